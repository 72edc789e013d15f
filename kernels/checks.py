"""What the contrastive loss accepts, checked the same way by its API and by the Triton launchers."""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
