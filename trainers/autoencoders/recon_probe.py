"""What an autoencoder keeps of the objects it reconstructs (`trainers vae`, `trainers dvae`).

A high PSNR does not mean the object survived: on the synthetic world at 32 px, painting each object the
mean colour of its image's background already scores about 23 dB, and so did autoencoders whose
reconstructions were grey blobs. So an autoencoder is judged by:

- PSNR beside two references: the mean of the images (`mean_image_psnr_db`, far too easy to beat) and
  the images with their objects erased (`object_erased_psnr_db`: each labelled box painted the mean
  colour of the pixels outside every box). A reconstruction at the second has kept the background only;
- the world's probe (trainers/probe/probe.py) reading the reconstructions against the images' own labels, per
  attribute, beside its reading of the images themselves, and their ratio `kept` (1: as legible as the
  real images; chance / real accuracy: nothing of it kept).

Both need the synthetic world's labels (`eval_prompts.world_labels`); on other caches the probe block is
None and the erased reference too, with a note saying why. Under MIN_IMAGES labelled images the probe is
left out too (its accuracy would be noise), and `--encode` does not refuse.

`--encode` refuses an autoencoder that keeps less than `KEPT_MIN` of the real images' colour or position
(`check_keeps_objects`; `--accept-lossy` encodes anyway): a generator trained on its latents or tokens
cannot draw what they do not hold, and it would be hours before its samples showed it. Half is far from
both ends: chance is 0.17 of the real colour accuracy and 0.2 of position, so below half most of what
the probe reads is gone, while probe noise on a legible reconstruction is a few points.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError

KEPT_MIN = 0.5  # of the real images' probe accuracy, on each of GATED (see the module docstring)
GATED = ("colour", "position")
ATTRIBUTES = ("shape", "colour", "size", "position")
CHECK_IMAGES = 256  # images `check_keeps_objects` reconstructs (a seeded sample of the cache's)
NOT_WORLD = "the cache's images are not of the synthetic world (no labels to read)"
MIN_IMAGES = 32  # labelled images the probe reads before its accuracy means anything (+- 0.09 at 32)


def erase_objects(images, boxes: list[list[list[float]]]):
    """float [-1, 1] [N, 3, S, S] -> the same with each image's boxes (fractions of the side) painted the
    mean colour of its pixels outside every box."""
    import torch

    side = images.shape[-1]
    out = images.clone()
    for i, image_boxes in enumerate(boxes):
        inside = torch.zeros(side, side, dtype=torch.bool)
        for x0, y0, x1, y1 in image_boxes:
            c0, r0 = max(0, int(np.floor(x0 * side))), max(0, int(np.floor(y0 * side)))
            inside[r0 : int(np.ceil(y1 * side)), c0 : int(np.ceil(x1 * side))] = True
        if inside.all() or not inside.any():
            continue
        background = images[i][:, ~inside].mean(dim=1)  # [3]
        out[i][:, inside] = background[:, None]
    return out


def may_be_world(cache: Path) -> bool:
    """Whether the first embed shard's sidecar has labels naming objects: a read of one column of one
    file, so a user's large cache is not read whole (`read_embed`) only to find it is not the world."""
    import pyarrow.parquet as pq

    from feature_cache.layout import shard_out
    from manifests import list_manifests

    manifests = list_manifests(Path(cache), "embed")
    out = shard_out(manifests[min(manifests)], ".parquet") if manifests else None
    try:
        if out is None or "labels" not in pq.read_schema(Path(cache) / out["path"]).names:
            return False
        labels = pq.read_table(Path(cache) / out["path"], columns=["labels"])["labels"].to_pylist()
    except (OSError, ValueError):
        return True  # let the full read say what is wrong
    return any(isinstance(v, str) and '"objects"' in v for v in labels)


def world_of(rows: Any, keys: list[str]) -> tuple[list[dict[str, Any] | None], str | None]:
    """(each key's labels when the embed rows are of the synthetic world, else Nones; why not, or None)."""
    from feature_cache.embed_rows import labels_of
    from trainers.probe.prompts import world_labels

    if not world_labels(rows)["measurable"]:
        return [None] * len(keys), NOT_WORLD
    where = {key: i for i, key in enumerate(rows.keys)}
    return [labels_of(rows, where[k]) if k in where else None for k in keys], None


