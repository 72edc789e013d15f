"""Adding a pseudo-feature method is its module and one line in methods/registry.py: a toy method (the
plain mean of the k retrieved captions), registered with that one line, is run, keyed, judged up to date
and read back by `pipeline optimize` and `pipeline status` with no other change."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from cli.pipeline import app
from methods.method import Batch, Method
from methods.registry import METHODS


def _mean_of_neighbours(f, batch: Batch, hp) -> tuple:
    import torch.nn.functional as F

    weights = batch.valid.float()  # [B, K]: every usable neighbour counts the same
    h = F.normalize((weights[:, :, None] * batch.t_k).sum(dim=1), dim=1)  # [B, D]
    return h, h, 0.0


MEAN = Method(
    "mean", "the plain mean of the k retrieved captions' features", keyed=(), features=_mean_of_neighbours
)


def _pseudo(cache, stage):
    rows = [pq.read_table(p) for p in sorted((cache / stage).glob("*.parquet"))]
    keys = [k for t in rows for k in t.column("key").to_pylist()]
    feats = np.concatenate([np.stack(t.column("pseudo_txt").to_numpy(zero_copy_only=False)) for t in rows])
    return dict(zip(keys, feats.astype(np.float32), strict=True))


def test_a_registered_toy_method_is_run_keyed_and_judged_by_pipeline_optimize(ran_project, monkeypatch):
    cli = CliRunner()
    refused = cli.invoke(app, ["optimize", "--method", "mean", "--variant", "mean"])
    assert refused.exit_code == 2 and "--method must be one of" in refused.output  # not registered yet

    monkeypatch.setitem(METHODS, "mean", MEAN)  # the one registry line
    made = cli.invoke(app, ["optimize", "--method", "mean", "--variant", "mean"])
    assert made.exit_code == 0, made.output
    manifest = json.loads(
        next((ran_project / "cache" / "optimize-mean" / "_manifests").glob("*.json")).read_text()
    )
    assert manifest["params"] == {"method": "mean"}  # keyed on what the method names, nothing else
    assert "0 shard(s) made" in cli.invoke(app, ["optimize", "--method", "mean", "--variant", "mean"]).output
    status = cli.invoke(app, ["status"])
    assert status.exit_code == 0 and "optimize-mean" in status.output

    # the toy's features are retrieve's softmax mix at a temperature so high that every weight is equal
    flat = cli.invoke(app, ["optimize", "--method", "retrieve", "--tau-r", "1e9", "--variant", "flat"])
    assert flat.exit_code == 0, flat.output
    mean, uniform = (
        _pseudo(ran_project / "cache", "optimize-mean"),
        _pseudo(ran_project / "cache", "optimize-flat"),
    )
    assert mean.keys() == uniform.keys() and len(mean) > 0
    for key, h in mean.items():
        np.testing.assert_allclose(h, uniform[key], atol=2e-3)
