"""The loss with a named backend: the torch implementation (chunked over rows, recomputing the logits in the
backward; it also serves CPUs) and the autograd Function that runs either backend. `contrastive_loss`
(kernels/contrastive.py) validates its inputs and resolves "auto" first; the self-check
(kernels/self_check.py) compares the two backends through `loss_with_backend`."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Default torch-backend chunk: as many rows as keep one fp32 chunk x N logit buffer under 2**28
# elements (1 GiB), capped at 4096 rows. The backend holds up to ~3 such buffers at a time.
_CHUNK_ELEMENTS = 2**28


_MAX_CHUNK_ROWS = 4096


def default_chunk_rows(n: int) -> int:
    return max(1, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // n))


def contrastive_forward_torch(
    h: torch.Tensor, f: torch.Tensor, tau: float, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) plus the natural-log row and column log-sum-exps (fp32, length N).

    Logits are computed in fp32 from upcast inputs: bf16 logits would round s ~ 100 (tau = 0.01) to
    steps of 0.5.
    """
    n = h.shape[0]
    chunk = chunk_rows or default_chunk_rows(n)
    inv_tau = 1.0 / tau
    f32 = f.float()  # N x D (no copy for fp32 inputs)
    lse_row = torch.empty(n, dtype=torch.float32, device=h.device)
    diag = torch.empty(n, dtype=torch.float32, device=h.device)
    col_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    col_sum = torch.zeros(n, dtype=torch.float32, device=h.device)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        logits = (h[r0:r1].float() @ f32.T).mul_(inv_tau)  # (r1 - r0) x N
        lse_row[r0:r1] = torch.logsumexp(logits, dim=1)
        diag[r0:r1] = logits.diagonal(offset=r0)
        # Online column log-sum-exp: rescale the running sum to the new running max.
        new_max = torch.maximum(col_max, logits.amax(dim=0))
        col_sum = col_sum * torch.exp(col_max - new_max) + logits.sub_(new_max).exp_().sum(dim=0)
        col_max = new_max
    lse_col = col_max + torch.log(col_sum)
    per_row = (lse_row - diag) + (lse_col - diag)
    loss = per_row.sum(dtype=torch.float64) * (0.5 / n)
    return loss.to(torch.float32), lse_row, lse_col


def contrastive_backward_torch(
    h: torch.Tensor,
    f: torch.Tensor,
    tau: float,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    grad_out: torch.Tensor,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """dL/dh (dtype of h) scaled by the scalar grad_out, recomputing logits chunk by chunk."""
    n = h.shape[0]
    chunk = chunk_rows or default_chunk_rows(n)
    inv_tau = 1.0 / tau
    f32 = f.float()
    scale = grad_out.to(device=h.device, dtype=torch.float32) * (0.5 / (n * tau))  # stays on device
    dh = torch.empty_like(h)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        logits = (h[r0:r1].float() @ f32.T).mul_(inv_tau)  # (r1 - r0) x N
        probs = (logits - lse_row[r0:r1, None]).exp_()  # softmax_row: each full row sums to 1
        probs += logits.sub_(lse_col[None, :]).exp_()  # + softmax_col: each full column sums to 1
        dh_chunk = probs @ f32  # (r1 - r0) x D
        dh_chunk.sub_(f32[r0:r1], alpha=2.0)  # diagonal: -2 delta_ij
        dh[r0:r1] = dh_chunk.mul_(scale)
    return dh


class _ContrastiveLoss(torch.autograd.Function):
    """Saves h, f and two length-N statistics; never the N x N logits."""

    @staticmethod
    def forward(ctx, h, f, tau, backend, chunk_rows, triton_config):
        if backend == "triton":
            from kernels.contrastive_triton import contrastive_forward_triton

            loss, stat_row, stat_col = contrastive_forward_triton(h, f, tau, triton_config)
        else:
            loss, stat_row, stat_col = contrastive_forward_torch(h, f, tau, chunk_rows)
        ctx.save_for_backward(h, f, stat_row, stat_col)
        ctx.tau, ctx.backend, ctx.chunk_rows, ctx.triton_config = tau, backend, chunk_rows, triton_config
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, f, stat_row, stat_col = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if ctx.backend == "triton":
            from kernels.contrastive_triton import contrastive_backward_triton

            dh = contrastive_backward_triton(h, f, ctx.tau, stat_row, stat_col, grad_out, ctx.triton_config)
        else:
            dh = contrastive_backward_torch(h, f, ctx.tau, stat_row, stat_col, grad_out, ctx.chunk_rows)
        return dh, None, None, None, None, None


def loss_with_backend(h, f, tau: float, backend: str, chunk_rows=None, triton_config=None) -> torch.Tensor:
    """The loss through `backend` ("torch" or "triton"), on inputs already validated."""
    return _ContrastiveLoss.apply(h, f, tau, backend, chunk_rows, triton_config)
