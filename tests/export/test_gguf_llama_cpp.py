"""The exported GGUF in llama.cpp itself (issue 18 item 9), through llama-cpp-python.

For llama and qwen2 (the tiny random models of test_gguf_export.py), f16 and q8_0:
- llama.cpp answers the same greedy tokens as transformers for a short chat prompt. The
  reference is transformers reading the same GGUF (the same, possibly quantized, weights),
  teacher-forced on llama.cpp's tokens; a token counts as the same when it is transformers'
  argmax or within `TIE` of it (tiny random models have near-ties that f16 arithmetic may break
  either way; a wrong tensor, permutation or quantization moves logits by far more).
- llama.cpp tokenizes the chat prompt exactly as the HF tokenizer does.
- the Modelfile's TEMPLATE renders a conversation exactly as the model's chat template, and its
  stop strings are the template's end-of-turn token, each one special token in llama.cpp.

Skips where llama_cpp is not importable (it is a source build: see docs/export.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.export.test_gguf_export import tiny_qwen2_dir  # noqa: F401  (the shared tiny qwen2 fixture)

from finqlora.export.gguf import export_gguf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (a source build of llama.cpp; see docs/export.md)"
)

NEW_TOKENS = 8
TIE = {"f16": 2e-2, "q8_0": 1e-1}
CONVERSATION = [
    {"role": "system", "content": "You are a finance assistant."},
    {"role": "user", "content": "Gold rose 1% after the Fed decision. Why?"},
]


def _model_dir(arch: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_model_dir" if arch == "llama" else "tiny_qwen2_dir")


def _load_llama_cpp(path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, n_batch=64, verbose=False, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_item9_llama_cpp_answers_the_same_greedy_tokens(arch: str, outtype: str, request, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _model_dir(arch, request)
    result = export_gguf(model_dir, tmp_path / f"{arch}-{outtype}.gguf", outtype=outtype, progress=False)
    assert result.architecture == arch
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    llm = _load_llama_cpp(result.gguf_path)
    assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == prompt_ids
    answer: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        answer.append(int(token))
        if len(answer) == NEW_TOKENS or token == llm.token_eos():
            break
    assert answer

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=result.gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids + answer])).logits[0, len(prompt_ids) - 1 : -1]
    for step, token in enumerate(answer):
        best = int(logits[step].argmax())
        gap = float(logits[step, best] - logits[step, token])
        assert token == best or gap <= TIE[outtype], f"step {step}: llama.cpp chose {token}, transformers {best} (logit gap {gap:.4f})"


def _render_go_chatml(template: str, messages: list[dict[str, str]]) -> str:
    """Render finqlora's ChatML Go template (a `range .Messages` loop) for `messages`."""
    match = re.fullmatch(r"\{\{- range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, flags=re.S)
    assert match, template
    body, tail = match.groups()
    turns = "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    return turns + tail


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_item9_modelfile_template_and_stops_match_the_chat_template(arch: str, request, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = _model_dir(arch, request)
    result = export_gguf(model_dir, tmp_path / f"{arch}.gguf", outtype="f16", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    modelfile = result.modelfile_path.read_text(encoding="utf-8")
    llm = _load_llama_cpp(result.gguf_path)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template

    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, flags=re.S)
    assert template and result.ollama_template
    conversation = [*CONVERSATION, {"role": "assistant", "content": "Lower real rates."}, {"role": "user", "content": "And silver?"}]
    rendered = _render_go_chatml(template.group(1), conversation)
    assert rendered == tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    stops = re.findall(r'PARAMETER stop "(.*?)"', modelfile)
    end_of_turn = tokenizer.apply_chat_template(conversation[:3], tokenize=False).split("Lower real rates.")[1].strip()
    assert end_of_turn in stops
    for stop in stops:
        assert len(llm.tokenize(stop.encode("utf-8"), add_bos=False, special=True)) == 1, stop
