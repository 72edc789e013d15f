"""Triton kernels and host launcher for the fused symmetric InfoNCE loss.

Layers 1 and 2 of `kernels.contrastive` (STYLE item 7): the private `@triton.jit` kernels and the
launchers that validate inputs and pick block sizes. The public entry point is
`kernels.contrastive.contrastive_loss`; call these launchers directly only in tests and benchmarks.

Notation: h, f are N x D, s = h f^T / tau. The kernels work in base 2, t = s * log2(e), so that the
online reductions use `exp2`; every statistic they return (row/column log-sum-exp, diagonal) is in
base 2 and the loss is converted back with ln(2) on the host.

Kernels:
- `_lse_kernel`: each program owns BLOCK_M rows of `a`, loops over all column tiles of `b` and keeps a
  running max and running sum per row (online log-sum-exp), fp32 accumulation. Launched twice: with
  (a, b) = (h, f) it gives the row log-sum-exp and the diagonal t_ii, with (a, b) = (f, h) the column
  log-sum-exp (t^T has the same diagonal). Two launches instead of one fused pass because a fused
  column reduction would need atomics or an (N / BLOCK_M) x N partial buffer.
- `_dh_kernel`: each program owns BLOCK_M rows and BLOCK_DO columns of dH and loops over all column
  tiles, recomputing t, so every dH element is written by exactly one program: no atomics, results
  are bit-for-bit deterministic. When D > BLOCK_DO the t tiles are recomputed once per BLOCK_DO slice;
  the alternative, a BLOCK_M x D fp32 accumulator, does not fit in registers for D = 512..768.

Pointer offsets: the part that scales with N is 64-bit (the row-block start is cast to int64 before
multiplying by the stride; column tiles advance a pointer by BLOCK_N * stride per step), the in-tile
part (< BLOCK * stride) is int32, so N * D may exceed 2**31 elements.

Dot precision: 16-bit inputs go to the tensor cores with fp32 accumulation; fp32 inputs use
input_precision="ieee" (true fp32 FMA, no TF32). TF32 keeps only 10 mantissa bits, a relative error
of ~5e-4 per product, which at tau = 0.01 (|s| up to 100) moves logits by ~0.05 and would fail the
1e-5 fp32 tolerance; callers who want TF32 speed should pass bf16 inputs instead.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.contrastive import validate_inputs, validate_tau

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Layer 1: kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lse_kernel(
    a_ptr,
    b_ptr,
    lse2_ptr,
    diag2_ptr,
    N,
    D,
    stride_a,
    stride_b,
    scale_log2,  # log2(e) / tau
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_DIAG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """lse2[i] = log2 sum_j exp2(t_ij) with t = a b^T * scale_log2; diag2[i] = t_ii if WRITE_DIAG."""
    pid = tl.program_id(0)
    start_m = pid.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m  # int64
    row_mask = rows < N
    a_base = a_ptr + start_m * stride_a
    b_base = b_ptr  # advanced by BLOCK_N rows per step; pointer arithmetic is 64-bit

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of t over columns seen so far
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(t - m_i)
    diag = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        col_mask = cols < N
        t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            a = tl.load(
                a_base + offs_m[:, None] * stride_a + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            # b loaded transposed: a BLOCK_D x BLOCK_N tile.
            b_t = tl.load(
                b_base + offs_n[None, :] * stride_b + d[:, None],
                mask=d_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            t = tl.dot(a, b_t, t, input_precision=INPUT_PRECISION)
        t = t * scale_log2
        t = tl.where(col_mask[None, :], t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
        m_i = m_new
        if WRITE_DIAG:
            # Only the tiles that intersect the diagonal pay for the extraction.
            if (start_n < start_m + BLOCK_M) & (start_n + BLOCK_N > start_m):
                is_diag = rows[:, None] == cols[None, :]
                diag += tl.sum(tl.where(is_diag, t, 0.0), axis=1)
        b_base += BLOCK_N * stride_b

    tl.store(lse2_ptr + rows, m_i + tl.log2(l_i), mask=row_mask)
    if WRITE_DIAG:
        tl.store(diag2_ptr + rows, diag, mask=row_mask)


@triton.jit
def _dh_kernel(
    h_ptr,
    f_ptr,
    lse2_row_ptr,
    lse2_col_ptr,
    grad_out_ptr,
    dh_ptr,
    N,
    D,
    stride_h,
    stride_f,
    stride_dh,
    scale_log2,  # log2(e) / tau
    grad_scale,  # 0.5 / (N * tau)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dH[rows, dcols] = grad_out * grad_scale * (sum_j (P_row + P_col)_ij f_j - 2 f_i)[dcols]."""
    pid_m = tl.program_id(0)
    pid_do = tl.program_id(1)
    start_m = pid_m.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    rows = start_m + offs_m
    row_mask = rows < N
    do_mask = offs_do < D
    h_base = h_ptr + start_m * stride_h
    f_base = f_ptr  # advanced by BLOCK_N rows per step; pointer arithmetic is 64-bit

    lse_r = tl.load(lse2_row_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        col_mask = cols < N
        t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            h = tl.load(
                h_base + offs_m[:, None] * stride_h + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            f_t = tl.load(
                f_base + offs_n[None, :] * stride_f + d[:, None],
                mask=d_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            t = tl.dot(h, f_t, t, input_precision=INPUT_PRECISION)
        t = t * scale_log2
        lse_c = tl.load(lse2_col_ptr + cols, mask=col_mask, other=0.0)
        # For valid (i, j), t_ij <= both log-sum-exps, so both exponentials are <= 1 at any tau.
        # Padding rows (t = 0, lse_r = 0) could still overflow exp2(-lse_c): zero them explicitly.
        p = tl.exp2(t - lse_r[:, None]) + tl.exp2(t - lse_c[None, :])
        p = tl.where(row_mask[:, None] & col_mask[None, :], p, 0.0)
        f_out = tl.load(
            f_base + offs_n[:, None] * stride_f + offs_do[None, :],
            mask=col_mask[:, None] & do_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(p.to(f_out.dtype), f_out, acc, input_precision=INPUT_PRECISION)
        f_base += BLOCK_N * stride_f

    # Diagonal term -2 * f_i, in fp32.
    f_diag = tl.load(
        f_ptr + start_m * stride_f + offs_m[:, None] * stride_f + offs_do[None, :],
        mask=row_mask[:, None] & do_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    acc = acc - 2.0 * f_diag
    g = tl.load(grad_out_ptr).to(tl.float32)
    dh = acc * (grad_scale * g)
    tl.store(
        dh_ptr + start_m * stride_dh + offs_m[:, None] * stride_dh + offs_do[None, :],
        dh.to(dh_ptr.dtype.element_ty),
        mask=row_mask[:, None] & do_mask[None, :],
    )


# ----------------------------------------------------------------------------------------------
# Layer 2: host launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch parameters for both kernels (not autotuned; see `default_config`)."""

    fwd_block_m: int  # rows of `a` per program in _lse_kernel
    fwd_block_n: int  # column tile width in _lse_kernel
    bwd_block_m: int  # rows of dH per program in _dh_kernel
    bwd_block_n: int  # column tile width in _dh_kernel
    block_d: int  # reduction slice over D when computing a logit tile (ragged tail masked)
    block_do: int  # dH columns per program in _dh_kernel; t is recomputed ceil(D / block_do) times
    num_warps: int
    num_stages: int


def default_config(dtype: torch.dtype, dim: int) -> TritonConfig:
    """Launch parameters for an H100, chosen from the usual flash-attention shapes, not measured here.

    Forward: 128 x 64 logit tile per step (8 warps, 32 fp32 registers per thread for the tile), D in
    slices of 64. Backward: 64-row programs with up to 256 dH columns each (16-bit inputs), so the
    fp32 accumulator is 64 registers per thread with 8 warps; D = 512 gives two slices per row block.
    fp32 inputs (ieee FMA path) use 128-column dH slices and 2 pipeline stages to stay inside shared
    memory with 4-byte tiles. None of this has been run on a GPU yet: tune with
    benchmarks/bench_contrastive.py before trusting it.
    Under the interpreter every block is 16 wide (the minimum tl.dot size) to keep CPU tests fast.
    """
    pow2_dim = max(16, triton.next_power_of_2(dim))
    if _interpreting():
        return TritonConfig(16, 16, 16, 16, 16, min(pow2_dim, 32), num_warps=1, num_stages=1)
    return TritonConfig(
        fwd_block_m=128,
        fwd_block_n=64,
        bwd_block_m=64,
        bwd_block_n=64,
        block_d=min(64, pow2_dim),
        # fp32 halves the dH slice: a 64 x 256 fp32 operand tile is 64 KiB of shared memory per stage.
        block_do=min(128 if dtype == torch.float32 else 256, pow2_dim),
        num_warps=8,
        num_stages=2 if dtype == torch.float32 else 3,
    )


def _check_launch(h: torch.Tensor, f: torch.Tensor, tau: float, config: TritonConfig | None) -> TritonConfig:
    """Validate everything the kernels assume and resolve the config."""
    validate_tau(tau)
    validate_inputs(h, f)  # shapes, dtypes, same device
    if h.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the triton backend needs CUDA tensors, got {h.device}; use backend='torch' on CPU "
            "(or set TRITON_INTERPRET=1 before importing triton to run the interpreter)"
        )
    if not (h.is_contiguous() and f.is_contiguous()):
        raise ValueError("the triton backend needs contiguous h and f; call .contiguous() first")
    if config is None:
        config = default_config(h.dtype, h.shape[1])
    for name in ("fwd_block_m", "fwd_block_n", "bwd_block_m", "bwd_block_n", "block_d", "block_do"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, got {value}")
    return config


def _input_precision(dtype: torch.dtype) -> str | None:
    # None = Triton's default, which only matters for fp32 operands; see the module docstring.
    return "ieee" if dtype == torch.float32 else None


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def contrastive_forward_triton(
    h: torch.Tensor, f: torch.Tensor, tau: float, config: TritonConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) plus the base-2 row and column log-sum-exps that the backward needs."""
    config = _check_launch(h, f, tau, config)
    n, dim = h.shape
    lse2_row = torch.empty(n, dtype=torch.float32, device=h.device)
    lse2_col = torch.empty(n, dtype=torch.float32, device=h.device)
    diag2 = torch.empty(n, dtype=torch.float32, device=h.device)
    scale_log2 = _LOG2E / tau
    precision = _input_precision(h.dtype)
    grid = (triton.cdiv(n, config.fwd_block_m),)
    common = dict(
        BLOCK_M=config.fwd_block_m,
        BLOCK_N=config.fwd_block_n,
        BLOCK_D=config.block_d,
        INPUT_PRECISION=precision,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    with _device_guard(h):
        _lse_kernel[grid](
            h, f, lse2_row, diag2, n, dim, h.stride(0), f.stride(0), scale_log2, WRITE_DIAG=True, **common
        )
        # diag2 is passed only as a placeholder pointer; WRITE_DIAG=False never touches it.
        _lse_kernel[grid](
            f, h, lse2_col, diag2, n, dim, f.stride(0), h.stride(0), scale_log2, WRITE_DIAG=False, **common
        )
    per_row = (lse2_row - diag2) + (lse2_col - diag2)
    loss = per_row.sum(dtype=torch.float64) * (0.5 * _LN2 / n)
    return loss.to(torch.float32), lse2_row, lse2_col


def contrastive_backward_triton(
    h: torch.Tensor,
    f: torch.Tensor,
    tau: float,
    lse2_row: torch.Tensor,
    lse2_col: torch.Tensor,
    grad_out: torch.Tensor,
    config: TritonConfig | None = None,
) -> torch.Tensor:
    """dL/dh (dtype of h) scaled by the scalar grad_out, from the statistics of the forward."""
    config = _check_launch(h, f, tau, config)
    n, dim = h.shape
    dh = torch.empty_like(h)
    grad_out = grad_out.reshape(1).to(device=h.device, dtype=torch.float32)
    grid = (triton.cdiv(n, config.bwd_block_m), triton.cdiv(dim, config.block_do))
    with _device_guard(h):
        _dh_kernel[grid](
            h,
            f,
            lse2_row,
            lse2_col,
            grad_out,
            dh,
            n,
            dim,
            h.stride(0),
            f.stride(0),
            dh.stride(0),
            _LOG2E / tau,
            0.5 / (n * tau),
            BLOCK_M=config.bwd_block_m,
            BLOCK_N=config.bwd_block_n,
            BLOCK_D=config.block_d,
            BLOCK_DO=config.block_do,
            INPUT_PRECISION=_input_precision(h.dtype),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return dh


__all__ = [
    "TritonConfig",
    "contrastive_backward_triton",
    "contrastive_forward_triton",
    "default_config",
]
