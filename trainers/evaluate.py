"""`trainers eval`: how good are a generator's images for a set of prompts?

Pure core: `evaluate(config, generate, info)` takes the generator as a callable,
`generate(cond float32 [N, D], seed) -> uint8 [N, 3, H, W]` (what `trainers.sample.load_generator`
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
  what real images score against real images.
- `clip_score`: mean of max(100 * cos(image feature, prompt text feature), 0) with the cache's CLIP
  (torchmetrics' convention); `clip_score_real` is the same for real images and their own captions.
- `attribute_accuracy`: on the synthetic world, the probe (`trainers.probe`) reads every generated image
  and is scored against the objects its prompt states (`pipeline.attribute_precision.caption_objects`);
  split into prompts naming a held-out colour-shape pair (never in an image) and the rest. Each has its
  `..._chance`: uniform guessing on the same prompts (`attribute_chance`). `attribute_accuracy_real`
  scores real cache images against their own labels: the instrument's ceiling on this cache.

Default prompts: synthetic-world captions from the synth caption generator with a random stream of its
own (so they are independent of any corpus), starting with one prompt per HELD_OUT_PAIRS pair.
Outputs: `OUT/eval.json` and `OUT/grid.png` (the first 64 images, 8 per row; prompts in
`OUT/grid_prompts.txt`, row-major).
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from manifests import write_bytes_atomic, write_json_atomic
from pipeline.errors import ConfigError, require_at_least

CLEANFID_INCEPTION = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid downloads it (Linux/macOS)
REAL_STREAM = 11  # numpy stream id of the real-image draw
GRID_COLUMNS = 8
ATTRIBUTES = ("shape", "colour", "size", "position")  # what the probe reads
FID_KEYS = ("fid", "fid_real", "fid_clip", "fid_clip_real", "fid_inception", "fid_inception_real")

Generate = Callable[[Any, int], Any]  # (cond float32 [N, D], seed) -> uint8 [N, 3, H, W]


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str  # what is evaluated (recorded in eval.json; the CLI loads the generator from it)
    cache: Path  # the feature cache the generator was trained on: its CLIP and its real images
    out: Path  # directory for eval.json, grid.png, grid_prompts.txt
    prompts: Path | None = None  # one prompt per line (# comments); default: synthetic-world prompts
    n: int = 1000  # images generated (and real images drawn from the cache, at most all of them)
    seed: int = 0  # prompts, generator noise and the real-image draw
    batch_size: int = 100  # images per generator call
    device: str = "auto"  # CLIP, probe and Inception device
    probe: Path | None = None  # a `trainers probe` file; default: trained once per cache in _trainers/
    inception: Path | None = None  # inception-2015-12-05.pt; default: clean-fid's location if present
    grid: int = 64  # images in grid.png

    def validate(self) -> None:
        require_at_least(
            ("--n", self.n, 2),
            ("--batch-size", self.batch_size, 1),
            ("--seed", self.seed, 0),
        )
        if self.grid < 0:
            raise ConfigError("--grid must be 0 or more")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ConfigError(f"--prompts {self.prompts}: file not found (one prompt per line)")
        if self.inception is not None and not Path(self.inception).is_file():
            raise ConfigError(
                f"--inception {self.inception}: file not found; download inception-2015-12-05.pt on a "
                "connected machine (clean-fid's URL) and pass its path, or leave --inception out "
                "for CLIP-feature FID"
            )
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


def synthetic_prompts(n: int, seed: int, max_objects: int = 2) -> list[str]:
    """n synthetic-world captions: one single-object prompt per held-out pair, then 1..max_objects object
    captions over every colour-shape pair (held-out ones included), from a random stream of their own."""
    from pipeline.labels import labels

    world = labels()
    rng = random.Random(f"trainers/eval/prompts/{seed}")
    prompts = []
    for colour, shape in world.held_out_pairs:
        obj = {
            "shape": shape,
            "colour": colour,
            "size": rng.choice(world.vocabulary["size"]),
            "position": rng.choice(world.vocabulary["position"]),
        }
        prompts.append(world.caption([obj], rng))
    all_pairs = [(c, s) for c in world.vocabulary["colour"] for s in world.vocabulary["shape"]]
    while len(prompts) < n:
        prompts.append(world.caption(world.sample_objects(rng, max_objects, pairs=all_pairs), rng))
    return prompts[:n]


def world_max_objects(rows, sample: int = 2000) -> int:
    """The most objects any of (a seeded sample of) the cache's labelled images has; 2 without labels.
    Prompts then ask for no more objects than the generator's world shows."""
    from trainers.embed_rows import labels_of

    pick = np.random.default_rng(0).permutation(len(rows))[:sample]
    counts = [len((labels_of(rows, int(r)) or {}).get("objects") or []) for r in pick]
    return max(counts, default=0) or 2


