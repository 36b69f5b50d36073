"""`finqlora doctor`: the real report on this CPU machine, and each failure branch made to
happen by breaking the import or probe it depends on."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finqlora.doctor import checks as doctor
from finqlora.core import versions

REPO = Path(__file__).resolve().parents[2]
T4_SMI = {"driver": "535.104.05", "cuda": "12.2", "gpus": [{"name": "Tesla T4", "memory_mib": 15360}]}


def _by_name(report: doctor.DoctorReport) -> dict[str, doctor.Check]:
    return {check.name: check for check in report.checks}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test describes a machine without a CUDA GPU")
def test_report_on_this_cpu_machine(tmp_path: Path) -> None:
    report = doctor.run_doctor(tmp_path / "runs", check_network=False)
    checks = _by_name(report)

    assert checks["python"].status == "ok"
    assert checks["torch"].status == "ok" and torch.__version__.split("+")[0] in checks["torch"].summary
    assert checks["gpu"].status == "warn" and "CPU" in checks["gpu"].summary
    for name in versions.REQUIRED_FOR_TRAINING[1:]:
        assert checks[name].status == "ok", checks[name]
    assert checks["disk:output"].details["path"] == str((tmp_path / "runs").absolute())
    if doctor._installed_version("bitsandbytes"):
        # Importable, and honest that GPU kernels were not exercised on this machine.
        assert checks["bitsandbytes"].status == "info" and "not checked" in checks["bitsandbytes"].summary

    from finqlora.models.builtin import BUILTINS, builtin_status

    installed = [spec for spec, model in ((m.spec, m) for m in BUILTINS.values()) if builtin_status(model).installed]
    assert all(spec in checks["builtin-models"].summary for spec in installed)

    assert report.device == "cpu" and report.compute_dtype == "float32"
    assert report.can_train and report.can_serve and report.exit_code == 0
    assert any("4-bit QLoRA" in item for item in report.does_not_work)
    assert any("CPU" in item for item in report.works)


def test_cli_json_and_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finqlora.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["doctor", "--json", "--no-network", "--output-dir", str(tmp_path)])
    payload = json.loads(result.output)
    assert result.exit_code == (0 if payload["can_train"] else 1)
    assert {c["name"] for c in payload["checks"]} >= {"python", "torch", "gpu", "bitsandbytes", "triton", "transformers", "peft", "accelerate", "disk:output", "builtin-models"}

    real_check = doctor.check_python
    monkeypatch.setattr(doctor, "check_python", lambda: real_check((3, 9, 18)))
    result = runner.invoke(app, ["doctor", "--json", "--no-network", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and json.loads(result.output)["can_train"] is False
    result = runner.invoke(app, ["doctor", "--no-network", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and "Python 3.9.18 is too old" in result.output and "fix:" in result.output


def test_python_too_old() -> None:
    check = doctor.check_python((3, 9, 18))
    assert check.status == "fail" and "3.10" in check.summary and "scripts/setup.sh" in check.fix


def test_torch_missing_or_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda name: None if name == "torch" else real(name))
    assert doctor.check_torch().status == "fail"
    monkeypatch.setattr(doctor, "_installed_version", real)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    check = doctor.check_torch()
    assert check.status == "fail" and "does not import" in check.summary


def _failing_import(monkeypatch: pytest.MonkeyPatch, module: str, error: BaseException) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None):
        if name == module:
            raise error
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_bitsandbytes_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    on_cpu = doctor.check_bitsandbytes(cuda_available=False)
    assert on_cpu.status == "warn" and "not needed on the CPU" in on_cpu.summary
    assert 'pip install "bitsandbytes>=0.45.1,<1"' in on_cpu.fix
    on_gpu = doctor.check_bitsandbytes(cuda_available=True)
    assert on_gpu.status == "fail" and "QLoRA" in on_gpu.summary


def test_bitsandbytes_triton_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_import(monkeypatch, "bitsandbytes", ModuleNotFoundError("No module named 'triton.ops'"))
    check = doctor.check_bitsandbytes(cuda_available=True)
    assert check.status == "fail" and "triton.ops" in check.summary
    assert check.fix == 'pip install -U "bitsandbytes>=0.45.1,<1"'


def test_bitsandbytes_cuda_library_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    error = OSError("libcudart.so.12: cannot open shared object file: No such file or directory")
    _failing_import(monkeypatch, "bitsandbytes", error)
    check = doctor.check_bitsandbytes(cuda_available=True)
    assert check.status == "fail" and "CUDA library" in check.summary and "LD_LIBRARY_PATH" in check.fix


def test_bitsandbytes_compiled_without_gpu_support(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")  # the probe runs only once the import succeeded

    def probe(device: str = "cuda") -> None:
        raise RuntimeError("The installed version of bitsandbytes was compiled without GPU support.")

    monkeypatch.setattr(doctor, "_bnb_kernel_probe", probe)
    check = doctor.check_bitsandbytes(cuda_available=True)
    assert check.status == "fail" and "GPU kernels fail" in check.summary
    assert check.fix.startswith("pip uninstall -y bitsandbytes")


def test_bitsandbytes_kernel_probe_really_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    real_probe = doctor._bnb_kernel_probe
    real_probe("cpu")  # the probe itself is real code: NF4 quantize + 4-bit layer forward
    monkeypatch.setattr(doctor, "_bnb_kernel_probe", lambda device="cuda": real_probe("cpu"))
    assert doctor.check_bitsandbytes(cuda_available=True).status == "ok"


def test_bitsandbytes_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(sys.modules["bitsandbytes"], "__version__", "0.41.1")
    check = doctor.check_bitsandbytes(cuda_available=True)
    assert check.status == "fail" and "0.41.1" in check.summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU that torch cannot use")
def test_gpu_present_but_torch_is_cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: T4_SMI)
    monkeypatch.setattr(torch.version, "cuda", None)
    check = doctor.check_gpu()
    assert check.status == "fail" and "CPU-only build" in check.summary and "Tesla T4" in check.summary
    assert "https://download.pytorch.org/whl/cu128" in check.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU that torch cannot use")
def test_driver_older_than_torch_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: T4_SMI)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    check = doctor.check_gpu()
    assert check.status == "fail" and "supports CUDA 12.2 but torch was built for CUDA 13.0" in check.summary
    assert "whl/cu128" in check.fix and ">= 580.65.06" in check.fix


def test_t4_is_reported_as_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    props = namedtuple("props", "name total_memory major minor")("Tesla T4", 15 * 1024**3, 7, 5)
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: T4_SMI)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    check = doctor.check_gpu()
    assert check.status == "ok" and check.details["compute_dtype"] == "float16" and "bf16: no" in check.summary


def test_driver_to_wheel_index() -> None:
    assert doctor.torch_index_for_driver("12.2") == "cu128"  # versions.TORCH_INDEX_FOR_DRIVER_CUDA
    assert doctor.torch_index_for_driver("13.1") == "cu130"
    assert doctor.torch_index_for_driver("11.4") == "cu118"
    assert doctor.torch_index_for_driver("10.2") is None


def test_package_versions_against_supported_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"transformers": "4.30.0", "peft": None, "gguf": None}
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda name: fake[name] if name in fake else real(name))
    old = doctor.check_package("transformers")
    assert old.status == "fail" and "outside the supported range >=4.56" in old.summary
    assert old.fix.startswith('pip install "transformers>=4.56')
    assert doctor.check_package("peft").status == "fail"
    assert doctor.check_package("gguf").status == "warn"  # only export needs it


def test_serving_packages_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda name: None if name == "fastapi" else real(name))
    report = doctor.run_doctor(tmp_path, check_network=False)
    assert _by_name(report)["fastapi"].status == "warn"
    assert report.can_serve is False
    assert report.to_dict()["can_serve"] is False


def test_disk_space(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 1024**3, 0, int(0.5 * 1024**3)))
    assert doctor.check_disk("output", tmp_path / "new" / "dir").status == "fail"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 1024**3, 0, 10 * 1024**3))
    assert doctor.check_disk("output", tmp_path).status == "warn"


def test_hub_unreachable_offline_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_value")
    monkeypatch.setattr(doctor, "_hub_reachable", lambda endpoint, timeout: (False, "ConnectTimeout"))
    check = doctor.check_hub()
    assert check.status == "warn" and "ConnectTimeout" in check.summary and "token set" in check.summary
    assert "HF_ENDPOINT" in check.fix and "builtin:" in check.fix
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert doctor.check_hub().status == "info"


def test_hub_probe_times_out_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    # A port nobody listens on: the probe must come back (not hang) and say unreachable.
    reachable, how = doctor._hub_reachable("http://127.0.0.1:9", timeout=1.0)
    assert reachable is False and how


def test_supported_ranges_match_pyproject() -> None:
    """Both ends of every range: pyproject's requirement and versions.SUPPORTED are one specifier set."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [Requirement(r) for r in project["dependencies"] + extras["gpu"]]
    declared = {r.name: r.specifier for r in requirements}
    declared["python"] = SpecifierSet(project["requires-python"])
    for name, spec in versions.SUPPORTED.items():
        assert name in declared, f"versions.SUPPORTED has {name}, pyproject.toml does not depend on it"
        assert declared[name] == SpecifierSet(spec), f"pyproject says {name}{declared[name]}, versions.SUPPORTED says {spec}"
        # Both ends are written down, so a new major is a decision, not an accident.
        operators = {s.operator for s in SpecifierSet(spec)}
        assert ">=" in operators and (name == "python" or "<" in operators), f"{name}: {spec} needs a lower and an upper bound"
    # The GPU profiles' imports are installable as one extra.
    assert {"bitsandbytes", "liger-kernel"} <= {Requirement(r).name for r in extras["gpu"]}


