"""Tests for kernels.contrastive: both backends against a materialising fp64 reference.

Three groups:
- torch backend and input validation: run in this process on CPU.
- triton backend under the Triton CPU interpreter: TRITON_INTERPRET=1 only takes effect if it is set
  before triton is first imported, and pytest imports every test module into one process, so
  `test_triton_backend_in_interpreter_subprocess` re-runs this file in a child process with the
  variable set, selecting the `test_child_*` tests (skipped here in the parent).
- full-size triton tests: need a CUDA device, skipped otherwise.

Tolerances are relative errors ||out - ref|| / ||ref|| against fp64 logits computed from the same
(already rounded) inputs. Loss: 1e-5 for fp32, 1e-3 for 16-bit (products of 16-bit values are exact
in fp32, so only accumulation order differs). Gradient: 1e-5 for fp32; 1e-2 for 16-bit, where storing
dH in 16 bits alone costs ~2e-3 (bf16) and the triton kernel also rounds probabilities to 16 bits
before the second matmul.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import UNVALIDATED_TRITON, contrastive_loss, triton_validated
from kernels.contrastive_torch import contrastive_forward_torch, default_chunk_rows

REPO_ROOT = Path(__file__).resolve().parents[2]
_CHILD_FLAG = "LAFITE_CONTRASTIVE_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(_CHILD_FLAG) == "1" and os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

child_only = pytest.mark.skipif(
    not IN_CHILD,
    reason="runs in a TRITON_INTERPRET=1 subprocess (test_triton_backend_in_interpreter_subprocess)",
)
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")

# dtype -> (loss rtol, grad rtol)
TOLS = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-3, 1e-2),
}


# ----------------------------------------------------------------------------------------------
# reference and factories
# ----------------------------------------------------------------------------------------------


def reference(h: torch.Tensor, f: torch.Tensor, tau: float, grad_scale: float = 1.0):
    """Materialising fp64 loss and dL/dh via F.cross_entropy in both directions and autograd."""
    h64 = h.detach().double().requires_grad_(True)
    f64 = f.detach().double()
    logits = h64 @ f64.T / tau  # N x N
    target = torch.arange(h.shape[0], device=h.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    (loss * grad_scale).backward()
    return loss.detach(), h64.grad


def make_pair(
    n: int, dim: int, dtype: torch.dtype, seed: int = 0, scale: float | None = None, device: str = "cpu"
):  # generated in fp64 on the CPU, then moved
    """Unit-norm h and f with cos(h_i, f_i) ~ 0.1 (as for CLIP features: informative but not separable,
    so the loss and gradient stay well conditioned even at tau = 0.01). With `scale`, independent
    Gaussian rows of norm ~ scale * sqrt(dim) / 10 instead: logits in the thousands at tau = 0.01."""
    gen = torch.Generator().manual_seed(seed)
    if scale is None:
        h = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
        noise = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
        f = F.normalize(0.1 * h + noise, dim=1)
    else:
        h = torch.randn(n, dim, generator=gen, dtype=torch.float64) * (scale / 10)
        f = torch.randn(n, dim, generator=gen, dtype=torch.float64) * (scale / 10)
    h = h.to(device=device, dtype=dtype).requires_grad_(True)
    f = f.to(device=device, dtype=dtype)
    return h, f


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    err = (out.double() - ref).norm().item()
    ref_norm = ref.norm().item()
    # N = 1 gives an exactly zero loss and gradient; then demand (near) exact zeros.
    return err / ref_norm if ref_norm > 0 else err * 1e12


def check_against_reference(
    n,
    dim,
    dtype,
    tau,
    backend,
    *,
    chunk_rows=None,
    scale=None,
    seed=0,
    grad_tol=None,
    device="cpu",
    triton_config=None,
):
    h, f = make_pair(n, dim, dtype, seed=seed, scale=scale, device=device)
    loss = contrastive_loss(h, f, tau, backend=backend, chunk_rows=chunk_rows, triton_config=triton_config)
    loss.backward()
    ref_loss, ref_grad = reference(h, f, tau)
    loss_tol, default_grad_tol = TOLS[dtype]
    grad_tol = max(grad_tol or 0.0, default_grad_tol)  # an override only loosens
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert h.grad.dtype == dtype and h.grad.shape == h.shape
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert rel_err(loss, ref_loss) <= loss_tol, (loss.item(), ref_loss.item())
    assert rel_err(h.grad, ref_grad) <= grad_tol, rel_err(h.grad, ref_grad)


# ----------------------------------------------------------------------------------------------
# torch backend (CPU)
# ----------------------------------------------------------------------------------------------

SMALL_GRID = [
    (n, dim, dtype, tau)
    for n in (1, 7, 128)
    for dim in (64, 100, 768)
    for dtype in (torch.float32, torch.bfloat16)
    for tau in (0.01, 0.07, 1.0)
]


@pytest.mark.parametrize("n,dim,dtype,tau", SMALL_GRID)
def test_torch_backend_matches_reference_small(n, dim, dtype, tau):
    # chunk of 3 rows for N = 7 and 50 rows for N = 128: smaller than N and not dividing it.
    chunk_rows = {1: None, 7: 3, 128: 50}[n]
    check_against_reference(n, dim, dtype, tau, "torch", chunk_rows=chunk_rows)


@pytest.mark.parametrize(
    "n,dim,dtype,tau,chunk_rows",
    [
        (1000, 512, torch.float32, 0.07, 333),
        (1000, 100, torch.bfloat16, 0.01, 333),
        (1000, 768, torch.bfloat16, 1.0, None),
        (4099, 768, torch.float32, 0.01, 1000),
        (4099, 768, torch.bfloat16, 0.07, 1000),
        (4099, 64, torch.float32, 1.0, 4096),
        (4099, 100, torch.bfloat16, 0.01, None),
    ],
)
def test_torch_backend_matches_reference_large(n, dim, dtype, tau, chunk_rows):
    check_against_reference(n, dim, dtype, tau, "torch", chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [4.0, 10.0])
def test_torch_backend_large_norms_no_overflow(dtype, scale):
    # |logits| reach ~1e3..1e4 at tau = 0.01: exp() of them overflows even fp64 without max
    # subtraction. fp32 logit error grows with |s|, hence the looser fp32 gradient tolerance.
    check_against_reference(33, 100, dtype, 0.01, "torch", chunk_rows=5, scale=scale, grad_tol=5e-5)


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_tiny_dims(dim, dtype):
    check_against_reference(7, dim, dtype, 0.07, "torch", chunk_rows=2)


def test_torch_backend_chunk_size_does_not_change_result():
    h, f = make_pair(50, 64, torch.float32)
    losses = [contrastive_forward_torch(h.detach(), f, 0.07, chunk_rows=c)[0] for c in (1, 7, 50, 4096)]
    for loss in losses[1:]:
        assert torch.allclose(loss, losses[0], rtol=1e-6, atol=0)


def test_torch_backend_grad_output_scaling():
    h, f = make_pair(37, 64, torch.float32)
    contrastive_loss(h, f, 0.07, backend="torch", chunk_rows=10).backward()
    grad_1 = h.grad.clone()
    h.grad = None
    (contrastive_loss(h, f, 0.07, backend="torch", chunk_rows=10) * 3.0).backward()
    torch.testing.assert_close(h.grad, 3.0 * grad_1, rtol=1e-6, atol=0)
    _, ref_grad = reference(h, f, 0.07, grad_scale=3.0)
    assert rel_err(h.grad, ref_grad) <= 1e-5


def test_torch_backend_deterministic():
    h, f = make_pair(300, 100, torch.float32)
    grads = []
    for _ in range(2):
        h.grad = None
        contrastive_loss(h, f, 0.05, backend="torch", chunk_rows=64).backward()
        grads.append(h.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_torch_backend_saves_no_n_by_n_tensor():
    n, dim = 256, 16  # N x N = 65536 elements > N x D = 4096
    h, f = make_pair(n, dim, torch.float32)
    loss = contrastive_loss(h, f, 0.07, backend="torch", chunk_rows=32)
    saved = loss.grad_fn.saved_tensors
    assert saved, "expected the custom autograd Function to save its inputs"
    assert max(t.numel() for t in saved) <= n * dim


def test_auto_backend_uses_torch_on_cpu():
    h, f = make_pair(20, 32, torch.float32)
    auto = contrastive_loss(h, f, 0.1)
    torch_loss = contrastive_loss(h, f, 0.1, backend="torch")
    assert torch.equal(auto, torch_loss)


def test_auto_backend_needs_ampere_for_triton(monkeypatch):
    import kernels.contrastive as contrastive
    import kernels.self_check as self_check

    class CudaTensorStub:  # what _resolve_backend looks at
        is_cuda = True
        device = torch.device("cuda", 0)
        dtype = torch.bfloat16
        shape = (8, 512)

    passed = self_check.SelfCheck(True, 0.0, 0.0, True, {}, "stub")  # tests/kernels/test_self_check.py
    monkeypatch.setattr(self_check, "first_use_check", lambda device, dtype, dim: passed)
    monkeypatch.setattr(contrastive, "_triton_importable", lambda: True)
    for capability, expected in (((7, 5), "torch"), ((8, 0), "triton"), ((9, 0), "triton")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert contrastive._resolve_backend("auto", CudaTensorStub()) == expected
    monkeypatch.setattr(contrastive, "_triton_importable", lambda: False)
    assert contrastive._resolve_backend("auto", CudaTensorStub()) == "torch"
    assert contrastive._resolve_backend("triton", CudaTensorStub()) == "triton"  # explicit: as asked


def test_no_grad_for_h_is_fine():
    h, f = make_pair(9, 16, torch.float32)
    loss = contrastive_loss(h.detach(), f, 0.1, backend="torch")
    assert not loss.requires_grad
    ref_loss, _ = reference(h, f, 0.1)
    assert rel_err(loss, ref_loss) <= 1e-5


def test_default_chunk_rows():
    assert default_chunk_rows(1) == 4096
    assert default_chunk_rows(65536) == 4096
    assert default_chunk_rows(2**20) == 256  # 256 x 2**20 fp32 logits = 1 GiB
    assert default_chunk_rows(2**30) == 1


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _pair(n=4, dim=8, dtype=torch.float32):
    return torch.randn(n, dim, dtype=dtype), torch.randn(n, dim, dtype=dtype)


@pytest.mark.parametrize(
    "h,f,match",
    [
        (torch.randn(4, 8), torch.randn(5, 8), "same shape"),
        (torch.randn(4, 8), torch.randn(4, 9), "same shape"),
        (torch.randn(8), torch.randn(8), "2-D"),
        (torch.randn(2, 4, 8), torch.randn(2, 4, 8), "2-D"),
        (torch.randn(0, 8), torch.randn(0, 8), "N >= 1"),
        (torch.randn(4, 0), torch.randn(4, 0), "D >= 1"),
    ],
)
def test_shape_errors(h, f, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(h, f, 0.1)


@pytest.mark.parametrize(
    "h_dtype,f_dtype,match",
    [
        (torch.float32, torch.bfloat16, "same dtype"),
        (torch.float16, torch.float32, "same dtype"),
        (torch.float64, torch.float64, "float16, bfloat16 or float32"),
        (torch.int32, torch.int32, "float16, bfloat16 or float32"),
    ],
)
def test_dtype_errors(h_dtype, f_dtype, match):
    h = torch.ones(4, 8, dtype=h_dtype)
    f = torch.ones(4, 8, dtype=f_dtype)
    with pytest.raises(TypeError, match=match):
        contrastive_loss(h, f, 0.1)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        contrastive_loss([[1.0]], torch.ones(1, 1), 0.1)


@pytest.mark.parametrize("tau", [0.0, -0.07, float("nan"), float("inf")])
def test_bad_tau_value(tau):
    h, f = _pair()
    with pytest.raises(ValueError, match="tau"):
        contrastive_loss(h, f, tau)


@pytest.mark.parametrize("tau", ["0.07", None, torch.tensor(0.07), True])
def test_bad_tau_type(tau):
    h, f = _pair()
    with pytest.raises(TypeError, match="tau"):
        contrastive_loss(h, f, tau)


@pytest.mark.parametrize("backend", ["cuda", "Triton", ""])
def test_bad_backend_name(backend):
    h, f = _pair()
    with pytest.raises(ValueError, match="backend"):
        contrastive_loss(h, f, 0.1, backend=backend)


@pytest.mark.parametrize("chunk_rows", [0, -3, 2.5])
def test_bad_chunk_rows(chunk_rows):
    h, f = _pair()
    with pytest.raises(ValueError, match="chunk_rows"):
        contrastive_loss(h, f, 0.1, backend="torch", chunk_rows=chunk_rows)


def test_frozen_f_requiring_grad_raises():
    h, f = _pair()
    with pytest.raises(ValueError, match="frozen"):
        contrastive_loss(h.requires_grad_(), f.requires_grad_(), 0.1)


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs triton, compiled mode (not the interpreter)",
)
def test_triton_backend_rejects_cpu_tensors():
    h, f = _pair()
    with pytest.raises(ValueError, match="CUDA"):
        contrastive_loss(h, f, 0.1, backend="triton")


# ----------------------------------------------------------------------------------------------
# triton backend under the interpreter (child process)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(IN_CHILD, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(not triton_validated(), reason=UNVALIDATED_TRITON)
def test_triton_backend_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # No extra -q: with the project's addopts it would hide the "N passed" summary parsed below.
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__).resolve()),
        "-k",
        "test_child_",
        "-p",
        "no:cacheprovider",
        "-rs",
        "-W",
        "error::RuntimeWarning",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20000:]
    passed = re.search(r"(\d+) passed", output)
    # Every child test must have run (none skipped), or the interpreter was not active.
    assert passed and int(passed.group(1)) == N_CHILD_TESTS, output[-5000:]
    assert "skipped" not in output, output[-5000:]


INTERP_GRID = [
    (n, dim, dtype, tau)
    for n in (1, 7, 33)
    for dim in (16, 100)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for tau in (0.01, 0.07, 1.0)
]


def _install_interpreter_bf16_dot_fix() -> None:
    """Triton 3.8's interpreter stores bfloat16 as uint16 and feeds those raw bit patterns to
    np.matmul in tl.dot. Wrap create_dot to widen bf16 operands to fp32 first (exact, and what the
    tensor cores compute: bf16 products accumulated in fp32). Only installed if the bug shows."""
    import numpy as np
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def _probe(a_ptr, o_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        tl.store(o_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, a))

    a = torch.eye(16, dtype=torch.bfloat16)
    out = torch.empty(16, 16)
    _probe[(1,)](a, out)
    if torch.equal(out, torch.eye(16)):
        return
    original = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _probe[(1,)](a, out)
    assert torch.equal(out, torch.eye(16)), "bf16 interpreter fix did not take"


if IN_CHILD:
    _install_interpreter_bf16_dot_fix()


@child_only
@pytest.mark.parametrize("n,dim,dtype,tau", INTERP_GRID)
def test_child_triton_matches_reference(n, dim, dtype, tau):
    check_against_reference(n, dim, dtype, tau, "triton")


def _configs():
    from kernels.contrastive_triton import TritonConfig

    return [
        # several row blocks, BLOCK_D < D with a ragged tail, several dH column slices
        TritonConfig(32, 16, 16, 32, 32, 16, num_warps=1, num_stages=1),
        # blocks larger than N and D: everything masked inside one tile
        TritonConfig(64, 64, 64, 64, 128, 128, num_warps=1, num_stages=1),
    ]


@child_only
@pytest.mark.parametrize("config_index", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_child_triton_block_configs(config_index, dtype):
    check_against_reference(45, 100, dtype, 0.05, "triton", triton_config=_configs()[config_index])


@child_only
@pytest.mark.parametrize("groups", [1, 3, 64])
def test_child_triton_forward_groups(groups):
    """The super-tile split of the forward: one program; three groups with a ragged last one (N = 100
    in groups of 48); more groups asked for than there are tiles. Same statistics either way."""
    from kernels.contrastive_triton import TritonConfig, contrastive_forward_triton

    config = TritonConfig(16, 16, 16, 16, 16, 32, num_warps=1, num_stages=1, fwd_groups=groups)
    check_against_reference(100, 40, torch.float32, 0.05, "triton", triton_config=config)
    h, f = make_pair(100, 40, torch.float32)
    _, row, col = contrastive_forward_triton(h.detach(), f, 0.05, config)
    _, lse_row, lse_col = contrastive_forward_torch(h.detach(), f, 0.05)
    ln2 = 0.6931471805599453
    torch.testing.assert_close(row * ln2, lse_row, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(col * ln2, lse_col, rtol=1e-6, atol=1e-5)


@child_only
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 512), (torch.float32, 200), (torch.float16, 72)])
def test_child_triton_gpu_default_configs(dtype, dim, monkeypatch):
    """The launch configs a GPU gets (128-wide tiles, 16 groups, all of D per dH program), run by the
    interpreter: their masking and grouping are checked here even though their speed needs the GPU."""
    from kernels import contrastive_triton

    monkeypatch.setattr(contrastive_triton, "_interpreting", lambda: False)
    config = contrastive_triton.default_config(dtype, dim)
    assert config.fwd_block_m == 128 and config.fwd_groups == 16
    monkeypatch.undo()
    check_against_reference(300, dim, dtype, 0.03, "triton", triton_config=config)


@child_only
def test_child_triton_rectangular_forward_tiles():
    from kernels.contrastive_triton import TritonConfig

    config = TritonConfig(16, 32, 32, 16, 16, 16, num_warps=1, num_stages=1, fwd_groups=2)
    check_against_reference(70, 24, torch.bfloat16, 0.07, "triton", triton_config=config)


@child_only
@pytest.mark.parametrize("dim", [1, 3])
def test_child_triton_tiny_dims(dim):
    check_against_reference(7, dim, torch.float32, 0.07, "triton")


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_child_triton_large_norms_no_overflow(dtype):
    check_against_reference(33, 100, dtype, 0.01, "triton", scale=10.0, grad_tol=5e-5)


@child_only
def test_child_triton_statistics_match_torch_backend():
    from kernels.contrastive_triton import contrastive_forward_triton

    h, f = make_pair(40, 24, torch.float32)
    loss_t, lse2_row, lse2_col = contrastive_forward_triton(h.detach(), f, 0.07)
    loss_c, lse_row, lse_col = contrastive_forward_torch(h.detach(), f, 0.07, chunk_rows=16)
    ln2 = 0.6931471805599453
    torch.testing.assert_close(lse2_row * ln2, lse_row, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse2_col * ln2, lse_col, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss_t, loss_c, rtol=1e-5, atol=0)


@child_only
def test_child_triton_grad_output_scaling():
    h, f = make_pair(21, 40, torch.float32)
    contrastive_loss(h, f, 0.07, backend="triton").backward()
    grad_1 = h.grad.clone()
    h.grad = None
    (contrastive_loss(h, f, 0.07, backend="triton") * 3.0).backward()
    torch.testing.assert_close(h.grad, 3.0 * grad_1, rtol=1e-6, atol=0)
    _, ref_grad = reference(h, f, 0.07, grad_scale=3.0)
    assert rel_err(h.grad, ref_grad) <= 1e-5


@child_only
def test_child_triton_deterministic():
    h, f = make_pair(33, 100, torch.bfloat16)
    grads = []
    for _ in range(2):
        h.grad = None
        contrastive_loss(h, f, 0.05, backend="triton").backward()
        grads.append(h.grad.clone())
    assert torch.equal(grads[0], grads[1])


@child_only
def test_child_triton_launcher_validation():
    from kernels.contrastive_triton import TritonConfig, contrastive_forward_triton

    h, f = make_pair(8, 32, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        contrastive_forward_triton(h.detach().T.contiguous().T, f, 0.1)
    bad = TritonConfig(24, 16, 16, 16, 16, 16, num_warps=1, num_stages=1)
    with pytest.raises(ValueError, match="power of two"):
        contrastive_forward_triton(h.detach(), f, 0.1, bad)
    no_groups = TritonConfig(16, 16, 16, 16, 16, 16, num_warps=1, num_stages=1, fwd_groups=0)
    with pytest.raises(ValueError, match="fwd_groups"):
        contrastive_forward_triton(h.detach(), f, 0.1, no_groups)
    with pytest.raises(TypeError, match="same dtype"):
        contrastive_forward_triton(h.detach(), f.half(), 0.1)


N_CHILD_TESTS = len(INTERP_GRID) + 4 + 3 + 3 + 1 + 2 + 2 + 4  # grid, configs, groups, GPU configs, tiles, ...


# ----------------------------------------------------------------------------------------------
# full size on a GPU
# ----------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_matches_torch_backend_full_size(dtype):
    n, dim, tau = 65536, 512, 0.07
    h, f = make_pair(n, dim, dtype, device="cuda")
    loss_t = contrastive_loss(h, f, tau, backend="triton")
    loss_t.backward()
    grad_t, h.grad = h.grad.clone(), None
    loss_c = contrastive_loss(h, f, tau, backend="torch")
    loss_c.backward()
    loss_tol, grad_tol = TOLS[dtype]
    assert rel_err(loss_t, loss_c) <= loss_tol
    assert rel_err(grad_t, h.grad) <= grad_tol


@needs_cuda
@pytest.mark.parametrize("n", [1, 7, 4099])
@pytest.mark.parametrize("dim", [100, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
def test_gpu_triton_matches_reference(n, dim, dtype, tau):
    check_against_reference(n, dim, dtype, tau, "triton", device="cuda")


@needs_cuda
def test_gpu_triton_deterministic_and_auto_dispatch():
    h, f = make_pair(8192, 512, torch.bfloat16, device="cuda")
    grads = []
    for backend in ("triton", "auto"):
        h.grad = None
        contrastive_loss(h, f, 0.07, backend=backend).backward()
        grads.append(h.grad.clone())
    assert torch.equal(grads[0], grads[1])  # auto picked triton, and triton is deterministic


@needs_cuda
def test_gpu_triton_offsets_beyond_int32():
    # 65536 x 32769 > 2**31 elements: the last row blocks start past int32 offsets. Forward only
    # (the backward would recompute logits ceil(32769 / 512) times).
    from kernels.contrastive_triton import contrastive_forward_triton

    n, dim, tau = 65536, 32769, 0.07
    assert n * dim > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(n, dim, device="cuda", generator=gen) / dim**0.5).to(torch.bfloat16)
    f = (torch.randn(n, dim, device="cuda", generator=gen) / dim**0.5).to(torch.bfloat16)
    _, lse2_row, lse2_col = contrastive_forward_triton(h, f, tau)
    last = slice(n - 5, n)
    ln2 = 0.6931471805599453
    # bf16 products are exact in fp32; fp32 matmul (TF32 off by default) for the 5-row reference.
    ref_row = torch.logsumexp(h[last].float() @ f.float().T / tau, dim=1) / ln2
    ref_col = torch.logsumexp(f[last].float() @ h.float().T / tau, dim=1) / ln2
    torch.testing.assert_close(lse2_row[last], ref_row, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse2_col[last], ref_col, rtol=1e-5, atol=1e-4)
