"""The maths of `pipeline optimize`: three ways to make pseudo text features, on tensors in memory.

No files here: `pipeline/optimize.py` reads shards and calls `pseudo_txt_features`, and so does
`benchmarks/bench_optimize.py`. Everything runs on whatever device the tensors are on, in fp32.

- perturb (LAFITE):  h = normalize(f + xi * eps * |f| / |eps|),  eps ~ N(0, I)
- retrieve:          h0 = normalize(sum_k softmax_k(sim_k / tau_r) * t_k)
- optimize:          start at h0 and minimise, per batch, InfoNCE(H, F; tau) + proximity * mean |h - h0|^2
                     with Adam, over either the k mixing logits (`weights`: h stays in the cone of its
                     neighbours' caption features) or a free offset (`residual`: h = normalize(h0 + delta)).

Parameters, Adam state, h0 and the mixing are fp32; only the loss kernel's inputs may be bf16 (`Hyper.
loss_dtype`, chosen by the stage: bf16 on CUDA, fp32 on CPU where bf16 matmuls are slower, not faster).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Elements of one [rows, columns] fp32 score block in the chunked matmuls below (256 MiB).
SCORE_BLOCK = 1 << 26


@dataclass(frozen=True)
class Hyper:
    """The method and its hyper-parameters (what `OptimizeConfig` resolves to)."""

    method: str = "optimize"
    param: str = "weights"
    xi: float = 3.0
    tau_r: float = 0.05
    tau: float = 0.07
    proximity: float = 1.0
    steps: int = 20
    lr: float = 0.1
    backend: str = "auto"  # contrastive_loss backend: auto | triton | torch
    loss_dtype: str = "float32"  # what H and F are cast to for the loss kernel (float32 | bfloat16)


@dataclass
class Neighbours:
    """The k retrieved caption features of each image, as rows of a caption bank on the device."""

    bank: torch.Tensor  # [M, D] caption features (float16 or float32)
    rows: torch.Tensor  # [N, K] int64 rows into `bank` (any valid row where `valid` is False)
    sims: torch.Tensor  # [N, K] float32 retrieval similarities
    valid: torch.Tensor  # [N, K] bool: False for missing neighbours (id -1) and unusable caption rows

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.rows[idx]  # [B, K]
        t_k = self.bank[rows.reshape(-1)].reshape(*rows.shape, -1).float()  # [B, K, D]
        return t_k, self.sims[idx], self.valid[idx]


@dataclass
class Features:
    """Pseudo text features of N images, before and after the method's refinement."""

    h_init: torch.Tensor  # [N, D] the starting point: h0 for optimize/retrieve, f itself for perturb
    h_final: torch.Tensor  # [N, D] the output, unit-norm
    loss_init: float  # contrastive loss of h_init over the batches (mean weighted by batch size)
    loss_final: float
    proximity_final: float  # mean |h_final - h_init|^2 (optimize; 0 otherwise)
    top1_init: float  # in-batch top-1 accuracy of matching h_i to f_i among the batch's images
    top1_final: float
    n_batches: int
    batch_size: int  # the largest batch (batches are near-equal splits of the shuffled rows)


def split_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded shuffle of range(n) cut into ceil(n / batch_size) near-equal batches.

    Near-equal rather than full batches plus a remainder: 65,537 rows at B = 65,536 make two batches of
    ~32,768 instead of one batch whose lone last image has no negatives at all.
    """
    if n == 0:
        return []
    order = rng.permutation(n)
    return np.array_split(order, math.ceil(n / min(batch_size, n)))


def perturb(f: torch.Tensor, noise: torch.Tensor, xi: float) -> torch.Tensor:
    """LAFITE's pseudo feature: `f` plus Gaussian noise scaled to `xi` times |f|, renormalised."""
    eps_norm = noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return F.normalize(f + xi * noise * f.norm(dim=1, keepdim=True) / eps_norm, dim=1)


def masked_logits(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~valid, float("-inf"))


def mix(logits: torch.Tensor, valid: torch.Tensor, t_k: torch.Tensor) -> torch.Tensor:
    """normalize(softmax(logits) @ t_k) per row: [B, K], [B, K], [B, K, D] -> [B, D]."""
    weights = torch.softmax(masked_logits(logits, valid), dim=1)  # [B, K]
    return F.normalize(torch.einsum("bk,bkd->bd", weights, t_k), dim=1)


def initial_logits(sims: torch.Tensor, valid: torch.Tensor, tau_r: float) -> torch.Tensor:
    return torch.where(valid, sims / tau_r, torch.zeros_like(sims))


def contrastive(h: torch.Tensor, f: torch.Tensor, hp: Hyper) -> torch.Tensor:
    """Symmetric InfoNCE in `hp.loss_dtype` (the kernel accumulates in fp32; the cast is differentiable,
    so gradients reach the fp32 parameters). A batch of one has no negatives: its loss is the constant 0.
    """
    if h.shape[0] < 2:
        return h.sum() * 0.0  # keeps the graph without calling the kernel
    from kernels import contrastive_loss

    dtype = getattr(torch, hp.loss_dtype)
    return contrastive_loss(h.to(dtype), f.to(dtype), hp.tau, backend=hp.backend)


