"""The maths of `pipeline optimize`: a method's pseudo text features for every batch of a shard's image
features, with the loss and in-batch top-1 before and after (methods/registry.py lists the methods).

No files here: `pipeline/optimize/stage.py` reads shards and calls `pseudo_txt_features`, and so does
`benchmarks/bench_optimize.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from methods.common import Features, Hyper, Neighbours, contrastive, in_batch_top1
from methods.method import Batch
from methods.registry import METHODS


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
    a method that needs neighbours, `noise` ([N, D]) by one that needs noise. `progress(n)` is called
    after each batch.
    """
    method = METHODS[hp.method]
    n, d = f.shape
    h_init = torch.empty((n, d), dtype=torch.float32, device=f.device)
    h_final = torch.empty_like(h_init)
    loss_init = loss_final = proximity = 0.0
    top1_init = top1_final = 0
    for batch in batches:
        idx = torch.from_numpy(batch).to(f.device)
        fb = f[idx]  # [B, D]
        b = fb.shape[0]
        batch_inputs = Batch(noise=noise[idx] if method.needs_noise else None)
        if method.needs_neighbours:
            batch_inputs.t_k, batch_inputs.sims, batch_inputs.valid = nbrs.gather(idx)  # [B,K,D] [B,K] [B,K]
        h0, h, prox = method.features(fb, batch_inputs, hp)
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