def read_prompts(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts {path}: cannot read it ({e})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in it (one per line)")
    return prompts


def names_held_out_pair(objects: list[dict[str, str]]) -> bool:
    from pipeline.labels import labels

    return any((o.get("colour"), o.get("shape")) in labels().held_out_pairs for o in objects)


# ---------------------------------------------------------------------------------------------------------
# Features and distances
# ---------------------------------------------------------------------------------------------------------


def frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (clean-fid's formula)."""
    from cleanfid.fid import frechet_distance

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def clip_image_features(bundle, pixels, batch_size: int = 256) -> np.ndarray:
    from pipeline.clip import encode_images

    return np.concatenate(
        [
            encode_images(bundle, pixels[i : i + batch_size]).cpu().numpy()
            for i in range(0, len(pixels), batch_size)
        ]
    )


def clip_text_features(bundle, texts: list[str], batch_size: int = 256) -> np.ndarray:
    from pipeline.clip import encode_texts

    return np.concatenate(
        [
            encode_texts(bundle, texts[i : i + batch_size]).cpu().numpy()
            for i in range(0, len(texts), batch_size)
        ]
    )


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """mean max(100 * cos, 0) over matched rows (both unit-norm)."""
    cos = np.sum(image_features * text_features, axis=1)
    return float(np.mean(np.maximum(100.0 * cos, 0.0)))


def inception_weights(explicit: Path | None) -> Path | None:
    """The local Inception weights to use, or None: never downloads."""
    if explicit is not None:
        return Path(explicit)
    return CLEANFID_INCEPTION if CLEANFID_INCEPTION.is_file() else None


def load_inception(weights: Path, device, flag: str = "--inception"):
    """clean-fid's TorchScript Inception from the file given (any name), as `features(x float [B, 3, 299,
    299] in 0..255) -> [B, 2048]`: clean-fid's InceptionV3W forward, which itself only loads a file named
    inception-2015-12-05.pt from a folder."""
    import torch

    from pipeline.torch_files import load_torchscript_file

    base = load_torchscript_file(weights, flag, expect="clean-fid's inception-2015-12-05.pt")
    if not isinstance(getattr(base, "layers", None), torch.nn.Module):
        raise ConfigError(
            f"{flag} {weights}: a TorchScript archive, but not clean-fid's Inception (no layers)"
        )
    layers = base.layers.to(device).eval()

    def features(x):
        return layers.forward((x - 128) / 128).view(x.shape[0], 2048)

    return features


def inception_features(model, pixels, device, batch_size: int = 50) -> np.ndarray:
    """clean-fid's "clean" mode: PIL bicubic resize to 299 per image, then `load_inception`'s model."""
    import torch
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    feats = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size].permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
            resized = np.stack([resize(img) for img in chunk]).transpose(0, 3, 1, 2)  # [B, 3, 299, 299]
            feats.append(model(torch.from_numpy(resized).float().to(device)).cpu().numpy())
    return np.concatenate(feats)


def real_halves_fid(real_features: np.ndarray) -> float | None:
    """FID between two disjoint halves of the real images (alternate rows of the seeded draw): what FID
    reads for real images, the floor a generator's FID is to be read against. Each half has n_real / 2
    images, so small-n bias puts it a little above the floor at n_real (FID is biased upwards)."""
    if len(real_features) < 4:
        return None
    return frechet(real_features[0::2], real_features[1::2])


def fid_label(fid_features: str | None) -> str:
    """'FID (CLIP features)' or 'FID (Inception features)': a CLIP-feature FID is on another scale."""
    return "FID (Inception features)" if fid_features == "inception" else "FID (CLIP features)"


def attribute_chance(targets: list[list[dict[str, str]]]) -> dict[str, float] | None:
    """The expected score of uniform guessing on these prompts' objects under the probe's rule
    (trainers.probe.score_objects): shape, colour, size: 1/|values| per named object; position: k/5 for a
    prompt naming k objects, since any k of the 5 slots count as seen; `all`: the product over the
    attributes an object names. Averaged over objects, as the accuracies are."""
    from trainers.probe import vocabulary

    vocab = vocabulary()
    scores: dict[str, list[float]] = {a: [] for a in (*ATTRIBUTES, "all")}
    for objects in targets:
        for obj in objects:
            guesses = {
                a: min(1.0, len(objects) / len(vocab[a])) if a == "position" else 1.0 / len(vocab[a])
                for a in ATTRIBUTES
                if obj.get(a) in vocab[a]
            }
            guesses["all"] = float(np.prod(list(guesses.values())))
            for a, value in guesses.items():
                scores[a].append(value)
    chance = {a: round(float(np.mean(v)), 4) for a, v in scores.items() if v}
    return chance or None


# ---------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------


def batch_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0] & 0x7FFFFFFF)


