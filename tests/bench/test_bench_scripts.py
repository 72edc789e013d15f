"""The benchmark scripts' plumbing: CSV rows kept aligned, and the contrastive sweep on a CPU.

No timing is asserted (speed targets are checked by running the scripts, see BENCHMARKS.md); these
tests make sure the scripts run, write what they claim, and reject bad options.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts put benchmarks/ on sys.path for `common`
    return module


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    load_script("bench_contrastive")
    common = sys.modules["common"]
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_append_rows_keeps_old_rows_when_columns_grow(results_dir):
    from common import append_rows

    append_rows("demo", [{"a": 1, "b": 2}])
    append_rows("demo", [{"b": 4, "a": 3}])  # same columns, other order: plain append
    path = append_rows("demo", [{"a": 5, "b": 6, "c": 7}])  # a new column: rewrite with the union
    header, rows = read_rows(path)
    assert header == ["a", "b", "c"]
    assert [(r["a"], r["b"], r["c"]) for r in rows] == [("1", "2", ""), ("3", "4", ""), ("5", "6", "7")]
    append_rows("demo", [{"a": 8, "b": 9}])  # fewer columns than the file: appended, blank cell
    assert read_rows(path)[1][-1] == {"a": "8", "b": "9", "c": ""}
    assert not list(results_dir.glob("*.tmp"))


def test_contrastive_sweep_on_cpu_writes_rows(results_dir, capsys):
    bench = load_script("bench_contrastive")
    bench.main(
        ["--device", "cpu", "--sizes", "64,32", "--dim", "16", "--impls", "chunked,naive", "--reps", "1"]
    )
    header, rows = read_rows(results_dir / "contrastive.csv")
    assert {"median_ms", "tflops", "peak_mem_gib", "work_mem_gib", "config", "commit", "device"} <= set(
        header
    )
    assert [(r["impl"], r["dtype"], r["N"]) for r in rows] == [
        (impl, dtype, n) for n in ("32", "64") for impl in ("chunked", "naive") for dtype in ("bf16", "fp32")
    ]
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    assert "triton rows skipped" in capsys.readouterr().out


def test_contrastive_rejects_bad_options():
    bench = load_script("bench_contrastive")
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "no_such_field=1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "num_warps=eight"])
    assert bench.parse_args(["--set", "num_warps=4,fwd_groups=8"]).overrides == {
        "num_warps": 4,
        "fwd_groups": 8,
    }
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--device", "cpu", "--impls", "cublas"])


def test_bench_train_runs_the_gan_and_dispatches_ldm_and_dalle(results_dir, capsys):
    bench = load_script("bench_train")
    bench.main(["--device", "cpu", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--no-csv"])
    assert "synthetic" in capsys.readouterr().out
    ldm_args = [
        "--device",
        "cpu",
        "--batch",
        "2",
        "--sample-batch",
        "2",
        "--reps",
        "1",
        "--sample-steps",
        "2",
    ]
    bench.main(["--model", "ldm", *ldm_args, "--no-csv"])
    out = capsys.readouterr().out
    assert "VAE encode + DiT step" in out and "2 Euler steps" in out
    dalle_args = ["--device", "cpu", "--size", "tiny", "--dvae-size", "tiny", "--batch", "2"]
    bench.main(
        ["--model", "dalle", *dalle_args, "--sample-batch", "2", "--reps", "1", "--h-dim", "16", "--no-csv"]
    )
    out = capsys.readouterr().out
    assert "tokens from the token cache" in out and "sample: KV cache" in out
    assert not list(results_dir.glob("*.csv"))  # --no-csv wrote nothing


def test_optimize_whole_stage_and_core_on_cpu(results_dir, tmp_path):
    bench = load_script("bench_optimize")
    args = ["--device", "cpu", "--n", "96", "--batch-size", "64", "--shard-size", "64", "--steps", "2"]
    args += ["--captions", "120", "--clusters", "6", "--dim", "16", "--k", "4", "--cache-dir", str(tmp_path)]
    bench.main(args)
    _, rows = read_rows(results_dir / "optimize.csv")
    assert [(r["mode"], r["method"]) for r in rows] == [
        ("stage", "retrieve"),
        ("stage", "optimize"),
        ("core", "retrieve"),
        ("core", "optimize"),
    ]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    kept = tmp_path / "bench-optimize-96"  # --cache-dir keeps the cache: two shards, all optimised
    assert sorted(p.name for p in (kept / "optimize").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    with pytest.raises(SystemExit, match="exists"):  # and never builds over an existing folder
        bench.main(args)
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "stage,everything"])


def test_parquet_writers_compared(results_dir):
    bench = load_script("bench_parquet")
    bench.main(["--n", "300", "--dim", "16", "--reps", "1"])
    _, rows = read_rows(results_dir / "parquet.csv")
    assert [r["writer"] for r in rows] == ["previous: zstd + dictionary", "write_parquet_atomic"]
    assert all(float(r["read_s"]) > 0 and float(r["size_mb"]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        bench.main(["--reps", "0"])


def test_clip_sweep_writes_a_row_per_arm_and_rejects_unknown_arms(results_dir):
    bench = load_script("bench_clip")
    rows = bench.main(["--arms", "tiny-g1,default", "--steps", "2", "--pretrain-n", "12", "--eval-n", "8"])
    assert [r["arm"] for r in rows] == ["tiny-g1", "default"]
    assert rows[1]["model"] == "lafite-rn32" and rows[1]["contrast_group"] == 1  # the default recipe
    assert rows[0]["caption_style"] == "full" and rows[1]["caption_style"] == "partial"
    fields, written = read_rows(results_dir / "clip.csv")
    assert len(written) == 2 and {"shape", "colour", "size", "position", "object_2_shape"} <= set(fields)
    assert {"cos_image_own_caption", "gap_vector", "temperature"} <= set(fields)
    assert all(-1 <= float(r["cos_image_own_caption"]) <= 1 for r in written)
    with pytest.raises(SystemExit):
        bench.main(["--arms", "vit-huge"])


def test_status_verify_cost_rows(results_dir):
    bench = load_script("bench_status")
    rows = bench.verify_rows(shards=3, gigabytes=0.003, cold=False)
    warm = [r for r in rows if r["what"].endswith("(warm)")]
    assert [r["what"].split(" (")[0] for r in warm] == [
        "hash every output in-process, floor",
        "pipeline status --verify minus status",
    ]
    assert all(r["gb"] > 0 and isinstance(r["s_per_gb"], float) for r in rows)


def test_ddp_rate_leaves_out_what_came_before_the_first_logged_step(tmp_path):
    bench = load_script("bench_ddp")
    metrics = tmp_path / "metrics.jsonl"
    # batch 4: 10 steps in 2 s (a slow start), then 20 more steps in 1 s: 80 images/s from step 10 on
    lines = [{"step": 10, "loss": 1.0, "images_per_s": 40 / 2.0}, {"step": 30, "images_per_s": 120 / 3.0}]
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert bench.steady_rate(metrics, 4) == pytest.approx(80.0)


def test_bench_train_times_whole_runs_at_one_and_two_processes(results_dir, capsys):
    bench = load_script("bench_train")
    bench.main(["--nproc", "1,2", "--steps", "20", "--images", "64", "--batch-size", "8"])
    _, rows = read_rows(results_dir / "ddp.csv")
    assert [(r["model"], r["nproc"], r["batch"]) for r in rows] == [("gan", "1", "8"), ("gan", "2", "8")]
    assert rows[0]["scaling"] == "1.00" and float(rows[1]["images_per_s"]) > 0
    assert "efficiency" in capsys.readouterr().out


def test_bench_sizes_prints_a_row_per_family_at_the_tiny_sizes(results_dir, capsys):
    bench = load_script("bench_sizes")
    families = ["gan", "vae", "ldm", "dvae", "dalle", "clip"]
    args = ["--families", ",".join(families), "--sizes", "tiny", "--steps", "1", "--batch", "4", "--no-csv"]
    rows = bench.main([*args, "--in-process"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["family", "size"])
    table = [line.split() for line in lines[header + 1 :] if line.strip()]
    assert [(cells[0], cells[1]) for cells in table] == [(f, "tiny") for f in families]
    assert "ESTIMATE" in out
    assert all(float(r["gflop_step"]) > 0 and float(r["cpu_s_step"]) > 0 for r in rows)  # both counted
    assert not list(results_dir.glob("*.csv"))  # --no-csv wrote nothing
    with pytest.raises(SystemExit):
        bench.main(["--families", "gan,diffusion", "--no-csv"])


def test_bench_sizes_runs_a_row_per_interpreter_and_reports_one_out_of_memory():
    bench = load_script("bench_sizes")
    case = bench.Case("dvae", "tiny", 32, 4, "")
    row = bench.run_isolated(case, bench.parse_args(["--steps", "1"]))
    assert row["status"] == "ok" and row["steps"] == 1 and float(row["peak_rss_gib"]) > 0
    failed = bench.run_isolated(case, bench.parse_args(["--steps", "1", "--max-memory-gib", "1e-6"]))
    assert failed["status"].startswith("out of memory") and failed["size"] == "tiny"


def test_bench_sizes_weights_the_phases_of_a_step():
    """The GAN's R1 step is one of 16: FLOPs (and seconds) are the phases' weighted mean; a warm-up step
    over --max-seconds-per-step is reported untimed."""
    bench = load_script("bench_sizes")
    import torch

    n = {"size": 8}
    a = torch.ones(32, 32)

    def step() -> None:
        k = n["size"]
        a[:k, :k] @ a[:k, :k]  # 2 k^3 FLOPs

    phases = [(1 / 16, lambda: n.update(size=32)), (15 / 16, lambda: n.update(size=8))]
    m = bench.measure(bench.Bench(step, 0, "", phases), steps=2, max_seconds=60.0)
    assert m["flops"] == pytest.approx((2 * 32**3 + 15 * 2 * 8**3) / 16)
    assert m["timed"] == 2 and m["seconds"] > 0
    assert bench.measure(bench.Bench(step, 0, "", phases), steps=2, max_seconds=0.0)["timed"] == 0
