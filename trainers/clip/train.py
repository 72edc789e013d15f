"""`trainers clip`: train a small open_clip model for offline caches (no pretrained CLIP can be fetched).

Like a real CLIP it is pretrained on pairs other than the generator's: by default a fresh stream of
synthetic pairs in shape contrast groups (`trainers.clip.data`), or the pairs of given shards (`--data`).
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
- `config.json`: the resolved config;
- `train_state.pt`, while it trains: the run so far (model, optimisers, batch generator, losses), saved
  atomically every `--checkpoint-every` steps and removed once clip.pt is written. `--resume` (the demo
  always) continues from it, to the same weights as a run never stopped, when its learnt settings match.

Zero-shot: each attribute value (red, circle, small, left...) is a class whose text feature is the mean
of the features of captions of every single-object combination with that value (prompt ensembling over
the other attributes), and each held-out one-object image is assigned the class of highest cosine. The
single-prompt variant ("a red object" vs "a blue object"...) is reported too, and, per object slot on
held-out two-object images, the caption-swap accuracy (`zero_shot_slots`): trainers/clip/zero_shot.py.

Under torchrun, data-parallel (trainers/runtime/distributed.py): `--batch-size` is the global batch. Every
rank renders (or reads) the same pairs, draws the same global batch of whole contrast groups from the same
generator and keeps its contiguous slice, whole groups each (a batch whose groups the ranks cannot share
evenly is refused); the brightness gains are drawn for the global batch and sliced. Three things couple
the rows of a batch, and each is computed over the global one, so that the averaged gradient is the
one-process one: the InfoNCE loss (on the gathered features, `clip_loss`), rn32's BatchNorm
(statistics over every rank's rows, `global_batch_norms`), and the token embedding's sparse gradient,
whose rows are the global batch's tokens (`World.average_gradients`). Rank 0 writes and evaluates.
"""

from __future__ import annotations

import functools
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from manifests import write_bytes_atomic, write_json_atomic
from manifests.errors import read_json
from trainers.clip.config import CLIP_SIZES, ClipTrainConfig
from trainers.clip.data import (
    PRETRAIN_INDEX,
    batch_rows,
    normalise,
    read_pairs,
    render_pairs,
    step_captions,
)
from trainers.clip.zero_shot import modality_gap, zero_shot, zero_shot_slots

if TYPE_CHECKING:
    from trainers.runtime.distributed import World

MAX_LOGIT_SCALE = math.log(100.0)
TRAIN_STATE = "train_state.pt"


def save_train_state(config: ClipTrainConfig, step: int, model, optimizers, generator, losses) -> None:
    """RUN/train_state.pt after `step` steps, atomically (a kill while saving keeps the previous one)."""
    import torch

    from manifests import atomic_write
    from trainers.runtime.checkpoints import note_checkpoint

    state = {
        "kind": "clip-train",
        "learnt": config.learnt(),
        "step": step,
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in optimizers],
        "generator": generator.get_state(),
        "losses": list(losses),
    }
    with atomic_write(Path(config.out) / TRAIN_STATE) as f:
        torch.save(state, f)
    note_checkpoint(Path(config.out) / TRAIN_STATE, step)  # what a Ctrl-C names (trainers.engine.loop.launch)


def resume_train_state(config: ClipTrainConfig, model, optimizers, generator) -> tuple[int, list[float]]:
    """(the step to start at, the losses so far): with --resume and RUN/train_state.pt there, the saved run
    loaded into `model`, `optimizers` and `generator`; else (0, []). A state saved with other learnt
    settings is refused in one line (it is another run: --force without --resume starts over)."""
    path = Path(config.out) / TRAIN_STATE if config.out is not None else None
    if not (config.resume and path is not None and path.is_file()):
        return 0, []
    from trainers.runtime.checkpoints import load_checkpoint, note_checkpoint

    state = load_checkpoint(path, "--resume", kinds=("clip-train",))
    theirs, ours = state.get("learnt", {}), config.learnt()
    changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if changed:
        said = ", ".join(f"{k} {theirs.get(k)!r} (now {ours.get(k)!r})" for k in changed)
        raise ConfigError(
            f"--resume: {path} was trained with {said}; give the same options, or --force without "
            "--resume to start over"
        )
    model.load_state_dict(state["model"])
    for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    generator.set_state(state["generator"])
    note_checkpoint(path, state["step"])
    return int(state["step"]), list(state["losses"])


