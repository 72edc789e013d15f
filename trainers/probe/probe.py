"""`trainers probe`: the attribute classifier that measures generated images of the synthetic world.

A small CNN trained on freshly rendered synthetic images (`world.synth.make_sample`, JPEG round-trip
like the shards) at the cache's image size. Objects in a scene sit at distinct positions, so the probe
has one *slot* per position (left, right, top, bottom, centre): for each slot, whether an object is there,
and its shape, colour and size. That handles one- and two-object images alike, and reading an object's
attributes needs no matching of objects to outputs.

Scoring an image against the objects its prompt names (`score_objects`): with k objects named, the k
most confident occupied slots are where the probe sees them; an object's `position` is right when its
slot is one of those; its shape, colour and size are read at that slot if so, else at the most confident
slot not read yet (a red star drawn in the wrong place still counts as red and as a star); `count` is
right when the number of occupied slots equals k. Noise, which lights up every slot, scores chance.

The probe file (`torch.save`, loadable with `weights_only=True`) holds the weights, the config and the
held-out accuracy it reached. `cached_probe(cache)` keeps one per (config, image size) in
`{cache}/_trainers/probe-{digest}.pt`, so `trainers eval` trains it once per cache.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from manifests import digest_json, write_bytes_atomic
from trainers.probe.config import PROBE_VERSION, ProbeConfig

TRAIN_SEED_OFFSET = 7_000_001  # synth seed of the training images = this + seed (any seed would do)
HELD_OUT_INDEX = 10**9  # evaluation images: beyond any `pipeline synth` key, and beyond n_train
SLOT_ATTRIBUTES = ("shape", "colour", "size")


def vocabulary() -> dict[str, tuple[str, ...]]:
    from world.labels import labels

    return labels().vocabulary


CROP_HALF = 0.18  # crop = anchor +- 0.18 of the side: a large object (0.152) plus its jitter (0.015) fits
CROP_PIXELS = 12  # every crop is resized to this (native at 32 px), so one network serves every size


def _net(width: int):
    """Shared over the five slot crops: [B*5, 3, 12, 12] -> [B*5, 1 + 6 + 6 + 2]."""
    import torch.nn as nn

    vocab = vocabulary()
    per_slot = 1 + len(vocab["shape"]) + len(vocab["colour"]) + len(vocab["size"])

    def block(c_in: int, c_out: int) -> list:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(3, width),
        *block(width, width),
        nn.MaxPool2d(2),  # 6 x 6
        *block(width, 2 * width),
        *block(2 * width, 2 * width),
        nn.MaxPool2d(2),  # 3 x 3
        nn.Flatten(),
        nn.Linear(9 * 2 * width, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, per_slot),
    )


def slot_crops(x, crop_pixels: int = CROP_PIXELS):
    """float [B, 3, S, S] -> [B, 5, 3, c, c]: the square around each position anchor, resized to c.

    The synthetic world puts objects only at the five anchors (`world.synth.POSITION_ANCHORS`, jitter
    0.015), so a crop per anchor is all a slot needs to see; it makes the probe ~4x cheaper than a
    whole-image CNN of the same accuracy and learns shape from far fewer images.
    """
    import torch
    import torch.nn.functional as F

    from world.synth import POSITION_ANCHORS

    side = x.shape[-1]
    half = CROP_HALF * side
    crops = []
    for position in vocabulary()["position"]:
        ax, ay = POSITION_ANCHORS[position]
        x0, y0 = round(ax * side - half), round(ay * side - half)
        n = round(2 * half)
        x0, y0 = min(max(x0, 0), side - n), min(max(y0, 0), side - n)
        crops.append(x[:, :, y0 : y0 + n, x0 : x0 + n])
    stacked = torch.stack(crops, dim=1)  # [B, 5, 3, n, n]
    b, k = stacked.shape[:2]
    flat = stacked.reshape(b * k, *stacked.shape[2:])
    if flat.shape[-1] != crop_pixels:
        flat = F.interpolate(
            flat, size=(crop_pixels, crop_pixels), mode="bilinear", antialias=True, align_corners=False
        )
    return flat.reshape(b, k, 3, crop_pixels, crop_pixels)


class Probe:
    """The trained network and how to read it. `predict` takes uint8 [B, 3, S, S] (any S)."""

    def __init__(self, config: ProbeConfig, state_dict: dict | None = None, accuracy: dict | None = None):
        self.config = config
        self.net = _net(config.width)
        if state_dict is not None:
            self.net.load_state_dict(state_dict)
        self.accuracy = accuracy or {}
        self.device = None

    def to(self, device) -> Probe:
        self.net.to(device)
        self.device = device
        return self

    def crop_logits(self, crops) -> dict[str, Any]:
        """Slot crops [M, 3, c, c] in [-1, 1] -> {"presence": [M], "shape": [M, 6], "colour": [M, 6],
        "size": [M, 2]}."""
        vocab = vocabulary()
        out = self.net(crops)  # [M, 15]
        sizes = [1, len(vocab["shape"]), len(vocab["colour"]), len(vocab["size"])]
        presence, shape, colour, size = out.split(sizes, dim=-1)
        return {"presence": presence[..., 0], "shape": shape, "colour": colour, "size": size}

    def logits(self, pixels) -> dict[str, Any]:
        """uint8 [B, 3, S, S] -> {"presence": [B, 5], "shape": [B, 5, 6], "colour": [B, 5, 6],
        "size": [B, 5, 2]}."""
        crops = slot_crops(pixels.float().div(127.5).sub(1.0))  # [B, 5, 3, c, c]
        b, k = crops.shape[:2]
        out = self.crop_logits(crops.reshape(b * k, *crops.shape[2:]))
        return {name: value.reshape(b, k, *value.shape[1:]) for name, value in out.items()}

    def predict(self, pixels, batch_size: int = 256) -> dict[str, np.ndarray]:
        """uint8 [N, 3, H, W] -> numpy {"presence": prob [N, 5], "shape"/"colour"/"size": argmax [N, 5]}."""
        import torch

        self.net.eval()
        parts: dict[str, list] = {"presence": [], "shape": [], "colour": [], "size": []}
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start : start + batch_size]
                out = self.logits(chunk.to(self.device) if self.device is not None else chunk)
                parts["presence"].append(torch.sigmoid(out["presence"]).cpu().numpy())
                for attr in SLOT_ATTRIBUTES:
                    parts[attr].append(out[attr].argmax(dim=-1).cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def state(self) -> dict[str, Any]:
        """What the probe file holds (plain types and tensors: loadable with weights_only=True)."""
        return {
            "kind": "probe",
            "version": PROBE_VERSION,
            "config": asdict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "accuracy": self.accuracy,
        }


# ---------------------------------------------------------------------------------------------------------
# Data and targets
# ---------------------------------------------------------------------------------------------------------


def render(seed: int, indices, image_size: int, max_objects: int):
    """(uint8 [N, 3, S, S], object lists) of synthetic images, JPEG round-tripped like the shards."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from world.synth import make_sample

    pixels, objects = [], []
    for index in indices:
        sample = make_sample(seed, int(index), image_size, max_objects)
        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        pixels.append(decode_image(data, mode=ImageReadMode.RGB))
        objects.append(sample["json"]["objects"])
    return torch.stack(pixels), objects


