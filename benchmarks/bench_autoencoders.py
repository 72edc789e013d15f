"""Sweep the autoencoders (`trainers vae`, `trainers dvae`) by what their reconstructions keep of the
synthetic world's objects (trainers/autoencoders/recon_probe.py), not by PSNR alone: each variant is trained
on one world cache and judged on its held-out images by the world's probe, beside the real images' accuracy
and the object-erased PSNR reference. The first variant of each family is the baseline, measured in the
same run.

A variant is `FAMILY` or `FAMILY:field=value,field=value` with VaeConfig / DvaeConfig fields, e.g.
`vae`, `vae:lr=1e-3`, `vae:perceptual_weight=0,lr=1e-3`, `dvae:size=tiny,kl_weight=0`.

    python benchmarks/bench_autoencoders.py --variants 'vae;vae:lr=1e-3' --steps 2000
    python benchmarks/bench_autoencoders.py --cache /tmp/world/cache --variants dvae:size=tiny --no-csv

The world: `pipeline synth` (2,000 images, 32 px, one or two objects) embedded with the bundled
lafite-tiny CLIP at random weights (only the VAE's perceptual term reads the CLIP). Times are on this
machine's threads (`OMP_NUM_THREADS`); run nothing else beside it when they are recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402

ATTRIBUTES = ("shape", "colour", "size", "position")


def make_world(root: Path, n: int, image_size: int) -> Path:
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.stage import run_embed
    from world.synth import SynthConfig, run_synth

    run_synth(SynthConfig(out=root / "world", n=n, shard_size=1000, n_captions=200, image_size=image_size))
    config = EmbedConfig(
        inputs=(f"{root / 'world'}/*.tar",),
        cache=root / "cache",
        clip_model="lafite-tiny",
        clip_pretrained="",
        image_size=image_size,
        workers=0,
    )
    run_embed(config)
    return root / "cache"


def parse_variant(text: str) -> tuple[str, dict]:
    family, _, rest = text.partition(":")
    fields = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        fields[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-[{" else value
    return family, fields


def train(family: str, fields: dict, cache: Path, out: Path, steps: int, seed: int):
    base = dict(cache=cache, out=out, steps=steps, seed=seed, checkpoint_every=0, device="cpu")
    if family == "vae":
        from trainers.autoencoders.vae.config import VaeConfig
        from trainers.autoencoders.vae.train import run_vae

        config = VaeConfig(**{"size": "tiny", "batch_size": 32, "eval_n": 256, **base, **fields})
        return run_vae(config).reconstruction, config
    from trainers.autoencoders.dvae.config import DvaeConfig
    from trainers.autoencoders.dvae.train import run_dvae

    config = DvaeConfig(**{"size": "tiny", "batch_size": 32, "eval_n": 256, **base, **fields})
    result = run_dvae(config)
    return {**result.reconstruction, "perplexity": result.eval["perplexity"]}, config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="vae,dvae", help="variants, separated by ;")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--n", type=int, default=2000, help="world images")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cache", default=None, help="an existing world cache (default: made here)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-autoencoders-"))
    rows = []
    try:
        cache = Path(args.cache) if args.cache else make_world(root, args.n, args.image_size)
        for variant in args.variants.split(";"):
            family, fields = parse_variant(variant)
            for seed in (int(s) for s in args.seeds.split(",")):
                t0 = time.perf_counter()
                report, config = train(family, fields, cache, root / "runs", args.steps, seed)
                probe = report["probe"] or {}
                row = {
                    **stamp("cpu"),
                    "variant": variant,
                    "size": config.size,
                    "steps": args.steps,
                    "seed": seed,
                    "train_s": round(time.perf_counter() - t0, 1),
                    "psnr_db": report["psnr_db"],
                    "erased_psnr_db": report["object_erased_psnr_db"],
                    "mean_image_psnr_db": report["mean_image_psnr_db"],
                    **{f"{a}_kept": (probe.get("kept") or {}).get(a) for a in ATTRIBUTES},
                    **{f"{a}_real": (probe.get("real") or {}).get(a) for a in ATTRIBUTES},
                    "perplexity": report.get("perplexity"),
                }
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_csv:
        append_rows("autoencoders", rows)
    columns = ["variant", "seed", "train_s", "psnr_db", "erased_psnr_db", *[f"{a}_kept" for a in ATTRIBUTES]]
    print_table(rows, columns + ["perplexity"])


if __name__ == "__main__":
    main()
