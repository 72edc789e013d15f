"""The trainers' on-the-fly conditions call the pipeline's own methods (methods/): the
trainers' `retrieve` features equal `pipeline optimize --method retrieve` outputs to float16 precision.
(`perturb` has one implementation too; its noise is drawn per epoch by the loader and per shard by the
stage, so the outputs differ by design.)"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from cli.pipeline import app
from feature_cache.features import fixed_rows


def test_the_retrieve_mix_is_the_same_in_the_pipeline_and_the_trainers(ran_project):
    from feature_cache.embed_rows import read_embed
    from trainers.data.conditions import retrieve_features

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
