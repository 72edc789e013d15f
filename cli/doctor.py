"""`pipeline doctor`: what a user needs to trust a machine before a long run, as rows of checks.

Each row is a `Check` (name, value, status, hint): package versions, devices and free memory, the kernel
self-check, faiss-gpu, the thread and worker defaults, the default CLIP weights, the needs of
pipeline.toml and, given a cache, a count per stage of `pipeline status`. A row is `missing` only when
something the config needs is absent or broken (a required package, CUDA for `device = "cuda"` or
`index = "gpu-flat"`, weights that cannot be downloaded, a failed self-check under `backend = "triton"`);
`warn` marks what runs, but worse than it could. CLIP weights are looked up in the local cache; only when
they are not there, and HF_HUB_OFFLINE is unset, is the hub probed, once, as `pipeline embed` probes it
(name lookup and connect within core.clip_weights.HUB_TIMEOUT_S), so doctor takes seconds offline too.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from core.errors import ConfigError

OK, WARN, MISSING, NA = "ok", "warn", "missing", "n/a"
REQUIRED_PACKAGES = ("torch", "pyarrow", "faiss", "open_clip")  # modules every stage imports
OPTIONAL_PACKAGES = {  # module -> what runs without it
    "triton": "the contrastive loss runs its torch backend",
    "dask": 'needed only for [run] executor = "dask"',
}
GiB = 2**30
DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED = "ViT-B-32", "auto"  # `pipeline embed`'s defaults


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    status: str  # ok | warn | missing | n/a
    hint: str = ""  # what to do about a warn or missing


@dataclass
class Report:
    checks: list[Check]

    @property
    def missing(self) -> list[Check]:
        return [c for c in self.checks if c.status == MISSING]

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [asdict(c) for c in self.checks], "missing": [c.name for c in self.missing]}


def render_report(report: Report) -> str:
    width = max(len(c.name) for c in report.checks)
    lines = []
    for c in report.checks:
        lines.append(f"{c.name:{width}s}  {c.status:7s}  {c.value}")
        if c.hint and c.status in (WARN, MISSING):
            lines.append(f"{'':{width}s}           -> {c.hint}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def package_version(module: str) -> str | None:
    """'distribution version' of what provides `module` ('faiss-cpu 1.15.1'), or None when it is not
    installed. Read from package metadata, without importing the module."""
    if importlib.util.find_spec(module) is None:
        return None
    for dist in _distributions().get(module, []):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "installed (version unknown)"


def package_checks(sections: dict[str, dict]) -> list[Check]:
    needs_dask = sections.get("run", {}).get("executor") == "dask"
    checks = []
    for module in ("torch", "triton", "faiss", "open_clip", "dask", "pyarrow"):
        version = package_version(module)
        if version is not None:
            checks.append(Check(module, version, OK))
        elif module in REQUIRED_PACKAGES or (module == "dask" and needs_dask):
            checks.append(Check(module, "not installed", MISSING, f"pip install {_pip_name(module)}"))
        elif module == "triton" and not cuda_devices():
            checks.append(Check(module, "not installed", NA, "used only on CUDA"))
        else:
            checks.append(Check(module, "not installed", WARN, OPTIONAL_PACKAGES[module]))
        if module == "torch":
            checks.append(cuda_check())
    return checks


def _pip_name(module: str) -> str:
    return {"faiss": "faiss-cpu (or faiss-gpu-cu12)", "open_clip": "open_clip_torch"}.get(module, module)


def cuda_devices() -> list[str]:
    """'cuda:0', 'cuda:1', ... as torch sees them; [] without torch or CUDA."""
    if package_version("torch") is None:
        return []
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def cuda_check() -> Check:
    if package_version("torch") is None:
        return Check("CUDA", "torch not installed", NA)
    import torch

    build = f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
    count = len(cuda_devices())
    return Check("CUDA", f"{count} device(s), {build}", OK) if count else Check("CUDA", f"none, {build}", NA)


def cpu_memory() -> tuple[int, int]:
    """(available, total) bytes of RAM: /proc/meminfo, else sysconf (where available means free)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def device_checks() -> list[Check]:
    from core.processes import available_cpus

    free, total = cpu_memory()
    checks = [Check("cpu", f"{available_cpus()} CPUs, {_memory(free, total)}", OK)]
    for device in cuda_devices():
        import torch

        free, total = torch.cuda.mem_get_info(device)
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        checks.append(Check(device, f"{name} (sm_{major}{minor}), {_memory(free, total)}", OK))
    return checks


def _memory(free: int, total: int) -> str:
    return f"{free / GiB:.1f} GiB free of {total / GiB:.1f} GiB"


