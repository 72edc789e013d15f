"""Triton kernels and host launcher for the fused symmetric InfoNCE loss.

Layers 1 and 2 of `kernels.contrastive` (STYLE item 7): the private `@triton.jit` kernels and the
launchers that validate inputs and pick block sizes. The public entry point is
`kernels.contrastive.contrastive_loss`; call these launchers directly only in tests and benchmarks.

Notation: h, f are N x D, s = h f^T / tau. The kernels work in base 2, t = s * log2(e), so that the
online reductions use `exp2`; every statistic they return (row/column log-sum-exp, diagonal) is in
base 2 and the loss is converted back with ln(2) on the host.

Kernels:
- `_fwd_kernel`: one pass over the logits for both reductions. Rows and columns are cut into G groups
  of equal size (a multiple of both tile sizes); program (g_r, g_c) walks its super-tile tile by tile,
  keeping the online (running max, running sum) log-sum-exp of each row in registers and merging each
  tile into its own row of a G x N column-partial buffer. A G x N row-partial buffer receives the row
  results, and the host folds both over G. Every logit is computed once (2 N^2 D flops), with no
  atomics and no N x N or (N / BLOCK_M) x N buffer: 2 G N floats of partials (128 MiB at N = 2**20).
- `_dh_kernel`: each program owns BLOCK_M rows and BLOCK_DO columns of dH and loops over all column
  tiles, recomputing t, so every dH element is written by exactly one program: no atomics, results
  are bit-for-bit deterministic. With BLOCK_DO >= D (the default up to D = 512) each logit is
  recomputed once: 4 N^2 D flops for the backward, 6 N^2 D in all, against the 4 N^2 D the benchmark
  counts as model flops. Wider D is cut into BLOCK_DO slices, each recomputing t.

Pointer offsets: the part that scales with N is 64-bit (program ids are cast to int64 before
multiplying by group or block sizes and strides; column tiles advance a pointer by BLOCK_N * stride per
step), the in-tile part (< BLOCK * stride) is int32, so N * D may exceed 2**31 elements.

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

from kernels.checks import validate_inputs, validate_tau

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Value of masked logits (base 2): below any real logit, and finite so masked-only maxima stay finite.
_MASKED = tl.constexpr(-1.0e30)


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Layer 1: kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    h_base,
    f_base,
    stride_h,
    stride_f,
    row_mask,
    col_mask,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """h[rows] f[cols]^T as a BLOCK_M x BLOCK_N fp32 tile, D in slices of BLOCK_D (masked tails read 0).

    h_base and f_base point at the tile's first row of h and of f; rows past the masks read 0.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        a = tl.load(
            h_base + offs_m[:, None] * stride_h + d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # f loaded transposed: a BLOCK_D x BLOCK_N tile.
        b_t = tl.load(
            f_base + offs_n[None, :] * stride_f + d[:, None],
            mask=d_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        t = tl.dot(a, b_t, t, input_precision=INPUT_PRECISION)
    return t


@triton.jit
def _fwd_kernel(
    h_ptr,
    f_ptr,
    row_part_ptr,
    col_part_ptr,
    diag2_ptr,
    N,
    D,
    stride_h,
    stride_f,
    group_size,  # rows (and columns) per group; a multiple of BLOCK_M and BLOCK_N
    scale_log2,  # log2(e) / tau
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Program (g_r, g_c) owns the super-tile (row group g_r) x (column group g_c) of t = h f^T * scale_log2:

    row_part[g_c, i] = log2 sum_{j in group g_c} exp2(t_ij)   for every row i of group g_r
    col_part[g_r, j] = log2 sum_{i in group g_r} exp2(t_ij)   for every column j of group g_c
    diag2[i] = t_ii                                           (written by the programs with g_r == g_c)

    Each logit tile is computed once and feeds both reductions. The row statistics live in registers
    over the column loop; the column statistics of the program's own slice of `col_part` are read,
    merged and written back once per tile. No other program touches that slice, so there are no
    atomics and the result is deterministic. col_part must start at -inf.
    """
    g_r = tl.program_id(0).to(tl.int64)
    g_c = tl.program_id(1).to(tl.int64)
    row_lo = g_r * group_size
    row_hi = tl.minimum(row_lo + group_size, N)
    col_lo = g_c * group_size
    col_hi = tl.minimum(col_lo + group_size, N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    for start_m in range(row_lo, row_hi, BLOCK_M):
        rows = start_m + offs_m  # int64
        row_mask = rows < row_hi
        h_base = h_ptr + start_m * stride_h
        f_base = f_ptr + col_lo * stride_f  # advanced by BLOCK_N rows per step
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of t over the columns seen
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(t - m_i)
        diag = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(col_lo, col_hi, BLOCK_N):
            cols = start_n + offs_n
            col_mask = cols < col_hi
            t = _logit_tile(
                h_base,
                f_base,
                stride_h,
                stride_f,
                row_mask,
                col_mask,
                D,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                INPUT_PRECISION,
            )
            # Padding rows and columns get a finite stand-in for -inf: exp2 of it is 0 next to any real
            # logit, and a padding row's (or column's) own statistics, never stored, stay NaN-free.
            t = tl.where(row_mask[:, None] & col_mask[None, :], t * scale_log2, _MASKED)
            m_new = tl.maximum(m_i, tl.max(t, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
            m_i = m_new

            col_ptrs = col_part_ptr + g_r * N + cols
            old = tl.load(col_ptrs, mask=col_mask, other=float("-inf"))
            c_new = tl.maximum(old, tl.max(t, axis=0))
            c_sum = tl.exp2(old - c_new) + tl.sum(tl.exp2(t - c_new[None, :]), axis=0)
            tl.store(col_ptrs, c_new + tl.log2(c_sum), mask=col_mask)

            # Only the tiles that intersect the diagonal pay for its extraction.
            if (start_n < start_m + BLOCK_M) & (start_n + BLOCK_N > start_m):
                is_diag = rows[:, None] == cols[None, :]
                diag += tl.sum(tl.where(is_diag, t, 0.0), axis=1)
            f_base += BLOCK_N * stride_f

        tl.store(row_part_ptr + g_c * N + rows, m_i + tl.log2(l_i), mask=row_mask)
        if g_r == g_c:
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
        t = _logit_tile(
            h_base,
            f_base,
            stride_h,
            stride_f,
            row_mask,
            col_mask,
            D,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            INPUT_PRECISION,
        )
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

    fwd_block_m: int  # rows per logit tile in _fwd_kernel
    fwd_block_n: int  # columns per logit tile in _fwd_kernel
    bwd_block_m: int  # rows of dH per program in _dh_kernel
    bwd_block_n: int  # column tile width in _dh_kernel
    block_d: int  # reduction slice over D when computing a logit tile (ragged tail masked)
    block_do: int  # dH columns per program in _dh_kernel; t is recomputed ceil(D / block_do) times
    num_warps: int
    num_stages: int
    # The forward splits rows and columns into up to `fwd_groups` groups each: fwd_groups**2 programs,
    # and 2 * fwd_groups * N floats of partial statistics.
    fwd_groups: int = 16


def default_config(dtype: torch.dtype, dim: int, arch: int = 90) -> TritonConfig:
    """Launch parameters for compute capability `arch` (x 10: 90 = H100, 80 = A100), from the usual
    GEMM / flash-attention shapes, not timed yet.

    16-bit inputs: 128 x 128 forward logit tiles (8 warps, 64 fp32 accumulator registers per
    thread), D in slices of 64, 16 x 16 super-tiles = 256 programs (two waves on 132 SMs at one
    program per SM). Backward: 64-row programs owning all dH columns up to D = 512 (a 64 x 512 fp32
    accumulator, 128 registers per thread), so each logit tile is recomputed once; wider D in slices
    of 512. Before Hopper (mma.sync keeps accumulators differently) that accumulator spills, so dH
    slices are 256 wide there and column tiles 32. fp32 inputs (the ieee FMA path, no tensor cores)
    use smaller tiles.
    Every default compiles for sm_80, sm_86, sm_89 and sm_90 without register spills and within shared
    memory, which `python -m kernels.compile_check` verifies offline (tests/kernels/test_compile_check.py);
    speed needs benchmarks/bench_contrastive.py on the GPU.
    Under the interpreter every block is 16 wide (the minimum tl.dot size) to keep CPU tests fast.
    """
    pow2_dim = max(16, triton.next_power_of_2(dim))
    if _interpreting():
        return TritonConfig(16, 16, 16, 16, 16, min(pow2_dim, 32), num_warps=1, num_stages=1, fwd_groups=2)
    if dtype == torch.float32:
        return TritonConfig(
            fwd_block_m=128,
            fwd_block_n=64,
            bwd_block_m=64,
            bwd_block_n=32,
            block_d=min(32, pow2_dim),
            block_do=min(128, pow2_dim),
            num_warps=8,
            num_stages=2,
        )
    hopper = arch >= 90
    return TritonConfig(
        fwd_block_m=128,
        fwd_block_n=128,
        bwd_block_m=64,
        bwd_block_n=64 if hopper else 32,
        block_d=min(64, pow2_dim),
        block_do=min(512 if hopper else 256, pow2_dim),
        num_warps=8,
        num_stages=3,
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
        config = default_config(h.dtype, h.shape[1], _arch(h.device))
    for name in ("fwd_block_m", "fwd_block_n", "bwd_block_m", "bwd_block_n", "block_d", "block_do"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, got {value}")
    if config.fwd_groups < 1:
        raise ValueError(f"TritonConfig.fwd_groups must be >= 1, got {config.fwd_groups}")
    return config


def _arch(device: torch.device) -> int:
    """Compute capability x 10 of a CUDA device (90 for an H100); 90 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _input_precision(dtype: torch.dtype) -> str | None:
    # None = Triton's default, which only matters for fp32 operands; see the module docstring.
    return "ieee" if dtype == torch.float32 else None


def fwd_meta(config: TritonConfig, dtype: torch.dtype) -> dict:
    """Compile-time parameters of `_fwd_kernel` (constexprs and launch options) for a config."""
    return dict(
        BLOCK_M=config.fwd_block_m,
        BLOCK_N=config.fwd_block_n,
        BLOCK_D=config.block_d,
        INPUT_PRECISION=_input_precision(dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def bwd_meta(config: TritonConfig, dtype: torch.dtype) -> dict:
    """Compile-time parameters of `_dh_kernel` (constexprs and launch options) for a config."""
    return dict(
        BLOCK_M=config.bwd_block_m,
        BLOCK_N=config.bwd_block_n,
        BLOCK_D=config.block_d,
        BLOCK_DO=config.block_do,
        INPUT_PRECISION=_input_precision(dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def contrastive_forward_triton(
    h: torch.Tensor, f: torch.Tensor, tau: float, config: TritonConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) plus the base-2 row and column log-sum-exps that the backward needs."""
    config = _check_launch(h, f, tau, config)
    n, dim = h.shape
    align = max(config.fwd_block_m, config.fwd_block_n)
    group_size = triton.cdiv(triton.cdiv(n, align), config.fwd_groups) * align
    groups = triton.cdiv(n, group_size)  # every group has at least one row
    row_part = torch.empty(groups, n, dtype=torch.float32, device=h.device)
    col_part = torch.full((groups, n), float("-inf"), dtype=torch.float32, device=h.device)
    diag2 = torch.empty(n, dtype=torch.float32, device=h.device)
    with _device_guard(h):
        _fwd_kernel[(groups, groups)](
            h,
            f,
            row_part,
            col_part,
            diag2,
            n,
            dim,
            h.stride(0),
            f.stride(0),
            group_size,
            _LOG2E / tau,
            **fwd_meta(config, h.dtype),
        )
    lse2_row, lse2_col = _logsumexp2(row_part), _logsumexp2(col_part)
    per_row = (lse2_row - diag2) + (lse2_col - diag2)
    loss = per_row.sum(dtype=torch.float64) * (0.5 * _LN2 / n)
    return loss.to(torch.float32), lse2_row, lse2_col


def _logsumexp2(parts: torch.Tensor) -> torch.Tensor:
    """log2 sum_g exp2(parts[g]) over the groups (dim 0), in place on `parts`; all columns finite."""
    top = parts.amax(dim=0)
    return top + parts.sub_(top).exp2_().sum(dim=0).log2_()


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
            **bwd_meta(config, h.dtype),
        )
    return dh


__all__ = [
    "TritonConfig",
    "bwd_meta",
    "contrastive_backward_triton",
    "contrastive_forward_triton",
    "default_config",
    "fwd_meta",
]
