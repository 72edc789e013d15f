"""`trainers eval`: how good are a generator's images for a set of prompts?

Pure core: `evaluate(config, generate, info)` takes the generator as a callable,
`generate(cond float32 [N, D], seed) -> uint8 [N, 3, H, W]` (what `trainers.families.load.load_generator`
returns), so tests can pass fakes; only the CLI command loads a checkpoint.

Metrics, on `n` generated images (prompt i mod len(prompts) for image i) and `n` real cache images, each
with its reference under the same name plus `_real` (what real images score) or `_chance`:

- `fid`: Frechet distance between generated and real images. Offline the features are the cache's CLIP
  image embeddings (`fid_features: "clip:<model>"`, clean-fid's `frechet_distance` on their means and
  covariances); when clean-fid's Inception weights are already on disk (`--inception FILE` or clean-fid's
  own download location, `/tmp/inception-2015-12-05.pt`) the Inception FID is computed too, with
  clean-fid's resizer, and becomes `fid` (`fid_features: "inception"`). Nothing is ever downloaded.
  CLIP-FID values are on another scale than Inception FID: compare them only with each other, on the same
  cache (the printed line says which: "FID (CLIP features)"). `fid_real` (and `fid_clip_real`,
  `fid_inception_real`): the same FID between two disjoint halves of the real images (`n_real_halves`),
  what real images score against real images. `fid_dim`: the features' dimension; with fewer than
  FID_IMAGES_PER_DIM real images per dimension the printed line says over how many real images, and a
  note that the FID is biased upwards.
- `clip_score`: mean of max(100 * cos(image feature, prompt text feature), 0) with the cache's CLIP
  (torchmetrics' convention); `clip_score_real` is the same for real images and their own captions.
- `attribute_accuracy`: only on a cache of the synthetic world (its images carry world labels:
  `eval_prompts.world_labels`), the probe (`trainers.probe.probe`) reads every generated image and is scored
  against the objects its prompt states (`world.attribute_precision.caption_objects`); split into
  prompts naming a held-out colour-shape pair (never in an image) and the rest. Each has its `..._chance`:
  uniform guessing on the same prompts (`attribute_chance`, which depends on `prompts.by_objects`).
  `attribute_accuracy_real` scores real cache images against their own labels: the instrument's ceiling
  on this cache. `attributes` says whether they were measured and, if not, why (`why_not`): on any other
  cache no probe is trained or used and every attribute key is None.

With `rerank: N` > 1 (`--rerank N`) the same metrics are measured again, under `rerank` in eval.json, on
the best of N candidates per image by CLIP (`trainers.eval.rerank`; candidate 0 is the plain image): `fid`,
`fid_clip`, `fid_inception`, `clip_score` (beside `clip_score_candidates`, what one un-ranked draw scores
on average over all candidates), the three attribute accuracies, `kept_first` (the share of images whose
plain draw won) and `candidates` (N); their references are the plain ones (same prompts, same real
images). The plain metrics and keys are as without it (`seconds` adds `rerank`). CLIP score favours the
re-ranked images by construction (the same CLIP chose them); FID and attribute accuracy do not.

Default prompts (`eval_prompts.default_prompts`): on a world cache, synthetic-world captions from the
synth caption generator with a random stream of its own (so they are independent of any corpus), starting
with one prompt per HELD_OUT_PAIRS pair; on any other cache, a seeded draw of its own captions, or, without
captions, synthetic captions recorded as placeholders (`prompts.source`).
Outputs: `OUT/eval.json` and `OUT/grid.png` (the first 64 images, 8 per row; prompts in
`OUT/grid_prompts.txt`, row-major); with re-ranking also `OUT/grid_rerank.png`, the same cells re-ranked.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from manifests import write_bytes_atomic, write_json_atomic
from trainers.eval.config import EvalConfig

# The helpers live in their own modules; callers import them from here too (cli.trainers, compare_report).
from trainers.eval.features import (
    clip_image_features,
    clip_score,
    clip_text_features,
    fid_label,
    frechet,
    inception_features,
    inception_weights,
    load_inception,
    real_halves_fid,
)
from trainers.probe.prompts import (
    ATTRIBUTES,
    attribute_chance,
    attributes_named,
    default_prompts,
    names_held_out_pair,
    objects_named,
    read_prompts,
    synthetic_prompts,  # noqa: F401 (re-exported: compare_report, the tests)
    world_labels,
)

REAL_STREAM = 11  # numpy stream id of the real-image draw
GRID_COLUMNS = 8
FID_KEYS = ("fid", "fid_real", "fid_clip", "fid_clip_real", "fid_inception", "fid_inception_real")
# FID's small-sample bias falls as d/n (Chong & Forsyth 2020, "Effectively Unbiased FID"). Measured here
# between two samples of one Gaussian with total variance 1 (as unit-norm CLIP features), d = 64 and 256:
# 0.06 at n = 5 d, 0.03 at 10 d, 0.016 at 20 d, as large as the gaps between conditions in the README's
# CLIP-feature FIDs (0.20 vs 0.24) below 10 d. There the count is printed beside the FID, with a note.
FID_IMAGES_PER_DIM = 10
NO_WORLD_LABELS = "the cache's images have no synthetic-world labels"
NO_WORLD_OBJECTS = "no prompt names a synthetic-world object"

Generate = Callable[[Any, int], Any]  # (cond float32 [N, D], seed) -> uint8 [N, 3, H, W]


# ---------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------


def batch_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0] & 0x7FFFFFFF)


def generate_images(generate: Generate, cond: np.ndarray, config: EvalConfig, progress=None):
    """uint8 [N, 3, H, W] from the generator, batch by batch, checked."""
    import torch

    from trainers.eval.rerank import as_images

    out = []
    for start in range(0, len(cond), config.batch_size):
        chunk = torch.from_numpy(
            np.ascontiguousarray(cond[start : start + config.batch_size], dtype=np.float32)
        )
        out.append(as_images(generate(chunk, batch_seed(config.seed, start)), len(chunk)))
        if progress:
            progress(len(chunk))
    return torch.cat(out)


def rerank_images(generate: Generate, cond: np.ndarray, config: EvalConfig, bundle, plain, progress=None):
    """The best of `config.rerank` candidates per image (trainers.eval.rerank), batch by batch as
    `generate_images`: each batch with its own seed, so candidate 0 is `plain`'s image, not drawn again."""
    import torch

    from trainers.eval.rerank import Reranked, rerank

    parts = []
    for start in range(0, len(cond), config.batch_size):
        stop = start + config.batch_size
        chunk = torch.from_numpy(np.ascontiguousarray(cond[start:stop], dtype=np.float32))
        seed = batch_seed(config.seed, start)
        parts.append(
            rerank(generate, chunk, bundle, config.rerank, seed, first=plain[start:stop], progress=progress)
        )
    return Reranked.concat(parts)


