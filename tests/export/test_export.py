"""Merge, zip and unzip of adapters (tiny random Llama from conftest, adapter made with peft).

Merge tolerance: a float32 merge must reproduce base + adapter logits within 1e-4 (max absolute
difference; only float summation order differs); a float16 merge within 1e-2 (fp16 rounding of
weights, logits of magnitude ~1). The adapter's B factors are perturbed so it changes the
logits by far more than those tolerances -- a merge that dropped the adapter would fail.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finqlora.core.errors import FinqloraError
from finqlora.export.adapter import (
    CHECKSUMS_NAME,
    ZIP_NAME,
    adapter_from_zip,
    merge_adapter,
    package_adapter,
    unpack_adapter,
    verify_adapter_zip,
)

TOKEN_IDS = torch.tensor([[1, 100, 2000, 300, 45, 9000, 12, 7, 2]])


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """adapter_from_zip extracts into FINQLORA_HOME: keep tests out of the user's cache."""
    monkeypatch.setenv("FINQLORA_HOME", str(tmp_path / "finqlora-home"))


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training-output-like folder: adapter + tokenizer + training_info.json + loss.png."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: the adapter would be a no-op
                param.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("run")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    (out / "training_info.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "epochs": 1}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(2, 2))
    plt.plot([3.0, 2.0, 1.5])
    plt.savefig(out / "loss.png")
    plt.close("all")
    return out


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(TOKEN_IDS).logits.float()


@pytest.fixture(scope="module")
def reference_logits(tiny_model_dir: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = _logits(base)
    with_adapter = _logits(PeftModel.from_pretrained(base, run_dir))
    return {"base": base_logits, "adapter": with_adapter}


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("float16", 1e-2)])
def test_merge_matches_base_plus_adapter(
    tiny_model_dir: Path, run_dir: Path, reference_logits: dict, tmp_path: Path, dtype: str, tolerance: float
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The adapter really changes the model, by much more than the tolerance.
    assert (reference_logits["adapter"] - reference_logits["base"]).abs().max().item() > 50 * tolerance

    result = merge_adapter(str(tiny_model_dir), run_dir, tmp_path / "merged", dtype=dtype)
    merged_dir = result.output_dir
    assert result.shards and all((merged_dir / shard).is_file() for shard in result.shards)
    assert not (merged_dir / "adapter_config.json").exists()
    with safe_open(str(merged_dir / result.shards[0]), framework="pt") as handle:
        name = next(k for k in handle.keys() if k.endswith("q_proj.weight"))
        assert handle.get_tensor(name).dtype == getattr(torch, dtype)
        assert not any("lora_" in key for key in handle.keys())
    info = json.loads((merged_dir / "finqlora_merge.json").read_text())
    assert info["merged_in_full_precision"] is True and info["dtype"] == dtype

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    difference = (_logits(merged) - reference_logits["adapter"]).abs().max().item()
    assert difference <= tolerance, f"merged vs base+adapter: max |diff| {difference:.2e} > {tolerance:.0e}"

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(run_dir).chat_template


def test_merge_refuses_adapter_for_another_base(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(run_dir).save_pretrained(other)

    with pytest.raises(FinqloraError, match="was trained on base"):
        merge_adapter(str(other), run_dir, tmp_path / "merged")
    # Even when the name check is waived, the layer shapes give the wrong base away.
    with pytest.raises(FinqloraError, match="(?i)shape|size|another base"):
        merge_adapter(str(other), run_dir, tmp_path / "merged", ignore_base_mismatch=True)
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_bad_dtype_and_existing_output(tiny_model_dir: Path, run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FinqloraError, match="unknown --dtype"):
        merge_adapter(str(tiny_model_dir), run_dir, tmp_path / "m", dtype="int8")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FinqloraError, match="already exists"):
        merge_adapter(str(tiny_model_dir), run_dir, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


def test_zip_round_trip(run_dir: Path, tmp_path: Path) -> None:
    result = package_adapter(run_dir, tmp_path / ZIP_NAME)
    with zipfile.ZipFile(result.zip_path) as archive:
        names = set(archive.namelist())
        sums = archive.read(CHECKSUMS_NAME).decode()
        readme = archive.read("README.md").decode()
    required = {"adapter_model.safetensors", "adapter_config.json", "training_info.json", "loss.png", "README.md", CHECKSUMS_NAME}
    assert required <= names and "tokenizer.json" in names
    assert result.missing_optional == []
    recorded_base = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded_base and recorded_base in readme  # tells the user which base to load
    assert len(sums.splitlines()) == len(names) - 1  # every file but SHA256SUMS itself

    assert verify_adapter_zip(result.zip_path) == result.files
    folder = unpack_adapter(result.zip_path, tmp_path / "unpacked")
    for name in result.files:
        if name != "README.md":
            assert (folder / name).read_bytes() == (run_dir / name).read_bytes(), name

    cached = adapter_from_zip(result.zip_path)
    assert cached.is_relative_to(tmp_path / "finqlora-home")
    assert (cached / "adapter_model.safetensors").read_bytes() == (run_dir / "adapter_model.safetensors").read_bytes()
    assert adapter_from_zip(result.zip_path) == cached  # second call reuses the verified extraction


def _rewrite_zip(source: Path, target: Path, replace: dict[str, bytes | None], extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if info.filename in replace:
                if replace[info.filename] is not None:
                    new.writestr(info.filename, replace[info.filename])
            else:
                new.writestr(info.filename, old.read(info.filename))
        for name, data in (extra or {}).items():
            new.writestr(name, data)


def test_zip_with_wrong_checksum_is_refused(run_dir: Path, tmp_path: Path) -> None:
    good = package_adapter(run_dir, tmp_path / ZIP_NAME).zip_path

    tampered = tmp_path / "tampered.zip"
    config = json.loads((run_dir / "adapter_config.json").read_text())
    config["r"] = 64
    _rewrite_zip(good, tampered, {"adapter_config.json": json.dumps(config).encode()})
    with pytest.raises(FinqloraError, match="checksum mismatch for adapter_config.json"):
        verify_adapter_zip(tampered)
    with pytest.raises(FinqloraError, match="checksum mismatch"):
        unpack_adapter(tampered, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FinqloraError, match="checksum mismatch"):
        adapter_from_zip(tampered)

    no_sums = tmp_path / "nosums.zip"
    _rewrite_zip(good, no_sums, {CHECKSUMS_NAME: None})
    with pytest.raises(FinqloraError, match="has no SHA256SUMS"):
        verify_adapter_zip(no_sums)

    smuggled = tmp_path / "smuggled.zip"
    _rewrite_zip(good, smuggled, {}, extra={"extra.py": b"print('hi')"})
    with pytest.raises(FinqloraError, match="not listed in SHA256SUMS"):
        verify_adapter_zip(smuggled)

    escaping = tmp_path / "escaping.zip"
    _rewrite_zip(good, escaping, {}, extra={"../evil.txt": b"x"})
    with pytest.raises(FinqloraError, match="unsafe path"):
        verify_adapter_zip(escaping)

    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(FinqloraError, match="not a zip file"):
        verify_adapter_zip(truncated)


def test_zip_needs_an_adapter_folder(tmp_path: Path) -> None:
    with pytest.raises(FinqloraError, match="not a LoRA adapter folder"):
        package_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FinqloraError, match="pickle"):
        package_adapter(tmp_path)


def test_cli_zip_unzip_and_refusal(run_dir: Path, tmp_path: Path) -> None:
    from finqlora.cli import app

    runner = CliRunner()
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = runner.invoke(app, ["export", "zip", "--run", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / ZIP_NAME).is_file()

    result = runner.invoke(app, ["export", "unzip", str(copy / ZIP_NAME), "--check"])
    assert result.exit_code == 0 and "match SHA256SUMS" in result.output

    result = runner.invoke(app, ["export", "unzip", str(copy / ZIP_NAME), "--output", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    bad = tmp_path / "bad.zip"
    _rewrite_zip(copy / ZIP_NAME, bad, {"loss.png": b"not the plot"})
    result = runner.invoke(app, ["export", "unzip", str(bad), "--check"])
    assert isinstance(result.exception, FinqloraError) and "loss.png" in str(result.exception)


def test_cli_merge(tiny_model_dir: Path, run_dir: Path, tmp_path: Path) -> None:
    from finqlora.cli import app

    package = package_adapter(run_dir, tmp_path / ZIP_NAME)
    # --adapter takes the zip directly (verified, then extracted into the cache).
    args = ["export", "merge", "--model", str(tiny_model_dir), "--adapter", str(package.zip_path), "--output", str(tmp_path / "merged"), "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and (tmp_path / "merged" / "config.json").is_file()
    result = CliRunner().invoke(app, args)  # the output exists now
    assert isinstance(result.exception, FinqloraError) and "already exists" in str(result.exception)
