"""The pipeline's methods and the trainers' on-the-fly copies of them must agree: the softmax mix of the
retrieved captions (`optimize --method retrieve` vs trainers.data.retrieve_features) and LAFITE's perturb
(pipeline.optimize_methods.perturb vs trainers.data.perturb). An edit to one twin alone fails here."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.features import fixed_rows


def test_the_retrieve_mix_is_the_same_in_the_pipeline_and_the_trainers(ran_project):
    from trainers.data import read_embed, retrieve_features

    cache = ran_project / "cache"
    args = ["optimize", "--variant", "mix", "--method", "retrieve", "--tau-r", "0.05"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_embed(cache)
    trainers_h0, _ = retrieve_features(rows, tau_r=0.05)
    for shard in rows.shards:
        table = pq.read_table(cache / "optimize-mix" / f"{shard:05d}.parquet")
        where = {k: i for i, k in enumerate(rows.keys)}
        idx = [where[k] for k in table["key"].to_pylist()]
        pipeline_h0 = fixed_rows(table["pseudo_txt"], rows.clip.dim, np.float32, "nan")[0]
        np.testing.assert_allclose(pipeline_h0, trainers_h0[idx], atol=2e-3)  # float16 storage


def test_perturb_is_the_same_in_the_pipeline_and_the_trainers():
    from pipeline.optimize_methods import perturb as pipeline_perturb
    from trainers.data import perturb as trainers_perturb

    rng = np.random.default_rng(0)
    f = rng.standard_normal((17, 64)).astype(np.float32)
    noise = rng.standard_normal((17, 64)).astype(np.float32)
    for xi in (0.0, 0.5, 3.0):
        ours = pipeline_perturb(torch.from_numpy(f), torch.from_numpy(noise), xi).numpy()
        np.testing.assert_allclose(ours, trainers_perturb(f, noise, xi), atol=1e-6)