def in_batch_top1(h: torch.Tensor, f: torch.Tensor) -> int:
    """How many rows i have argmax_j <h_i, f_j> == i (chunked: never the full [B, B] matrix)."""
    n = h.shape[0]
    chunk = max(1, SCORE_BLOCK // max(n, 1))
    hits = 0
    for start in range(0, n, chunk):
        scores = h[start : start + chunk] @ f.T  # [c, B]
        target = torch.arange(start, min(start + chunk, n), device=h.device)
        hits += int((scores.argmax(dim=1) == target).sum())
    return hits


def refine(
    f: torch.Tensor,
    h0: torch.Tensor,
    logits0: torch.Tensor,
    valid: torch.Tensor,
    t_k: torch.Tensor,
    hp: Hyper,
) -> tuple[torch.Tensor, float]:
    """Adam on one batch; returns (h [B, D] detached, final proximity term)."""
    if hp.param == "weights":
        param = logits0.clone().requires_grad_(True)  # [B, K]

        def features() -> torch.Tensor:
            return mix(param, valid, t_k)

    else:
        param = torch.zeros_like(h0, requires_grad=True)  # [B, D]

        def features() -> torch.Tensor:
            return F.normalize(h0 + param, dim=1)

    opt = torch.optim.Adam([param], lr=hp.lr)
    for _ in range(hp.steps):
        h = features()
        proximity = (h - h0).pow(2).sum(dim=1).mean()
        loss = contrastive(h, f, hp) + hp.proximity * proximity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = features()
        return h, float((h - h0).pow(2).sum(dim=1).mean())


def pseudo_txt_features(
    f: torch.Tensor,
    hp: Hyper,
    batches: list[np.ndarray],
    *,
    nbrs: Neighbours | None = None,
    noise: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Features:
    """Pseudo text features for image features `f` [N, D] (unit-norm, fp32, on the device).

    `batches` partition range(N) (see `split_batches`): they are the contrastive negatives of
    `optimize` and the candidates of the in-batch top-1 accuracy for every method. `nbrs` is needed by
    retrieve and optimize, `noise` ([N, D]) by perturb. `progress(n)` is called after each batch.
    """
    n, d = f.shape
    h_init = torch.empty((n, d), dtype=torch.float32, device=f.device)
    h_final = torch.empty_like(h_init)
    loss_init = loss_final = proximity = 0.0
    top1_init = top1_final = 0
    for batch in batches:
        idx = torch.from_numpy(batch).to(f.device)
        fb = f[idx]  # [B, D]
        b = fb.shape[0]
        if hp.method == "perturb":
            h0 = fb
            h = perturb(fb, noise[idx], hp.xi)
        else:
            t_k, sims, valid = nbrs.gather(idx)  # [B, K, D], [B, K], [B, K]
            logits0 = initial_logits(sims, valid, hp.tau_r)
            h0 = mix(logits0, valid, t_k)
            h = h0
            # A batch of one has no negatives: its InfoNCE is constant, so the objective is the proximity
            # term alone, whose minimum is h0 itself. Taking no step is exact; Adam would instead blow
            # rounding-level gradients up into lr-sized steps away from h0.
            if hp.method == "optimize" and hp.steps > 0 and b > 1:
                h, prox = refine(fb, h0, logits0, valid, t_k, hp)
                proximity += prox * b
        with torch.no_grad():
            l0 = float(contrastive(h0, fb, hp))
            l1 = l0 if h is h0 else float(contrastive(h, fb, hp))
            t0 = in_batch_top1(h0, fb)
            t1 = t0 if h is h0 else in_batch_top1(h, fb)
        loss_init += l0 * b
        loss_final += l1 * b
        top1_init += t0
        top1_final += t1
        h_init[idx] = h0
        h_final[idx] = h
        if progress is not None:
            progress(b)
    total = max(n, 1)
    return Features(
        h_init=h_init,
        h_final=h_final,
        loss_init=loss_init / total,
        loss_final=loss_final / total,
        proximity_final=proximity / total,
        top1_init=top1_init / total,
        top1_final=top1_final / total,
        n_batches=len(batches),
        batch_size=max((len(b) for b in batches), default=0),
    )


def nearest_rows(queries: torch.Tensor, bank: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """Exact top-1 inner-product row of `bank` [M, D] for each query [N, D], by chunked fp32 matmul.

    Rows where `usable` is False never win. Returns int64 [N] (-1 when no row is usable).
    """
    n, m = queries.shape[0], bank.shape[0]
    best = torch.full((n,), -1, dtype=torch.int64, device=queries.device)
    if n == 0 or m == 0 or not bool(usable.any()):
        return best
    q_chunk = min(n, 4096)
    m_chunk = max(1, SCORE_BLOCK // q_chunk)
    for qs in range(0, n, q_chunk):
        q = queries[qs : qs + q_chunk].float()
        best_score = torch.full((q.shape[0],), float("-inf"), device=queries.device)
        best_row = torch.full((q.shape[0],), -1, dtype=torch.int64, device=queries.device)
        for ms in range(0, m, m_chunk):
            scores = q @ bank[ms : ms + m_chunk].float().T  # [q, m]
            scores.masked_fill_(~usable[ms : ms + m_chunk], float("-inf"))
            score, row = scores.max(dim=1)
            better = score > best_score  # strict: ties keep the earlier row, as a full argmax would
            best_score = torch.where(better, score, best_score)
            best_row = torch.where(better, row + ms, best_row)
        best[qs : qs + q_chunk] = best_row
    return best
