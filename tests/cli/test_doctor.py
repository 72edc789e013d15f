"""`pipeline doctor`: its fields, the --json form, and exit 1 when something the config needs is missing.

The machine is made what each test needs by monkeypatching doctor's probes (`package_version`,
`cuda_devices`, the local-weights lookup, the hub probe, the load average), never by uninstalling anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from factories import TINY_CLIP, tiny_cache
from typer.testing import CliRunner

import cli.doctor as doctor
import core.clip_weights
from cli.pipeline import app
from core import processes

FIELDS = ["torch", "CUDA", "triton", "faiss", "open_clip", "dask", "pyarrow", "cpu", "kernel self-check"]
FIELDS += ["faiss-gpu", "threads", "embed workers", "CLIP weights"]
TINY_TOML = f'[embed]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = ""\n'
HUB_PROBE = core.clip_weights.offline_reason  # the real one, which `machine` replaces


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A quiet CPU machine whose hub answers (HF_HUB_OFFLINE unset), in an empty project folder."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(doctor, "cuda_devices", lambda: [])
    monkeypatch.setattr(processes, "load_average", lambda: 0.3)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(core.clip_weights, "offline_reason", lambda url=None: None)
    return tmp_path


def without(monkeypatch, *modules):
    """Simulate `modules` not being installed."""
    installed = doctor.package_version
    monkeypatch.setattr(doctor, "package_version", lambda m: None if m in modules else installed(m))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def checks_of(result) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_doctor_prints_every_field(machine):
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    names = [line.split("  ")[0].strip() for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert names == FIELDS
    assert "not applicable (no CUDA device)" in result.stdout
    assert "ViT-B-32 'auto' -> 'openai'" in result.stdout  # the default weights, looked up locally


def test_doctor_json_has_the_same_fields(machine):
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [c["name"] for c in report["checks"]] == FIELDS and report["missing"] == []
    checks = checks_of(result)
    assert checks["torch"]["status"] == "ok" and checks["torch"]["value"].startswith("torch ")
    assert checks["faiss"]["value"].startswith("faiss-")  # names the build: faiss-cpu or faiss-gpu
    assert checks["kernel self-check"] == {
        "name": "kernel self-check",
        "value": "not applicable (no CUDA device)",
        "status": "n/a",
        "hint": "",
    }
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn", "n/a"}


def test_a_missing_required_package_exits_1_naming_it(machine, monkeypatch):
    without(monkeypatch, "faiss")
    result = invoke("doctor", "--json")
    assert result.exit_code == 1
    checks = checks_of(result)
    assert checks["faiss"]["status"] == "missing" and "pip install faiss-cpu" in checks["faiss"]["hint"]
    assert checks["faiss-gpu"]["status"] == "n/a"
    assert result.stderr.strip() == "doctor: missing faiss"


def test_dask_is_missing_only_when_the_config_runs_on_dask(machine, monkeypatch):
    without(monkeypatch, "dask")
    (machine / "pipeline.toml").write_text(TINY_TOML)
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    assert "dask               warn" in result.stdout
    (machine / "pipeline.toml").write_text(TINY_TOML + '[run]\nexecutor = "dask"\n')
    result = invoke("doctor")
    assert result.exit_code == 1 and result.stderr.strip() == "doctor: missing dask"


def test_cuda_asked_for_but_absent_exits_1(machine):
    (machine / "pipeline.toml").write_text(
        TINY_TOML + 'device = "cuda"\n[retrieve]\nindex = "gpu-flat"\n[optimize]\ndevice = "cpu"\n'
    )
    result = invoke("doctor", "--json")
    assert result.exit_code == 1
    checks = checks_of(result)
    assert checks["[embed] device"]["status"] == checks["[retrieve] index"]["status"] == "missing"
    assert "[optimize] device" not in checks
    assert result.stderr.strip() == "doctor: missing [embed] device, [retrieve] index"


def test_clip_weights_on_disk_or_not_needed_never_ask_the_hub(machine, monkeypatch, tmp_path):
    def probe(url=None):
        raise AssertionError("asked the hub")

    monkeypatch.setattr(core.clip_weights, "offline_reason", probe)
    weights = tmp_path / "open_clip_model.safetensors"
    monkeypatch.setattr(core.clip_weights, "cached_weights_file", lambda name, tag: weights)
    assert doctor.clip_weights_check("ViT-B-32", "openai").status == "ok"
    assert doctor.clip_weights_check(TINY_CLIP, "").status == "ok"  # random weights: nothing to load
    assert doctor.clip_weights_check(TINY_CLIP, "auto").status == "warn"  # random weights by default
    assert doctor.clip_weights_check(TINY_CLIP, "missing.pt").status == "missing"
    assert doctor.clip_weights_check("no-such-model", "auto").status == "missing"


def test_clip_weights_the_hub_cannot_give_are_missing_with_the_file_to_download(machine, monkeypatch):
    """Not on disk and the hub unreachable: `missing` and exit 1, as `pipeline embed` would fail, with the
    file and repo the embed error names; when the hub answers, a warning that the first embed downloads."""
    probes = []

    def unreachable(url=None):
        probes.append(url)
        return "huggingface.co cannot be reached (Name or service not known)"

    monkeypatch.setattr(core.clip_weights, "cached_weights_file", lambda name, tag: None)
    monkeypatch.setattr(core.clip_weights, "offline_reason", unreachable)
    result = invoke("doctor", "--json")
    assert result.exit_code == 1 and result.stderr.strip() == "doctor: missing CLIP weights"
    check = checks_of(result)["CLIP weights"]
    assert check["status"] == "missing" and check["value"].endswith(
        "huggingface.co cannot be reached (Name or service not known)"
    )
    assert check["hint"] == core.clip_weights.offline_fix("ViT-B-32", "openai")
    assert (
        "open_clip_model.safetensors from the Hugging Face repo timm/vit_base_patch32_clip_224.openai"
        in check["hint"]
    )
    assert probes == [None]  # once, for the hub (not a URL-only tag)
    monkeypatch.setattr(core.clip_weights, "offline_reason", lambda url=None: None)
    online = doctor.clip_weights_check("ViT-B-32", "auto")
    assert online.status == "warn" and "the first embed downloads them" in online.value


def test_doctor_probes_the_hub_with_one_connect_and_not_under_hf_hub_offline(machine, monkeypatch):
    """The real probe: one connection attempt (at an address nothing listens on), none with HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    connects = []

    def refuse(sock, address):
        connects.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(core.clip_weights, "offline_reason", HUB_PROBE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(machine / "empty-hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    result = invoke("doctor", "--json")
    assert result.exit_code == 1 and result.stderr.strip() == "doctor: missing CLIP weights"
    assert "127.0.0.1 cannot be reached (Connection refused)" in checks_of(result)["CLIP weights"]["value"]
    assert connects == [("127.0.0.1", 9)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = doctor.clip_weights_check("ViT-B-32", "auto")
    assert offline.status == "missing" and offline.value.endswith(
        "not in the local cache, and HF_HUB_OFFLINE is set"
    )
    assert connects == [("127.0.0.1", 9)]


def test_threads_follow_the_load_and_warn_when_a_count_was_forced(machine, monkeypatch):
    """On 2 CPUs at load 7.8 a command starts 1 torch thread (core.processes.default_threads) and says
    why; --threads 2 or OMP_NUM_THREADS=2 keeps 2, which wait for each other behind the other jobs: a
    warning naming --threads 1."""
    monkeypatch.setattr(processes, "available_cpus", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(processes, "_own_load", lambda: 0.0)
    monkeypatch.setattr(processes, "_explicit_threads", lambda: None)
    monkeypatch.setattr(processes, "load_average", lambda: 7.8)
    busy = doctor.thread_checks({})[0]
    assert busy.status == "ok", busy
    assert busy.value == (
        "1 torch thread(s) (2 CPUs, and a load average of 7.8 says other jobs keep 1 busy; --threads N "
        "chooses); load 7.8 on 2 CPUs"
    )
    monkeypatch.setattr(processes, "_explicit_threads", lambda: 2)  # --threads 2 or OMP_NUM_THREADS=2
    forced = doctor.thread_checks({})[0]
    assert forced.status == "warn" and "--threads 1" in forced.hint
    assert forced.value.endswith("load 7.8 on 2 CPUs: a command would still start 2")
    monkeypatch.setattr(processes, "_explicit_threads", lambda: None)
    monkeypatch.setattr(processes, "load_average", lambda: 0.4)
    quiet = doctor.thread_checks({})[0]
    assert quiet.status == "ok" and quiet.value == (
        "2 torch thread(s) (the CPUs this process may use); load 0.4 on 2 CPUs"
    )


def test_faiss_is_not_imported_without_a_cuda_device(machine, monkeypatch):
    import pipeline.retrieve.faiss_index

    def faiss_gpus():
        raise AssertionError("faiss imported to find no GPU")

    monkeypatch.setattr(pipeline.retrieve.faiss_index, "faiss_gpus", faiss_gpus)
    assert doctor.faiss_gpu_check().status == "n/a"


def test_doctor_in_a_fresh_process_imports_no_clip_model_code(tmp_path):
    """open_clip's model code (torchvision, timm, torch._dynamo) took 2.9-5.4 s of doctor's 6.6-8.9 s on 2
    busy cores; the weights check needs only open_clip's table of tags."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    env["OMP_NUM_THREADS"] = "1"
    code = (
        "import sys\nfrom cli.pipeline import main\nsys.argv[0] = 'pipeline'\ntry:\n    main()\nfinally:\n"
        "    print([m for m in ('open_clip', 'torchvision', 'timm', 'faiss') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "doctor"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and done.stderr.strip() == "doctor: missing CLIP weights", (
        done.stdout + done.stderr
    )
    assert "HF_HUB_OFFLINE is set" in done.stdout
    assert done.stdout.splitlines()[-1] == ("['faiss']" if doctor.cuda_devices() else "[]")


def test_cache_summary_counts_each_stage(machine, tmp_path_factory):
    cache = tiny_cache(tmp_path_factory.mktemp("doctor"))
    (machine / "pipeline.toml").write_text(TINY_TOML)
    result = invoke("doctor", "--cache", cache, "--json")
    assert result.exit_code == 0, result.output
    checks = checks_of(result)
    assert checks["cache embed"]["value"].startswith("2 up to date, 0 stale")
    assert checks["cache index"]["value"].startswith("0 up to date, 1 stale")


def test_a_path_that_is_not_a_cache_is_a_warning_not_a_traceback(machine):
    (machine / "pipeline.toml").write_text(TINY_TOML)
    result = invoke("doctor", "--cache", machine / "nowhere")
    assert result.exit_code == 0, result.output
    assert "cache              warn     --cache" in result.stdout and "no such directory" in result.stdout


def test_embed_workers_follow_the_config(machine):
    (machine / "pipeline.toml").write_text(TINY_TOML + "workers = 3\n")
    assert checks_of(invoke("doctor", "--json"))["embed workers"]["value"].startswith("3 decoders")


@pytest.fixture
def fake_gpu(monkeypatch):
    """An Ampere-class cuda:0 for `self_check_check`, whose kernel check returns `verdicts[0]`."""
    import torch

    from kernels import self_check

    verdicts = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(self_check, "self_check", lambda device, dtype, dim: verdicts[0])
    return verdicts


def _verdict(passed: bool, cached: bool = False):
    from kernels.self_check import SelfCheck

    reason = "matched" if passed else "triton differs from torch: dH relative error 3.0e-01 > 2e-02"
    return SelfCheck(passed, 1e-3 if passed else 0.3, 0.0 if cached else 1.2, cached, {}, reason)


def test_self_check_passes_fails_and_fails_hard_under_backend_triton(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("LAFITE_CACHE_DIR", str(tmp_path))
    fake_gpu.append(_verdict(True, cached=True))
    passed = doctor.self_check_check("cuda:0", "bfloat16", 512, explicit_triton=False)
    assert passed.status == "ok" and "cached in" in passed.value and str(tmp_path) in passed.value
    fake_gpu[0] = _verdict(False)
    failed = doctor.self_check_check("cuda:0", "bfloat16", 512, explicit_triton=False)
    assert failed.status == "warn" and "triton differs from torch" in failed.value  # auto runs torch
    hard = doctor.self_check_check("cuda:0", "bfloat16", 512, explicit_triton=True)
    assert hard.status == "missing" and "backend" in hard.hint


def test_self_check_not_available_without_the_module(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels.self_check", None)  # the import now raises ImportError
    check = doctor.self_check_check("cuda:0", "bfloat16", 512, explicit_triton=False)
    assert check.status == "n/a" and check.value.startswith("not available")


def test_self_check_needs_triton_on_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(doctor, "cuda_devices", lambda: ["cuda:0"])
    without(monkeypatch, "triton")
    (check,) = doctor.self_check_checks({})
    assert check.status == "n/a" and "triton not importable" in check.value
