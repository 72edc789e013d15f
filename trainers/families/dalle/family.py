"""`trainers dalle` as a generator family (trainers/families/registry.py), over the shared dVAE's tokens, with
its `trainers compare` budgets: 2,000 mini-dVAE steps 3.6 minutes, then 3,000 mini-transformer steps about
5.5 minutes a run on the 2-core development machine (2026-12-07; BENCHMARKS.md). gpu: not measured yet."""

from __future__ import annotations

from trainers.autoencoders.dvae.autoencoder import DVAE
from trainers.engine.family import GENERATOR_UNKEYED, Family

DALLE = Family(
    "dalle",
    "trainers.families.dalle.config:DalleConfig",
    "trainers.families.dalle.train:run_dalle",
    "trainers.families.dalle.load:load_dalle",
    "trainers.families.dalle.model:DALLE_SIZES",
    presets={
        "smoke": dict(size="tiny", steps=2, batch_size=4, eval_n=16, vae_size="tiny", vae_steps=2),
        # the mini fsq dVAE (512 codes) keeps colour 0.97 and position 1.00 of the real images' reading on
        # the demo's world, where tiny's 64 codes keep 0.52 and 0.83 (BENCHMARKS.md)
        "cpu": dict(size="mini", steps=3000, batch_size=32, eval_n=500, vae_size="mini", vae_steps=2000),
        "gpu": dict(
            size="small", steps=50_000, batch_size=64, eval_n=5000, vae_size="small", vae_steps=10_000
        ),
    },
    sampler=("guidance", "temperature", "top_k", "top_p"),
    autoencoder=DVAE,
    unkeyed=GENERATOR_UNKEYED + ("dvae",),
)
