"""First-use self-check of the Triton contrastive kernel against the chunked torch path.

Why: the kernel is tested under the interpreter and on the GPUs we have, but a new card, driver or
Triton release can miscompile it without raising, and a wrong loss or gradient still looks like a
number: `pipeline optimize` would just write worse features. So the first time `backend="auto"` is about
to pick Triton for a (device, dtype, D class) in a process, `first_use_check` runs both backends on a
small seeded problem and compares the loss and dH (`CASES`: a block-aligned N, and a ragged N at a low
temperature, where logits reach 100). The D class is D rounded up to a power of two: `default_config`
picks block sizes from that alone. The problem uses the caller's own D, so the kernels compiled for the
check are the ones the real call reuses.

- A match is cached per (device name, driver, CUDA, triton, dtype, D class) in `verdict_cache_path()`,
  so later processes skip the check. Only matches are cached: a failing setup is checked (and warned
  about) again by each process.
- A mismatch, or a kernel that raises, logs one warning with the error size, and `contrastive_loss`
  uses the torch path for that key for the rest of the process.
- `backend="triton"` never checks: the user asked for it.

Cost, measured on CPU only (one thread, no GPU here): the torch side takes 4-5 ms at D = 512 (8 ms at
D = 1024); the whole check takes 0.66 s at D = 32 and ~40 s at D = 512 under TRITON_INTERPRET=1, a
numpy simulator of the kernels that says nothing about GPU time. Not yet timed on a GPU, where the two
problems are microseconds of math and the cost is compiling the kernels: N = 64 compiles what the real
call reuses, the ragged N = 97 is a second specialisation (Triton specialises on N % 16).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "LAFITE_CACHE_DIR"  # overrides the user cache directory (tests point it at a tmp dir)
FAULT_ENV = "LAFITE_SELF_CHECK_FAULT"  # tests only: a relative error added to the kernel's loss and dH
CACHE_FILE = "kernel_self_check.json"
CASES = ((64, 0.07), (97, 0.01))  # (N, tau)
SEED = 0
# Largest relative error allowed between the backends (loss and dH alike). Both accumulate in fp32; on
# CASES they differ by 1.1e-6 (fp32) and 2.6e-4 (fp16: dH, and in the kernel the probabilities, are
# rounded to 16 bits; bf16 keeps 3 bits fewer, so ~2e-3), measured under the interpreter at D = 32 and
# 512. A miscompiled kernel is off by far more.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class SelfCheck:
    passed: bool  # the kernel matched the torch path within tolerance
    max_error: float  # largest relative error seen (loss and dH); inf if not finite, 0.0 if not run
    seconds: float  # time the check took in this process (0.0 when the verdict came from the cache)
    cached: bool  # read from the verdict cache
    key: dict[str, str]  # device, driver, cuda, triton, dtype, d_class
    reason: str  # one line: what was checked or why it failed

    def summary(self) -> dict:
        """JSON-safe fields for stats files (no key: it repeats what the stats already name)."""
        error = self.max_error if math.isfinite(self.max_error) else None
        return {
            "passed": self.passed,
            "max_error": error,
            "seconds": round(self.seconds, 4),
            "cached": self.cached,
            "reason": self.reason,
        }


def verdict_cache_path() -> Path:
    """The JSON file of cached passes: in $LAFITE_CACHE_DIR, else $XDG_CACHE_HOME/lafite-pipeline, else
    ~/.cache/lafite-pipeline."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lafite-pipeline"
    return Path(root) / CACHE_FILE


def d_class(dim: int) -> int:
    """D rounded up to a power of two."""
    return 1 << max(dim - 1, 0).bit_length()


def verdict_key(device: torch.device, dtype: torch.dtype, dim: int) -> dict[str, str]:
    """What a cached verdict is valid for."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    try:
        triton_version = importlib.metadata.version("triton")  # without importing triton
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else device.type,
        "driver": _nvidia_driver_version() if on_gpu else "none",
        "cuda": (torch.version.cuda or "none") if on_gpu else "none",
        "triton": triton_version,
        "dtype": str(dtype).removeprefix("torch."),
        "d_class": str(d_class(dim)),
    }


def _nvidia_driver_version() -> str:
    """The kernel module's version, e.g. 550.54.15 (torch does not expose it; nvidia-smi reads the same)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)*)\s", text)
    return found.group(1) if found else "unknown"


def self_check(device, dtype, dim: int = 512, *, use_cache: bool = True) -> SelfCheck:
    """Compare the Triton and torch backends on `CASES` at width `dim` on `device` in `dtype`.

    With `use_cache`, a cached pass for the key is returned without running anything, and a new pass is
    cached; without it, the check always runs and the cache is neither read nor written.
    """
    device = torch.device(device)
    key = verdict_key(device, dtype, dim)
    if use_cache and (hit := _read_verdict(key)) is not None:
        return hit
    tolerance = TOLERANCE[dtype]
    t0 = time.perf_counter()
    try:
        max_error, where = compare_backends(device, dtype, dim)
    except Exception as e:  # a kernel that does not compile or launch here fails the check
        message = " ".join(str(e).split())[:200]
        reason = f"triton raised {type(e).__name__}: {message}"
        return SelfCheck(False, 0.0, time.perf_counter() - t0, False, key, reason)
    seconds = time.perf_counter() - t0
    passed = max_error <= tolerance
    problem = f"D={dim} {key['dtype']}, N and tau in {list(CASES)}"
    if passed:
        reason = f"triton matched torch on loss and dH ({problem}): max relative error {max_error:.1e}"
    else:
        reason = (
            f"triton differs from torch: {where} relative error {max_error:.1e} > {tolerance:.0e} ({problem})"
        )
    check = SelfCheck(passed, max_error, seconds, False, key, reason)
    if passed and use_cache:
        _write_verdict(check)
    return check


