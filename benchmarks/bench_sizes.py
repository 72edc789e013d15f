"""What each `--size` of every `trainers` family costs: seconds per training step on this CPU, FLOPs per
step, and an *estimated* (not measured) time per step on one H100.

For each family and each entry of its size registry (trainers.families.gan.model.GAN_SIZES, vae.VAE_SIZES,
ldm.LDM_SIZES, dvae.DVAE_SIZES, dalle.DALLE_SIZES, clip_config.CLIP_SIZES) the family's trainer is built as
its command builds it, with its config's default batch size, at the resolution the size is meant for (SIZES
below), and stepped on one fixed synthetic batch in memory (images in [-1, 1], unit-norm conditions of the
CLIP's width; `trainers clip`: uint8 images and tokenised captions). No cache, no loader, untrained weights:
untrained and trained weights cost the same.

    gan    GanTrainer.train_step; L_ConG's CLIP (random weights) as the cache would have at that size:
           lafite-tiny at 32 px, lafite-small at 64 px, ViT-B-32 at 128 px and more
    vae    VaeTrainer.train_step with the perceptual term through that same CLIP (no discriminator: the
           default --disc-weight 0)
    ldm    LdmTrainer.train_step on a frozen untrained VAE (the batch encoded in the step, as a run
           without `trainers vae --encode`'s latents does; the encode is a small share of the step)
    dvae   DvaeTrainer.train_step
    dalle  DalleTrainer.train_step on a frozen untrained dVAE (tokens encoded in the step, likewise)
    clip   the step of trainers.clip.train._train_clip (augment, both towers, ClipLoss, AdamW +
           SparseAdam, logit-scale clamp), which has no trainer object of its own

Measured per row:

    CPU s/step      median over --steps timed steps after one warm-up step. The GAN's lazy R1 runs on
                    every 16th step (StyleGAN2, --r1-every) and costs about twice a plain step, so the R1
                    step and the plain step are each warmed up and timed (R1 once, plain --steps times)
                    and the row reports (t_R1 + 15 t_plain) / 16: the cost per step of a real run.
                    A row whose warm-up step takes over --max-seconds-per-step is not timed further: its
                    figure is that one warm-up step (with the FLOP counter on: negligible at that size).
    GFLOP/step      torch.utils.flop_counter.FlopCounterMode over the warm-up step (forward, backward,
                    the R1 double backward, the frozen CLIP/autoencoder): matmuls, convolutions and
                    attention, which is what bounds a GPU at these sizes; elementwise work (norms,
                    activations, Adam's update) is not counted. GAN: the R1-weighted mean as above.
                    Two changes to the counter (counted_step): its per-module tracker is off (it breaks
                    R1's autograd.grad), and the CPU attention kernels are added to its registry (it
                    knows the CUDA ones only, so attention would count 0 here).
    CPU GFLOP/s     GFLOP/step / CPU s/step: how well the CPU runs that size.
    est. H100 ms    an ESTIMATE, nothing was run on a GPU: max(FLOPs / --gpu-tflops, aten ops x
                    --launch-us). The first term assumes a sustained --gpu-tflops (default 100 TFLOP/s:
                    bf16 autocast at these small widths, about a tenth of the H100's dense peak); the
                    second is eager PyTorch's per-op host overhead (ops counted in the warm-up step),
                    which bounds the small sizes: `bound` says which term won.
    peak RSS        the process's peak resident memory while the row was built and stepped (VmHWM after
                    resetting it through /proc/self/clear_refs; Linux only, else blank). It includes the
                    interpreter and torch (about the baseline printed first).

Each row runs in an interpreter of its own (--in-process: all in this one), so its peak RSS is its own,
and its address space is capped (--max-memory-gib): a row too big for the machine is reported "out of
memory" rather than calling the kernel's OOM killer, which on a shared machine may kill a neighbour.

Rows are appended to benchmarks/results/sizes.csv (date, commit, device, threads, load average at
start) unless --no-csv. Busy machines make the CPU times rough: the load average is recorded for that.

    python benchmarks/bench_sizes.py                                   # every family and size
    python benchmarks/bench_sizes.py --families gan,vae --sizes small --steps 5
    OMP_NUM_THREADS=1 python benchmarks/bench_sizes.py --threads 1 --steps 2 --max-seconds-per-step 120
"""

