"""`trainers clip`: train a small open_clip model for offline caches (no pretrained CLIP can be fetched).

Like a real CLIP it is pretrained on pairs other than the generator's: by default a fresh stream of
synthetic pairs in shape contrast groups (`trainers.clip_data`), or the pairs of given shards (`--data`).
The default bundled config is `lafite-rn32` (open_clip ModifiedResNet, 32 px), chosen by
`benchmarks/bench_clip.py`: the ViT configs (`lafite-tiny`, `lafite-small`) do not learn shape at 32 px.
Training: open_clip's `ClipLoss` (symmetric InfoNCE with the learnable logit scale, clamped at 100 like
open_clip's trainer), AdamW without weight decay on gains, biases and the logit scale (SparseAdam for the
token embedding), linear warmup then cosine decay; the pairs are decoded once into memory at the
model's input size; augmentation is a brightness jitter only (see `augment`).

Outputs in RUN (the `--out` directory):

- `clip.pt`: `{"state_dict": ...}`, which `pipeline embed --clip-model lafite-tiny --clip-pretrained
  RUN/clip.pt` loads (open_clip's loader, `weights_only=True`);
- `clip_config.json`: the open_clip model config, so `--clip-model RUN/clip_config.json` works too;
- `clip_eval.json`: zero-shot attribute accuracy on freshly rendered synthetic images that no synth run
  can contain (indices >= 10^9; `pipeline synth` keys have 9 digits), and the training loss curve;
- `config.json`: the resolved config.

Zero-shot: each attribute value (red, circle, small, left...) is a class whose text feature is the mean
of the features of captions of every single-object combination with that value (prompt ensembling over
the other attributes), and each held-out one-object image is assigned the class of highest cosine. The
single-prompt variant ("a red object" vs "a blue object"...) is reported too, and, per object slot on
held-out two-object images, the caption-swap accuracy (`zero_shot_slots`).
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from manifests import write_bytes_atomic, write_json_atomic
from manifests.errors import read_json
from pipeline.errors import ConfigError, require_at_least
from trainers.clip_data import PRETRAIN_INDEX, batch_rows, read_pairs, render_pairs

# --size -> bundled open_clip config: rn32 (ModifiedResNet, 32 px) is the one that sees every attribute;
# tiny is for tests; small is a 64 px ViT
CLIP_SIZES = {"rn32": "lafite-rn32", "tiny": "lafite-tiny", "small": "lafite-small"}
HELD_OUT_INDEX = 10**9  # first index of the evaluation images: beyond any `pipeline synth` key (9 digits)
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class ClipTrainConfig:
    data: tuple[str, ...] = ()  # image+caption inputs (tars, folders, Parquet); (): a fresh synthetic stream
    out: Path | None = None  # run dir (clip.pt, clip_config.json, clip_eval.json); None: runs/NNN-clip-SIZE
    size: str = "rn32"  # a CLIP_SIZES key (bundled open_clip configs)
    steps: int = 3000  # optimisation steps
    batch_size: int = 129  # pairs per step (the InfoNCE negatives), rounded down to whole contrast groups
    pretrain_n: int = 40000  # fresh synthetic pairs rendered for training when no --data is given
    contrast_group: int = 3  # scenes per group that differ only in shape (see trainers.clip_data)
    max_objects: int = 1  # objects per synthetic training image (1 or 2; see bench_clip in BENCHMARKS.md)
    lr: float = 2e-3  # AdamW peak learning rate (3e-3 collapsed to a constant embedding on the tiny model)
    weight_decay: float = 0.1  # on matrices only
    warmup: int = 50  # linear warmup steps (clamped to steps // 2)
    seed: int = 0  # init, batch order, augmentation
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    eval_n: int = 600  # held-out synthetic images for zero-shot accuracy (0: skip)
    eval_seed: int = 0  # synth seed of the held-out images (indices >= 10^9 never collide with training)
    force: bool = False  # overwrite an existing RUN/clip.pt

    def validate(self) -> None:
        if self.size not in CLIP_SIZES:
            raise ConfigError(f"--size {self.size}: choose one of {', '.join(CLIP_SIZES)}")
        if self.max_objects not in (1, 2):
            raise ConfigError("--max-objects must be 1 or 2")
        require_at_least(
            ("--pretrain-n", self.pretrain_n, 2),
            ("--contrast-group", self.contrast_group, 1),
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 2),
            ("--warmup", self.warmup, 0),
            ("--eval-n", self.eval_n, 0),
            ("--seed", self.seed, 0),
        )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("--lr must be a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError("--weight-decay must be 0 or more")
        if self.out is None:
            return
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        if (out / "clip.pt").exists() and not self.force:
            raise ConfigError(
                f"--out {out}: already holds clip.pt; pass --force to overwrite it or another --out"
            )


def build_clip(size: str, seed: int, device):
    """(model in train mode, tokenizer, open_clip name, model config, mean, std, image size)."""
    import open_clip
    import torch

    from pipeline.clip import open_clip_quiet, resolve_model

    name, _ = resolve_model(CLIP_SIZES[size])
    torch.manual_seed(seed)
    with open_clip_quiet():  # its "No pretrained weights loaded" notice: random init is the point here
        model = open_clip.create_model(name, device=device)
    cfg = open_clip.get_model_config(name)
    pre = open_clip.get_model_preprocess_cfg(model)
    image_size = pre.get("size", cfg["vision_cfg"]["image_size"])
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
    return model, open_clip.get_tokenizer(name), name, cfg, mean, std, int(image_size)


def normalise(pixels, mean, std):
    """uint8 [B, 3, S, S] -> the float input open_clip expects (as `pipeline.clip.encode_images`)."""
    import torch

    x = pixels.float().div(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def augment(pixels, generator):
    """Light augmentation on uint8 [B, 3, S, S]: brightness x 0.9-1.1. No flips (captions say left and
    right), no hue changes (they say colours), and no shifts: a +-2 px random shift at 32 px cut zero-shot
    position accuracy from 0.67 to 0.29 and size from 0.68 to 0.59 after 300 steps (2,000 images)."""
    import torch

    gain = 0.9 + 0.2 * torch.rand((pixels.shape[0], 1, 1, 1), generator=generator)
    return (pixels.float() * gain).clamp(0, 255).round().to(torch.uint8)


def param_groups(model, weight_decay: float, skip: set[int] = frozenset()) -> list[dict[str, Any]]:
    """open_clip's rule: no decay on gains, biases and the logit scale (ndim < 2, ln, bn, bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizers(model, config: ClipTrainConfig) -> list:
    """AdamW for everything but the token embedding, which gets sparse gradients and SparseAdam: a caption
    corpus uses a few hundred of its 49,408 rows, and a dense AdamW update of all of them was half of a
    tiny-model step on CPU (0.09 s of 0.2 s at batch 64)."""
    import torch

    embedding = getattr(model, "token_embedding", None)
    optimizers = []
    if isinstance(embedding, torch.nn.Embedding):
        embedding.sparse = True
        optimizers.append(
            torch.optim.SparseAdam([embedding.weight], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
        )
    groups = param_groups(model, config.weight_decay, skip={id(embedding.weight)} if optimizers else set())
    optimizers.append(torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6))
    return optimizers


