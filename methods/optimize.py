"""optimize (Lafite2): start at the retrieve mix h0 and minimise, per batch, InfoNCE(H, F; tau) + proximity *
mean |h - h0|^2 with Adam, over either the k mixing logits (`weights`: h stays in the cone of its
neighbours' caption features) or a free offset (`residual`: h = normalize(h0 + delta))."""

from __future__ import annotations

from typing import TYPE_CHECKING

from methods.method import Batch, Method
from methods.retrieve import mix, start

if TYPE_CHECKING:
    import torch

    from methods.common import Hyper


def refine(
    f: torch.Tensor,
    h0: torch.Tensor,
    logits0: torch.Tensor,
    valid: torch.Tensor,
    t_k: torch.Tensor,
    hp: Hyper,
) -> tuple[torch.Tensor, float]:
    """Adam on one batch; returns (h [B, D] detached, final proximity term)."""
    import torch
    import torch.nn.functional as F

    from methods.common import contrastive

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


def _features(f, batch: Batch, hp) -> tuple:
    h0, logits0 = start(batch, hp)
    # A batch of one has no negatives: its InfoNCE is constant, so the objective is the proximity term
    # alone, whose minimum is h0 itself. Taking no step is exact; Adam would instead blow rounding-level
    # gradients up into lr-sized steps away from h0.
    if hp.steps > 0 and f.shape[0] > 1:
        h, proximity = refine(f, h0, logits0, batch.valid, batch.t_k, hp)
        return h0, h, proximity
    return h0, h0, 0.0


OPTIMIZE = Method(
    "optimize",
    "Lafite2: the retrieve mix refined by a contrastive loss against the batch's images",
    keyed=("param", "tau_r", "tau", "proximity", "steps", "lr", "batch_size", "seed"),
    features=_features,
)
