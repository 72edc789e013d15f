"""Offline sm_90 compilation of the Triton kernels (kernels.compile_check): no GPU needed.

Triton's wheel bundles ptxas, so CI compiles the very kernels the GPU would run and checks what can
be known without one: the default launch configurations fit the H100's registers (no spills) and
shared memory, and 16-bit dots lower to Hopper warp-group MMA (tensor cores).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kernels import UNVALIDATED_TRITON, triton_validated

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs triton, not in interpreter mode",
    ),
    pytest.mark.skipif(  # what an older compiler makes of them is compile_check's report, not a test's
        not triton_validated(), reason=UNVALIDATED_TRITON
    ),
]


def _ptxas_available() -> bool:
    from pathlib import Path

    import triton.backends.nvidia as nvidia

    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


@pytest.fixture(scope="module", autouse=True)
def _needs_ptxas():
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is missing")


@pytest.mark.parametrize("dim", [64, 512, 768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_default_configs_fit_an_h100(dtype, dim):
    from kernels.compile_check import MAX_SHARED, check_config

    reports = check_config(dtype, dim, arch=90)
    assert [r.kernel for r in reports] == ["forward", "backward dh"]
    for report in reports:
        assert report.spill_bytes == 0 and report.stack_bytes == 0, report.line()
        assert 0 < report.registers <= 255, report.line()
        assert 0 < report.shared_bytes <= MAX_SHARED[90], report.line()
        assert report.viable
        expected = "fma" if dtype == torch.float32 else "wgmma"  # fp32 runs ieee FMA by design
        assert report.dot_instructions == expected, report.line()


@pytest.mark.parametrize("arch", [80, 89])
def test_default_configs_fit_ampere_and_ada(arch):
    # mma.sync needs more registers than wgmma for the same accumulator: smaller dH tiles there.
    from kernels.compile_check import check_config

    for dtype, dim in ((torch.bfloat16, 64), (torch.bfloat16, 512), (torch.float32, 512)):
        for report in check_config(dtype, dim, arch=arch):
            assert report.viable, report.line()
            assert report.dot_instructions == ("fma" if dtype == torch.float32 else "mma.sync")


def test_unknown_arch_is_refused():
    from kernels.compile_check import check_config

    with pytest.raises(ValueError, match="arch must be one of"):
        check_config(torch.bfloat16, 512, arch=70)


def test_a_spilling_config_is_reported():
    # A 64 x 512 fp32 dH accumulator over 4 warps needs 256 registers per thread for it alone.
    from kernels.compile_check import check_config
    from kernels.contrastive_triton import TritonConfig

    config = TritonConfig(128, 64, 64, 64, 64, 512, num_warps=4, num_stages=3)
    forward, backward = check_config(torch.bfloat16, 512, config, arch=90)
    assert backward.spill_bytes > 0 and not backward.viable
    assert "NOT VIABLE" in backward.line()


def test_cli_reports_and_exit_code(capsys):
    from kernels.compile_check import main

    assert main(["--dims", "64", "--dtypes", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "forward" in out and "backward dh" in out and "wgmma" in out