def check_clip(info: dict[str, Any], cache_clip) -> list[str]:
    """The generator's conditions must live in the cache's CLIP space: refuse a different CLIP; warn
    (returned) when it cannot be checked."""
    from core.clip import clip_identity

    model, pretrained = info.get("clip_model"), info.get("clip_pretrained")
    if model is None:
        return ["the generator's info names no CLIP; assuming it was trained on this cache's"]
    try:
        identity = clip_identity(model, pretrained or None)
    except ConfigError as e:
        return [f"cannot check the generator's CLIP ({e}); using the cache's"]
    if identity != cache_clip.identity:
        raise ConfigError(
            f"the checkpoint was trained on features of CLIP {model} / {pretrained!r}, but --cache was "
            f"made with {cache_clip.clip_model} / {cache_clip.clip_pretrained!r}; pass the cache the run "
            "was trained on"
        )
    return []


def paired_record(info: dict[str, Any]) -> dict[str, Any] | None:
    """What the checkpoint says about real-caption pairs used in training (few-shot runs), if anything."""
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    found = {}
    for key in ("paired_fraction", "paired_limit", "paired_count", "paired_pool"):
        for source in (info, config):
            if key in source and source[key] is not None:
                found[key] = source[key]
                break
    return found or None


ACCURACY_SPLITS = ("", "_held_out_pairs", "_seen_pairs")


def attribute_accuracies(probe, images, targets: list[list[dict[str, str]]]) -> dict[str, Any]:
    """`attribute_accuracy{split}` of these images (the probe's reading scored against their prompts'
    objects) and its `_chance`, for all prompts and the splits naming / not naming a held-out pair; None
    where no prompt of a split names objects."""
    from trainers.probe.probe import score_objects, summarise

    result: dict[str, Any] = {}
    for name in ACCURACY_SPLITS:
        result[f"attribute_accuracy{name}"] = result[f"attribute_accuracy{name}_chance"] = None
    predictions = probe.predict(images)
    result["attribute_accuracy"] = summarise(score_objects(predictions, targets))
    result["attribute_accuracy_chance"] = attribute_chance(targets)
    held = [names_held_out_pair(t) for t in targets]
    for name, keep in (("_held_out_pairs", held), ("_seen_pairs", [not h for h in held])):
        subset = [i for i, k in enumerate(keep) if k and targets[i]]
        if subset:
            sub_pred = {k: v[subset] for k, v in predictions.items()}
            sub_targets = [targets[i] for i in subset]
            result[f"attribute_accuracy{name}"] = summarise(score_objects(sub_pred, sub_targets))
            result[f"attribute_accuracy{name}_chance"] = attribute_chance(sub_targets)
    return result