def build_clip(size: str, seed: int, device):
    """(model in train mode, tokenizer, open_clip name, model config, mean, std, image size)."""
    import open_clip
    import torch

    from core.clip import open_clip_quiet
    from core.clip_models import resolve_model

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


def augment(pixels, generator, world: World | None = None):
    """Light augmentation on uint8 [B, 3, S, S]: brightness x 0.9-1.1. No flips (captions say left and
    right), no hue changes (they say colours), and no shifts: a +-2 px random shift at 32 px cut zero-shot
    position accuracy from 0.67 to 0.29 and size from 0.68 to 0.59 after 300 steps (2,000 images).
    Under torchrun `pixels` are this rank's rows; the gains are drawn for the global batch and sliced."""
    import torch

    from trainers.runtime.distributed import SINGLE

    world = world or SINGLE
    n = pixels.shape[0] * world.size
    gain = world.part(0.9 + 0.2 * torch.rand((n, 1, 1, 1), generator=generator))  # [B, 1, 1, 1]
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


class CaptionTokens:
    """The tokenizer with a memory: the partial world's captions repeat (a few templates over a few attribute
    subsets), and tokenizing each step's batch anew was about a tenth of a CPU step."""

    LIMIT = 200_000  # captions kept (77 int64 each: about 120 MB at most)

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, captions: list[str]):
        import torch

        new = [c for c in dict.fromkeys(captions) if c not in self.known]
        if new:
            if len(self.known) + len(new) > self.LIMIT:
                self.known.clear()
            self.known.update(zip(new, self.tokenizer(new), strict=True))
        return torch.stack([self.known[c] for c in captions])


