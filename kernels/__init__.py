"""Fused GPU kernels with torch fallbacks (see DESIGN.md, section "Kernels")."""

from kernels.contrastive import contrastive_loss

# The oldest triton the kernels are validated with: their tests pass, and compile_check finds the default
# configs viable on sm_80/89/90. triton 3.5.1 (torch 2.9.1's) compiles the D >= 512 backward with 16
# spilled registers and its interpreter rejects the forward, so there the self-check fails and the torch
# path runs (kernels.self_check); the package still admits it, with torch >= 2.9.
VALIDATED_TRITON = (3, 8)
UNVALIDATED_TRITON = "the kernels are validated with triton >= {}.{}".format(*VALIDATED_TRITON)


def triton_validated() -> bool:
    """Whether the installed triton is at least VALIDATED_TRITON (False without triton); triton itself is
    not imported."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("triton").split("+")[0].split(".")
        return tuple(int(part) for part in release[:2]) >= VALIDATED_TRITON
    except (PackageNotFoundError, ValueError):
        return False


__all__ = ["UNVALIDATED_TRITON", "VALIDATED_TRITON", "contrastive_loss", "triton_validated"]
