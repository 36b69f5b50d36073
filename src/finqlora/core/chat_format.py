"""One prompt format for training, inference, evaluation and serving.

A dataset record (Alpaca `instruction`/`input`/`output`, or OpenAI-style `messages`) becomes
chat messages, and the tokenizer's own chat template renders them. Training learns exactly
the text that the template puts after the generation prompt for an assistant turn (the answer
plus the template's end-of-turn marker), so a model stops where inference expects it to.

Rules (documented in docs/formats.md):
- user message = instruction, a blank line, then the input (instruction alone if no input);
- no system message unless the record has one (a template may add its own default);
- the answer's end is the template's end-of-turn text (e.g. `<|im_end|>` for ChatML models,
  `<｜end▁of▁sentence｜>` for DeepSeek), and generation stops on it and on the tokenizer's EOS;
- a tokenizer without a chat template is refused unless a fallback template is asked for
  (`CHATML_TEMPLATE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.records import normalize, user_content

# ChatML: the fallback for base models that ship no chat template (asked for explicitly).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PROBE_ANSWER = "FINQLORA_PROBE_ANSWER"


@dataclass(frozen=True)
class ChatExample:
    """A record as chat: the prompt messages and the reference answer (may be empty)."""

    messages: list[dict[str, str]]
    answer: str


def record_to_chat(record: Mapping[str, Any]) -> ChatExample:
    """Turn an Alpaca-style, ShareGPT-style or messages-style record into prompt messages + answer."""
    if "conversations" in record or record.get("history"):  # sharegpt turns and alpaca history become messages
        try:
            record = normalize(record)
        except ValueError as exc:
            raise FinqloraError(f"record {record.get('id', '')!s}: {exc}") from None
    if "messages" in record:
        messages = [dict(role=m["role"], content=m["content"]) for m in record["messages"]]
        if messages and messages[-1]["role"] == "assistant":
            return ChatExample(messages=messages[:-1], answer=messages[-1]["content"])
        return ChatExample(messages=messages, answer="")
    if "instruction" not in record:
        raise FinqloraError(
            "record has neither 'instruction' nor 'messages'",
            hint="each JSONL line needs instruction/input/output (Alpaca) or messages (OpenAI chat) fields",
        )
    messages: list[dict[str, str]] = []
    if record.get("system"):
        messages.append({"role": "system", "content": str(record["system"])})
    messages.append({"role": "user", "content": user_content(str(record["instruction"]), record.get("input"))})
    return ChatExample(messages=messages, answer=str(record.get("output") or ""))


def ensure_chat_template(tokenizer: Any, fallback: str | None = None) -> None:
    """Make sure the tokenizer can render chats; install `fallback` only when asked to."""
    if getattr(tokenizer, "chat_template", None):
        return
    if fallback is None:
        name = getattr(tokenizer, "name_or_path", "this tokenizer")
        raise FinqloraError(
            f"{name} has no chat template, so prompts cannot be formatted the way the model expects",
            hint="use an instruct/chat model, or pass --chat-template chatml to use the ChatML fallback "
            "(the same template is then stored with the adapter and used everywhere)",
        )
    tokenizer.chat_template = CHATML_TEMPLATE if fallback == "chatml" else fallback


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The text a model sees before it answers (generation prompt included)."""
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def assistant_turn_suffix(tokenizer: Any) -> str:
    """What the chat template writes after an assistant's answer (its end-of-turn marker)."""
    ensure_chat_template(tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    suffix = full[full.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    # Trailing newlines after the end-of-turn token are layout, not something to learn.
    suffix = suffix.rstrip("\n")
    if not suffix and tokenizer.eos_token:
        suffix = tokenizer.eos_token
    return suffix


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and the template's end-of-turn token."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    suffix_ids = tokenizer.encode(assistant_turn_suffix(tokenizer), add_special_tokens=False)
    if suffix_ids and suffix_ids[0] not in ids:
        ids.append(int(suffix_ids[0]))
    return ids


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    answer_tokens: int
    trimmed: bool


def encode_for_training(tokenizer: Any, record: Mapping[str, Any], max_length: int) -> EncodedExample:
    """Tokenize a record for supervised fine-tuning with the loss on the answer only.

    Prompt tokens get label -100. The answer ends with the template's end-of-turn marker.
    When prompt + answer exceed `max_length`, the prompt is cut from its middle (its start
    holds the template and the instruction, its end the generation prompt) so the answer and
    its end are always kept; an answer longer than `max_length` alone keeps its end marker.
    """
    example = record_to_chat(record)
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, example.messages), add_special_tokens=False)
    answer_ids = tokenizer.encode(example.answer + assistant_turn_suffix(tokenizer), add_special_tokens=False)
    trimmed = False
    budget = max_length - len(answer_ids)
    min_prompt = min(len(prompt_ids), 16)
    if budget < min_prompt:
        # The answer alone is too long: keep its first part and its end marker.
        end_ids = tokenizer.encode(assistant_turn_suffix(tokenizer), add_special_tokens=False)
        keep = max(max_length - min_prompt - len(end_ids), 1)
        answer_ids = answer_ids[:keep] + end_ids
        budget = max_length - len(answer_ids)
        trimmed = True
    if len(prompt_ids) > budget:
        head = budget // 2
        tail = budget - head
        prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - tail :]
        trimmed = True
    input_ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    return EncodedExample(input_ids, labels, len(prompt_ids), len(answer_ids), trimmed)
