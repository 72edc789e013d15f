"""Fused GPU kernels with torch fallbacks (see DESIGN.md, section "Kernels")."""

from kernels.contrastive import contrastive_loss

__all__ = ["contrastive_loss"]