def reconstruction_report(
    real, recon, labels: list[dict[str, Any] | None], probe: Any | None, note: str | None = None
) -> dict[str, Any]:
    """The figures of the module docstring for real and reconstructed images float [-1, 1] [N, 3, S, S]
    and each image's world labels (None: unlabelled); `probe` None (or no labels) leaves the probe out."""
    from trainers.autoencoders.pixels import psnr, to_uint8
    from trainers.probe.probe import score_objects, summarise

    real, recon = real.float(), recon.float()
    mean_image = real.mean(dim=0, keepdim=True).expand_as(real)
    report: dict[str, Any] = {
        "n": len(real),
        "psnr_db": round(float(psnr(recon, real).mean()), 3),
        "mean_image_psnr_db": round(float(psnr(mean_image, real).mean()), 3),
        "object_erased_psnr_db": None,
        "probe": None,
        "probe_note": note,
    }
    labelled = [i for i, lab in enumerate(labels) if lab and lab.get("objects") and lab.get("boxes")]
    if not labelled:
        report["probe_note"] = note or "no image has the synthetic world's labels"
        return report
    idx = np.array(labelled)
    erased = erase_objects(real[idx], [labels[i]["boxes"] for i in labelled])
    report["object_erased_psnr_db"] = round(float(psnr(erased, real[idx]).mean()), 3)
    if probe is None:
        return report
    objects = [labels[i]["objects"] for i in labelled]
    seen = {
        name: summarise(score_objects(probe.predict(to_uint8(images[idx])), objects))
        for name, images in (("real", real), ("reconstructed", recon))
    }
    report["probe"] = {
        "n_objects": seen["real"]["n_objects"],
        "real": {a: seen["real"][a] for a in ATTRIBUTES},
        "reconstructed": {a: seen["reconstructed"][a] for a in ATTRIBUTES},
        "kept": {
            a: round(seen["reconstructed"][a] / seen["real"][a], 3) if seen["real"][a] else None
            for a in ATTRIBUTES
        },
    }
    return report


def measure(
    cache: Path, real, recon, keys: list[str], device: str = "auto", rows: Any = None
) -> dict[str, Any]:
    """`reconstruction_report` of held-out images `real` (float [-1, 1]) and their reconstructions,
    with the labels of `keys` (from `rows`, the cache's embed rows, read when not given) and the cache's
    probe (trained once per cache: `probe.cached_probe`)."""
    from feature_cache.embed_rows import read_embed
    from trainers.probe.config import ProbeConfig
    from trainers.probe.probe import cached_probe

    if rows is None and not may_be_world(Path(cache)):
        return reconstruction_report(real, recon, [None] * len(keys), None, NOT_WORLD)
    labels, note = world_of(rows if rows is not None else read_embed(Path(cache), warn=False), keys)
    labelled = sum(bool(lab and lab.get("objects")) for lab in labels)
    if note is None and labelled < MIN_IMAGES:
        note = (
            f"{labelled} labelled held-out image(s): too few for the probe's accuracy (it needs {MIN_IMAGES})"
        )
    probe = None
    if note is None:
        size = int(real.shape[-1])
        probe = cached_probe(Path(cache), ProbeConfig(device=device), image_size=size)[0]
    return reconstruction_report(real, recon, labels, probe, note)


def lost(report: dict[str, Any]) -> list[str]:
    """The GATED attributes the reconstructions keep less than KEPT_MIN of, as 'colour 0.07 of 0.97'."""
    probe = report.get("probe")
    if not probe:
        return []
    return [
        f"{a} {probe['reconstructed'][a]:.2f} of {probe['real'][a]:.2f}"
        for a in GATED
        if probe["kept"][a] is not None and probe["kept"][a] < KEPT_MIN
    ]


def describe(report: dict[str, Any]) -> str:
    """One clause for the command line: PSNR against its references, and what the probe reads."""
    erased = report["object_erased_psnr_db"]
    refs = f"mean image {report['mean_image_psnr_db']:.2f} dB" + (
        f", objects erased {erased:.2f} dB" if erased is not None else ""
    )
    text = f"held-out PSNR {report['psnr_db']:.2f} dB ({refs})"
    probe = report["probe"]
    if probe is None:
        return f"{text}; attributes not measured ({report['probe_note']})"
    read = ", ".join(f"{a} {probe['reconstructed'][a]:.2f}/{probe['real'][a]:.2f}" for a in ATTRIBUTES)
    return f"{text}; probe on reconstructions/real images: {read}"


def check_keeps_objects(
    cache: Path, reconstruct: Callable[[Any], Any], flag: str, device: str = "auto"
) -> dict[str, Any] | None:
    """Before `--encode`: reconstruct a seeded sample of the cache's images (`reconstruct`: float [-1, 1]
    [B, 3, S, S] -> the same) and refuse, as a ConfigError naming `flag`, when they keep less than
    KEPT_MIN of what the probe reads on colour or position. Returns the report; None on a cache that is
    not of the synthetic world (nothing to read the objects with)."""
    import torch

    from feature_cache.embed_rows import read_embed
    from trainers.probe.prompts import world_labels

    if not may_be_world(Path(cache)):
        return None
    rows = read_embed(Path(cache), warn=False)
    if not world_labels(rows)["measurable"]:
        return None
    pick = np.sort(np.random.default_rng(0).permutation(len(rows))[:CHECK_IMAGES])
    real = rows.pixels(pick).float().div_(127.5).sub_(1.0)
    with torch.no_grad():
        recon = torch.cat([reconstruct(real[i : i + 64]).float().cpu() for i in range(0, len(real), 64)])
    report = measure(Path(cache), real, recon, [rows.keys[int(r)] for r in pick], device, rows)
    gone = lost(report)
    if gone:
        raise ConfigError(
            f"{flag}: its reconstructions of {len(real)} of the cache's images lose the objects (the probe "
            f"reads {', '.join(gone)} on the real images; under {KEPT_MIN:g} of it is refused): a generator "
            "trained on this encoding could not draw them. Train it longer or larger, or pass "
            "--accept-lossy to encode anyway"
        )
    return report
