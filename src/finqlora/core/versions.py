"""Known-good version sets and supported version ranges: the ONE place they are written down.

`finqlora doctor` checks the installed packages against `SUPPORTED`, docs/installation.md
shows `KNOWN_GOOD` as its install matrix, and `torch_cuda_statement()` is the one sentence on
the supported torch/CUDA sets that README.md, README.zh-CN.md, docs/installation.md and the
Colab notebook show (a test checks that each carries it verbatim). The Colab notebook keeps
Colab's preinstalled torch (`KNOWN_GOOD["t4-colab"]` names no torch to install). When a version
moves, change it here (and the same range in pyproject.toml: a test keeps both ends of each in
step with `SUPPORTED`).

Each known-good set says where it was verified, so nobody mistakes a plan for a measurement:
`verified` names the machine and date, or says "not verified in this repository".
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterable
from dataclasses import dataclass

# Lower bounds are what the code needs (APIs we call); upper bounds exclude majors we have
# never run. `doctor` reports a package outside its range as a failure (training may break).
SUPPORTED: dict[str, str] = {
    "python": ">=3.10",
    "torch": ">=2.4,<3",
    "transformers": ">=4.56,<6",
    "peft": ">=0.17,<1",
    "accelerate": ">=1.10,<2",
    "safetensors": ">=0.4,<1",
    "gguf": ">=0.17,<1",
    # 0.45.1 is the first release that no longer needs `triton.ops` (removed in triton 3.2,
    # which torch >= 2.6 ships): older releases fail to import next to a current torch.
    "bitsandbytes": ">=0.45.1,<1",
    # The GPU profiles' fused kernels (the `gpu` extra); 0.5 has the functional fused linear CE.
    "liger-kernel": ">=0.5,<1",
    "fastapi": ">=0.115,<1",
    "uvicorn": ">=0.30,<1",
}

# Packages without which no training can start (doctor exits non-zero if one is missing or
# out of range). bitsandbytes is only needed for 4-bit QLoRA on an NVIDIA GPU.
REQUIRED_FOR_TRAINING: tuple[str, ...] = ("torch", "transformers", "peft", "accelerate", "safetensors")
# Packages the OpenAI-compatible server needs on top of torch/transformers/peft.
REQUIRED_FOR_SERVING: tuple[str, ...] = ("fastapi", "uvicorn")

# CUDA toolkit versions of PyTorch wheels and the minimum NVIDIA driver each needs on Linux
# (from NVIDIA's CUDA toolkit release notes, "minor version compatibility" minimums).
MIN_LINUX_DRIVER_FOR_CUDA: dict[str, str] = {
    "11.8": "450.80.02",
    "12.1": "525.60.13",
    "12.4": "525.60.13",
    "12.6": "525.60.13",
    "12.8": "525.60.13",
    "12.9": "525.60.13",
    "13.0": "580.65.06",
}

PYTORCH_WHEEL_INDEX = "https://download.pytorch.org/whl/{tag}"
# The PyTorch wheel build for a driver by the major CUDA version it supports: CUDA's minor-version
# compatibility lets any 12.x driver >= 525 run every cu12x wheel, so the major version decides.
# cu128 is the 12.x build of the `cuda12` set below (torch 2.11 ships cu126, cu128 and cu130).
TORCH_INDEX_FOR_DRIVER_CUDA: dict[int, str] = {13: "cu130", 12: "cu128", 11: "cu118"}


@dataclass(frozen=True)
class VersionSet:
    """A set of versions that work together for one kind of machine."""

    name: str
    title: str
    python: str
    torch: str  # pip requirement for torch, e.g. "torch==2.11.0"; "" = keep the preinstalled torch
    torch_index: str | None  # wheel index tag ("cu128", "cpu"), None = PyPI default
    packages: dict[str, str]  # other pinned packages: name -> version
    compute_dtype: str  # what training should compute in on this machine
    verified: str
    notes: str = ""

    def pip_commands(self, python: str = "python") -> list[str]:
        """The pip commands that install this set (torch first, from its wheel index, unless it is kept)."""
        pinned = " ".join(f"{name}=={version}" for name, version in self.packages.items())
        if not self.torch:
            return [f"{python} -m pip install {pinned}"]
        torch_cmd = f"{python} -m pip install {self.torch}"
        if self.torch_index:
            torch_cmd += f" --index-url {PYTORCH_WHEEL_INDEX.format(tag=self.torch_index)}"
        return [torch_cmd, f"{python} -m pip install {pinned}"]

    @property
    def torch_text(self) -> str:
        """torch of this set in words: '2.11.0 (cu128)', or the preinstalled one that is kept."""
        if not self.torch:
            return "preinstalled, kept"
        return self.torch.split("==")[1] + (f" ({self.torch_index})" if self.torch_index else "")


# The library releases this repository's test suite runs on; the GPU sets reuse them (only
# torch differs by machine) so that the code path on a GPU is the one CI exercises.
_TESTED_LIBRARIES: dict[str, str] = {
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
    "safetensors": "0.8.0",
    "gguf": "0.19.0",
    "bitsandbytes": "0.50.2",
}

KNOWN_GOOD: dict[str, VersionSet] = {
    vs.name: vs
    for vs in (
        VersionSet(
            name="cpu",
            title="CPU only (Linux/macOS/Windows; plain LoRA on small models, no 4-bit)",
            python="3.10-3.13",
            torch="torch==2.13.0",
            torch_index="cpu",
            packages=_TESTED_LIBRARIES,
            compute_dtype="float32",
            verified="this repository's CI machine (Linux x86_64, Python 3.11, 2 CPU cores), 2026-11-29",
            notes="bitsandbytes is optional here: CPU training uses plain LoRA (no 4-bit).",
        ),
        VersionSet(
            name="t4-colab",
            title="Google Colab free tier, NVIDIA T4 16 GB (CUDA 12.x driver; no bf16: fp16 compute)",
            python="3.12 (Colab default)",
            # Colab ships torch built for its CUDA and moves it several times a year; reinstalling
            # another one downloads ~900 MB and leaves torchvision/torchaudio mismatched.
            torch="",
            torch_index=None,
            packages=_TESTED_LIBRARIES,
            compute_dtype="float16",
            verified="not verified on a T4 in this repository (its CI has no T4): torch is whatever Colab "
            "preinstalls (kept; it must be in the supported range), the libraries are the ones CI tests -- the "
            "notebook runs `finqlora doctor` first, which checks torch, CUDA and the GPU kernels",
            notes="T4 (compute capability 7.5) has no bf16: finqlora computes in fp16 with 4-bit NF4 weights. "
            "The notebook installs finqlora with pip constrained to the installed torch, torchvision and torchaudio.",
        ),
        VersionSet(
            name="cuda12",
            title="Linux + NVIDIA GPU, CUDA 12.x driver (>= 525), Ampere or newer (bf16)",
            python="3.10-3.13",
            torch="torch==2.11.0",
            torch_index="cu128",
            packages=_TESTED_LIBRARIES,
            compute_dtype="bfloat16",
            verified="not verified on a CUDA 12 GPU in this repository; the libraries are the ones CI tests",
        ),
        VersionSet(
            name="cuda13",
            title="Linux + NVIDIA GPU, CUDA 13.x driver (>= 580), e.g. H100/H200 (bf16)",
            python="3.12",
            torch="torch==2.11.0",
            torch_index="cu130",
            packages={
                "transformers": "5.17.0",
                "peft": "0.21.2",
                "accelerate": "1.15.0",
                "safetensors": "0.8.0",
                "gguf": "0.19.0",
                "bitsandbytes": "0.50.2",
            },
            compute_dtype="bfloat16",
            verified="partly: this is the software of the H200 machine this repository's GPU benchmark runs on "
            "(Python 3.12.3, torch 2.11.0+cu130, transformers 5.17.0, accelerate 1.15.0, triton 3.6.0, driver 580.159; "
            "bitsandbytes and liger-kernel 0.8.5 carried as wheels; see docs/performance.md for what ran there); "
            "gguf is the CI-tested release, not run on that machine",
        ),
    )
}


# What training_info.json and the evaluation's metrics.json record, so a result names the software
# that produced it.
RECORDED_LIBRARIES: tuple[str, ...] = (
    "finqlora",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "safetensors",
)


def library_versions(names: Iterable[str] = RECORDED_LIBRARIES) -> dict[str, str | None]:
    """Python's version and each installed package's version (None where it is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def get_version_set(name: str) -> VersionSet:
    try:
        return KNOWN_GOOD[name]
    except KeyError:
        from finqlora.core.errors import FinqloraError

        raise FinqloraError(
            f"unknown version set '{name}'", hint=f"known sets: {', '.join(KNOWN_GOOD)}"
        ) from None


def pip_command(name: str, python: str = "python") -> str:
    """One shell line that installs a known-good set (for notebooks and docs)."""
    return " && ".join(get_version_set(name).pip_commands(python))


def torch_cuda_statement() -> str:
    """The one sentence on the supported torch/CUDA sets (README, README.zh-CN, docs, notebook)."""
    drivers = "; ".join(
        f"a CUDA {major}.x driver >= {MIN_LINUX_DRIVER_FOR_CUDA[f'{tag[2:-1]}.{tag[-1]}']}: {tag} wheels"
        for major, tag in sorted(TORCH_INDEX_FOR_DRIVER_CUDA.items(), reverse=True)
        if major >= 12
    )
    sets = ", ".join(f"{vs.name} torch {vs.torch_text}" for vs in KNOWN_GOOD.values())
    return (
        f"Supported torch/CUDA: torch {SUPPORTED['torch']}, built for your driver's CUDA ({drivers}; no GPU: cpu "
        f"wheels); on Colab the preinstalled torch is kept. Known-good sets: {sets}."
    )


SUPPORTED_TORCH_STATEMENT = torch_cuda_statement()


def markdown_matrix() -> str:
    """The install matrix of docs/installation.md, generated from `KNOWN_GOOD` and `SUPPORTED`."""
    names = list(KNOWN_GOOD)
    packages = ["python", "torch", *KNOWN_GOOD[names[0]].packages]
    lines = ["| package | supported | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for package in packages:
        cells = []
        for vs in KNOWN_GOOD.values():
            if package == "python":
                cells.append(vs.python)
            elif package == "torch":
                cells.append(vs.torch_text)
            else:
                cells.append(vs.packages.get(package, "-"))
        lines.append(f"| {package} | `{SUPPORTED.get(package, '')}` | " + " | ".join(cells) + " |")
    lines.append("| compute dtype | | " + " | ".join(vs.compute_dtype for vs in KNOWN_GOOD.values()) + " |")
    return "\n".join(lines)
