"""The dataset's JSONL file: a draft as one line in the chosen record format (Alpaca fields,
OpenAI messages or ShareGPT conversations, each with the record's id, type, split, event and
label), and reading the first records of a file back (`finqlora data show`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.records import user_content
from finqlora.core.safe_input import InputError, json_loads
from finqlora.dataset.drafts import Draft


def to_record(draft: Draft, record_format: str) -> dict[str, Any]:
    meta = {
        "id": draft.record_id,
        "type": draft.type,
        "split": draft.split,
        "event_id": draft.event_id,
        "event_time": draft.event_time,
        "label": draft.label,
    }
    if record_format == "messages":
        messages = [
            {"role": "user", "content": user_content(draft.instruction, draft.input)},
            {"role": "assistant", "content": draft.output},
        ]
        return {"messages": messages, **meta}
    if record_format == "sharegpt":
        turns = [{"from": "human", "value": user_content(draft.instruction, draft.input)}, {"from": "gpt", "value": draft.output}]
        return {"conversations": turns, **meta}
    return {"id": draft.record_id, "type": draft.type, "instruction": draft.instruction, "input": draft.input,
            "output": draft.output, **{k: v for k, v in meta.items() if k not in ("id", "type")}}


def preview_records(path: Path, n: int = 3) -> list[dict[str, Any]]:
    """The first n records of a dataset file, with clear errors for unreadable lines."""
    if not path.exists():
        raise FinqloraError(f"{path} does not exist", hint="build a dataset with `finqlora build --output PATH`")
    records = []
    hint = "each line must be one JSON object; rebuild the file with `finqlora build`"
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if len(records) >= n:
                break
            if not raw.strip():
                continue
            try:
                record = json_loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise FinqloraError(f"{path}, line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", hint=hint) from None
            except InputError as exc:
                raise FinqloraError(f"{path}, line {number}: not valid JSON ({exc})", hint=hint) from None
            if not isinstance(record, dict):
                raise FinqloraError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}", hint=hint)
            records.append(record)
    return records