def self_check_checks(sections: dict[str, dict]) -> list[Check]:
    """The contrastive kernel's self-check on each CUDA device, at optimize's dtype and feature width."""
    devices = cuda_devices()
    if not devices:
        return [Check("kernel self-check", "not applicable (no CUDA device)", NA)]
    if package_version("triton") is None:
        return [Check("kernel self-check", "not applicable (triton not importable: torch backend)", NA)]
    optimize = sections.get("optimize", {})
    dtype = {"fp32": "float32"}.get(optimize.get("precision", "auto"), "bfloat16")  # auto: bf16 on CUDA
    dim = clip_dim(sections.get("embed", {}).get("clip_model", DEFAULT_CLIP_MODEL))
    explicit = optimize.get("backend") == "triton"
    return [self_check_check(device, dtype, dim, explicit) for device in devices]


def clip_dim(clip_model: str) -> int:
    """The CLIP feature width, which optimize's loss runs at (the self-check keys on it); 512 if unknown."""
    from core.clip_models import model_dim

    try:
        return model_dim(clip_model)
    except (ConfigError, OSError, KeyError, TypeError, ValueError):
        return 512


def self_check_check(device: str, dtype: str, dim: int, explicit_triton: bool) -> Check:
    """One device's self-check. A failure is `missing` only under `backend = "triton"`, which never checks;
    under `auto` optimize then runs the (slower) torch backend, so it is a warning."""
    import torch

    name = f"kernel self-check {device}"
    if torch.cuda.get_device_capability(device) < (8, 0):  # as kernels.contrastive._triton_supported
        return Check(name, "not applicable (pre-Ampere GPU: torch backend)", NA)
    try:
        from kernels.self_check import self_check, verdict_cache_path
    except ImportError as e:
        return Check(name, f"not available ({e})", NA)
    result = self_check(torch.device(device), getattr(torch, dtype), dim)  # a kernel that raises fails it
    value = f"{'passed' if result.passed else 'FAILED'} ({dtype}, D={dim}), max error {result.max_error:.1e}"
    if result.passed:
        where = f"cached in {verdict_cache_path()}" if result.cached else f"{result.seconds:.1f} s"
        return Check(name, f"{value}, {where}", OK)
    if explicit_triton:
        return Check(name, f"{value}: {result.reason}", MISSING, 'set [optimize] backend = "auto" or "torch"')
    return Check(name, f"{value}: {result.reason}", WARN, "backend auto runs the torch loss instead (slower)")


def faiss_gpu_check() -> Check:
    if package_version("faiss") is None:
        return Check("faiss-gpu", "faiss not installed", NA)
    if not cuda_devices():  # without importing faiss
        return Check("faiss-gpu", "not applicable (no CUDA device)", NA)
    from pipeline.retrieve.faiss_index import faiss_gpus

    gpus = faiss_gpus()
    if gpus:
        return Check("faiss-gpu", f"usable on {gpus} GPU(s)", OK)
    return Check("faiss-gpu", "not usable: indexes build on the CPU", WARN, "pip install faiss-gpu-cu12")