def slot_targets(objects: list[list[dict[str, str]]]) -> dict[str, np.ndarray]:
    """Per image and slot: presence (0/1) and class indices (-1 where no object)."""
    vocab = vocabulary()
    n, n_slots = len(objects), len(vocab["position"])
    presence = np.zeros((n, n_slots), dtype=np.float32)
    targets = {attr: np.full((n, n_slots), -1, dtype=np.int64) for attr in SLOT_ATTRIBUTES}
    for i, objs in enumerate(objects):
        for obj in objs:
            slot = vocab["position"].index(obj["position"])
            presence[i, slot] = 1.0
            for attr in SLOT_ATTRIBUTES:
                targets[attr][i, slot] = vocab[attr].index(obj[attr])
    return {"presence": presence, **targets}


def probe_loss(out: dict[str, Any], targets: dict[str, Any]):
    """BCE on presence + cross-entropy on the attributes of occupied slots (targets -1 elsewhere)."""
    import torch.nn.functional as F

    loss = F.binary_cross_entropy_with_logits(out["presence"], targets["presence"])
    for attr in SLOT_ATTRIBUTES:
        logits, target = out[attr], targets[attr]  # [..., C], [...]
        loss = loss + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1
        )
    return loss


def augment(crops, generator):
    """Make the instrument tolerant of generator artefacts: brightness 0.9-1.1 and pixel noise of std
    0-6 levels (of 255), on crops in [-1, 1]. Never a hue change (colours are labels)."""
    import torch

    m = crops.shape[0]
    gain = 0.9 + 0.2 * torch.rand((m, 1, 1, 1), generator=generator)
    noise = (
        torch.randn(crops.shape, generator=generator)
        * (6.0 / 127.5)
        * torch.rand((m, 1, 1, 1), generator=generator)
    )
    return ((crops + 1.0) * gain - 1.0 + noise).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Training and the held-out accuracy