def compare_backends(device: torch.device, dtype: torch.dtype, dim: int) -> tuple[float, str]:
    """Largest relative error between the triton and torch backends' loss and dH over `CASES`, and where."""
    from kernels.contrastive_torch import loss_with_backend

    fault = float(os.environ.get(FAULT_ENV) or 0.0)
    gen = torch.Generator().manual_seed(SEED)  # its own stream: the caller's RNG state is untouched
    errors = []
    # The caller may be in no_grad, inference or autocast mode (the optimize stage scores under no_grad).
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for n, tau in CASES:
            h, f = (x.to(device, dtype) for x in _seeded_pair(n, dim, gen))
            out = {}
            for backend in ("triton", "torch"):
                h_leaf = h.clone().requires_grad_(True)
                loss = loss_with_backend(h_leaf, f, tau, backend)
                out[backend] = (loss.detach(), *torch.autograd.grad(loss, h_leaf))
            loss_k, dh_k = (x * (1.0 + fault) for x in out["triton"])
            loss_t, dh_t = out["torch"]
            errors.append((_relative_error(loss_k, loss_t), f"loss at N={n} tau={tau}"))
            errors.append((_relative_error(dh_k, dh_t), f"dH at N={n} tau={tau}"))
    return max(errors, key=lambda e: e[0])


def _seeded_pair(n: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm h, f (fp64, CPU) with cos(h_i, f_i) ~ 0.1, as for CLIP features."""
    h = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    noise = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    return h, F.normalize(0.1 * h + noise, dim=1)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else math.inf  # a NaN must not compare as small


# ----------------------------------------------------------------------------------------------
# The verdict cache: {"verdicts": {json key: {"key", "max_error", "reason", "checked_at"}}}
# ----------------------------------------------------------------------------------------------


def _read_verdicts() -> dict:
    try:
        verdicts = json.loads(verdict_cache_path().read_text())["verdicts"]
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: as if empty
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def _read_verdict(key: dict[str, str]) -> SelfCheck | None:
    entry = _read_verdicts().get(json.dumps(key, sort_keys=True))
    try:
        reason = f"cached pass of {entry['checked_at']}: {entry['reason']}"
        return SelfCheck(True, float(entry["max_error"]), 0.0, True, key, reason)
    except (TypeError, KeyError, ValueError):  # no entry, or a damaged one: check again
        return None


def _write_verdict(check: SelfCheck) -> None:
    """Add a pass to the cache atomically. Two processes racing may drop one entry: it is checked again."""
    from manifests import write_json_atomic
    from manifests.errors import CacheFault

    verdicts = _read_verdicts()
    verdicts[json.dumps(check.key, sort_keys=True)] = {
        "key": check.key,
        "max_error": check.max_error,
        "reason": check.reason,
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        write_json_atomic(verdict_cache_path(), {"verdicts": verdicts})
    except (OSError, CacheFault) as e:  # a read-only home or a full disk: the next process checks again
        log.debug("cannot cache the kernel self-check verdict in %s: %s", verdict_cache_path(), e)


# ----------------------------------------------------------------------------------------------
# Once per process: what backend="auto" consults before choosing triton
# ----------------------------------------------------------------------------------------------

_process_verdicts: dict[tuple[str, torch.dtype, int], SelfCheck] = {}
_lock = threading.Lock()  # one check (and at most one warning) per key even with threads


def first_use_check(device, dtype, dim: int) -> SelfCheck:
    """This process's verdict for (device, dtype, D class): `self_check` on first use, then remembered.

    A failure logs one warning; `contrastive_loss(backend="auto")` then runs torch for that key.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    memo_key = (str(device), dtype, d_class(dim))
    with _lock:
        check = _process_verdicts.get(memo_key)
        if check is None:
            check = _process_verdicts[memo_key] = self_check(device, dtype, dim)
            if not check.passed:
                log.warning(
                    "contrastive kernel self-check failed on %s (%s, D class %d), so this process uses "
                    "the torch backend there: %s",
                    check.key["device"],
                    check.key["dtype"],
                    d_class(dim),
                    check.reason,
                )
    return check


def main() -> None:
    """`python -m kernels.self_check`: the uncached verdict and its cost on this machine's first CUDA
    device, per dtype and D, as JSON lines (the record benchmarks/gpu_suite.sh keeps)."""
    if not torch.cuda.is_available():
        raise SystemExit("kernels.self_check: no CUDA device")
    device = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        for dim in (512, 768):
            for use_cache in (False, True):  # cold (compiles, checks), then the cached verdict
                check = self_check(device, dtype, dim, use_cache=use_cache)
                print(
                    json.dumps({"dtype": str(dtype), "dim": dim, "use_cache": use_cache, **check.summary()})
                )


if __name__ == "__main__":
    main()