import argparse
import ctypes
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_rows, print_table, stamp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

FAMILIES = ("gan", "vae", "ldm", "dvae", "dalle", "clip")
# family -> size -> (resolutions, the autoencoder size it trains on) where neither the registry nor the
# trainer says it: the compare presets' pairings when the rows were measured (cpu: tiny/mini at 32 px,
# gpu: small/S at 64 px; since 2026-12-07 the cpu preset pairs ldm tiny with vae mini, dalle mini with
# dvae tiny)
SIZES: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
    "vae": {"tiny": ((32,), ""), "mini": ((32,), ""), "small": ((64,), "")},  # small: "32-64 px world"
    "ldm": {"tiny": ((32,), "tiny"), "S": ((64,), "small"), "B": ((64,), "small")},  # VAE_SIZES entry
    "dvae": {"tiny": ((32,), ""), "mini": ((32,), ""), "small": ((64,), ""), "small8": ((64,), "")},
    "dalle": {  # DVAE_SIZES entry: small at 32 px is 8 x 8 tokens, at 64 px 16 x 16
        "tiny": ((32,), "tiny"),
        "mini": ((32,), "small"),
        "small": ((64,), "small"),
        "base": ((64,), "small"),
    },
}
FAMILY_MODULES = {  # family -> (its size registry, its command's config: the default --batch-size)
    "gan": ("trainers.families.gan.model:GAN_SIZES", "trainers.families.gan.config:GanConfig"),
    "vae": ("trainers.autoencoders.vae.model:VAE_SIZES", "trainers.autoencoders.vae.config:VaeConfig"),
    "ldm": ("trainers.families.ldm.model:LDM_SIZES", "trainers.families.ldm.config:LdmConfig"),
    "dvae": ("trainers.autoencoders.dvae.model:DVAE_SIZES", "trainers.autoencoders.dvae.config:DvaeConfig"),
    "dalle": ("trainers.families.dalle.model:DALLE_SIZES", "trainers.families.dalle.config:DalleConfig"),
    "clip": ("trainers.clip.config:CLIP_SIZES", "trainers.clip.config:ClipTrainConfig"),
}
CLIP_AT = {32: "lafite-tiny", 64: "lafite-small"}  # the GAN's and VAE's CLIP by px; ViT-B-32 above
CAPTIONS = ("a small red circle on the left", "one large blue star at the top", "a green cross, centre")
TABLE_COLUMNS = (
    "family size px batch with params_m gflop_step cpu_s_step steps status cpu_gflops est_h100_ms bound "
    "peak_rss_gib"
).split()


@dataclass
class Bench:
    """One row's trainer, ready to step: `step()` runs one training step on the fixed batch; `phases` are
    (weight, prepare) pairs whose weighted mean is the cost of a step of a real run (the GAN's R1)."""

    step: Callable[[], None]
    params: int  # trainable parameters of what the step trains
    using: str  # the frozen model the step also runs: a CLIP, an autoencoder, or the CLIP config trained
    phases: list[tuple[float, Callable[[], None]]] = field(default_factory=lambda: [(1.0, lambda: None)])


def random_batch(batch: int, px: int, h_dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(batch, 3, px, px, generator=g) * 2 - 1,  # [B, 3, R, R]
        "cond": F.normalize(torch.randn(batch, h_dim, generator=g), dim=1),  # [B, D]
    }


def clip_for(px: int, override: str | None) -> str:
    return override or CLIP_AT.get(px, "ViT-B-32")


def n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


# --- one builder per family: (size, px, batch, clip override, autoencoder size) -> Bench -----------------