def thread_checks(sections: dict[str, dict]) -> list[Check]:
    """The torch threads `start_threads` gives a command (`default_threads`: the CPUs, less those the load
    average says other jobs keep busy), and what embed lowers them to beside its decoders
    (`limit_threads`), unless --threads or OMP_NUM_THREADS chose a count. A count chosen that way is kept
    whatever the load, so a load above the CPUs with more than one thread is a warning
    (core/processes.py: threads that wait for cores other jobs hold run several times slower)."""
    from core import processes
    from pipeline.embed.config import EmbedConfig

    explicit = processes._explicit_threads()  # what this command was asked for, as limit_threads reads it
    cpus = processes.available_cpus()
    threads, why = (explicit, "--threads or OMP_NUM_THREADS") if explicit else processes.default_threads()
    workers = sections.get("embed", {}).get("workers", EmbedConfig(inputs=()).workers)
    beside = explicit or max(1, min(threads, cpus // (1 + workers)))
    value = f"{threads} torch thread(s) ({why})"
    load, machine_cpus = processes.load_average(), os.cpu_count() or cpus  # the load counts every CPU
    if load is not None:
        value += f"; load {load:.1f} on {machine_cpus} CPUs"
    busy = load is not None and load > machine_cpus
    if busy and max(threads, beside) > 1:
        hint = "busy machine: pass --threads 1 (`pipeline --threads 1 run`, `trainers --threads 1 gan ...`)"
        threads_check = Check("threads", value + f": a command would still start {threads}", WARN, hint)
    else:
        threads_check = Check("threads", value, OK)
    return [
        threads_check,
        Check("embed workers", f"{workers} decoders of 1 thread, beside {beside} torch thread(s)", OK),
    ]


def clip_weights_check(clip_model: str, clip_pretrained: str) -> Check:
    """Whether the weights embed would load are on this machine, or can be downloaded: the local cache
    first, then (not under HF_HUB_OFFLINE) the one bounded probe of the hub that embed makes."""
    name = "CLIP weights"
    if package_version("open_clip") is None or package_version("torch") is None:
        return Check(name, "open_clip or torch not installed", NA)
    from core.clip_models import model_config
    from core.clip_weights import AUTO, offline_fix, pretrained_table, resolve_pretrained, tag_weights

    try:
        model_name = model_config(clip_model)[0]
        pretrained = resolve_pretrained(clip_model, clip_pretrained)
    except ConfigError as e:
        return Check(name, str(e), MISSING)
    label = f"{clip_model} {clip_pretrained!r}" + (f" -> {pretrained!r}" if clip_pretrained == AUTO else "")
    if not pretrained:
        if clip_pretrained == AUTO:
            return Check(name, f"{label}: random weights", WARN, "pass a checkpoint file for real features")
        return Check(name, f"{label}: random weights, nothing to load", OK)
    if Path(pretrained).is_file():
        return Check(name, f"{label}: checkpoint file", OK)
    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained:
        return Check(name, f"{label}: checkpoint file not found", MISSING)
    if not pretrained_table().get_pretrained_cfg(model_name, pretrained):
        return Check(name, f"{label}: not an open_clip tag for {clip_model}", MISSING)
    found, reason = tag_weights(model_name, pretrained)
    if found is not None:
        return Check(name, f"{label}: in the local cache ({found})", OK)
    if reason is not None:
        fix = offline_fix(model_name, pretrained)
        return Check(name, f"{label}: not in the local cache, and {reason}", MISSING, fix)
    return Check(
        name, f"{label}: not in the local cache; the hub answers, so the first embed downloads them", WARN
    )


def config_checks(sections: dict[str, dict]) -> list[Check]:
    """Devices and indexes that pipeline.toml asks for and this machine must have."""
    devices = cuda_devices()
    checks = []
    for stage in ("embed", "retrieve", "optimize"):
        device = str(sections.get(stage, {}).get("device", "auto"))
        if not device.startswith("cuda"):
            continue
        name, found = f"[{stage}] device", f"{device}: {len(devices)} CUDA device(s)"
        if device in devices or (device == "cuda" and devices):
            checks.append(Check(name, found, OK))
        else:
            checks.append(Check(name, found, MISSING, f'set [{stage}] device = "cpu" (or "auto")'))
    if sections.get("retrieve", {}).get("index") == "gpu-flat":
        name, found = "[retrieve] index", f"gpu-flat: {len(devices)} CUDA device(s)"
        if devices:
            checks.append(Check(name, found, OK))
        else:
            checks.append(Check(name, found, MISSING, 'set [retrieve] index = "auto" to search on the CPU'))
    return checks


def cache_checks(cache: Path, sections: dict[str, dict]) -> list[Check]:
    """One row per stage of `pipeline status`; a path that is not a cache is a row, not an error."""
    from manifests.errors import CacheFault
    from pipeline.run import stage_configs
    from pipeline.status import pipeline_status

    try:
        configs = stage_configs(sections, cache) if sections.get("embed", {}).get("inputs") else None
        stages = pipeline_status(cache, configs)
    except (ConfigError, CacheFault) as e:
        return [Check("cache", str(e), WARN)]
    return [
        Check(
            f"cache {s.stage}",
            f"{len(s.up_to_date):,} up to date, {len(s.stale):,} stale" + (f" ({s.note})" if s.note else ""),
            OK,
        )
        for s in stages
    ]


def diagnose(cache: Path | None, sections: dict[str, dict]) -> Report:
    """Every check, in the order `pipeline doctor` prints them. `sections`: pipeline.toml's default_map."""
    embed = sections.get("embed", {})
    clip_model = embed.get("clip_model", DEFAULT_CLIP_MODEL)
    clip_pretrained = embed.get("clip_pretrained", DEFAULT_CLIP_PRETRAINED)
    checks = package_checks(sections) + device_checks() + self_check_checks(sections) + [faiss_gpu_check()]
    checks += thread_checks(sections) + [clip_weights_check(clip_model, clip_pretrained)]
    checks += config_checks(sections)
    if cache is not None:
        checks += cache_checks(cache, sections)
    return Report(checks)