# ---------------------------------------------------------------------------------------------------------


def train_probe(config: ProbeConfig, progress: Callable[[int], None] | None = None) -> Probe:
    """Render, train, evaluate on held-out images. `progress(n)` after each n training steps (and
    `progress.set_total(steps)` first, where it has one).

    The training unit is a slot crop: every occupied slot and as many empty ones, drawn afresh each
    epoch. Empty slots outnumber objects ~2:1, and only their presence is learnt, so subsampling them
    cuts a step's cost by ~40% for the same accuracy.
    """
    import torch

    from trainers.runtime.runs import select_device

    config.validate()
    device = select_device(config.device)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    pixels, objects = render(
        TRAIN_SEED_OFFSET + config.seed, range(config.n_train), config.image_size, config.max_objects
    )
    crops = slot_crops(pixels.float().div(127.5).sub(1.0))  # [N, 5, 3, c, c]
    crops = crops.reshape(-1, *crops.shape[2:])  # [N*5, 3, c, c]
    targets = {k: torch.from_numpy(v).reshape(-1) for k, v in slot_targets(objects).items()}  # [N*5] each
    positives = torch.nonzero(targets["presence"] > 0).flatten()
    negatives = torch.nonzero(targets["presence"] == 0).flatten()
    t_render = time.perf_counter()

    probe = Probe(config).to(device)
    per_epoch = 2 * len(positives)
    steps_per_epoch = max(1, per_epoch // config.batch_size)
    optimizer = torch.optim.AdamW(probe.net.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=steps_per_epoch * config.epochs, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(config.seed)
    if hasattr(progress, "set_total"):  # a core.progress bar: the step count is known only now
        progress.set_total(steps_per_epoch * config.epochs)
    probe.net.train()
    for _ in range(config.epochs):
        chosen = negatives[torch.randperm(len(negatives), generator=generator)[: len(positives)]]
        units = torch.cat([positives, chosen])
        units = units[torch.randperm(len(units), generator=generator)]
        for step in range(steps_per_epoch):
            idx = units[step * config.batch_size : (step + 1) * config.batch_size]
            out = probe.crop_logits(augment(crops[idx], generator).to(device))  # [M, 15] split
            loss = probe_loss(out, {k: v[idx].to(device) for k, v in targets.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress:
                progress(1)
    probe.net.eval()
    t_train = time.perf_counter()
    accuracy: dict[str, Any] = {"train_loss_last": round(float(loss.detach()), 4)}
    if config.n_eval:
        accuracy.update(held_out_accuracy(probe, config))
    accuracy["seconds"] = {"render": round(t_render - t0, 2), "train": round(t_train - t_render, 2)}
    probe.accuracy = accuracy
    return probe


def held_out_accuracy(probe: Probe, config: ProbeConfig) -> dict[str, Any]:
    """Accuracy on images no training run rendered: one-object images per attribute, and every image
    (up to max_objects) scored by `score_objects` against its true objects."""
    seed = TRAIN_SEED_OFFSET + config.seed
    indices = range(HELD_OUT_INDEX, HELD_OUT_INDEX + config.n_eval)
    result = {}
    for name, max_objects in (("one_object", 1), ("all", config.max_objects)):
        pixels, objects = render(seed, indices, config.image_size, max_objects)
        scores = score_objects(probe.predict(pixels), objects)
        result[name] = summarise(scores)
    return result


def score_objects(
    predictions: dict[str, np.ndarray], targets: list[list[dict[str, str]]]
) -> dict[str, list[bool]]:
    """Per named attribute, one bool per scored object (see the module docstring); `count` one per image,
    `all` one per object (every attribute it names right). Objects may be partial ("a red star").

    The probe's reading of an object is turned into an object (the position of its slot when the slot is
    one of the k seen, and the shape, colour and size read there), then scored with the hit rule every
    attribute-precision figure uses (`world.attribute_precision.object_hits`)."""
    from world.attribute_precision import object_hits

    vocab = vocabulary()
    scores: dict[str, list[bool]] = {a: [] for a in ("shape", "colour", "size", "position", "count", "all")}
    for i, objects in enumerate(targets):
        if not objects:
            continue
        presence = predictions["presence"][i]  # [5]
        occupied = presence > 0.5
        # The k most confident occupied slots are where the probe sees the k named objects: clutter (noise
        # lights up every slot) cannot make a position right by chance more often than k/5.
        ranked = [int(s) for s in np.argsort(-presence, kind="stable")]
        seen = {s for s in ranked[: len(objects)] if occupied[s]}
        read: set[int] = set()
        for obj in objects:
            named = obj.get("position")
            slot = vocab["position"].index(named) if named in vocab["position"] else None
            position_seen = slot is not None and slot in seen  # right even if another object read it
            if slot is None or slot not in seen or slot in read:
                free = [s for s in ranked if s not in read]
                slot = free[0] if free else ranked[0]
            read.add(slot)
            reading = {a: vocab[a][int(predictions[a][i, slot])] for a in SLOT_ATTRIBUTES}
            if position_seen:
                reading["position"] = named
            # Values outside the vocabulary are not scored (a hand-written prompt's typo is not a miss).
            named_object = {a: v for a, v in obj.items() if a in vocab and v in vocab[a]}
            hits = object_hits(named_object, reading)
            for attr in vocab:
                if attr in hits:
                    scores[attr].append(hits[attr])
            scores["all"].append(hits["object"])
        scores["count"].append(int(occupied.sum()) == len(objects))
    return scores


def summarise(scores: dict[str, list[bool]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: (round(float(np.mean(v)), 4) if v else None) for k, v in scores.items()}
    out["n_objects"] = len(scores["all"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def save_probe(probe: Probe, path: Path) -> Path:
    """A torch file with a digest trailer (trainers/data/store_files.py), which torch.load ignores."""
    import torch

    from trainers.data.store_files import sealed

    buffer = io.BytesIO()
    torch.save(probe.state(), buffer)
    write_bytes_atomic(Path(path), sealed(buffer.getvalue()))
    return Path(path)


def load_probe(path: Path, device: str = "auto") -> Probe:
    from core.torch_files import load_torch_file
    from trainers.runtime.runs import select_device

    if not Path(path).exists():
        raise ConfigError(f"--probe {path}: file not found; make one with `trainers probe --out {path}`")
    state = load_torch_file(path, "--probe", expect="a `trainers probe` file")
    if not isinstance(state, dict) or state.get("kind") != "probe":
        raise ConfigError(f"--probe {path}: not a `trainers probe` file")
    if state.get("version") != PROBE_VERSION:
        raise ConfigError(
            f"--probe {path}: made by probe version {state.get('version')}; retrain it with `trainers probe`"
        )
    probe = Probe(ProbeConfig(**state["config"]), state["state_dict"], state.get("accuracy"))
    return probe.to(select_device(device))


def probe_path(cache: Path, config: ProbeConfig) -> Path:
    from trainers.data.conditions import TRAINERS_DIR

    return Path(cache) / TRAINERS_DIR / f"probe-{digest_json(config.keyed())[:16]}.pt"


def cached_probe(
    cache: Path,
    config: ProbeConfig | None = None,
    progress: Callable[[int], None] | None = None,
    image_size: int | None = None,
) -> tuple[Probe, Path | None]:
    """The probe for a cache's image size (`image_size` when the caller knows it), trained once and kept
    in `{cache}/_trainers/`, shared by every eval on the cache. Returns (probe, its file, or None when
    the cache is not writable)."""
    from feature_cache.embed_rows import cache_image_size

    config = replace(config or ProbeConfig(), image_size=image_size or cache_image_size(cache))
    path = probe_path(cache, config)
    if path.is_file():
        from trainers.data.store_files import unsealed

        try:
            unsealed(path.read_bytes())  # damage of any size
            return load_probe(path, config.device), path
        except ValueError as e:  # derived, so retrain and replace it
            warnings.warn(f"{path}: cannot be read ({e}); retraining it", stacklevel=2)
        except ConfigError as e:  # foreign
            warnings.warn(f"{e}; retraining it", stacklevel=2)
    probe = train_probe(config, progress)
    try:
        save_probe(probe, path)
    except OSError as e:
        warnings.warn(
            f"cannot keep the probe in {path.parent} ({e}); it will be retrained next time", stacklevel=2
        )
        return probe, None
    return probe, path


def describe(probe: Probe) -> str:
    acc = probe.accuracy.get("one_object") or {}
    both = probe.accuracy.get("all") or {}
    parts = ", ".join(
        f"{a} {acc[a]:.3f}" for a in ("shape", "colour", "size", "position") if acc.get(a) is not None
    )
    return (
        f"probe at {probe.config.image_size}px: one-object held-out accuracy {parts}; "
        f"all images: objects fully right {both.get('all')}, count {both.get('count')}"
    )