def build_gan(size: str, px: int, batch: int, clip_model: str | None, _ae: str) -> Bench:
    from core.clip import load_clip
    from trainers.families.gan.config import GanConfig
    from trainers.families.gan.model import architecture
    from trainers.families.gan.train import GanTrainer

    clip = load_clip(clip_for(px, clip_model), None, "cpu")
    config = GanConfig(size=size, batch_size=batch, device="cpu")
    trainer = GanTrainer(config, architecture(size, px, clip.dim), clip, torch.device("cpu"))
    data, every = random_batch(batch, px, clip.dim), config.r1_every

    def at(step: int) -> Callable[[], None]:
        return lambda: setattr(trainer, "step", step)  # step % r1_every == 0: the R1 step

    phases = [(1 / every, at(0)), ((every - 1) / every, at(1))]
    using = clip_for(px, clip_model)
    return Bench(lambda: trainer.train_step(data), n_params(trainer.G, trainer.D), using, phases)


def build_vae(size: str, px: int, batch: int, clip_model: str | None, _ae: str) -> Bench:
    from core.clip import load_clip
    from trainers.autoencoders.vae.config import VaeConfig
    from trainers.autoencoders.vae.model import vae_architecture
    from trainers.autoencoders.vae.train import VaeTrainer

    clip = load_clip(clip_for(px, clip_model), None, "cpu")
    config = VaeConfig(size=size, batch_size=batch, device="cpu")
    trainer = VaeTrainer(config, vae_architecture(size, px), clip, torch.device("cpu"))
    data = random_batch(batch, px, 1)
    return Bench(lambda: trainer.train_step(data), n_params(trainer.model), clip_for(px, clip_model))


def build_ldm(size: str, px: int, batch: int, clip_model: str | None, vae_size: str) -> Bench:
    from core.clip_models import model_dim
    from trainers.autoencoders.vae.model import DOWNSAMPLE, AutoencoderKL, vae_architecture
    from trainers.families.ldm.config import LdmConfig
    from trainers.families.ldm.model import ldm_architecture
    from trainers.families.ldm.train import LdmTrainer

    vae_arch = vae_architecture(vae_size, px)
    vae = AutoencoderKL(vae_arch).eval().requires_grad_(False)
    h_dim = model_dim(clip_for(px, clip_model))
    arch = ldm_architecture(size, vae_arch["latent_channels"], px // DOWNSAMPLE, h_dim, 1.0)
    trainer = LdmTrainer(LdmConfig(size=size, batch_size=batch, device="cpu"), arch, vae, torch.device("cpu"))
    data = random_batch(batch, px, h_dim)
    return Bench(lambda: trainer.train_step(data), n_params(trainer.model), f"vae {vae_size}")


def build_dvae(size: str, px: int, batch: int, _clip: str | None, _ae: str) -> Bench:
    from trainers.autoencoders.dvae.config import DvaeConfig
    from trainers.autoencoders.dvae.model import dvae_architecture
    from trainers.autoencoders.dvae.train import DvaeTrainer

    config = DvaeConfig(size=size, batch_size=batch, device="cpu")
    trainer = DvaeTrainer(config, dvae_architecture(size, px), torch.device("cpu"))
    data = random_batch(batch, px, 1)
    return Bench(lambda: trainer.train_step(data), n_params(trainer.model), "")


def build_dalle(size: str, px: int, batch: int, clip_model: str | None, dvae_size: str) -> Bench:
    from core.clip_models import model_dim
    from trainers.autoencoders.dvae.model import DiscreteVAE, dvae_architecture
    from trainers.families.dalle.config import DalleConfig
    from trainers.families.dalle.model import DalleTransformer
    from trainers.families.dalle.train import DalleTrainer

    dvae = DiscreteVAE(dvae_architecture(dvae_size, px)).eval().requires_grad_(False)
    h_dim = model_dim(clip_for(px, clip_model))
    model = DalleTransformer(size, vocab=dvae.vocab_size, grid=dvae.grid, cond_dim=h_dim)
    config = DalleConfig(size=size, batch_size=batch, device="cpu")
    trainer = DalleTrainer(config, model, dvae, torch.device("cpu"))
    data = random_batch(batch, px, h_dim)
    using = f"dvae {dvae_size}, {'x'.join(map(str, dvae.grid))} tokens"
    return Bench(lambda: trainer.train_step(data), n_params(trainer.model), using)


def build_clip(size: str, px: int, batch: int, _clip: str | None, _ae: str) -> Bench:
    from open_clip.loss import ClipLoss

    from trainers.clip.config import CLIP_SIZES, ClipTrainConfig
    from trainers.clip.data import normalise
    from trainers.clip.train import MAX_LOGIT_SCALE, augment, build_clip, clip_loss, make_optimizers
    from trainers.engine.loop import lr_at
    from trainers.runtime.distributed import SINGLE

    config = ClipTrainConfig(size=size, batch_size=batch, device="cpu")
    model, tokenizer, _, _, mean, std, image_size = build_clip(size, config.seed, "cpu")
    model.train()
    optimizers, loss_fn = make_optimizers(model, config), ClipLoss()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    text = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])  # [B, L]

    def step() -> None:  # the loop body of trainers.clip.train._train_clip, one process
        images = normalise(augment(pixels, g), mean, std)  # [B, 3, S, S]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(0, config)
        img_feat = model.encode_image(images, normalize=True)  # [B, D]
        txt_feat = model.encode_text(text, normalize=True)  # [B, D]
        loss = clip_loss(loss_fn, img_feat, txt_feat, model.logit_scale, SINGLE)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    return Bench(step, n_params(model), CLIP_SIZES[size])


