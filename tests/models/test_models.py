"""Resolving and loading models, and attaching adapters safely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finqlora.core.errors import FinqloraError
from finqlora.models.loading import (
    ResolvedModel,
    adapter_base_model,
    check_adapter_folder,
    describe_model,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)

PROMPT = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


def make_adapter(base: str | Path, out: Path, *, seed: int = 0) -> Path:
    """A LoRA with non-zero weights (so it changes outputs), saved like `finqlora train` does."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(base), for_training=True)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def other_base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Another tiny Llama with a different hidden size (a 'wrong base' for the adapter)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("other-base")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def test_builtin_smollm2_resolves_to_a_converted_folder():
    resolved = resolve_model("builtin:smollm2-135m-instruct")
    assert resolved.kind == "builtin" and resolved.base_id == "builtin:smollm2-135m-instruct"
    info = describe_model(resolved)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 30
    assert info["source_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_local_folder_resolves_to_its_absolute_path(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved == ResolvedModel(str(tiny_model_dir), "local", str(tiny_model_dir.resolve()), str(tiny_model_dir.resolve()))


def test_adapter_folder_given_as_model_says_to_use_adapter(adapter_dir):
    with pytest.raises(FinqloraError) as info:
        resolve_model(str(adapter_dir))
    assert "LoRA adapter" in info.value.message and "--adapter" in info.value.hint


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FinqloraError, match="not found"):
        resolve_model(str(tmp_path / "no-such-model"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FinqloraError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_hub_id_without_network_says_to_pass_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(FinqloraError) as info:
        resolve_model("finqlora-test/not-a-real-model")
    assert "HF_HUB_OFFLINE" in info.value.message and "finqlora-test/not-a-real-model" in info.value.message
    assert "local model folder" in info.value.hint and "builtin:qwen2.5-coder-0.5b-instruct" in info.value.hint


def test_hub_id_found_in_the_local_cache_resolves_offline(tiny_model_dir, tmp_path, monkeypatch):
    """A model already in the Hugging Face cache works offline and keeps its hub id as identity."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--finqlora-test--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--finqlora-test--tiny" / "refs").mkdir()
    (cache / "models--finqlora-test--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    resolved = resolve_model("finqlora-test/tiny")
    assert resolved.kind == "hub" and resolved.base_id == "finqlora-test/tiny"
    assert Path(resolved.path) == snapshot


def test_cpu_defaults_and_overrides():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU defaults")
    assert pick_device("auto") == "cpu"
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(FinqloraError, match="no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(FinqloraError, match="unknown dtype"):
        pick_dtype("int3", "cpu")


def test_inference_and_training_loads_are_fresh_and_configured(tiny_model_dir):
    inference = load_model(str(tiny_model_dir))
    assert inference.device == "cpu" and inference.dtype == torch.float32 and not inference.load_in_4bit
    assert not inference.model.training and inference.tokenizer.padding_side == "left"
    assert inference.stop_ids == [inference.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    training = load_model(str(tiny_model_dir), for_training=True)
    assert training.model.training and training.model.config.use_cache is False
    assert training.tokenizer.padding_side == "right"
    # Separate weights: nothing done to the inference model can reach the training one.
    assert training.model.model.embed_tokens.weight.data_ptr() != inference.model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_without_chat_template_needs_an_explicit_fallback(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FinqloraError, match="no chat template"):
        load_tokenizer(str(bare))
    tokenizer = load_tokenizer(str(bare), chat_template="chatml")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_adapter_records_a_machine_independent_base(adapter_dir, tiny_model_dir):
    assert adapter_base_model(adapter_dir) == str(tiny_model_dir.resolve())
    assert (adapter_dir / "adapter_model.safetensors").is_file()


def test_adapter_round_trip_changes_outputs_and_unloads_exactly(tiny_model_dir, adapter_dir):
    base = load_model(str(tiny_model_dir))
    tuned = load_model(str(tiny_model_dir), adapter=adapter_dir)
    assert tuned.adapter == adapter_dir.resolve()
    base_logits, tuned_logits = logits(base.model), logits(tuned.model)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    with tuned.base_only():
        assert torch.equal(logits(tuned.model), base_logits)
    assert torch.equal(logits(tuned.model), tuned_logits)  # the adapter is back on after the block
    assert torch.equal(logits(tuned.model.unload()), base_logits)


def test_frozen_head_gets_a_contiguous_input_with_logits_to_keep(tiny_model_dir, adapter_dir):
    """An adapter freezes the lm_head; fed the strided `hidden[:, -1:, :]` of a batch, torch.matmul
    would copy its weight once per row (+4.3 GB at batch 16 for Qwen 0.5B): the loader hands it a
    contiguous copy, with the same logits."""
    tuned = load_model(str(tiny_model_dir), adapter=adapter_dir)
    head = tuned.model.get_output_embeddings()
    assert not head.weight.requires_grad
    seen = []
    head.register_forward_hook(lambda module, args, output: seen.append(args[0].is_contiguous()))
    batch = torch.cat([PROMPT, PROMPT.flip(1), PROMPT + 8])
    with torch.no_grad():
        last = tuned.model(input_ids=batch, logits_to_keep=1).logits
        full = tuned.model(input_ids=batch).logits
    assert seen == [True, True]
    assert torch.allclose(last[:, -1], full[:, -1], atol=1e-5)


def test_adapter_tokenizer_and_chat_template_win(tiny_model_dir, adapter_dir, tmp_path):
    custom = tmp_path / "adapter-with-template"
    shutil.copytree(adapter_dir, custom)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|im_end|>{% endfor %}[assistant]"
    tokenizer.save_pretrained(custom)
    loaded = load_model(str(tiny_model_dir), adapter=custom)
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user]x<|im_end|>[assistant]"


def test_adapter_for_another_base_is_refused_by_name(other_base_dir, adapter_dir, tiny_model_dir):
    with pytest.raises(FinqloraError) as info:
        load_model(str(other_base_dir), adapter=adapter_dir)
    assert str(tiny_model_dir.resolve()) in info.value.message
    assert f"--model {tiny_model_dir.resolve()}" in info.value.hint


def test_adapter_for_another_base_is_refused_by_shape(other_base_dir, adapter_dir):
    with pytest.raises(FinqloraError) as info:
        load_model(str(other_base_dir), adapter=adapter_dir, ignore_base_mismatch=True)
    assert "does not fit" in info.value.message
    assert "adapter expects input size 64, base has 32" in info.value.message
    assert "more)" in info.value.message  # every layer is listed as a count, not a wall of text


def test_adapter_with_target_modules_the_base_lacks_is_refused(tiny_model_dir, adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    shutil.copytree(adapter_dir, renamed)
    weights = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "query_key_value"): v for k, v in weights.items()}, renamed / "adapter_model.safetensors")
    with pytest.raises(FinqloraError, match="the base has no module .*query_key_value"):
        load_model(str(tiny_model_dir), adapter=renamed)


def test_pickle_adapter_needs_an_explicit_flag(tiny_model_dir, adapter_dir, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(FinqloraError) as info:
        load_model(str(tiny_model_dir), adapter=pickled)
    assert "pickle" in info.value.message and "--allow-pickle-adapter" in info.value.hint
    loaded = load_model(str(tiny_model_dir), adapter=pickled, allow_pickle_adapter=True)
    reference = load_model(str(tiny_model_dir), adapter=adapter_dir)
    assert torch.equal(logits(loaded.model), logits(reference.model))


def test_not_an_adapter_folder_points_to_checkpoints(adapter_dir, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "checkpoint-20")
    with pytest.raises(FinqloraError) as info:
        load_model(str(tiny_model_dir), adapter=run)
    assert "checkpoint-20" in info.value.hint
    with pytest.raises(FinqloraError, match="adapter folder not found"):
        load_model(str(tiny_model_dir), adapter=tmp_path / "nothing")


def test_safetensors_only_for_base_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-base"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(FinqloraError, match="no safetensors weights"):
        load_model(str(pickled))


def test_builtin_smollm2_loads_with_its_chat_template():
    loaded = load_model("builtin:smollm2-135m-instruct")
    assert loaded.model.name_or_path == "builtin:smollm2-135m-instruct"
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch, tiny_model_dir):
    from finqlora.export.gguf import export_gguf

    # A tiny GGUF with SmolLM2's tokenizer and chat template (the built-in's logic, in seconds).
    gguf = export_gguf(tiny_model_dir, tmp_path / "tiny-f16.gguf", outtype="f16", progress=False).gguf_path
    monkeypatch.setenv("FINQLORA_HOME", str(tmp_path / "home"))
    import gguf as gguf_lib

    parses = []

    class CountingReader(gguf_lib.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parses.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf_lib, "GGUFReader", CountingReader)
    resolved = resolve_model(str(gguf))
    # transformers reads the file for the tokenizer, the configuration and the weights: one parse.
    assert len(parses) == 1, parses
    assert gguf_lib.GGUFReader is CountingReader  # the caching stand-in is gone again
    assert resolved.kind == "gguf" and resolved.base_id == str(gguf.resolve())
    folder = Path(resolved.path)
    assert folder.parent == tmp_path / "home" / "models" and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf)) == resolved  # cached: same folder, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # Its tokenizer carries the GGUF's chat template.
    assert "<|im_start|>" in load_tokenizer(resolved).chat_template


class _RunsShell:
    """A pickle payload: unpickling it would call os.system (the attack the weights-only loader stops)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        import os

        return (os.system, (f"touch {self.marker}",))


def test_item6_ask_refuses_a_malicious_pickle_adapter_without_a_traceback(tiny_model_dir, tmp_path, capsys):
    """Issue 18 item 6: `ask --allow-pickle-adapter` with a malicious pickle -> error + hint, exit 2, nothing run."""
    from finqlora.cli import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil-adapter"
    evil.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(tiny_model_dir), "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (evil / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "payload": _RunsShell(marker)}, evil / "adapter_model.bin")
    with pytest.raises(FinqloraError, match="refused to load this pickle adapter") as info:
        check_adapter_folder(evil, allow_pickle=True)
    assert "nothing from it was run" in (info.value.hint or "")
    with pytest.raises(SystemExit) as exited:
        main(["ask", "hello", "--model", str(tiny_model_dir), "--adapter", str(evil), "--allow-pickle-adapter",
              "--device", "cpu", "--max-new-tokens", "2"])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert "error:" in stderr and "hint:" in stderr and "Traceback" not in stderr
    assert not marker.exists(), "the pickle's payload must never run"
