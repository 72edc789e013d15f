"""Symmetric InfoNCE loss between pseudo text features H and frozen image features F.

    L = 0.5 * (CE(H F^T / tau, arange(N)) + CE(F H^T / tau, arange(N)))      (mean over rows)
      = 0.5 / N * sum_i [(lse_row_i - s_ii) + (lse_col_i - s_ii)],   s = H F^T / tau

    dL/dH_i = 0.5 / (N tau) * sum_j [softmax_row(s)_ij + softmax_col(s)_ij - 2 delta_ij] F_j

Neither backend materialises the N x N logits:
- "triton" (`kernels.contrastive_triton`): fused kernels with online log-sum-exp over tiles.
- "torch": a chunked implementation, O(N * chunk_rows) memory, that also serves CPUs.
"auto" picks triton for CUDA tensors on Ampere or newer when triton imports and its first-use self-check
(`kernels.self_check`) passes for the device, dtype and D class; torch otherwise.

The loss is returned as a float32 scalar whatever the input dtype; the gradient has the dtype of H.
F is frozen: it gets no gradient, and passing an F that requires grad raises instead of silently
leaving F.grad empty.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from kernels.self_check import SelfCheck

BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Default torch-backend chunk: as many rows as keep one fp32 chunk x N logit buffer under 2**28
# elements (1 GiB), capped at 4096 rows. The backend holds up to ~3 such buffers at a time.
_CHUNK_ELEMENTS = 2**28
_MAX_CHUNK_ROWS = 4096


def validate_inputs(h: torch.Tensor, f: torch.Tensor) -> None:
    """Type, shape, dtype and same-device checks shared by both backends."""
    for name, t in (("h", h), ("f", f)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N x D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if h.shape != f.shape:
        raise ValueError(f"h and f must have the same shape, got {tuple(h.shape)} and {tuple(f.shape)}")
    if h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"h and f need N >= 1 rows and D >= 1 columns, got shape {tuple(h.shape)}")
    if h.dtype != f.dtype:
        raise TypeError(f"h and f must have the same dtype, got {h.dtype} and {f.dtype}")
    if h.device != f.device:
        raise ValueError(f"h and f must be on the same device, got {h.device} and {f.device}")


def validate_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(
            f"tau must be a Python float, got {type(tau).__name__} (a learnable temperature is not supported)"
        )
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return float(tau)


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        from kernels import contrastive_triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, dim: int
) -> tuple[str, SelfCheck | None]:
    """The backend `contrastive_loss` runs for N x dim inputs on `device` in `dtype`, and the self-check
    verdict behind it when "auto" considered triton (None otherwise: an explicit backend, a CPU, an
    older GPU). The check runs once per device, dtype and D class in a process (`first_use_check`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend, None
    if not _triton_supported(device):
        return "torch", None
    from kernels.self_check import first_use_check

    check = first_use_check(device, dtype, dim)
    return ("triton" if check.passed else "torch"), check


def _resolve_backend(backend: str, h: torch.Tensor) -> str:
    return resolve_backend(backend, h.device, h.dtype, h.shape[1])[0]


def _triton_supported(device: torch.device) -> bool:
    """A CUDA device, Triton imports and the GPU is Ampere or newer (bf16 tensor-core dots; the configs
    are checked for sm_80+ by kernels.compile_check). Older GPUs take the torch path under "auto"."""
    return (
        device.type == "cuda" and _triton_importable() and torch.cuda.get_device_capability(device) >= (8, 0)
    )


# ----------------------------------------------------------------------------------------------
# torch backend: chunked over rows, recomputes logits in the backward
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Layer 3: autograd Function and the public function
# ----------------------------------------------------------------------------------------------


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


def contrastive_loss(
    h: torch.Tensor,
    f: torch.Tensor,
    tau: float,
    backend: str = "auto",
    *,
    chunk_rows: int | None = None,
    triton_config=None,
) -> torch.Tensor:
    """Symmetric InfoNCE loss between h (N x D, may require grad) and frozen f (N x D).

    Args:
        h: pseudo text features, float16/bfloat16/float32.
        f: image features, same shape, dtype and device as h; must not require grad.
        tau: temperature > 0 (tested down to 0.01).
        backend: "auto" (triton for CUDA tensors on sm_80+ if importable and its first-use self-check
            passes, else torch), "triton" (no self-check) or "torch".
        chunk_rows: rows per chunk for the torch backend; default `default_chunk_rows(N)`.
        triton_config: a `kernels.contrastive_triton.TritonConfig` overriding the block sizes.

    Returns:
        The mean loss as a float32 scalar tensor; backward gives h a gradient of h's dtype.
    """
    tau = validate_tau(tau)
    validate_inputs(h, f)
    backend = _resolve_backend(backend, h)
    if chunk_rows is not None and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    ):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if f.requires_grad and torch.is_grad_enabled():
        raise ValueError("f is treated as frozen and gets no gradient; pass f.detach()")
    if backend == "triton":
        h, f = h.contiguous(), f.contiguous()
    return _ContrastiveLoss.apply(h, f, tau, backend, chunk_rows, triton_config)
