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
from typing import TYPE_CHECKING

import torch

from kernels.checks import validate_inputs, validate_tau
from kernels.contrastive_torch import loss_with_backend

if TYPE_CHECKING:
    from kernels.self_check import SelfCheck

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import kernels.contrastive_triton  # noqa: F401
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


# ----------------------------------------------------------------------------------------------
# Layer 3: autograd Function and the public function
# ----------------------------------------------------------------------------------------------


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
    return loss_with_backend(h, f, tau, backend, chunk_rows, triton_config)
