"""Tests for kernels.self_check: the first-use check that `backend="auto"` runs before choosing Triton.

Two groups, as in test_contrastive.py:
- in this process: the cache path, key and atomic writes, the once-per-process memo and its warning, and
  the dispatch (auto consults the check, "triton" and "torch" never do), with the kernel comparison
  replaced by a counting stub;
- `test_child_*`: the real check with the Triton kernel under TRITON_INTERPRET=1, which must be set
  before triton is imported, so `test_self_check_in_interpreter_subprocess` re-runs them in a child.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.contrastive as contrastive
import kernels.self_check as sc
from kernels import UNVALIDATED_TRITON, contrastive_loss, triton_validated

REPO_ROOT = Path(__file__).resolve().parents[2]
_CHILD_FLAG = "LAFITE_SELF_CHECK_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(_CHILD_FLAG) == "1" and os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
CPU = torch.device("cpu")

child_only = pytest.mark.skipif(
    not IN_CHILD, reason="runs in a TRITON_INTERPRET=1 subprocess (test_self_check_in_interpreter_subprocess)"
)


@pytest.fixture(autouse=True)
def fresh_process_state(tmp_path, monkeypatch):
    """A private verdict cache and an empty per-process memo, as in a new process."""
    monkeypatch.setenv(sc.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    monkeypatch.delenv(sc.FAULT_ENV, raising=False)
    monkeypatch.setattr(sc, "_process_verdicts", {})


@pytest.fixture
def comparisons(monkeypatch):
    """Replace the kernel comparison with a stub; `calls` counts runs, `result` is what it returns."""

    class Stub:
        calls = 0
        result = (2e-7, "dH at N=97 tau=0.01")

        def __call__(self, device, dtype, dim):
            Stub.calls += 1
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    stub = Stub()
    monkeypatch.setattr(sc, "compare_backends", stub)
    return stub


def cache_entries() -> dict:
    return json.loads(sc.verdict_cache_path().read_text())["verdicts"]


# ----------------------------------------------------------------------------------------------
# the verdict cache
# ----------------------------------------------------------------------------------------------


def test_verdict_cache_path_env_then_xdg_then_home(monkeypatch, tmp_path):
    assert sc.verdict_cache_path() == tmp_path / "user-cache" / "kernel_self_check.json"
    monkeypatch.delenv(sc.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sc.verdict_cache_path() == tmp_path / "xdg" / "lafite-pipeline" / "kernel_self_check.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        sc.verdict_cache_path() == tmp_path / "home" / ".cache" / "lafite-pipeline" / "kernel_self_check.json"
    )


def test_verdict_key_names_device_driver_triton_dtype_and_d_class(monkeypatch):
    key = sc.verdict_key(CPU, torch.float32, 600)
    assert set(key) == {"device", "driver", "cuda", "triton", "dtype", "d_class"}
    assert (key["device"], key["dtype"], key["d_class"]) == ("cpu", "float32", "1024")
    assert sc.verdict_key(CPU, torch.float32, 1024) == key  # same class: 513..1024
    assert sc.verdict_key(CPU, torch.float32, 512)["d_class"] == "512"
    assert sc.verdict_key(CPU, torch.bfloat16, 600)["dtype"] == "bfloat16"
    assert [sc.d_class(d) for d in (1, 2, 3, 16, 17, 768)] == [1, 2, 4, 16, 32, 1024]

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(sc, "_nvidia_driver_version", lambda: "550.54.15")
    gpu = sc.verdict_key(torch.device("cuda", 0), torch.bfloat16, 512)
    assert (gpu["device"], gpu["driver"], gpu["cuda"]) == (
        "NVIDIA H100 80GB HBM3",
        "550.54.15",
        torch.version.cuda,
    )


def test_a_pass_is_cached_under_its_key_and_later_calls_skip_the_check(comparisons):
    first = sc.self_check(CPU, torch.float32, 600)
    assert first.passed and not first.cached and first.seconds > 0 and comparisons.calls == 1
    assert first.max_error == 2e-7 and "matched" in first.reason
    (stored,) = cache_entries().values()
    assert stored["key"] == sc.verdict_key(CPU, torch.float32, 600) and stored["max_error"] == 2e-7

    again = sc.self_check(CPU, torch.float32, 1000)  # same D class: a later process would read this
    assert again.passed and again.cached and again.seconds == 0.0 and comparisons.calls == 1
    assert again.key == first.key and again.max_error == first.max_error

    assert not sc.self_check(CPU, torch.float32, 600, use_cache=False).cached  # forced: runs again
    assert not sc.self_check(CPU, torch.float16, 600).cached  # another dtype: another key
    assert comparisons.calls == 3 and len(cache_entries()) == 2


def test_the_cache_is_written_atomically(comparisons, monkeypatch):
    sc.self_check(CPU, torch.float32, 64)
    before = sc.verdict_cache_path().read_bytes()
    # The disk fills once the new cache file's bytes are written, before it would replace the old one.
    monkeypatch.setenv("PIPELINE_ENOSPC_AT", sc.CACHE_FILE)
    check = sc.self_check(CPU, torch.float16, 64)
    assert check.passed and not check.cached  # the verdict stands; it is just not remembered
    assert sc.verdict_cache_path().read_bytes() == before  # the old file, whole
    assert [p.name for p in sc.verdict_cache_path().parent.iterdir()] == [sc.CACHE_FILE]  # no temp file


def test_a_damaged_cache_counts_as_empty_and_is_rewritten(comparisons):
    sc.verdict_cache_path().parent.mkdir(parents=True)
    sc.verdict_cache_path().write_text('{"verdicts": {"trunc')
    assert not sc.self_check(CPU, torch.float32, 64).cached and comparisons.calls == 1
    assert sc.self_check(CPU, torch.float32, 64).cached and comparisons.calls == 1


def test_a_failure_is_not_cached(comparisons):
    comparisons.result = (3e-2, "dH at N=97 tau=0.01")
    check = sc.self_check(CPU, torch.float32, 64)
    assert not check.passed and check.max_error == 3e-2
    assert "dH at N=97 tau=0.01 relative error 3.0e-02 > 1e-04" in check.reason
    assert not sc.verdict_cache_path().exists()
    sc.self_check(CPU, torch.float32, 64)
    assert comparisons.calls == 2


def test_a_kernel_that_raises_fails_the_check(comparisons):
    comparisons.result = RuntimeError("PTX JIT\ncompilation failed")
    check = sc.self_check(CPU, torch.float32, 64)
    assert not check.passed and check.max_error == 0.0
    assert check.reason == "triton raised RuntimeError: PTX JIT compilation failed"
    assert not sc.verdict_cache_path().exists()


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1", reason="needs triton, compiled"
)
def test_without_a_gpu_or_interpreter_the_real_check_fails_with_the_reason():
    check = sc.self_check(CPU, torch.float32, 32)
    assert not check.passed and check.reason.startswith(
        "triton raised ValueError: the triton backend needs CUDA"
    )


# ----------------------------------------------------------------------------------------------
# once per process, and the dispatch
# ----------------------------------------------------------------------------------------------


def test_first_use_check_runs_once_per_device_dtype_and_d_class_and_warns_once(comparisons, caplog):
    comparisons.result = (0.25, "loss at N=64 tau=0.07")
    with caplog.at_level(logging.WARNING, logger="kernels.self_check"):
        for dim in (600, 1000, 600):
            assert not sc.first_use_check(CPU, torch.float32, dim).passed
        assert comparisons.calls == 1
        sc.first_use_check(CPU, torch.float32, 512)  # another D class
        sc.first_use_check(CPU, torch.float16, 512)  # another dtype
    assert comparisons.calls == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and "2.5e-01" in warnings[0] and "torch backend" in warnings[0]


def test_auto_consults_the_check_and_explicit_backends_never_do(monkeypatch):
    verdicts = []

    def first_use_check(device, dtype, dim):
        verdicts.append(sc.SelfCheck(len(verdicts) == 0, 0.0, 0.0, False, {}, "stub"))  # pass, then fail
        return verdicts[-1]

    monkeypatch.setattr(sc, "first_use_check", first_use_check)
    assert contrastive.resolve_backend("auto", CPU, torch.float32, 64) == ("torch", None)  # no GPU
    assert not verdicts

    monkeypatch.setattr(contrastive, "_triton_supported", lambda device: True)
    assert contrastive.resolve_backend("auto", CPU, torch.float32, 64) == ("triton", verdicts[0])
    assert contrastive.resolve_backend("auto", CPU, torch.float32, 64) == ("torch", verdicts[1])
    assert contrastive.resolve_backend("triton", CPU, torch.float32, 64) == ("triton", None)
    assert contrastive.resolve_backend("torch", CPU, torch.float32, 64) == ("torch", None)
    assert len(verdicts) == 2
    with pytest.raises(ValueError, match="backend must be one of"):
        contrastive.resolve_backend("cuda", CPU, torch.float32, 64)


def test_summary_is_json_safe():
    check = sc.SelfCheck(False, float("inf"), 0.123456, False, {"dtype": "float32"}, "dH at N=97: nan")
    summary = {"passed": False, "max_error": None, "seconds": 0.1235, "cached": False}
    assert check.summary() == {**summary, "reason": "dH at N=97: nan"}
    json.dumps(check.summary(), allow_nan=False)


# ----------------------------------------------------------------------------------------------
# the real check, with the Triton kernel under the interpreter (child process)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(IN_CHILD, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(not triton_validated(), reason=UNVALIDATED_TRITON)
def test_self_check_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-k", "test_child_"]
    cmd += ["-p", "no:cacheprovider", "-rs"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) == 3, output[-5000:]  # every child test ran
    assert "skipped" not in output, output[-5000:]


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 dots are broken in the interpreter
def test_child_self_check_passes_with_the_triton_kernel(dtype):
    check = sc.self_check(CPU, dtype, 32)
    assert check.passed and not check.cached, check.reason
    assert 0 < check.max_error <= sc.TOLERANCE[dtype] / 10 and check.seconds > 0
    assert sc.self_check(CPU, dtype, 32).cached


@child_only
def test_child_injected_fault_falls_back_to_torch_and_warns_once(monkeypatch, caplog):
    from kernels import contrastive_triton

    launches = []
    launcher = contrastive_triton.contrastive_forward_triton
    monkeypatch.setattr(
        contrastive_triton, "contrastive_forward_triton", lambda *a: launches.append(1) or launcher(*a)
    )
    monkeypatch.setattr(contrastive, "_triton_supported", lambda device: True)  # as on a GPU
    gen = torch.Generator().manual_seed(1)
    h, f = torch.randn(40, 24, generator=gen), torch.randn(40, 24, generator=gen)

    contrastive_loss(h, f, 0.07, backend="auto")  # first use at D class 32: checked, passes
    assert len(launches) == 3  # two in the check, then the call itself

    monkeypatch.setenv(sc.FAULT_ENV, "1e-2")  # the kernel's loss and dH come out 1% off in the check
    h, f = torch.randn(40, 48, generator=gen), torch.randn(40, 48, generator=gen)  # a new D class: 64
    with caplog.at_level(logging.WARNING, logger="kernels.self_check"):
        auto = contrastive_loss(h, f, 0.07, backend="auto")
        contrastive_loss(h, f, 0.07, backend="auto")
    assert len(launches) == 5  # only the check's two: both calls ran torch
    assert torch.equal(auto, contrastive_loss(h, f, 0.07, backend="torch"))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "self-check failed on cpu (float32, D class 64)" in warning
    assert "relative error 1.0e-02 > 1e-04" in warning
    assert not sc.first_use_check(CPU, torch.float32, 48).passed
    assert sc.first_use_check(CPU, torch.float32, 24).passed  # the other class is unaffected


def test_the_validated_triton_is_read_from_the_installed_version(monkeypatch):
    import importlib.metadata

    import kernels

    for installed, validated in (("3.8.0", True), ("3.10.1+git", True), ("3.5.1", False), ("2.2.0", False)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=installed: v)
        assert kernels.triton_validated() is validated, installed
