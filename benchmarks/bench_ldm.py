"""Benchmark the latent-diffusion trainer: training images/s and peak memory, and sampling images/s.

Training: one step = VAE encode (frozen, posterior mean) + DiT rectified-flow loss + backward + Adam,
against the DiT step alone on latents already in memory (the baseline: what a latent cache would
give). Sampling: 50 Euler steps with guidance 1 (one forward per step) against guidance 3 (two), then
the VAE decode. Synthetic inputs, no cache needed.

Also reached as `python benchmarks/bench_train.py --model ldm [these options]`.

    python benchmarks/bench_ldm.py                                  # CPU: tiny at 32 px
    python benchmarks/bench_ldm.py --device cuda --size S --resolution 64 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from trainers.autoencoders.vae.model import DOWNSAMPLE, AutoencoderKL, vae_architecture
    from trainers.families.ldm.model import Dit, flow_loss, ldm_architecture, sample_euler

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default=None, help="LDM_SIZES entry (default: S on CUDA, tiny on CPU)")
    parser.add_argument("--vae-size", default=None, help="VAE_SIZES entry (default: small CUDA, tiny CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="image px (default: 64 CUDA, 32 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 64 CUDA, 16 CPU)")
    parser.add_argument("--sample-batch", type=int, default=None, help="(default: 64 CUDA, 8 CPU)")
    parser.add_argument("--h-dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("S" if cuda else "tiny")
    vae_size = args.vae_size or ("small" if cuda else "tiny")
    res = args.resolution or (64 if cuda else 32)
    batch = args.batch or (64 if cuda else 16)
    sample_batch = args.sample_batch or (64 if cuda else 8)
    torch.manual_seed(0)

    vae = AutoencoderKL(vae_architecture(vae_size, res)).to(device).eval().requires_grad_(False)
    latent = res // DOWNSAMPLE
    arch = ldm_architecture(
        size, vae.arch["latent_channels"] if hasattr(vae, "arch") else 4, latent, args.h_dim, 1.0
    )
    model = Dit(arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1  # [B, 3, R, R]
    h = torch.nn.functional.normalize(torch.randn(batch, args.h_dim, device=device), dim=1)  # [B, D]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        cached = vae.encode(images)[0]  # [B, C, r, r] posterior mean: what a latent cache holds

    def dit_step(x0: torch.Tensor) -> None:
        with autocast:
            loss = flow_loss(model, x0, h, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def full_step() -> None:
        with torch.no_grad(), autocast:
            x0 = vae.encode(images)[0].float()
        dit_step(x0)

    rows, base = [], {**stamp(args.device), "size": size, "vae": vae_size, "px": res}
    for what, fn, n in (
        ("train: DiT step on cached latents (baseline)", lambda: dit_step(cached), batch),
        ("train: VAE encode + DiT step", full_step, batch),
    ):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(fn, device, args.reps)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if cuda else "n/a"
        rows.append(
            {
                **base,
                "what": what,
                "batch": n,
                "ms": round(seconds * 1e3, 1),
                "images_per_s": round(n / seconds, 1),
                "peak_mem_gib": peak,
            }
        )
    model.eval()
    noise = torch.randn(sample_batch, arch["latent_channels"], latent, latent, device=device)
    hs = h[:1].expand(sample_batch, -1)
    for guidance in (1.0, 3.0):

        def sample(g=guidance) -> None:
            with torch.no_grad(), autocast:
                vae.decode(sample_euler(model, noise, hs, args.sample_steps, g))

        seconds = timed(sample, device, max(1, args.reps // 2), warmup=1)
        rows.append(
            {
                **base,
                "what": f"sample: {args.sample_steps} Euler steps, guidance {guidance:g}",
                "batch": sample_batch,
                "ms": round(seconds * 1e3, 1),
                "images_per_s": round(sample_batch / seconds, 1),
                "peak_mem_gib": "",
            }
        )
    if not args.no_csv:
        append_rows("ldm", rows)
    print_table(rows, ["device", "size", "px", "what", "batch", "ms", "images_per_s", "peak_mem_gib"])


if __name__ == "__main__":
    main()
