"""`trainers gan` as a generator family (trainers/families/registry.py), with its `trainers compare` budgets.

Budgets: sized on the 2-core development machine, 2 threads, the demo's cache (lafite-rn32 CLIP, 32 px),
2026-12-07; BENCHMARKS.md has each compare's wall time. 4,000 tiny-GAN steps of batch 8 took 237-274 s a
run (the demo's 4 runs, probe and reports: 17 minutes, on a machine that ran the old 1,000 steps of 32 in
186 s where another took 112 s). gpu: not measured yet (no GPU was lent); `trainers gan`'s GPU defaults.
"""

from __future__ import annotations

from trainers.engine.family import GENERATOR_UNKEYED, Family

GAN = Family(
    "gan",
    "trainers.families.gan.config:GanConfig",
    "trainers.families.gan.train:run_gan",
    "trainers.families.gan.sample:load_gan",
    "trainers.families.gan.model:GAN_SIZES",
    presets={
        "smoke": dict(size="tiny", steps=2, batch_size=4, eval_n=16),
        # batch 8: at this size the GAN learns from updates more than from images; 4,000 steps of 8 drew
        # shape 0.57 where 1,000 of 32 drew 0.45 (both at lr 0.01), in 1.3-1.9x the time (BENCHMARKS.md)
        "cpu": dict(size="tiny", steps=4000, batch_size=8, eval_n=500),
        "gpu": dict(size="small", steps=20_000, batch_size=64, eval_n=5000),
    },
    unkeyed=GENERATOR_UNKEYED + ("prompts",),
    # 2: the condition scaled to unit second moment (trainers.families.gan.model architecture's
    # cond_scale); 3: the tiny size's lr 0.01
    version="3",
)
