"""Compile the contrastive kernels ahead of time for a CUDA architecture, no GPU needed.

Triton's wheel ships ptxas, so the whole lowering (Triton IR -> PTX -> cubin) runs on any machine.
For each kernel and launch configuration this reports what decides whether the config is viable on
the card before anything is timed: registers per thread, bytes spilled to local memory (from
`ptxas -v`), shared memory, and which instructions the dots became (Hopper warp-group MMA `wgmma`,
Ampere-style `mma.sync`, or plain FMA). It says nothing about speed: benchmarks/bench_contrastive.py
does, on a GPU.

The signatures mirror what the launchers pass at run time (pointers 16-byte aligned and, like
N, D and the strides in practice, divisible by 16), so the code compiled here is the code the JIT
would build for those shapes.

    python -m kernels.compile_check                         # default configs, sm_90, D = 64, 512, 768
    python -m kernels.compile_check --arch 80 --dims 512 --dtypes bf16    # an A100
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.contrastive_triton import (
    TritonConfig,
    _dh_kernel,
    _fwd_kernel,
    bwd_meta,
    default_config,
    fwd_meta,
)

TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES = {name: dtype for dtype, name in TYPE_NAMES.items()}
# Largest dynamic shared memory per block, by compute capability x 10 (sm_90: 227 KiB).
MAX_SHARED = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}

# Runtime arguments of each kernel, in order: (name, kind) with kind "in" for a pointer to the input
# dtype, "f32" for an fp32 pointer, "int" for an i32 scalar that the JIT would mark divisible by 16 and
# "float" for an fp32 scalar.
_FWD_ARGS = [
    ("h_ptr", "in"),
    ("f_ptr", "in"),
    ("row_part_ptr", "f32"),
    ("col_part_ptr", "f32"),
    ("diag2_ptr", "f32"),
    ("N", "int"),
    ("D", "int"),
    ("stride_h", "int"),
    ("stride_f", "int"),
    ("group_size", "int"),
    ("scale_log2", "float"),
]
_BWD_ARGS = [
    ("h_ptr", "in"),
    ("f_ptr", "in"),
    ("lse2_row_ptr", "f32"),
    ("lse2_col_ptr", "f32"),
    ("grad_out_ptr", "f32"),
    ("dh_ptr", "in"),
    ("N", "int"),
    ("D", "int"),
    ("stride_h", "int"),
    ("stride_f", "int"),
    ("stride_dh", "int"),
    ("scale_log2", "float"),
    ("grad_scale", "float"),
]


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    arch: int  # compute capability x 10
    dtype: str
    dim: int
    registers: int  # per thread
    spill_bytes: int  # bytes of register spill stores per thread
    stack_bytes: int  # local-memory stack frame per thread (spills land here)
    shared_bytes: int  # dynamic shared memory per block
    dot_instructions: str  # "wgmma", "mma.sync" or "fma"
    num_warps: int

    @property
    def viable(self) -> bool:
        return self.spill_bytes == 0 and self.stack_bytes == 0 and self.shared_bytes <= MAX_SHARED[self.arch]

    def line(self) -> str:
        flag = "ok" if self.viable else "NOT VIABLE"
        return (
            f"{self.kernel:<12} {self.dtype:<5} D={self.dim:<5} regs={self.registers:<4} "
            f"spill={self.spill_bytes:<5} smem={self.shared_bytes / 1024:6.1f} KiB  "
            f"dots={self.dot_instructions:<8} warps={self.num_warps}  {flag}"
        )


def _triton_signature(args: list[tuple[str, str]], dtype: torch.dtype):
    pointer = {"in": f"*{TYPE_NAMES[dtype]}", "f32": "*fp32"}
    signature, attrs = {}, {}
    for index, (name, kind) in enumerate(args):
        signature[name] = pointer.get(kind) or {"int": "i32", "float": "fp32"}[kind]
        if kind != "float":  # aligned pointers and multiples of 16, as the JIT specialises them
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _compile(kernel, args, meta: dict, dtype: torch.dtype, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    signature, attrs = _triton_signature(args, dtype)
    signature.update({name: "constexpr" for name in meta})
    source = ASTSource(fn=kernel, signature=signature, constexprs=meta, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill stores and stack bytes from the bundled ptxas in verbose mode.

    cuobjdump's resource summary of the cubin reports LOCAL:0 even for spilling kernels, so the
    numbers come from `ptxas -v` on the same PTX with the options Triton 3.8 passes (its
    `make_cubin`: -lineinfo, --regAllocOptLevel=2, the `sm_XXa` target on Hopper).
    """
    import triton.backends.nvidia as nvidia

    ptxas = Path(nvidia.__file__).parent / "bin" / "ptxas"
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        cubin = Path(tmp) / "kernel.cubin"
        proc = subprocess.run(
            [str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}"]
            + [str(source), "-o", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        )
    info = proc.stdout + proc.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, info)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "stack": number(r"(\d+) bytes stack frame"),
    }


def _dot_instructions(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def check_config(
    dtype: torch.dtype, dim: int, config: TritonConfig | None = None, arch: int = 90
) -> list[KernelReport]:
    """Compile both kernels for `arch` with `config` (default: `default_config(dtype, dim, arch)`)."""
    if arch not in MAX_SHARED:
        raise ValueError(f"arch must be one of {sorted(MAX_SHARED)}, got {arch}")
    config = config or default_config(dtype, dim, arch)
    reports = []
    for name, kernel, args, meta in (
        ("forward", _fwd_kernel, _FWD_ARGS, fwd_meta(config, dtype)),
        ("backward dh", _dh_kernel, _BWD_ARGS, bwd_meta(config, dtype)),
    ):
        compiled = _compile(kernel, args, meta, dtype, arch)
        usage = _ptxas_usage(compiled.asm["ptx"], arch)
        reports.append(
            KernelReport(
                kernel=name,
                arch=arch,
                dtype=TYPE_NAMES[dtype],
                dim=dim,
                registers=usage["registers"],
                spill_bytes=usage["spill_stores"],
                stack_bytes=usage["stack"],
                shared_bytes=int(compiled.metadata.shared),
                dot_instructions=_dot_instructions(compiled.asm["ptx"]),
                num_warps=meta["num_warps"],
            )
        )
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, default=90, choices=sorted(MAX_SHARED), help="compute capability x 10 (90 = H100)"
    )
    parser.add_argument("--dims", default="64,512,768", help="comma-separated feature dimensions D")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16, fp16, fp32")
    args = parser.parse_args(argv)
    all_viable = True
    for dtype_name in args.dtypes.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            dtype = DTYPES[dtype_name.strip()]
            print(default_config(dtype, dim, args.arch))
            for report in check_config(dtype, dim, arch=args.arch):
                print("  " + report.line(), flush=True)
                all_viable &= report.viable
    return 0 if all_viable else 1


if __name__ == "__main__":
    raise SystemExit(main())