def test_dependencies_are_imported() -> None:
    """Every required dependency is imported by finqlora (or needed at run time by one that is)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src").rglob("*.py"))
    import_names = {"pyyaml": "yaml", "markdown-it-py": "markdown_it", "scikit-learn": "sklearn"}
    runtime_only = {"accelerate"}  # transformers' Trainer refuses to start without it
    for requirement in map(Requirement, project["dependencies"]):
        if requirement.name in runtime_only:
            continue
        module = import_names.get(requirement.name, requirement.name.replace("-", "_"))
        assert f"import {module}" in sources or f"from {module}" in sources, f"nothing imports {requirement.name}: drop it"


def test_installation_doc_shows_the_generated_matrix() -> None:
    page = (REPO / "docs" / "installation.md").read_text(encoding="utf-8")
    assert versions.markdown_matrix() in page, "regenerate the matrix: python -c 'from finqlora.core.versions import markdown_matrix; print(markdown_matrix())'"
    for name in versions.KNOWN_GOOD:
        assert versions.pip_command(name) in page


def test_a_crashing_check_becomes_a_red_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken() -> doctor.Check:
        raise RuntimeError("huggingface_hub is half-installed")

    monkeypatch.setattr(doctor, "check_builtins", broken)
    report = doctor.run_doctor(tmp_path, check_network=False)
    check = _by_name(report)["builtin-models"]
    assert check.status == "fail" and "half-installed" in check.summary
    assert "torch" in _by_name(report)  # the other checks still ran
    assert report.exit_code == 1


def _fake_dists(monkeypatch: pytest.MonkeyPatch, installed: dict[str, str], requires: dict[str, list[str]]) -> None:
    monkeypatch.setattr(doctor, "_installed_version", installed.get)
    monkeypatch.setattr(doctor, "_requirements", lambda name: requires.get(name, []))


def test_torch_companions_match_on_this_machine() -> None:
    check = doctor.check_torch_companions(cuda_available=torch.cuda.is_available())
    assert check.status == "ok", check


def test_triton_that_torch_was_not_built_with(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a Colab user gets after `pip install triton` next to Colab's torch.
    _fake_dists(monkeypatch, {"torch": "2.8.0+cu126", "triton": "3.6.0"},
                {"torch": ['triton==3.4.0; platform_system == "Linux" and platform_machine == "x86_64"', "filelock"]})
    check = doctor.check_torch_companions(cuda_available=True)
    assert check.status == "fail" and "triton 3.6.0" in check.summary and "triton==3.4.0" in check.summary
    assert check.fix == 'pip install "triton==3.4.0"'
    assert doctor.check_torch_companions(cuda_available=False).status == "warn"


def test_torchvision_built_for_another_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a torch reinstall from another index leaves behind.
    _fake_dists(monkeypatch, {"torch": "2.8.0+cu126", "torchvision": "0.26.0+cu130", "torchaudio": "2.8.0+cu126"},
                {"torchvision": ["numpy", "torch==2.11.0", "pillow!=8.3.*,>=5.3.0"], "torchaudio": ["torch==2.8.0"]})
    check = doctor.check_torch_companions(cuda_available=True)
    assert check.status == "warn" and "torchvision 0.26.0+cu130 needs torch==2.11.0" in check.summary
    assert "torchaudio" not in check.summary and check.fix.startswith("pip uninstall -y torchvision")