BUILDERS = {
    "gan": build_gan,
    "vae": build_vae,
    "ldm": build_ldm,
    "dvae": build_dvae,
    "dalle": build_dalle,
    "clip": build_clip,
}


@dataclass(frozen=True)
class Case:
    family: str
    size: str
    px: int
    batch: int
    autoencoder: str  # ldm: VAE_SIZES entry, dalle: DVAE_SIZES entry, else ""


def family_cases(family: str, resolution: int | None, batch: int | None) -> list[Case]:
    """Every size of the family's registry at the resolutions it is meant for, its command's batch."""
    from core.clip_models import model_config
    from core.lazy import member

    registry, config = (member(ref) for ref in FAMILY_MODULES[family])
    if family == "gan":
        sizes = {name: (spec.resolutions, "") for name, spec in registry.items()}
    elif family == "clip":  # the bundled config's input size
        sizes = {
            name: ((model_config(cfg)[1]["vision_cfg"]["image_size"],), "") for name, cfg in registry.items()
        }
    else:
        missing = sorted(set(registry) - set(SIZES[family]))
        if missing:  # a new registry entry: say where its resolution goes rather than guess it
            raise SystemExit(f"bench_sizes: {family} sizes {missing} have no entry in SIZES; add one")
        sizes = SIZES[family]
    batch = batch or config.batch_size  # the dataclass default: the command's
    return [
        Case(family, name, px, batch, ae)
        for name, (resolutions, ae) in sizes.items()
        for px in ((resolution,) if resolution and family != "clip" else resolutions)  # clip: its config's
    ]


# --- measuring, shared by every family ---------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches: roughly its kernel launches on a GPU, run eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class _TotalOnly:
    """FlopCounterMode's per-module tracker hooks every module's backward, which makes the R1 penalty's
    autograd.grad on a leaf raise ("A leaf node was passed to _will_engine_execute_node ..."): count
    the total only."""

    parents = ("Global",)

    def __enter__(self) -> "_TotalOnly":
        return self

    def __exit__(self, *exc) -> None:
        return None


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# CPU attention kernels the registry lacks (it has the CUDA ones): attention FLOPs would read 0 on a CPU
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def counted_step(step: Callable[[], None]) -> tuple[float, int, float]:
    """(FLOPs, aten ops, seconds) of one step, run under the FLOP and op counters."""
    flops, ops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS), OpCounter()
    flops.mod_tracker = _TotalOnly()
    t0 = time.perf_counter()
    with flops, ops:
        step()
    return float(flops.get_total_flops()), ops.ops, time.perf_counter() - t0


