"""Benchmark the DALL-E family: training tokens/s, and sampling images/s with and without the KV cache.

Training, three rows of the same batch (synthetic images and unit-norm conditions, no cache needed):

    transformer step on cached tokens   the baseline: model.loss + backward + AdamW on tokens in memory
    trainer step, token cache            DalleTrainer.train_step with every key found in a TokenCache
    trainer step, dVAE encode            DalleTrainer.train_step encoding the images now (no token cache)

`vs_baseline` is each row's throughput over the baseline's: what the trainer adds (lookup, EMA, clipping,
the schedule) and what a token cache saves. Sampling: the whole grid, guidance 3 (two branches per token),
then the dVAE decode, with the KV cache (one length-1 forward per token) against recomputing the whole
sequence per token; `vs_baseline` there is the cached sampler's speed-up over the uncached one.

Also reached as `python benchmarks/bench_train.py --model dalle [these options]`. Rows are appended to
benchmarks/results/dalle.csv.

    python benchmarks/bench_dalle.py                                  # CPU: mini, small dVAE, 32 px
    python benchmarks/bench_dalle.py --device cuda --size small --resolution 64 --batch 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ldm import timed  # noqa: E402
from common import append_rows, print_table, stamp  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import numpy as np

    from trainers.autoencoders.dvae.encode import TokenCache, image_tokens
    from trainers.autoencoders.dvae.model import DiscreteVAE, decode_tokens, dvae_architecture
    from trainers.data.derived import KeyedRows
    from trainers.families.dalle.config import DalleConfig
    from trainers.families.dalle.model import DalleTransformer
    from trainers.families.dalle.sample import sample_tokens
    from trainers.families.dalle.train import DalleTrainer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default=None, help="DALLE_SIZES entry (default: small CUDA, mini CPU)")
    parser.add_argument("--dvae-size", default="small", help="DVAE_SIZES entry")
    parser.add_argument("--resolution", type=int, default=None, help="image px (default: 64 CUDA, 32 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 64 CUDA, 32 CPU)")
    parser.add_argument("--sample-batch", type=int, default=None, help="(default: 64 CUDA, 16 CPU)")
    parser.add_argument("--h-dim", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("small" if cuda else "mini")
    res = args.resolution or (64 if cuda else 32)
    batch = args.batch or (64 if cuda else 32)
    sample_batch = args.sample_batch or (64 if cuda else 16)
    torch.manual_seed(0)

    dvae = DiscreteVAE(dvae_architecture(args.dvae_size, res)).to(device).eval().requires_grad_(False)
    model = DalleTransformer(size, vocab=dvae.vocab_size, grid=dvae.grid, cond_dim=args.h_dim)
    config = DalleConfig(size=size, batch_size=batch, steps=10**6, warmup=0, device=args.device)
    trainer = DalleTrainer(config, model, dvae, device)
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1  # [B, 3, R, R]
    h = torch.nn.functional.normalize(torch.randn(batch, args.h_dim, device=device), dim=1)  # [B, D]
    keys = [f"k{i:06d}" for i in range(batch)]
    cached = image_tokens(dvae, images)  # [B, h*w]: what the token cache holds
    trainer.token_cache = None
    rows = KeyedRows(keys, cached.cpu().numpy().astype(np.int16), "tokens/bench")  # in memory: B keys
    token_cache = TokenCache(rows, dvae.grid, dvae.vocab_size, "")

    def transformer_step() -> None:
        with trainer.autocast():
            loss = trainer.model.loss(h, cached, cond_drop=config.cond_drop, generator=trainer.drop_rng)
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()

    def trainer_step(with_cache: bool):
        def step() -> None:
            trainer.token_cache = token_cache if with_cache else None
            trainer.train_step({"image": images, "cond": h, "key": keys})

        return step

    n_tokens = batch * dvae.grid[0] * dvae.grid[1]
    base = {
        **stamp(args.device),
        "size": size,
        "dvae": args.dvae_size,
        "px": res,
        "grid": "x".join(map(str, dvae.grid)),
    }
    rows: list[dict] = []

    def row(what: str, seconds: float, n: int, baseline: float | None, **extra) -> dict:
        if cuda:
            extra.setdefault("peak_mem_gib", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}")
        return {
            **base,
            "what": what,
            "batch": n,
            "ms": round(seconds * 1e3, 1),
            "vs_baseline": round(baseline / seconds, 3) if baseline else "",
            **extra,
        }

    train_base = None
    for what, fn in (
        ("train: transformer step on cached tokens (baseline)", transformer_step),
        ("train: trainer step, tokens from the token cache", trainer_step(True)),
        ("train: trainer step, tokens encoded by the dVAE", trainer_step(False)),
    ):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(fn, device, args.reps)
        train_base = train_base or seconds
        rows.append(row(what, seconds, batch, train_base, tokens_per_s=round(n_tokens / seconds, 1)))

    model.eval()
    cond = h[:1].expand(sample_batch, -1).contiguous()
    sample_base = None
    for what, kv in (("sample: without KV cache (baseline)", False), ("sample: KV cache", True)):

        def sample(kv=kv) -> None:
            with torch.no_grad(), trainer.autocast():
                decode_tokens(
                    dvae, sample_tokens(model, cond, seed=0, guidance=args.guidance, use_kv_cache=kv)
                )

        seconds = timed(sample, device, max(1, args.reps // 2), warmup=1)
        sample_base = sample_base or seconds
        rows.append(
            row(
                f"{what}, guidance {args.guidance:g}",
                seconds,
                sample_batch,
                sample_base,
                images_per_s=round(sample_batch / seconds, 2),
            )
        )
    if not args.no_csv:
        append_rows("dalle", rows)
    print_table(rows, ["what", "batch", "ms", "tokens_per_s", "images_per_s", "vs_baseline"])


if __name__ == "__main__":
    main()