def rerank_metrics(
    reranked,
    text: np.ndarray,
    real_feat: np.ndarray,
    *,
    inception=None,
    real_inception=None,
    device=None,
    probe=None,
    targets=None,
) -> dict[str, Any]:
    """eval.json's `rerank` block: the plain metrics' names, measured on the re-ranked images against the
    same real images and prompts (so their `_real` / `_chance` references are the plain ones)."""
    fid_clip = frechet(reranked.features, real_feat)
    fid_inception = None
    if inception is not None:
        fid_inception = frechet(inception_features(inception, reranked.images, device), real_inception)
    block: dict[str, Any] = {
        "candidates": int(reranked.scores.shape[1]),
        "fid": fid_inception if inception is not None else fid_clip,
        "fid_clip": fid_clip,
        "fid_inception": fid_inception,
    }
    for key in ("fid", "fid_clip", "fid_inception"):
        block[key] = None if block[key] is None else round(block[key], 4)
    block["clip_score"] = round(clip_score(reranked.features, text), 4)
    # What one un-ranked draw scores on average over every candidate: the gain is clip_score minus this.
    block["clip_score_candidates"] = round(float(np.mean(np.maximum(100.0 * reranked.scores, 0.0))), 4)
    block["kept_first"] = round(float(np.mean(reranked.chosen == 0)), 4)  # share kept the plain image
    for name in ACCURACY_SPLITS:
        block[f"attribute_accuracy{name}"] = None
    if probe is not None and targets and any(targets):
        accuracies = attribute_accuracies(probe, reranked.images, targets)
        block.update({k: v for k, v in accuracies.items() if not k.endswith("_chance")})
    return block


