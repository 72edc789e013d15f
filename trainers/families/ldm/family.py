"""`trainers ldm` as a generator family (trainers/families/registry.py), in the shared VAE's latents, with its
`trainers compare` budgets: 2,000 mini-VAE steps about 4 minutes, then 6,000 tiny-DiT steps 2.5-3 minutes
a run on the 2-core development machine (2026-12-07; BENCHMARKS.md). gpu: not measured yet."""

from __future__ import annotations

from trainers.autoencoders.vae.autoencoder import VAE
from trainers.engine.family import GENERATOR_UNKEYED, Family

LDM = Family(
    "ldm",
    "trainers.families.ldm.config:LdmConfig",
    "trainers.families.ldm.train:run_ldm",
    "trainers.families.ldm.sample:load_ldm",
    "trainers.families.ldm.model:LDM_SIZES",
    presets={
        "smoke": dict(
            size="tiny", steps=2, batch_size=4, eval_n=16, vae_size="tiny", vae_steps=2, sample_steps=4
        ),
        # the mini VAE keeps shape 0.78-0.84 of the real images' reading, tiny 0.49; in its latents the tiny
        # DiT (lr 1e-3) draws more of the objects than in pixel space at the same steps (BENCHMARKS.md)
        "cpu": dict(
            size="tiny",
            steps=6000,
            batch_size=32,
            eval_n=500,
            vae_size="mini",
            vae_steps=2000,
            space="latent",
        ),
        "gpu": dict(size="S", steps=50_000, batch_size=64, eval_n=5000, vae_size="small", vae_steps=10_000),
    },
    sampler=("steps", "guidance"),
    autoencoder=VAE,
    unkeyed=GENERATOR_UNKEYED + ("vae", "sample_steps"),
    compare_fields=("space",),
    version="2",  # 2: the condition scaled to unit RMS (cond_scale), the tiny size's lr 1e-3
)
