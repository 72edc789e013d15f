"""What every pseudo-feature method shares, on tensors in memory: the hyper-parameters (`Hyper`), the k
retrieved neighbours (`Neighbours`), the result (`Features`), the batches (`split_batches`), the contrastive
loss and in-batch top-1 they are judged by, and the exact nearest caption of a feature.

Everything runs on whatever device the tensors are on, in fp32; only the loss kernel's inputs may be bf16
(`Hyper.loss_dtype`, chosen by the stage: bf16 on CUDA, fp32 on CPU where bf16 matmuls are slower, not
faster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feature_cache.caption_bank import CaptionBank

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


def nearest_caption_precision(
    bank: CaptionBank, features, truths: list[dict[str, str] | None], device
) -> dict[str, Any] | None:
    """Attribute precision (`world.attribute_precision`) of the exact nearest caption of the bank to
    each labelled row of `features` [n, D]; `truths`: each row's target object, None where unlabelled.
    A row with no usable caption in the bank is not scored."""
    from world.attribute_precision import attribute_precision

    labelled = [i for i, truth in enumerate(truths) if truth is not None]
    if not labelled:
        return None
    bank_emb, bank_usable = bank.on(device)
    sel = torch.as_tensor(labelled, device=device)
    rows = nearest_rows(features[sel], bank_emb, bank_usable).cpu().numpy()
    return attribute_precision(
        (truths[i], bank.objects(row) if row >= 0 else None)
        for i, row in zip(labelled, rows.tolist(), strict=True)
    )