def generate_images(generate: Generate, cond: np.ndarray, config: EvalConfig, progress=None):
    """uint8 [N, 3, H, W] from the generator, batch by batch, checked."""
    import torch

    out = []
    for start in range(0, len(cond), config.batch_size):
        chunk = torch.from_numpy(
            np.ascontiguousarray(cond[start : start + config.batch_size], dtype=np.float32)
        )
        images = generate(chunk, batch_seed(config.seed, start))
        images = torch.as_tensor(images).cpu()
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[:2] != (len(chunk), 3):
            raise ValueError(
                f"the generator returned {images.dtype} {tuple(images.shape)}; "
                f"expected uint8 [{len(chunk)}, 3, H, W]"
            )
        out.append(images)
        if progress:
            progress(len(chunk))
    return torch.cat(out)


def check_clip(info: dict[str, Any], cache_clip) -> list[str]:
    """The generator's conditions must live in the cache's CLIP space: refuse a different CLIP; warn
    (returned) when it cannot be checked."""
    from pipeline.clip import clip_identity

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


def evaluate(
    config: EvalConfig,
    generate: Generate,
    info: dict[str, Any] | None = None,
    *,
    probe=None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate, measure, write OUT/eval.json + OUT/grid.png; returns the eval.json dict."""
    from pipeline.attribute_precision import caption_objects
    from trainers.committed import describe_skipped
    from trainers.conditions import load_cache_clip
    from trainers.embed_rows import labels_of, read_embed
    from trainers.probe import ProbeConfig, cached_probe, load_probe, score_objects, summarise
    from trainers.runs import select_device

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

    max_objects = None
    if config.prompts is not None:
        unique = read_prompts(config.prompts)
        source = str(config.prompts)
    else:
        max_objects = world_max_objects(rows)
        unique = synthetic_prompts(min(config.n, 1000), config.seed, max_objects)
        source = f"synthetic (seed {config.seed}, 1-{max_objects} objects: as the cache's images)"
    prompts = [unique[i % len(unique)] for i in range(config.n)]
    text_unique = clip_text_features(bundle, unique)  # [P, D]
    text = text_unique[np.arange(config.n) % len(unique)]  # [N, D]
    if info.get("h_dim") not in (None, text.shape[1]):
        raise ConfigError(
            f"the generator takes {info['h_dim']}-d conditions but the cache's CLIP gives {text.shape[1]}"
        )

    generated = generate_images(generate, text, config, progress)  # uint8 [N, 3, H, W]
    t_generate = time.perf_counter()

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
            "naming_held_out_pairs": sum(names_held_out_pair(caption_objects(p)) for p in unique),
        },
        "image_size": {"generated": int(generated.shape[-1]), "real": int(real.shape[-1])},
        "clip": {"clip_model": rows.clip.clip_model, "clip_pretrained": rows.clip.clip_pretrained},
    }
    # Each metric has its reference under its own name + `_real`: the real images' value (FID: two
    # disjoint halves of them, n_real_halves); attribute accuracies have `_chance` on the same prompts.
    fid_inception = fid_inception_real = None
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
    if config.n < 2 * gen_feat.shape[1]:
        notes.append(f"n={config.n} is small for {gen_feat.shape[1]}-d features: FID is biased upwards")

    result["clip_score"] = round(clip_score(gen_feat, text), 4)
    real_captions = [rows.captions[int(r)] for r in real_rows]
    have = [i for i, c in enumerate(real_captions) if isinstance(c, str) and c.strip()]
    result["clip_score_real"] = (
        round(clip_score(real_feat[have], clip_text_features(bundle, [real_captions[i] for i in have])), 4)
        if have
        else None
    )

    targets = [caption_objects(p) for p in prompts]
    for name in ("", "_held_out_pairs", "_seen_pairs"):
        result[f"attribute_accuracy{name}"] = result[f"attribute_accuracy{name}_chance"] = None
    result["attribute_accuracy_real"] = result["probe"] = None
    if any(targets):
        if probe is None:
            probe_config = ProbeConfig(device=config.device)
            probe, probe_file = cached_probe(config.cache, probe_config, image_size=int(real.shape[-1]))
        predictions = probe.predict(generated)
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

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.grid:
        k = min(config.grid, len(generated))
        write_grid(out / "grid.png", generated[:k])
        write_bytes_atomic(out / "grid_prompts.txt", "".join(p + "\n" for p in prompts[:k]).encode())
        result["grid"] = {"file": str(out / "grid.png"), "images": k, "columns": min(GRID_COLUMNS, k)}
    result["paired"] = paired_record(info)
    result["training_data"] = info.get("data")  # the rows the run trained on (LoaderInfo.record)
    result["generator"] = {
        k: v for k, v in info.items() if k in ("kind", "step", "size", "resolution", "h_dim")
    }
    result["notes"] = notes
    result["seconds"] = {"generate": round(t_generate - t0, 2), "total": round(time.perf_counter() - t0, 2)}
    result["device"] = str(device)
    _check_finite(result)
    write_json_atomic(out / "eval.json", result)
    return result


def _check_finite(result: dict[str, Any]) -> None:
    for key in (*FID_KEYS, "clip_score", "clip_score_real"):
        value = result.get(key)
        if value is not None and not math.isfinite(value):
            result.setdefault("notes", []).append(f"{key} is not finite (degenerate images?)")
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


def describe(result: dict[str, Any]) -> str:
    """One line: each number with its reference, e.g. `FID (CLIP features) 0.09 (real halves 0.05)`."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    acc = result.get("attribute_accuracy") or {}
    chance = result.get("attribute_accuracy_chance") or {}
    real = result.get("attribute_accuracy_real") or {}
    parts = ", ".join(
        f"{a} {acc[a]:.2f} (chance {number(chance.get(a))}, real {number(real.get(a))})"
        for a in ATTRIBUTES
        if acc.get(a) is not None
    )
    return (
        f"eval: n={result['n']}, {fid_label(result.get('fid_features'))} {result['fid']} "
        f"(real halves {result.get('fid_real')}), "
        f"CLIP score {result['clip_score']} (real {result.get('clip_score_real')})"
        + (f", attributes {parts}" if parts else "")
    )
