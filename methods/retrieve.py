"""retrieve: h0 = normalize(sum_k softmax_k(sim_k / tau_r) * t_k), the k retrieved captions' features mixed
by their similarity to the image; missing neighbours are masked out of the softmax."""

from __future__ import annotations

from typing import TYPE_CHECKING

from methods.method import Batch, Method

if TYPE_CHECKING:
    import torch


def masked_logits(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~valid, float("-inf"))


def mix(logits: torch.Tensor, valid: torch.Tensor, t_k: torch.Tensor) -> torch.Tensor:
    """normalize(softmax(logits) @ t_k) per row: [B, K], [B, K], [B, K, D] -> [B, D]."""
    import torch
    import torch.nn.functional as F

    weights = torch.softmax(masked_logits(logits, valid), dim=1)  # [B, K]
    return F.normalize(torch.einsum("bk,bkd->bd", weights, t_k), dim=1)


def initial_logits(sims: torch.Tensor, valid: torch.Tensor, tau_r: float) -> torch.Tensor:
    import torch

    return torch.where(valid, sims / tau_r, torch.zeros_like(sims))


def start(batch: Batch, hp):
    """(h0 [B, D], its mixing logits [B, K]): the retrieve mix, where optimize starts too."""
    logits0 = initial_logits(batch.sims, batch.valid, hp.tau_r)
    return mix(logits0, batch.valid, batch.t_k), logits0


def _features(f, batch: Batch, hp) -> tuple:
    h0, _ = start(batch, hp)
    return h0, h0, 0.0


RETRIEVE = Method(
    "retrieve",
    "the k retrieved captions' features, mixed by softmax(similarity / --tau-r)",
    keyed=("tau_r",),
    features=_features,
)