def lr_at(step: int, config: ClipTrainConfig) -> float:
    warmup = min(config.warmup, config.steps // 2)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class ClipTrainResult:
    run_dir: Path
    checkpoint: Path
    model_config: Path
    eval_path: Path
    losses: list[float]
    evaluation: dict[str, Any]
    model: Any  # the trained model, eval mode (for tests and callers that go on using it)


def train_clip(config: ClipTrainConfig, progress: Callable[[int], None] | None = None) -> ClipTrainResult:
    """Validate, read the pairs, train, save, evaluate. `progress(n)` after each n steps."""
    import torch
    from open_clip.loss import ClipLoss

    from trainers.runs import new_run_dir, select_device

    config.validate()
    device = select_device(config.device)
    if config.out is None:
        config = replace(config, out=new_run_dir(Path("runs"), f"clip-{config.size}"))
    model, tokenizer, name, model_cfg, mean, std, image_size = build_clip(config.size, config.seed, device)
    t0 = time.perf_counter()
    if config.data:
        data = read_pairs(config.data, image_size)
    else:
        data = render_pairs(
            config.pretrain_n, config.seed, image_size, config.contrast_group, config.max_objects
        )
    tokens = tokenizer(data.captions)  # [N, context_length]
    t_read = time.perf_counter()

    model.train()
    optimizers = make_optimizers(model, config)
    loss_fn = ClipLoss()
    generator = torch.Generator().manual_seed(config.seed)
    n = len(data.captions)
    losses = []
    for step in range(config.steps):
        idx = batch_rows(data, config.batch_size, generator)  # [B]
        images = normalise(augment(data.pixels[idx], generator), mean, std).to(device)  # [B, 3, S, S]
        text = tokens[idx].to(device)  # [B, L]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
        img_feat = model.encode_image(images, normalize=True)  # [B, D]
        txt_feat = model.encode_text(text, normalize=True)  # [B, D]
        loss = loss_fn(img_feat, txt_feat, model.logit_scale.exp())
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        if progress:
            progress(1)
    t_train = time.perf_counter()
    model.eval()

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # Plain tensors only: open_clip's loader (and `pipeline embed`) read it with weights_only=True.
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, buffer)
    write_bytes_atomic(out / "clip.pt", buffer.getvalue())
    write_json_atomic(out / "clip_config.json", model_cfg)
    run_config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    run_config["data"] = list(config.data)
    write_json_atomic(
        out / "config.json", {"kind": "clip", "config": run_config, "clip_model": CLIP_SIZES[config.size]}
    )

    evaluation = {
        "model": CLIP_SIZES[config.size],
        "image_size": image_size,
        "pairs": n,
        "dropped": data.dropped,
        "steps": config.steps,
        "batch_size": int(idx.numel()),
        "training_data": list(config.data)
        or {
            "stream": "fresh synthetic pairs",
            "first_index": PRETRAIN_INDEX,
            "seed": config.seed,
            "contrast_group": config.contrast_group,
            "max_objects": config.max_objects,
        },
        "loss_first": round(float(np.mean(losses[: max(1, min(10, len(losses) // 10))])), 4),
        "loss_last": round(float(np.mean(losses[-max(1, min(10, len(losses) // 10)) :])), 4),
        "loss_every_10": [round(v, 4) for v in losses[::10]],
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "seconds": {"read": round(t_read - t0, 2), "train": round(t_train - t_read, 2)},
        "device": str(device),
    }
    if config.eval_n:
        with torch.no_grad():
            evaluation.update(
                zero_shot(model, tokenizer, mean, std, image_size, config.eval_n, config.eval_seed, device)
            )
            evaluation["zero_shot_two_objects"] = zero_shot_slots(
                model, tokenizer, mean, std, image_size, config.eval_n, config.eval_seed, device
            )
    eval_path = out / "clip_eval.json"
    write_json_atomic(eval_path, evaluation)
    return ClipTrainResult(
        out, out / "clip.pt", out / "clip_config.json", eval_path, losses, evaluation, model
    )


# ---------------------------------------------------------------------------------------------------------
# Zero-shot attribute accuracy on held-out synthetic images
# ---------------------------------------------------------------------------------------------------------


def held_out_images(n: int, seed: int, image_size: int, max_objects: int = 1):
    """(uint8 [n, 3, S, S], labels) of synthetic images no `pipeline synth` run can hold (index >= 10^9),
    JPEG round-tripped like the shards."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from pipeline.synth import make_sample

    pixels, labels = [], []
    for i in range(n):
        sample = make_sample(seed, HELD_OUT_INDEX + i, image_size, max_objects)
        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        pixels.append(decode_image(data, mode=ImageReadMode.RGB))
        labels.append(sample["json"])
    return torch.stack(pixels), labels


def class_prompts(attribute: str, value: str) -> list[str]:
    """Captions of every single-object combination with `attribute` = `value` (synth templates)."""
    from itertools import product

    from pipeline.labels import labels

    values = labels().vocabulary
    rng = random.Random(f"trainers/clip/prompts/{attribute}/{value}")
    prompts = []
    for combo in product(*(values[a] if a != attribute else (value,) for a in values)):
        prompts.append(labels().caption([dict(zip(values, combo, strict=True))], rng))
    return prompts


def single_prompt(attribute: str, value: str) -> str:
    from pipeline.labels import labels

    return labels().phrase(attribute, value)


def encode_text_batched(model, tokenizer, texts: list[str], device, batch: int = 512):
    import torch

    out = [
        model.encode_text(tokenizer(texts[i : i + batch]).to(device), normalize=True)
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(out).float()


def zero_shot(model, tokenizer, mean, std, image_size: int, n: int, seed: int, device) -> dict[str, Any]:
    """Zero-shot accuracy per attribute on n held-out one-object images (see the module docstring)."""
    import torch

    from pipeline.labels import labels as world_labels

    values = world_labels().vocabulary
    pixels, labels = held_out_images(n, seed, image_size)
    img = torch.cat(
        [
            model.encode_image(normalise(pixels[i : i + 256], mean, std).to(device), normalize=True)
            for i in range(0, n, 256)
        ]
    ).float()  # [n, D]
    ensemble, single, chance = {}, {}, {}
    for attribute, names in values.items():
        truth = torch.tensor([names.index(lab["objects"][0][attribute]) for lab in labels], device=img.device)
        classes = []
        for value in names:
            feats = encode_text_batched(model, tokenizer, class_prompts(attribute, value), device)
            classes.append(torch.nn.functional.normalize(feats.mean(dim=0), dim=0))
        classes_t = torch.stack(classes)  # [C, D]
        ensemble[attribute] = round(float(((img @ classes_t.T).argmax(dim=1) == truth).float().mean()), 4)
        prompts = encode_text_batched(model, tokenizer, [single_prompt(attribute, v) for v in names], device)
        single[attribute] = round(float(((img @ prompts.T).argmax(dim=1) == truth).float().mean()), 4)
        chance[attribute] = round(1.0 / len(names), 4)
    captions = [lab["caption"] for lab in labels]
    txt = encode_text_batched(model, tokenizer, captions, device)  # [n, D]
    top1 = float(((img @ txt.T).argmax(dim=1) == torch.arange(n, device=img.device)).float().mean())
    return {
        "zero_shot": ensemble,
        "zero_shot_single_prompt": single,
        "chance": chance,
        "image_to_caption_top1": round(top1, 4),
        "eval_images": {"n": n, "seed": seed, "first_index": HELD_OUT_INDEX, "objects": 1},
    }


def zero_shot_slots(model, tokenizer, mean, std, image_size: int, n: int, seed: int, device) -> dict:
    """Zero-shot accuracy per object slot on held-out two-object images, by caption swap: for slot i and
    attribute a, the candidates are the image's true caption with slot i's a set to each possible value
    (same template and wording), and the prediction is the candidate of highest cosine. This asks whether
    the CLIP binds each attribute to the right object, which class prompts cannot."""
    import torch

    from pipeline.labels import labels as world_labels

    world = world_labels()
    values = world.vocabulary
    pixels, labels = held_out_images(n, seed, image_size, max_objects=2)
    keep = [i for i, lab in enumerate(labels) if len(lab["objects"]) == 2]
    if not keep:
        return {}
    img = torch.cat(
        [
            model.encode_image(normalise(pixels[keep[i : i + 256]], mean, std).to(device), normalize=True)
            for i in range(0, len(keep), 256)
        ]
    ).float()  # [m, D]
    accuracy: dict[str, dict[str, float]] = {}
    for slot in (0, 1):
        accuracy[f"object_{slot + 1}"] = {}
        for attribute, names in values.items():
            texts, truth = [], []
            for i in keep:
                objects = labels[i]["objects"]
                truth.append(names.index(objects[slot][attribute]))
                for value in names:
                    swapped = [dict(o) for o in objects]
                    swapped[slot][attribute] = value
                    texts.append(world.caption(swapped, random.Random(f"trainers/clip/slots/{i}")))
            txt = encode_text_batched(model, tokenizer, texts, device).view(len(keep), len(names), -1)
            pred = torch.einsum("md,mcd->mc", img, txt).argmax(dim=1).cpu()
            accuracy[f"object_{slot + 1}"][attribute] = round(
                float((pred == torch.tensor(truth)).float().mean()), 4
            )
    return {**accuracy, "n_images": len(keep), "seed": seed}


def describe(result: ClipTrainResult) -> str:
    ev = result.evaluation
    zs = ev.get("zero_shot")
    acc = ", ".join(f"{k} {v:.2f}" for k, v in zs.items()) if zs else "not evaluated"
    return (
        f"clip: {ev['steps']} steps on {ev['pairs']:,} pairs, "
        f"loss {ev['loss_first']:.3f} -> {ev['loss_last']:.3f}; "
        f"zero-shot {acc} -> {result.checkpoint}"
    )


def read_eval(run_dir: Path) -> dict[str, Any]:
    fix = f"retrain with `trainers clip --out {run_dir} --force` to remake it"
    return read_json(Path(run_dir) / "clip_eval.json", fix)