def evaluate(
    config: EvalConfig,
    generate: Generate,
    info: dict[str, Any] | None = None,
    *,
    probe=None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate, measure, write OUT/eval.json + OUT/grid.png; returns the eval.json dict."""
    from feature_cache.committed import describe_skipped
    from feature_cache.embed_rows import labels_of, read_embed
    from trainers.data.conditions import load_cache_clip
    from trainers.probe.config import ProbeConfig
    from trainers.probe.probe import cached_probe, load_probe, score_objects, summarise
    from trainers.runtime.runs import select_device
    from world.attribute_precision import caption_objects

    config.validate()
    info = dict(info or {})
    t0 = time.perf_counter()
    device = select_device(config.device)
    # The user's files first, so a bad one is refused before any image is generated.
    weights = inception_weights(config.inception)
    inception = None
    if weights is not None:
        flag = "--inception" if config.inception is not None else "--inception (clean-fid's download)"
        inception = load_inception(weights, device, flag)
    if probe is None and config.probe is not None:
        probe, probe_file = load_probe(config.probe, str(device)), config.probe
    else:
        probe_file = None
    rows = read_embed(config.cache, warn=False)
    notes = check_clip(info, rows.clip)
    if rows.skipped_shards:  # the real images are drawn from the committed rest
        skipped = describe_skipped({"embed": rows.skipped_shards})
        notes.append(f"real images drawn without {skipped}")
    bundle = load_cache_clip(rows.clip, str(device))

    # Attributes are measured only where the cache's own labels are the synthetic world's (world_labels).
    world = world_labels(rows)
    if config.prompts is not None:
        unique, source, max_objects = read_prompts(config.prompts), str(config.prompts), None
    else:
        unique, source, max_objects = default_prompts(rows, config.n, config.seed, world)
    prompts = [unique[i % len(unique)] for i in range(config.n)]
    targets = [caption_objects(p) for p in prompts] if world["measurable"] else []
    text_unique = clip_text_features(bundle, unique)  # [P, D]
    text = text_unique[np.arange(config.n) % len(unique)]  # [N, D]
    if info.get("h_dim") not in (None, text.shape[1]):
        raise ConfigError(
            f"the generator takes {info['h_dim']}-d conditions but the cache's CLIP gives {text.shape[1]}"
        )

    generated = generate_images(generate, text, config, progress)  # uint8 [N, 3, H, W]
    t_generate = time.perf_counter()
    reranked = None
    if config.rerank > 1:  # best of config.rerank per image; candidate 0 is `generated`'s
        reranked = rerank_images(generate, text, config, bundle, generated, progress)
    t_rerank = time.perf_counter()

    n_real = min(config.n, len(rows))
    real_rows = np.sort(
        np.random.default_rng([config.seed, REAL_STREAM]).choice(len(rows), n_real, replace=False)
    )
    real = rows.pixels(real_rows)  # uint8 [n_real, 3, S, S]
    gen_feat = clip_image_features(bundle, generated)  # [N, D]
    real_feat = clip_image_features(bundle, real)  # [n_real, D]
    fid_clip = frechet(gen_feat, real_feat)
    fid_clip_real = real_halves_fid(real_feat)
    result: dict[str, Any] = {
        "checkpoint": str(config.checkpoint),
        "cache": str(config.cache),
        "n": config.n,
        "n_real": n_real,
        "seed": config.seed,
        "prompts": {
            "source": source,
            "unique": len(unique),
            "max_objects": max_objects,
            "naming_held_out_pairs": (
                sum(names_held_out_pair(caption_objects(p)) for p in unique) if world["measurable"] else None
            ),
            # how many of the n prompts name k objects: what the position chance depends on (k/5 each)
            "by_objects": objects_named(targets) if world["measurable"] else None,
            # how many of the n prompts name each attribute: its accuracy is counted on those alone
            "by_attribute": attributes_named(targets) if world["measurable"] else None,
        },
        "image_size": {"generated": int(generated.shape[-1]), "real": int(real.shape[-1])},
        "clip": {"clip_model": rows.clip.clip_model, "clip_pretrained": rows.clip.clip_pretrained},
    }
    # Each metric has its reference under its own name + `_real`: the real images' value (FID: two
    # disjoint halves of them, n_real_halves); attribute accuracies have `_chance` on the same prompts.
    fid_inception = fid_inception_real = real_inception = None
    if inception is not None:
        real_inception = inception_features(inception, real, device)
        fid_inception = frechet(inception_features(inception, generated, device), real_inception)
        fid_inception_real = real_halves_fid(real_inception)
        result.update(fid=fid_inception, fid_real=fid_inception_real, fid_features="inception")
    else:
        result.update(fid=fid_clip, fid_real=fid_clip_real, fid_features=f"clip:{rows.clip.clip_model}")
    result.update(
        n_real_halves=[len(real_rows[0::2]), len(real_rows[1::2])],
        fid_clip=fid_clip,
        fid_clip_real=fid_clip_real,
        fid_inception=fid_inception,
        fid_inception_real=fid_inception_real,
    )
    for key in FID_KEYS:
        result[key] = None if result[key] is None else round(result[key], 4)
    result["fid_dim"] = int(real_inception.shape[1]) if inception is not None else int(real_feat.shape[1])
    if fid_n_is_small(n_real, result["fid_dim"]):  # n_real <= n: the smaller sample
        notes.append(
            f"n_real={n_real} is small for {result['fid_dim']}-d features: FID is biased upwards "
            f"(compare FIDs at equal n only; about {FID_IMAGES_PER_DIM * result['fid_dim']} images make "
            "the bias small)"
        )

    result["clip_score"] = round(clip_score(gen_feat, text), 4)
    real_captions = [rows.captions[int(r)] for r in real_rows]
    have = [i for i, c in enumerate(real_captions) if isinstance(c, str) and c.strip()]
    result["clip_score_real"] = (
        round(clip_score(real_feat[have], clip_text_features(bundle, [real_captions[i] for i in have])), 4)
        if have
        else None
    )

    for name in ACCURACY_SPLITS:
        result[f"attribute_accuracy{name}"] = result[f"attribute_accuracy{name}_chance"] = None
    result["attribute_accuracy_real"] = result["probe"] = None
    why_not = None if any(targets) else NO_WORLD_OBJECTS if world["measurable"] else NO_WORLD_LABELS
    result["attributes"] = {
        "measured": why_not is None,
        "why_not": why_not,
        "labelled_images": world["labelled"],  # of a seeded sample of the cache's rows
        "sampled_images": world["sampled"],
    }
    if why_not is None:
        if probe is None:
            probe_config = ProbeConfig(device=config.device)
            probe, probe_file = cached_probe(config.cache, probe_config, image_size=int(real.shape[-1]))
        result.update(attribute_accuracies(probe, generated, targets))
        real_labels = [(labels_of(rows, int(r)) or {}).get("objects") for r in real_rows]
        labelled = [i for i, objs in enumerate(real_labels) if objs]
        if labelled:
            real_pred = probe.predict(real[labelled])
            result["attribute_accuracy_real"] = summarise(
                score_objects(real_pred, [real_labels[i] for i in labelled])
            )
        result["probe"] = {
            "file": str(probe_file) if probe_file else None,
            "image_size": probe.config.image_size,
            "held_out_accuracy": probe.accuracy.get("one_object"),
        }
    if reranked is not None:
        result["rerank"] = rerank_metrics(
            reranked,
            text,
            real_feat,
            inception=inception,
            real_inception=real_inception,
            device=device,
            probe=probe,
            targets=targets,
        )

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.grid:
        k = min(config.grid, len(generated))
        write_grid(out / "grid.png", generated[:k])
        write_bytes_atomic(out / "grid_prompts.txt", "".join(p + "\n" for p in prompts[:k]).encode())
        result["grid"] = {"file": str(out / "grid.png"), "images": k, "columns": min(GRID_COLUMNS, k)}
        if reranked is not None:  # the same cells, each the best of its candidates
            write_grid(out / "grid_rerank.png", reranked.images[:k])
            result["rerank"]["grid"] = {"file": str(out / "grid_rerank.png"), "images": k}
    result["paired"] = paired_record(info)
    result["training_data"] = info.get("data")  # the rows the run trained on (LoaderInfo.record)
    result["generator"] = {
        k: v for k, v in info.items() if k in ("kind", "step", "size", "resolution", "h_dim")
    }
    result["notes"] = notes
    result["seconds"] = {"generate": round(t_generate - t0, 2), "total": round(time.perf_counter() - t0, 2)}
    if reranked is not None:
        result["seconds"]["rerank"] = round(t_rerank - t_generate, 2)
    result["device"] = str(device)
    _check_finite(result)
    if reranked is not None:
        _check_finite(result["rerank"], notes=result["notes"], prefix="rerank.")
    write_json_atomic(out / "eval.json", result)
    return result


def _check_finite(result: dict[str, Any], notes: list[str] | None = None, prefix: str = "") -> None:
    notes = result.setdefault("notes", []) if notes is None else notes
    for key in (*FID_KEYS, "clip_score", "clip_score_real"):
        value = result.get(key)
        if value is not None and not math.isfinite(value):
            notes.append(f"{prefix}{key} is not finite (degenerate images?)")
            result[key] = None


def write_grid(path: Path, images) -> Path:
    """uint8 [K, 3, H, W] -> a PNG grid, 8 per row, 2 px gaps."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=GRID_COLUMNS, padding=2, pad_value=255)  # [3, H', W'] uint8
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    write_bytes_atomic(Path(path), buffer.getvalue())
    return Path(path)


def fid_n_is_small(n_real: int, dim: int | None) -> bool:
    """Too few real images for a FID of `dim`-d features to be read without its count (FID_IMAGES_PER_DIM)."""
    return dim is not None and n_real < FID_IMAGES_PER_DIM * dim


def describe(result: dict[str, Any]) -> str:
    """One line: each number with its reference, e.g. `FID (CLIP features) 0.09 (real halves 0.05)` (with
    `over N real images` when N is small for the features), or why attributes were not measured; with
    re-ranking, the re-ranked numbers after it."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def attributes(acc: dict[str, Any], with_references: bool) -> str:
        chance = result.get("attribute_accuracy_chance") or {}
        real = result.get("attribute_accuracy_real") or {}
        return ", ".join(
            f"{a} {acc[a]:.2f}"
            + (f" (chance {number(chance.get(a))}, real {number(real.get(a))})" if with_references else "")
            for a in ATTRIBUTES
            if acc.get(a) is not None
        )

    parts = attributes(result.get("attribute_accuracy") or {}, True)
    why_not = (result.get("attributes") or {}).get("why_not")
    n_real = result.get("n_real")
    over = f" over {n_real} real images" if fid_n_is_small(n_real or 0, result.get("fid_dim")) else ""
    line = (
        f"eval: n={result['n']}, {fid_label(result.get('fid_features'))} {result['fid']}{over} "
        f"(real halves {result.get('fid_real')}), "
        f"CLIP score {result['clip_score']} (real {result.get('clip_score_real')})"
        + (f", attributes {parts}" if parts else f", attributes: not measured ({why_not})" if why_not else "")
    )
    rerank = result.get("rerank")
    if rerank:
        parts = attributes(rerank.get("attribute_accuracy") or {}, False)
        line += (
            f"; best of {rerank['candidates']} by CLIP: FID {rerank['fid']}, "
            f"CLIP score {rerank['clip_score']} (one draw {rerank['clip_score_candidates']})"
            + (f", attributes {parts}" if parts else "")
        )
    return line
