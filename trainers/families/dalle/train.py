"""`trainers dalle`: train the language-free DALL-E transformer (`trainers/families/dalle/model.py`) on a
frozen dVAE.

One step, on a batch of real images x with conditions h (unit-norm text-space features):

    tokens = dVAE hard codes of x, row-major [B, h*w]        token cache by key, else encoded now; no grad
    drop ~ Bernoulli(cond_drop)                              from the run's own seeded generator
    loss = CE(Transformer([h or null; BOS, tokens[:-1]]), tokens)   mean nats per image token
    AdamW (decay on matrices and embeddings), linear warmup then cosine to 0, grad-norm clip
    EMA <- lerp(model, EMA, decay)

The tokens are those of `trainers dvae --cache C --encode DVAE` (`trainers/autoencoders/dvae/encode.py`) where
the cache has them, looked up by key, and the images' hard codes computed now where it does not (the same
numbers); a cache whose tokens are all another dVAE's is refused (`--dvae` is then likely the wrong
checkpoint). The checkpoint records the dVAE's resolved path and content digest: resume and `trainers sample`
refuse a dVAE that changed since, since the transformer's tokens would mean other images.

Few-shot: `--init CKPT` starts from another `trainers dalle` checkpoint's weights (same architecture and
dVAE; a fresh optimiser, step 0), and `--condition caption --paired-limit N` trains on N real pairs, as
`trainers ldm`. Sampling defaults (`guidance`, `temperature`, `top_k`, `top_p`) are recorded for
`trainers sample` / `trainers eval` (`trainers/families/dalle/load.py`).

bf16 autocast on CUDA only. Resume is bit-for-bit on the CPU: the checkpoint holds model, EMA, optimiser,
the dropout generator and every global RNG state, and the loader restarts at `start_step`.

Under torchrun, data-parallel as `trainers ldm` (trainers/runtime/distributed.py): `--batch-size` is the
global batch, each rank tokenises its slice of it, the condition dropout is drawn from the shared generator
for the global batch and `--dropout`'s masks from the global RNG at the global batch's shape (each rank keeps
its slice of both: `trainers.families.dalle.model.dropout`), gradients are averaged before they are clipped
(so the norm clipped is the global batch's, as in one process), and rank 0 writes.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError
from trainers.data.loader import cache_loader_config
from trainers.engine import loop
from trainers.families.dalle.config import RESUME_OVERRIDABLE, DalleConfig, sampling_options
from trainers.families.dalle.model import DalleTransformer, build_dalle
from trainers.runtime.checkpoints import require_same_arch
from trainers.runtime.distributed import SINGLE, World
from trainers.runtime.runs import resolve_run_config, seed_everything, select_device

COND_DROP_STREAM = 31  # SeedSequence tag of the condition-dropout generator (apart from torch's global)


def resolve_config(
    values: dict[str, Any], resume: Path | str | None = None
) -> tuple[DalleConfig, dict | None]:
    """CLI values -> config, or the resumed checkpoint's with the allowed overrides
    (trainers.runtime.runs)."""
    return resolve_run_config(DalleConfig, "dalle", RESUME_OVERRIDABLE, values, resume)


def drop_generator(seed: int) -> torch.Generator:
    """The condition-dropout draws' own CPU generator (device-independent, saved in checkpoints)."""
    import numpy as np

    state = np.random.SeedSequence([seed, COND_DROP_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class DalleTrainer:
    """Model, EMA, optimiser, frozen dVAE and one training step; no files, no loader."""

    def __init__(
        self,
        config: DalleConfig,
        model: DalleTransformer,
        dvae: torch.nn.Module,
        device: torch.device,
        world: World = SINGLE,
    ):
        self.config, self.device, self.world = config, device, world
        self.model = model.to(device)
        self.arch = model.architecture()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.loss = loop.compiled(self.model.loss, config.compile)  # the training step's
        self.dvae = dvae.to(device)
        self.opt = torch.optim.AdamW(
            self.model.param_groups(config.weight_decay), lr=config.lr, betas=(0.9, 0.95)
        )
        self.drop_rng = drop_generator(config.seed)
        self.amp = device.type == "cuda"
        self.step = 0
        # trainers.autoencoders.dvae.encode.TokenCache of this dVAE (`trainers dvae --encode`), if any
        self.token_cache = None

    def autocast(self):
        return loop.bf16_autocast(self.amp)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> dVAE tokens int64 [B, h*w]: cached ones by key, the rest encoded now
        (in fp32, outside autocast: the cache holds fp32 argmaxes)."""
        from trainers.autoencoders.dvae.encode import tokens_for

        return tokens_for(self.dvae, images, keys, self.token_cache, self.device)

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = self.tokens(batch["image"], batch.get("key"))  # [B, h*w]
        h = batch["cond"].to(self.device, non_blocking=True).float()  # [B, D]
        lr = loop.lr_at(self.step, self.config)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.autocast():
            loss = self.loss(
                h, tokens, cond_drop=self.config.cond_drop, generator=self.drop_rng, world=self.world
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # averaged first: every rank then clips by the global batch's gradient norm, as one process does
        self.world.average_gradients(self.model.parameters())
        clip = self.config.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.step += 1
        loop.update_ema(self.ema, self.model, self.step, self.config.ema_decay)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": torch.tensor(lr)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "drop_rng": self.drop_rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if not weights_only:
            self.opt.load_state_dict(state["opt"])
            self.drop_rng.set_state(state["drop_rng"])


INIT_HINT = "use a checkpoint trained with the same --size, --n-prefix, dVAE grid and vocabulary and CLIP"
ARCH_KEYS_CHECKED_BY_INIT = ("depth", "width", "heads", "vocab", "grid_h", "grid_w", "cond_dim", "n_prefix")


@dataclass
class DalleResult:
    run_dir: Path | None  # None on the ranks other than 0 of a torchrun launch
    step: int  # steps done in total (including those before a resume)
    checkpoint: Path | None  # the last checkpoint written
    losses: dict[str, float]  # of the last logged step ({} when a resumed run had nothing to do)
    images_per_s: float
    data: dict[str, Any]  # what the loader used: LoaderInfo.record() and pairs
    samples: list[Path] = field(default_factory=list)  # sample grids written
    vocab: int = 0  # K: the loss of a uniform guess is ln K


def _load_frozen_dvae(config: DalleConfig, resume_state: dict | None):
    """(dVAE, its checkpoint, digest): --dvae, or on resume the recorded one unless --dvae names it moved;
    a resumed run refuses a dVAE whose content differs from the one it was trained with."""
    from core.paths import absolute
    from trainers.autoencoders.dvae.encode import dvae_digest
    from trainers.autoencoders.dvae.model import load_dvae

    path = config.dvae
    if resume_state is not None and absolute(config.dvae) == resume_state["config"].get("dvae"):
        path = resume_state["dvae"]["path"]  # the file it used, even if the run dir has newer ones
    dvae, ckpt = load_dvae(path, "--dvae")
    digest = dvae_digest(ckpt["path"])
    if resume_state is not None and digest != resume_state["dvae"]["digest"]:
        raise ConfigError(
            f"--dvae {ckpt['path']}: not the dVAE this run was trained with (its content changed since); "
            "resume with that checkpoint, or start a new run"
        )
    return dvae, ckpt, digest


def run_dalle(config: DalleConfig, resume_state: dict | None = None, progress: Any = None) -> DalleResult:
    """Train (or continue) a run; checkpoints, config.json, metrics.jsonl and sample grids in its dir.
    Under torchrun, data-parallel (trainers/runtime/distributed.py): rank 0 writes, and returns the result;
    the
    other ranks return one without a run dir."""
    return loop.launch(config, functools.partial(_run_dalle, config, resume_state), progress)


def _run_dalle(config, resume_state, world: World, device_name: str, progress) -> DalleResult:
    from feature_cache.embed_rows import cache_clip
    from trainers.autoencoders.dvae.encode import load_token_cache, require_token_cache
    from trainers.autoencoders.dvae.model import decode_tokens
    from trainers.data.loader import make_loader
    from trainers.families.dalle.sample import sample_tokens

    device = select_device(device_name)
    resume = loop.load_resume(config, "dalle", resume_state)
    if resume.finished(config.steps):
        return DalleResult(
            resume.path.parent, resume.step, resume.path, {}, 0.0, resume.state.get("data", {})
        )
    init_path, init_state = loop.load_init_state(config, "dalle")
    clip = cache_clip(config.cache)
    dvae, dvae_ckpt, digest = _load_frozen_dvae(config, resume.state)
    if init_state is not None and init_state["dvae"]["digest"] != digest:
        raise ConfigError(
            f"--init {init_path}: trained on the tokens of another dVAE ({init_state['dvae']['path']}); "
            "give that checkpoint as --dvae"
        )
    token_cache = load_token_cache(config.cache, dvae_ckpt["path"])
    if token_cache is None and any(Path(config.cache).glob("tokens/*/_manifests/*.json")):
        require_token_cache(config.cache, dvae_ckpt["path"])  # only another dVAE's: the one-line error
    dvae_arch = dvae_ckpt["arch"]
    batches = make_loader(cache_loader_config(config), start_step=resume.step, world=world)
    info = batches.info
    loop.check_autoencoder_fits(
        info, int(clip.dim), config.cache, f"--dvae {dvae_ckpt['path']}", dvae_arch["resolution"]
    )
    data = info.record()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    grid_h = loop.cache_prompt_grid(clip, device, config.prompts, config.samples_per_prompt)  # [P * n, D]
    seed_everything(config.seed)
    if resume.state is None:
        model = DalleTransformer(
            config.size,
            vocab=int(dvae_arch["vocab_size"]),
            grid=tuple(dvae_arch["grid"]),
            cond_dim=info.dim,
            n_prefix=config.n_prefix,
            dropout=config.dropout,
        )
    else:
        model = build_dalle(resume.state["arch"])
    trainer = DalleTrainer(config, model, dvae, device, world)
    trainer.token_cache = token_cache
    arch = trainer.arch
    if init_state is not None:
        require_same_arch(init_path, init_state["arch"], arch, ARCH_KEYS_CHECKED_BY_INIT, INIT_HINT)
    loop.restore(trainer, resume, init_state, [trainer.model, trainer.ema], world)
    dvae_args = {
        "path": dvae_ckpt["path"],
        "step": int(dvae_ckpt["step"]),
        "digest": digest,
        "arch": dvae_arch,
    }
    clip_args, tokens = loop.clip_record(clip), loop.derived_record(token_cache)
    parts = {"arch": arch, "clip": clip_args, "dvae": dvae_args, "data": data, "tokens": tokens}
    run_dir = None
    if world.main:  # the other ranks train in step and write nothing
        run_dir = loop.open_run(config, resume, info.pair_keys)
        run_record = {"arch": arch, "clip": clip_args, "dvae_ckpt": dvae_args, "data": data}
        loop.write_config(run_dir, "dalle", config, **run_record, tokens=tokens)

    def draw() -> torch.Tensor:
        # sample_tokens draws from its own seeded generator: a grid does not move the training RNG
        with trainer.autocast():
            grid_tokens = sample_tokens(
                trainer.ema, grid_h.to(device), seed=config.seed, **sampling_options(config)
            )  # [P * n, h*w]
        return decode_tokens(trainer.dvae, grid_tokens)  # [P * n, 3, R, R] uint8

    grid = loop.SampleGrid(draw, list(config.prompts), config.samples_per_prompt, config.sample_every)
    record, advance = loop.checkpoint_record("dalle", config, **parts), loop.step_counter(progress)
    trained = loop.train_steps(trainer, batches, config, run_dir, record, grid=grid, advance=advance)
    return DalleResult(run_dir, data=data, vocab=arch["vocab"], **vars(trained))


def describe(result: DalleResult) -> str:
    data = result.data
    if result.run_dir is None:  # a rank other than 0 of a torchrun launch
        return f"dalle: step {result.step:,}, loss {result.losses['loss']:.4f} here (rank 0 wrote the run)"
    return (
        f"dalle: step {result.step:,}, loss {result.losses['loss']:.4f} nats/token (uniform "
        f"{math.log(result.vocab):.2f}), {data['n_images']:,} images ({data['pairs']:,} pairs), "
        f"{result.images_per_s:,.1f} img/s -> {result.checkpoint}"
    )
