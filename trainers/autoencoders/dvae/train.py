"""`trainers dvae`: train the discrete VAE (`trainers/autoencoders/dvae/model.py`) on the cache's images.

One step, on a batch of real images x in [-1, 1] (the conditions are not used):

    tau  = tau_start * (tau_end / tau_start) ** min(1, step / anneal_steps)     1 -> 1/16 by default
    beta = kl_weight * min(1, step / kl_warmup)        anneal over half the steps, warm up over a quarter
    x', logits = dVAE(x, tau)                                                  gumbel-softmax codes
    loss = mean |x - x'|^2 + beta * KL(softmax(logits) || uniform)             KL in nats per cell

with `--quantizer gumbel`; with `fsq` (the default: trainers/autoencoders/dvae/model.py) the codes are rounded
coordinates, and the loss is the MSE alone (tau and beta are still logged, unused).

A held-out slice of the cache (`eval_n` images, a fixed seeded choice:
`trainers.autoencoders.vae.train.split_cache`, the same split `trainers vae` makes) is never trained on.
eval.json reports, on it and with hard (argmax) codes: the reconstruction PSNR beside the PSNR of the held-out
mean image (a reconstruction that does not beat it has learnt nothing per image) and of the images with their
objects erased, what the world's probe reads on the reconstructions against the real images (`reconstruction`:
trainers/autoencoders/recon_probe.py), and codebook usage: the perplexity of the code frequencies (of K) and
the number of dead codes.

Resume is bit-for-bit on the CPU, as `trainers ldm`: the checkpoint holds model, optimiser, step, config
and every global RNG state (the gumbel noise comes from torch's), and the loader restarts at the step.
`trainers dvae --encode CKPT` then writes the token cache (`trainers/autoencoders/dvae/encode.py`), as one
process.

Data-parallel under torchrun, as `trainers ldm` (trainers/runtime/distributed.py): `--batch-size` is the
global batch, each rank loads its slice, the gumbel noise is drawn for the global batch and sliced, and the
gradients are averaged over the ranks (the MSE and the KL are means over a batch's rows, so that is the
one-process gradient). The logged batch perplexity is of the gathered global batch's codes, and the
logged losses are averaged over the ranks (trainers/engine/loop.py), so metrics.jsonl reads as one process's.
Rank 0 writes and evaluates; a run resumes with any world size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from trainers.autoencoders.dvae.config import RESUME_OVERRIDABLE, DvaeConfig
from trainers.autoencoders.dvae.model import DiscreteVAE, codebook_usage, dvae_architecture, kl_to_uniform
from trainers.engine import loop
from trainers.runtime.distributed import SINGLE, World


def resolve_config(
    values: dict[str, Any], resume: Path | str | None = None
) -> tuple[DvaeConfig, dict | None]:
    """CLI values -> config, or the resumed checkpoint's with the allowed overrides
    (trainers.runtime.runs)."""
    from trainers.runtime.runs import resolve_run_config

    return resolve_run_config(DvaeConfig, "dvae", RESUME_OVERRIDABLE, values, resume)


class DvaeTrainer:
    """Model, optimiser, the two schedules and one step; no files, no loader. `world`: the torchrun ranks
    sharing the step."""

    def __init__(self, config: DvaeConfig, arch: dict, device: torch.device, world: World = SINGLE):
        self.config, self.arch, self.device, self.world = config, arch, device, world
        self.model = DiscreteVAE(arch).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step = 0  # steps taken; both schedules read it

    def temperature(self) -> float:
        cfg = self.config
        return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** min(1.0, self.step / cfg.annealing_steps)

    def kl_beta(self) -> float:
        cfg = self.config
        warmup = cfg.warmup_steps
        return cfg.kl_weight * (min(1.0, self.step / warmup) if warmup else 1.0)

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device, non_blocking=True).float()  # [B, 3, R, R]
        tau, beta = self.temperature(), self.kl_beta()
        recon, logits, codes = self.model(x, tau, self.world)  # [B, 3, R, R], [B, K, h, w] (FSQ: None)
        mse = F.mse_loss(recon, x)
        kl = kl_to_uniform(logits) if logits is not None else torch.zeros((), device=x.device)
        loss = mse + beta * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.world.average_gradients(self.model.parameters())
        self.opt.step()
        self.step += 1
        # the codes of the whole global batch: a perplexity of fewer rows would read lower
        codes = self.world.gather(codes)  # [B, h, w]
        usage = codebook_usage(codes, self.model.vocab_size)
        return {
            "loss": loss.detach(),
            "mse": mse.detach(),
            "kl": kl.detach(),
            "tau": torch.tensor(tau),
            "kl_beta": torch.tensor(beta),
            "batch_perplexity": torch.tensor(usage["perplexity"]),  # of this batch's hard codes
        }

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def evaluate_dvae(
    model: DiscreteVAE, images: torch.Tensor, cache: Path, keys: list[str], device: str = "auto"
) -> dict[str, Any]:
    """Held-out figures of `images` float [N, 3, R, R] in [-1, 1] (the cache's rows `keys`), with hard
    codes: reconstruction PSNR beside the mean image's (the reference to beat), what the reconstructions
    keep of the objects (`reconstruction`: trainers/autoencoders/recon_probe.py), codebook perplexity and
    dead codes."""
    from trainers.autoencoders.dvae.model import reconstruct
    from trainers.autoencoders.recon_probe import measure

    was_training = model.training
    model.eval()
    parts = [reconstruct(model, images[i : i + 64]) for i in range(0, len(images), 64)]
    model.train(was_training)
    recon, codes = torch.cat([r for r, _ in parts]), torch.cat([c for _, c in parts])
    report = measure(cache, images, recon, keys, device)
    return {
        "psnr_db": report["psnr_db"],
        "mean_image_psnr_db": report["mean_image_psnr_db"],
        **codebook_usage(codes, model.vocab_size),
        "vocab_size": model.vocab_size,
        "n_eval": len(images),
        "reconstruction": report,
    }


@dataclass
class DvaeResult:
    run_dir: Path | None  # None on a torchrun rank other than 0 (which writes nothing)
    step: int  # steps done in total (including those before a resume)
    checkpoint: Path | None  # the last checkpoint written
    losses: dict[str, float]  # of the last logged step ({} when a resumed run had nothing to do)
    eval: dict[str, Any] = field(default_factory=dict)  # what eval.json holds
    images_per_s: float = 0.0

    @property
    def psnr(self) -> float | None:
        """Held-out reconstruction PSNR (dB) with hard codes, as `trainers vae` reports its own."""
        return self.eval.get("psnr_db")

    @property
    def reconstruction(self) -> dict[str, Any] | None:
        """What the reconstructions keep of the objects (trainers/autoencoders/recon_probe.py), as `trainers
        vae`'s."""
        return self.eval.get("reconstruction")


def run_dvae(config: DvaeConfig, progress: Any = None, *, resume_state: dict | None = None) -> DvaeResult:
    """Train (or, with `config.resume`, continue) a run; config.json, checkpoints, metrics.jsonl and
    eval.json in its directory. `progress(n)` is called after each step. Under torchrun, data-parallel
    (trainers/runtime/distributed.py): rank 0 writes, evaluates and returns the result."""
    return loop.launch(config, functools.partial(_run_dvae, config, resume_state), progress)


def _run_dvae(config: DvaeConfig, resume_state, world: World, device_name: str, progress) -> DvaeResult:
    from manifests import write_json_atomic
    from trainers.autoencoders.vae.train import split_cache
    from trainers.runtime.runs import seed_everything, select_device

    device = select_device(device_name)
    resume = loop.load_resume(config, "dvae", resume_state)
    if resume.finished(config.steps):  # nothing to do: say so, touch nothing
        return DvaeResult(resume.path.parent, resume.step, resume.path, {})
    loader, eval_images, info, eval_keys = split_cache(config, resume.step, world)
    arch = dvae_architecture(config.size, int(eval_images.shape[-1]), config.quantizer)
    if resume.state is not None and resume.state["arch"] != arch:
        raise ConfigError(
            f"--resume {config.resume}: trained on {resume.state['arch']['resolution']}px images, the cache "
            f"has {arch['resolution']}px ones (resume with the cache the run was trained on)"
        )
    seed_everything(config.seed)
    trainer = DvaeTrainer(config, arch, device, world)
    loop.restore(trainer, resume, None, [trainer.model], world)
    data = {**info.record(), "n_train": len(loader.dataset), "n_eval": len(eval_images)}
    run_dir = None
    if world.main:  # the other ranks train in step and write nothing
        run_dir = loop.open_run(config, resume)
        loop.write_config(run_dir, "dvae", config, arch=arch, data=data)
    record = loop.checkpoint_record("dvae", config, arch=arch, data=data)
    trained = loop.train_steps(
        trainer, loader, config, run_dir, record, advance=loop.step_counter(progress), log_rate=False
    )
    result = DvaeResult(run_dir, trained.step, trained.checkpoint, trained.losses)
    result.images_per_s = trained.images_per_s
    if not world.main:
        return result
    held_out = evaluate_dvae(trainer.model, eval_images, config.cache, eval_keys, device_name)
    result.eval = {"step": result.step, **held_out, **result.losses}
    write_json_atomic(run_dir / "eval.json", {**result.eval, "training_data": data})
    return result


def describe(result: DvaeResult) -> str:
    from trainers.autoencoders.recon_probe import describe as kept

    ev = result.eval
    return (
        f"dvae: step {result.step:,}, loss {result.losses['loss']:.4f}, {kept(ev['reconstruction'])}; "
        f"codebook perplexity {ev['perplexity']:.1f} of {ev['vocab_size']}, {ev['dead_codes']} dead "
        f"-> {result.checkpoint}"
    )
