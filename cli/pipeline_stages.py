"""`pipeline retrieve` and `pipeline optimize`, the commands of stages 2 and 3 (their cores:
pipeline/retrieve/stage.py, pipeline/optimize/stage.py); registered on the `pipeline` app in cli/pipeline.py.
Each
option defaults to its config field's (pipeline/retrieve/config.py, pipeline/optimize/config.py)."""

from __future__ import annotations

import json
import warnings
from typing import Annotated

import typer

from cli.common import (
    DEVICE_HELP,
    CacheOpt,
    DeviceOpt,
    DryRunPlanOpt,
    ForceOpt,
    WaitOpt,
    given_options,
    user_errors,
)
from core.progress import progress_bar
from feature_cache.lock import writing
from methods.registry import METHODS
from pipeline.optimize.config import OptimizeConfig
from pipeline.retrieve.config import CaptionsConfig, IndexConfig, RetrieveConfig, SearchConfig


@user_errors
def retrieve(
    captions: Annotated[
        list[str] | None,
        typer.Option(
            "--captions",
            help="Caption corpus: .txt (one per line), .jsonl, .csv, .tsv or .parquet files, plain or gzip; "
            "folders and globs; repeat for several.",
            show_default=False,
        ),
    ] = None,
    cache: CacheOpt = CaptionsConfig.cache,
    caption_column: Annotated[
        str, typer.Option("--caption-column", help="Text column of .jsonl/.csv/.tsv/.parquet corpora.")
    ] = CaptionsConfig.caption_column,
    caption_shard_size: Annotated[
        int, typer.Option("--caption-shard-size", help="Captions per captions/ shard.")
    ] = CaptionsConfig.shard_size,
    index: Annotated[
        str,
        typer.Option(
            "--index",
            help="auto (Flat below 50k captions, else IVF), a FAISS factory string (IVF4096,Flat) or "
            "gpu-flat (exact fp16 matmul top-k on a CUDA GPU).",
        ),
    ] = IndexConfig.index,
    k: Annotated[int, typer.Option("--k", help="Captions retrieved per image.")] = IndexConfig.k,
    target_recall: Annotated[
        float, typer.Option("--target-recall", help="recall@k that IVF nprobe is tuned to reach.")
    ] = IndexConfig.target_recall,
    max_index_memory: Annotated[
        str, typer.Option("--max-index-memory", help="Index memory budget (8GB, 512MiB); auto fits it by PQ.")
    ] = "",  # no limit: parse_size reads it as IndexConfig.max_index_memory's 0
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Captions per CLIP forward pass.")
    ] = CaptionsConfig.batch_size,
    query_batch_size: Annotated[
        int, typer.Option("--query-batch-size", help="Image queries per index search call.")
    ] = SearchConfig.batch_size,
    device: Annotated[
        str, typer.Option("--device", help=f"CLIP device: {DEVICE_HELP}")
    ] = CaptionsConfig.device,
    force: Annotated[
        bool, typer.Option("--force", help="Redo every step; accept captions encoded by another CLIP.")
    ] = CaptionsConfig.force,
    wait: WaitOpt = 0.0,
    dry_run: DryRunPlanOpt = False,
) -> None:
    """Top-k captions per image: caption features (captions/), a FAISS index (index/), search (retrieve/).

    The CLIP is the embed stage's. Each step reruns only when stale: appended captions are the only
    ones encoded, a changed index re-searches every shard, a new embed shard is searched alone.
    """
    given = given_options(locals(), "captions", "wait", "dry_run")
    from pipeline.retrieve.stage import describe_retrieve, run_retrieve, summary_lines

    config = RetrieveConfig.from_options(captions=tuple(captions or ()), **given)
    if dry_run:
        typer.echo(json.dumps(describe_retrieve(config), indent=1))
        return
    with writing(cache, wait):
        result = run_retrieve(config, progress_bar)
    for warning in result.warnings:
        warnings.warn(warning, stacklevel=1)
    for line in summary_lines(result):
        typer.echo(line)


@user_errors
def optimize(
    cache: CacheOpt = OptimizeConfig.cache,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".",
        ),
    ] = OptimizeConfig.method,
    param: Annotated[
        str,
        typer.Option(
            "--param",
            help="optimize: weights (learn mixing logits over the k neighbours: stays among real "
            "caption features) or residual (h = normalize(h0 + delta)).",
        ),
    ] = OptimizeConfig.param,
    steps: Annotated[
        int, typer.Option("--steps", help="optimize: Adam steps per batch.")
    ] = OptimizeConfig.steps,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="optimize: images per batch, the contrastive negatives (clamped to the shard).",
        ),
    ] = OptimizeConfig.batch_size,
    tau: Annotated[float, typer.Option("--tau", help="optimize: InfoNCE temperature.")] = OptimizeConfig.tau,
    tau_r: Annotated[
        float, typer.Option("--tau-r", help="Softmax temperature over neighbour similarities (large: mean).")
    ] = OptimizeConfig.tau_r,
    proximity: Annotated[
        float, typer.Option("--proximity", help="optimize: weight of mean |h - h0|^2.")
    ] = OptimizeConfig.proximity,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="optimize: Adam learning rate.",
            show_default="0.1 for weights, 0.05/sqrt(D) residual",
        ),
    ] = OptimizeConfig.lr,
    xi: Annotated[
        float, typer.Option("--xi", help="perturb: noise scale relative to |f|.")
    ] = OptimizeConfig.xi,
    seed: Annotated[
        int, typer.Option("--seed", help="perturb noise and batch shuffle.")
    ] = OptimizeConfig.seed,
    backend: Annotated[
        str, typer.Option("--backend", help="Contrastive-loss kernel: auto, triton (CUDA) or torch.")
    ] = OptimizeConfig.backend,
    precision: Annotated[
        str, typer.Option("--precision", help="Loss-kernel inputs: auto (CUDA bf16, CPU fp32), fp32 or bf16.")
    ] = OptimizeConfig.precision,
    device: DeviceOpt = OptimizeConfig.device,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Re-hash this stage's outputs instead of trusting size and mtime."),
    ] = OptimizeConfig.verify,
    force: ForceOpt = OptimizeConfig.force,
    variant: Annotated[
        str,
        typer.Option(
            "--variant",
            help="Make a named variant beside the default one, in optimize-NAME/ (trainers read it with "
            "--condition optimize:NAME); '' is the default variant, optimize/.",
        ),
    ] = OptimizeConfig.variant,
    wait: WaitOpt = 0.0,
    dry_run: DryRunPlanOpt = False,
) -> None:
    """Pseudo text features per image: optimize/{i}.parquet (pseudo_txt, cos_init, cos_final) + stats.

    The method and its params are keyed: switching --method reruns this stage only, and a rerun with
    the same params does nothing. `--variant NAME` keeps several methods or params side by side, each
    with its own shards and manifests, so training on one never waits for restaging another.
    """
    given = given_options(locals(), "wait", "dry_run")
    from pipeline.optimize.stage import describe_plan, plan_optimize, report, run_optimize

    config = OptimizeConfig(**given)
    if dry_run:
        typer.echo(json.dumps(describe_plan(config, plan_optimize(config)), indent=1))
        return
    with writing(cache, wait), progress_bar(config.stage, total=None) as advance:
        result = run_optimize(config, advance)
    for line in report(result, config):  # what `pipeline run` prints too
        typer.echo(line)