def groups_per_step(batch_size: int, group: int, n_groups: float, world: World) -> int:
    """Contrast groups in each global batch (`batch_rows`: batch // group, at least 1, at most the data's);
    refused when the ranks cannot take the same whole number of groups each."""
    groups = int(min(max(1, batch_size // group), n_groups))
    if groups % world.size:
        fix = max(1, groups // world.size) * world.size * group
        raise ConfigError(
            f"--batch-size {batch_size} is {groups} contrast group(s) of {group} pairs, which {world.size} "
            f"processes cannot share as whole groups; use --batch-size {fix}"
        )
    return groups


def clip_loss(loss_fn, img_feat, txt_feat, logit_scale, world: World):
    """open_clip's ClipLoss over the global batch: on every rank's gathered features
    (trainers.runtime.distributed; backpropagate `world.coupled(loss)`). The logit scale enters that loss
    whole on every rank, not
    through this rank's rows, so `coupled` would count its gradient once per rank: it is divided back."""
    scale = logit_scale.exp()
    if world.distributed and scale.requires_grad:  # a fixed --temperature has no gradient to divide
        scale.register_hook(lambda grad: grad / world.size)
    return loss_fn(world.gather(img_feat), world.gather(txt_feat), scale)


def global_batch_norms(model, world: World) -> None:
    """Replace the model's BatchNorm2d layers (rn32's ModifiedResNet) by ones whose training statistics are
    the global batch's (`global_batch_norm_class`), keeping their parameters and buffers: the same state
    dict. Under torchrun only: one process keeps torch's."""
    import torch

    if not world.distributed:
        return
    cls = global_batch_norm_class()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.BatchNorm2d:
                setattr(parent, name, cls.like(child))


@functools.cache
def global_batch_norm_class() -> type:
    """GlobalBatchNorm2d, defined on first use so that importing this module does not import torch."""
    import torch
    import torch.distributed as dist

    class SumOverRanks(torch.autograd.Function):
        """x summed over the ranks; the backward sums the gradients over the ranks too, so each rank gets
        the gradient of every rank's loss with respect to its own rows (SyncBatchNorm's rule)."""

        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            dist.all_reduce(x)
            return x

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
            return grad

    class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
        """BatchNorm2d whose training statistics are those of the global batch (every rank's rows), as in
        one process: torch's SyncBatchNorm does this on GPUs only, and the gloo (CPU) launches need it too.
        In eval mode, or without a process group, it is BatchNorm2d."""

        @classmethod
        def like(cls, bn: torch.nn.BatchNorm2d) -> GlobalBatchNorm2d:
            new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            new.weight, new.bias = bn.weight, bn.bias
            new.running_mean, new.running_var = bn.running_mean, bn.running_var
            new.num_batches_tracked = bn.num_batches_tracked
            return new.train(bn.training)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not (self.training and dist.is_available() and dist.is_initialized()):
                return super().forward(x)
            n = x.numel() // x.shape[1] * dist.get_world_size()  # values per channel in the global batch
            mean = SumOverRanks.apply(x.sum((0, 2, 3))) / n  # [C]
            centred = x - mean[None, :, None, None]  # [b, C, H, W]
            var = SumOverRanks.apply(centred.square().sum((0, 2, 3))) / n  # [C], biased (normalisation)
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.lerp_(mean, m)
                    self.running_var.lerp_(var * n / max(1, n - 1), m)  # unbiased, as torch's
            y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
            if self.affine:
                y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
            return y

    return GlobalBatchNorm2d


@dataclass
class ClipTrainResult:
    run_dir: Path | None  # None on the ranks other than 0 of a torchrun launch (they write nothing)
    checkpoint: Path | None
    model_config: Path | None
    eval_path: Path | None
    losses: list[float]
    evaluation: dict[str, Any]
    model: Any  # the trained model, eval mode (for tests and callers that go on using it)
    resumed_at: int = 0  # the step a --resume continued from (0: trained from the start)


def train_clip(config: ClipTrainConfig, progress: Callable[[int], None] | None = None) -> ClipTrainResult:
    """Validate, read the pairs, train, save, evaluate. `progress(n)` after each n steps. Under torchrun,
    data-parallel (see the module docstring): rank 0 writes, evaluates and returns the result; the other
    ranks return one without a run dir."""
    from trainers.engine.loop import launch

    # the batch is split as whole contrast groups, checked by groups_per_step
    return launch(config, functools.partial(_train_clip, config), progress, split_batch=False)


def _train_clip(config: ClipTrainConfig, world: World, device_name: str, progress) -> ClipTrainResult:
    import torch
    from open_clip.loss import ClipLoss

    from trainers.engine.loop import lr_at
    from trainers.runtime.runs import new_run_dir, select_device

    device = select_device(device_name)
    if not config.data:  # the stream's groups are known before rendering it: refuse a bad split first
        groups_per_step(
            config.batch_size, config.contrast_group, -(-config.pretrain_n // config.contrast_group), world
        )
    if config.out is None and world.main:
        config = replace(config, out=new_run_dir(Path("runs"), f"clip-{config.size}"))
    model, tokenizer, name, model_cfg, mean, std, image_size = build_clip(config.size, config.seed, device)
    model = model.to(memory_format=torch.channels_last)  # its convolutions: 12% of a CPU step faster
    t0 = time.perf_counter()
    if config.data:
        data = read_pairs(config.data, image_size)
    else:
        data = render_pairs(
            config.pretrain_n, config.seed, image_size, config.contrast_group, config.max_objects
        )
    groups_per_step(config.batch_size, data.group, len(data.captions) // data.group, world)
    redraw = config.caption_style == "partial" and data.objects is not None  # fresh captions every step
    tokens = None if redraw else tokenizer(data.captions)  # [N, context_length]
    tokens_of = CaptionTokens(tokenizer)
    t_read = time.perf_counter()

    model.train()
    if config.temperature is not None:  # fixed: the logit scale is 1 / temperature and not learnt
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / config.temperature))
        model.logit_scale.requires_grad_(False)
    optimizers = make_optimizers(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    start, losses = resume_train_state(config, model, optimizers, generator)
    if start and progress:
        progress(start)  # the bar continues where the saved run stopped
    global_batch_norms(model, world)
    world.broadcast([model])
    loss_fn = ClipLoss()
    n = len(data.captions)
    for step in range(start, config.steps):
        idx = batch_rows(data, config.batch_size, generator)  # [B]: the global batch, the same on every rank
        rows = world.part(idx)  # [b]: this rank's whole contrast groups
        images = normalise(augment(data.pixels[rows], generator, world), mean, std).to(device)  # [b, 3, S, S]
        images = images.contiguous(memory_format=torch.channels_last)
        if redraw:
            text = tokens_of(step_captions(data, rows, config.seed, step)).to(device)  # [b, L]
        else:
            text = tokens[rows].to(device)  # [b, L]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
        if config.temperature_start is not None:  # annealed: the logit scale of this step
            with torch.no_grad():
                model.logit_scale.fill_(math.log(1.0 / config.temperature_at(step)))
        img_feat = model.encode_image(images, normalize=True)  # [b, D]
        txt_feat = model.encode_text(text, normalize=True)  # [b, D]
        loss = clip_loss(loss_fn, img_feat, txt_feat, model.logit_scale, world)  # the global batch's
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        world.coupled(loss).backward()
        world.average_gradients(model.parameters())
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        if world.main and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save_train_state(config, step + 1, model, optimizers, generator, losses)
        if progress:
            progress(1)
    t_train = time.perf_counter()
    model.eval()
    if not world.main:  # the other ranks trained in step and write nothing
        return ClipTrainResult(None, None, None, None, losses, {}, model, start)

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
            "caption_style": config.caption_style,
        },
        "loss_first": round(float(np.mean(losses[: max(1, min(10, len(losses) // 10))])), 4),
        "loss_last": round(float(np.mean(losses[-max(1, min(10, len(losses) // 10)) :])), 4),
        "loss_every_10": [round(v, 4) for v in losses[::10]],
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "temperature": config.temperature,  # None: learnt (logit_scale is 1 / the learnt temperature)
        "temperature_start": config.temperature_start,  # None: fixed from the first step
        "seconds": {"read": round(t_read - t0, 2), "train": round(t_train - t_read, 2)},
        "device": str(device),
    }
    if config.eval_n:
        with torch.no_grad():
            held_out = (model, tokenizer, mean, std, image_size, config.eval_n, config.eval_seed, device)
            evaluation.update(zero_shot(*held_out, config.caption_style))
            evaluation["modality_gap"] = modality_gap(*held_out, config.caption_style)
            evaluation["zero_shot_two_objects"] = zero_shot_slots(
                model, tokenizer, mean, std, image_size, config.eval_n, config.eval_seed, device
            )
    eval_path = out / "clip_eval.json"
    write_json_atomic(eval_path, evaluation)
    (out / TRAIN_STATE).unlink(missing_ok=True)  # clip.pt holds the run now
    return ClipTrainResult(
        out, out / "clip.pt", out / "clip_config.json", eval_path, losses, evaluation, model, start
    )


# ---------------------------------------------------------------------------------------------------------
# Zero-shot attribute accuracy on held-out synthetic images
# ---------------------------------------------------------------------------------------------------------


def describe(result: ClipTrainResult) -> str:
    if result.run_dir is None:  # a rank other than 0 of a torchrun launch
        return f"clip: {len(result.losses)} steps, loss {result.losses[-1]:.3f} (rank 0 wrote the run)"
    ev = result.evaluation
    zs = ev.get("zero_shot")
    acc = ", ".join(f"{k} {v:.2f}" for k, v in zs.items()) if zs else "not evaluated"
    resumed = f" (resumed at step {result.resumed_at:,})" if result.resumed_at else ""
    return (
        f"clip: {ev['steps']} steps{resumed} on {ev['pairs']:,} pairs, "
        f"loss {ev['loss_first']:.3f} -> {ev['loss_last']:.3f}; "
        f"zero-shot {acc}{describe_gap(ev.get('modality_gap'))} -> {result.checkpoint}"
    )


def describe_gap(gap: dict[str, Any] | None) -> str:
    """'; modality gap: cos(image, own caption) 0.31, gap vector 0.74' (empty when not measured)."""
    if not gap:
        return ""
    return (
        f"; modality gap: cos(image, own caption) {gap['cos_image_own_caption']:.2f}, "
        f"gap vector {gap['gap_vector_length']:.2f}"
    )


def read_eval(run_dir: Path) -> dict[str, Any]:
    fix = f"retrain with `trainers clip --out {run_dir} --force` to remake it"
    return read_json(Path(run_dir) / "clip_eval.json", fix)