def timed_step(step: Callable[[], None], prepare: Callable[[], None]) -> float:
    prepare()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def measure(bench: Bench, steps: int, max_seconds: float) -> dict[str, float]:
    """FLOPs, ops and seconds per step, each the phases' weighted mean; `timed`: the steps the median of the
    heaviest phase is over (0: its warm-up step's time, over `max_seconds`)."""
    flops = ops = seconds = 0.0
    timed, over, main = steps, False, max(w for w, _ in bench.phases)
    for weight, prepare in bench.phases:
        prepare()
        f, n, first = counted_step(bench.step)  # the warm-up step
        flops, ops = flops + weight * f, ops + weight * n
        over = over or first > max_seconds
        if over:
            seconds, timed = seconds + weight * first, 0
            continue
        reps = steps if weight == main else 1  # the rare R1 step once: 1/16 of the figure
        seconds += weight * statistics.median(timed_step(bench.step, prepare) for _ in range(reps))
    return {"flops": flops, "ops": ops, "seconds": seconds, "timed": timed}


def reset_peak_rss() -> bool:
    """Drop freed heap back to the OS and restart the kernel's resident high-water mark (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_gib(field_name: str, path: str = "/proc/self/status") -> float | None:
    """A `Field:  N kB` line of a /proc file (this process's status, or /proc/meminfo) in GiB, or None."""
    try:
        with open(path) as f:
            line = next(line for line in f if line.startswith(field_name + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 2**20  # kB -> GiB


def case_cells(case: Case) -> dict:
    return {"family": case.family, "size": case.size, "px": case.px, "batch": case.batch}


def run_case(case: Case, args: argparse.Namespace, built: Callable[[], None] = lambda: None) -> dict:
    """One row; `built()` is called once the trainer is built, before its first step."""
    rss_ok = reset_peak_rss()
    torch.manual_seed(0)
    bench = BUILDERS[case.family](case.size, case.px, case.batch, args.clip_model, case.autoencoder)
    built()
    m = measure(bench, args.steps, args.max_seconds_per_step)
    peak = proc_gib("VmHWM") if rss_ok else None
    compute_ms = m["flops"] / (args.gpu_tflops * 1e12) * 1e3
    launch_ms = m["ops"] * args.launch_us / 1e3
    return {
        **case_cells(case),
        "with": bench.using,
        "params_m": f"{bench.params / 1e6:.2f}",
        "gflop_step": f"{m['flops'] / 1e9:.3g}",
        "cpu_s_step": f"{m['seconds']:.3f}",
        "steps": m["timed"],
        "status": "ok" if m["timed"] else "warm-up step only",
        "cpu_gflops": f"{m['flops'] / 1e9 / m['seconds']:.3g}",
        "est_h100_ms": f"{max(compute_ms, launch_ms):.3g}",
        "bound": "flops" if compute_ms >= launch_ms else "launch",
        "aten_ops": round(m["ops"]),
        "peak_rss_gib": "" if peak is None else f"{peak:.2f}",
    }


# how an allocation over the cap surfaces: torch's CPU allocator, or oneDNN building a convolution
MEMORY_ERRORS = ("can't allocate memory", "could not create a primitive")


def run_limited(case: Case, args: argparse.Namespace) -> dict:
    """run_case with the address space capped, once the row is built (imports, weights), at what it has
    then plus --max-memory-gib: a row too big for the machine fails here, alone, instead of waking the
    kernel's OOM killer (which may pick another process: the machine is shared)."""
    import resource

    limit_gib = args.max_memory_gib or 0.75 * (proc_gib("MemAvailable", "/proc/meminfo") or float("inf"))

    def cap() -> None:
        if limit_gib < float("inf") and proc_gib("VmSize") is not None:
            limit = int((proc_gib("VmSize") + limit_gib) * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    try:
        return run_case(case, args, built=cap)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not any(m in str(e) for m in MEMORY_ERRORS):
            raise
        return {**case_cells(case), "steps": 0, "status": f"out of memory (over {limit_gib:.3g} GiB)"}


ROW_PREFIX = "bench_sizes row: "


def run_isolated(case: Case, args: argparse.Namespace) -> dict:
    """run_case in a fresh interpreter: the peak RSS is this row's alone, and a row the kernel kills for
    memory (`run_limited`) or kills is reported instead of ending the sweep."""
    given = {"--steps": args.steps, "--max-seconds-per-step": args.max_seconds_per_step}
    given |= {"--gpu-tflops": args.gpu_tflops, "--launch-us": args.launch_us}
    given |= {
        "--threads": args.threads,
        "--clip-model": args.clip_model,
        "--max-memory-gib": args.max_memory_gib,
    }
    argv = [str(x) for flag, value in given.items() if value is not None for x in (flag, value)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(asdict(case)), *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    rows = [line[len(ROW_PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if proc.returncode == 0 and rows:
        return json.loads(rows[-1])
    why = f"exit {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
    oom = " (out of memory?)" if proc.returncode == -signal.SIGKILL else ""
    return {**case_cells(case), "steps": 0, "status": f"failed: {why}{oom}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all)")
    parser.add_argument("--sizes", help="comma-separated size names, any family (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up")
    parser.add_argument(
        "--max-seconds-per-step",
        type=float,
        default=float("inf"),
        help="a row whose warm-up step takes longer is not timed further",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="assumed sustained H100 TFLOP/s")
    parser.add_argument("--launch-us", type=float, default=10.0, help="assumed host overhead per aten op, us")
    parser.add_argument(
        "--resolution",
        type=int,
        help="every row at this px instead of its size's (clip rows keep their config's)",
    )
    parser.add_argument("--batch", type=int, help="every row at this batch instead of its command's default")
    parser.add_argument("--clip-model", help="the GAN's and VAE's CLIP (and conditions' width) for every row")
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the rows in this process, not one interpreter each (quicker to start; the peak RSS "
        "then carries earlier rows' leftovers, and a row killed for memory ends the sweep)",
    )
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        help="a row's process may grow by this much before its allocations fail and the row is reported "
        "out of memory (default: 3/4 of the memory available when it starts; rows run one interpreter each)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one row, as JSON: what run_isolated runs
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown or not args.families:
        parser.error(f"--families {','.join(unknown)}: choose from {','.join(FAMILIES)}")
    if args.steps < 1 or (args.batch is not None and args.batch < 2):
        parser.error("--steps must be at least 1 and --batch at least 2")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*random weights.*")
    if args.case:  # a row of run_isolated's
        print(ROW_PREFIX + json.dumps(run_limited(Case(**json.loads(args.case)), args)), flush=True)
        return []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cases = [c for f in args.families for c in family_cases(f, args.resolution, args.batch)]
    if args.sizes:
        wanted = set(args.sizes.split(","))
        if wanted - {c.size for c in cases}:
            raise SystemExit(
                f"bench_sizes: --sizes {','.join(sorted(wanted - {c.size for c in cases}))}: "
                f"no such size in {','.join(args.families)}"
            )
        cases = [c for c in cases if c.size in wanted]
    reset_peak_rss()
    base = proc_gib("VmRSS")
    print(
        f"{len(cases)} rows, {torch.get_num_threads()} torch threads, load average {load:.2f}, process RSS "
        f"{base or 0:.2f} GiB before the first; est_h100_ms is an ESTIMATE (max of FLOPs / "
        f"{args.gpu_tflops:g} TFLOP/s and aten ops x {args.launch_us:g} us), not a measurement",
        flush=True,
    )
    rows = []
    for case in cases:
        row = run_case(case, args) if args.in_process else run_isolated(case, args)
        done = f"{row['cpu_s_step']} s/step" if "cpu_s_step" in row else row["status"]
        print(f"  {case.family} {case.size} {case.px}px: {done}", flush=True)
        rows.append(row)
    print_table(rows, TABLE_COLUMNS)
    if not args.no_csv:
        extra = {**stamp("cpu"), "threads": torch.get_num_threads(), "load_avg_start": f"{load:.2f}"}
        extra |= {"gpu_tflops": args.gpu_tflops, "launch_us": args.launch_us, "steps_arg": args.steps}
        path = append_rows("sizes", [{**extra, **row} for row in rows])
        print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
