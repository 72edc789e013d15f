"""Autoregressive sampling of image tokens from a `trainers.families.dalle.model.DalleTransformer`:

    tokens = sample_tokens(model, cond, seed=0, top_k=64, top_p=0.95, guidance=3.0)  # [N, D] -> [N, h*w]

Per token, in float32 (also under bf16 autocast):
  1. guidance mixes the raw logits, l = l_uncond + g (l_cond - l_uncond): g = 0 is the unconditional
     model (null condition) and g = 1 the plain conditional model, each running only its own branch so
     both are exact; g > 1 runs both branches as one doubled batch (one forward per token, not two);
  2. temperature divides l; 3. top-k keeps the k largest; 4. top-p keeps the smallest set of most
     likely tokens whose probability reaches p (always at least the top one);
  5. the token is argmax(l + Gumbel noise), a draw from softmax(l) restricted to the kept tokens.

The Gumbel noise is one uniform [N, K] draw per token from one generator (CPU by default, so a seed
gives the same tokens on any device for the same logits), whatever the decoding path: sampling with
the KV cache (`prefill` then one `step` per token) and without it (the full forward over the prefix and
the tokens so far, at every token) consume identical random numbers and give the same tokens.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from core.errors import ConfigError
from trainers.families.dalle.model import DalleTransformer


def check_sampling(
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, guidance: float = 1.0
) -> None:
    """ConfigError naming the flag for a sampling setting outside its range."""
    if not (isinstance(temperature, Real) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature {temperature}: must be a number > 0 (1 samples the model as is)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        raise ConfigError(f"--top-k {top_k}: must be an integer >= 1 (1 is greedy), or unset for no top-k")
    if top_p is not None and not (isinstance(top_p, Real) and 0 < top_p <= 1):
        raise ConfigError(f"--top-p {top_p}: must be in (0, 1] (1 keeps every token), or unset")
    if not (isinstance(guidance, Real) and math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(
            f"--guidance {guidance}: must be a number >= 0 (0 unconditional, 1 conditional, > 1 guided)"
        )


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits [N, K] -> float32 logits / temperature with the tokens outside top-k, then top-p, at -inf."""
    logits = logits.float() / temperature  # [N, K]
    if top_k is not None and int(top_k) < logits.shape[1]:
        kth = torch.topk(logits, int(top_k), dim=1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=1, descending=True)  # [N, K]
        probs = torch.softmax(sorted_logits, dim=1)
        before = torch.cumsum(probs, dim=1) - probs  # probability of the more likely tokens
        remove_sorted = before >= top_p  # the top token has before = 0 < p: always kept
        remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def gumbel_pick(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """argmax(logits + Gumbel) [N]: a draw from softmax(logits); the noise comes from `generator`."""
    u = torch.rand(logits.shape, generator=generator, device=generator.device, dtype=torch.float32)
    u = u.clamp_min(torch.finfo(torch.float32).tiny)  # rand is in [0, 1): keep log finite
    gumbel = -torch.log(-torch.log(u)).to(logits.device)  # [N, K]
    return torch.argmax(logits + gumbel, dim=1)


@torch.no_grad()
def sample_tokens(
    model: DalleTransformer,
    cond: torch.Tensor,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float = 1.0,
    use_kv_cache: bool = True,
) -> torch.Tensor:
    """cond float32 [N, D] -> image tokens long [N, h*w] on the model's device.

    `guidance` g: logits = l_uncond + g (l_cond - l_uncond); 0 samples the unconditional model (the
    learned null condition), 1 the conditional model, > 1 is classifier-free guidance. `generator`
    (any device) overrides `seed` (a CPU generator seeded with it). The model runs in eval mode (its
    mode is restored after). Same model, cond, seed and settings: same tokens, with or without the cache.
    """
    check_sampling(temperature, top_k, top_p, guidance)
    if cond.dim() != 2 or cond.shape[1] != model.cond_dim:
        raise ValueError(
            f"cond must be [N, {model.cond_dim}] (the run's feature dim), got {tuple(cond.shape)}"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    device = next(model.parameters()).device
    n, length = cond.shape[0], model.seq_len
    cond = cond.to(device=device, dtype=torch.float32)

    # the batch the model sees: one branch for g in {0, 1}, [cond; null] for guided sampling
    doubled = guidance not in (0, 1)
    if doubled:
        batch_cond = torch.cat([cond, cond])  # [2N, D]
        drop_mask = torch.arange(2 * n, device=device) >= n  # second half -> null condition
    else:
        batch_cond = cond
        drop_mask = torch.ones(n, dtype=torch.bool, device=device) if guidance == 0 else None

    def mix(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not doubled:
            return logits  # [N, K]
        l_cond, l_uncond = logits[:n], logits[n:]
        return l_uncond + guidance * (l_cond - l_uncond)

    was_training = model.training
    model.eval()
    try:
        tokens = torch.empty(n, length, dtype=torch.long, device=device)
        cache = None
        for i in range(length):
            if use_kv_cache:
                if i == 0:
                    logits, cache = model.prefill(batch_cond, drop_mask)  # [B, K]
                else:
                    prev = tokens[:, i - 1]
                    logits, cache = model.step(torch.cat([prev, prev]) if doubled else prev, i - 1, cache)
            else:
                sofar = tokens[:, :i]  # [N, i]
                sofar = torch.cat([sofar, sofar]) if doubled else sofar
                logits = model.predict(batch_cond, sofar, drop_mask)[:, -1]  # [B, K]
            filtered = filter_logits(mix(logits), temperature, top_k, top_p)
            tokens[:, i] = gumbel_pick(filtered, generator)
    finally:
        model.train(was_training)
    return tokens
