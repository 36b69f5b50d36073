"""The record layouts users bring, and LLaMA-Factory's `dataset_info.json`.

Three layouts are read, one record at a time, detected by their fields:

- **alpaca**: `instruction`, `input`, `output`, optional `system` and `history`
  (`[[question, answer], ...]`, earlier turns);
- **sharegpt**: `conversations`, a list of `{"from": "human"|"gpt"|"system", "value": ...}`,
  optional `system`;
- **messages** (OpenAI chat): `messages`, a list of `{"role": "system"|"user"|"assistant", "content": ...}`.

A file is JSONL (one record a line) or one JSON array of records (LLaMA-Factory's `.json`
files). Alpaca records without history pass through unchanged; the others become `messages`
records (other fields such as `split` and `id` are kept), which `chat_format.record_to_chat`
reads. A LLaMA-Factory dataset is named `PATH/dataset_info.json:NAME`; its entry's
`file_name`, `formatting`, `columns` and `tags` are read as LLaMA-Factory documents them
(https://github.com/hiyouga/LLaMA-Factory/blob/main/data/README.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_jsonl, iter_jsonl

RECORD_FORMATS = ("alpaca", "messages", "sharegpt")
FORMAT_FIELDS = {"alpaca": "instruction", "messages": "messages", "sharegpt": "conversations"}

# LLaMA-Factory's defaults for an entry's columns and (sharegpt) tags.
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"}
# The tags of an OpenAI-style `messages` file described as sharegpt (LLaMA-Factory's own example).
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
# A dataset file is read whole; larger files are not instruction sets a person brings.
MAX_JSON_ARRAY_BYTES = 2_000_000_000


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The layout of one record (by its fields), or None."""
    for name, field in FORMAT_FIELDS.items():
        if field in record:
            return name
    return None


def _turns(turns: Any, tags: Mapping[str, str], where: str) -> list[dict[str, str]]:
    """ShareGPT-style turns -> messages with roles system/user/assistant."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{where}' must be a non-empty list of turns")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or tags["role_tag"] not in turn or tags["content_tag"] not in turn:
            raise ValueError(f"turn {number} of '{where}' needs '{tags['role_tag']}' and '{tags['content_tag']}'")
        role = roles.get(turn[tags["role_tag"]])
        if role is None:
            raise ValueError(
                f"turn {number} of '{where}' has {tags['role_tag']} {turn[tags['role_tag']]!r}; allowed: {', '.join(map(repr, roles))} "
                "(tool and observation turns are not trained)"
            )
        messages.append({"role": role, "content": str(turn[tags["content_tag"]] or "")})
    return messages


def user_content(instruction: str, input_text: str | None = None) -> str:
    """The user message of an Alpaca record: the instruction, a blank line, then the input (if any)."""
    instruction = (instruction or "").strip()
    input_text = (input_text or "").strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def _alpaca_messages(record: Mapping[str, Any], columns: Mapping[str, str]) -> list[dict[str, str]]:
    messages = []
    if record.get(columns["system"]):
        messages.append({"role": "system", "content": str(record[columns["system"]])})
    history = record.get(columns["history"]) or []
    if not isinstance(history, list):
        raise ValueError(f"'{columns['history']}' must be a list of [question, answer] pairs")
    for number, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"'{columns['history']}'[{number}] must be a [question, answer] pair")
        messages += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    messages.append({"role": "user", "content": user_content(str(record.get(columns["prompt"]) or ""), record.get(columns["query"]))})
    messages.append({"role": "assistant", "content": str(record.get(columns["response"]) or "")})
    return messages


def normalize(record: Mapping[str, Any], formatting: str | None = None, columns: Mapping[str, str] | None = None,
              tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A record in any layout -> an Alpaca record (no history) or a `messages` record.

    `formatting`, `columns` and `tags` are a dataset_info.json entry's; without them the layout
    is detected from the fields. Raises ValueError saying what is wrong (the caller names file and row).
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    columns = dict(columns or {})
    if formatting is None:
        formatting = detect_format(record)
        if formatting is None:
            raise ValueError(
                f"unknown record layout (fields: {', '.join(list(record)[:8]) or 'none'}); expected instruction/input/output "
                "(alpaca), conversations (sharegpt) or messages (OpenAI chat)"
            )
    if formatting == "alpaca":
        cols = {**ALPACA_COLUMNS, **columns}
        if cols["prompt"] not in record:
            raise ValueError(f"an alpaca record needs '{cols['prompt']}'")
        if cols == ALPACA_COLUMNS and not record.get("history"):
            return dict(record)  # our own layout: read as it is
        rest = {k: v for k, v in record.items() if k not in cols.values()}
        return {**rest, "messages": _alpaca_messages(record, cols)}
    if formatting == "messages":
        return {**record, "messages": _turns(record.get("messages"), OPENAI_TAGS, "messages")}
    if formatting != "sharegpt":
        raise ValueError(f"formatting {formatting!r} is not alpaca or sharegpt")
    cols = {**SHAREGPT_COLUMNS, **columns}
    key = cols["messages"]
    turn_tags = {**(OPENAI_TAGS if key == "messages" and not tags else SHAREGPT_TAGS), **(tags or {})}
    messages = _turns(record.get(key), turn_tags, key)
    if record.get(cols["system"]) and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": str(record[cols["system"]])})
    rest = {k: v for k, v in record.items() if k not in (key, cols["system"])}
    return {**rest, "messages": messages}


def iter_records(path: Path, *, what: str = "dataset") -> Iterator[tuple[int, Any]]:
    """(row number, record) of a JSONL file or of a file holding one JSON array (row = 1-based array index)."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        yield from iter_jsonl(path, what=what)
        return
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY_BYTES:
        raise FinqloraError(f"{path}: {size:,} bytes is too large for one JSON array", hint="write it as JSONL (one record a line)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FinqloraError(f"{path}: not a valid JSON array ({exc})", hint="a .json dataset is one array of objects; or write JSONL") from None
    yield from enumerate(rows, 1)


def split_dataset_info(spec: str | Path) -> tuple[Path, str] | None:
    """`DIR/dataset_info.json:NAME` -> (info file, NAME); None for a plain file path."""
    text = str(spec)
    head, colon, name = text.rpartition(":")
    if colon and Path(head).name == "dataset_info.json" and name:
        return Path(head), name
    return None


def dataset_info_entry(info: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """The data file of entry `name` of a LLaMA-Factory dataset_info.json, and the entry."""
    if not info.is_file():
        raise FinqloraError(f"dataset_info not found: {info}", hint="pass DIR/dataset_info.json:NAME with the folder of your LLaMA-Factory data")
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FinqloraError(f"{info}: not valid JSON ({exc})") from None
    if not isinstance(entries, dict) or name not in entries:
        known = ", ".join(sorted(entries)) if isinstance(entries, dict) else "none"
        raise FinqloraError(f"{info}: no dataset named {name!r}", hint=f"datasets in it: {known}")
    entry = entries[name]
    if not isinstance(entry, dict) or not entry.get("file_name"):
        other = next((k for k in ("hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name") if isinstance(entry, dict) and k in entry), None)
        why = f"it names {other}, which needs a hub; download the file and point file_name at it" if other else "it has no file_name"
        raise FinqloraError(f"{info}: dataset {name!r} cannot be read here: {why}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise FinqloraError(f"{info}: dataset {name!r} has formatting {formatting!r}", hint="LLaMA-Factory's formattings are alpaca, sharegpt and openai")
    if entry.get("ranking"):
        raise FinqloraError(f"{info}: dataset {name!r} is a ranking (preference) set", hint="supervised fine-tuning reads instruction data only")
    file = info.parent / entry["file_name"]
    if not file.is_file():
        raise FinqloraError(f"{info}: the file of dataset {name!r} is not there: {file}", hint="file_name is relative to the dataset_info.json folder")
    return file, entry


def _entry_layout(entry: Mapping[str, Any]) -> dict[str, Any]:
    """normalize()'s arguments for a dataset_info.json entry, with LLaMA-Factory's defaults.

    As in LLaMA-Factory, an entry reads a `system` (and an alpaca `history`) column only when its
    columns name it, and `openai` is sharegpt with OpenAI's field names.
    """
    formatting = entry.get("formatting", "alpaca")
    columns = {"system": "", **({"history": ""} if formatting == "alpaca" else {}), **(entry.get("columns") or {})}  # "" = no field
    if formatting == "openai":
        formatting, columns = "sharegpt", {"messages": "messages", **columns}
        return {"formatting": formatting, "columns": columns, "tags": {**OPENAI_TAGS, **(entry.get("tags") or {})}}
    return {"formatting": formatting, "columns": columns, "tags": entry.get("tags")}


def read_dataset(spec: str | Path) -> tuple[Path, list[tuple[int, dict[str, Any]]]]:
    """(data file, [(row, normalized record)]) of a dataset file or a `dataset_info.json:NAME` entry."""
    named = split_dataset_info(spec)
    if named is not None:
        file, entry = dataset_info_entry(*named)
        layout = _entry_layout(entry)
    else:
        file, layout = Path(spec), {}
    if not file.is_file():
        raise FinqloraError(
            f"dataset not found: {file}",
            hint="build one with `finqlora build --output data/qlora/instructions.jsonl`, or pass --data PATH "
            "(JSONL or a JSON array; or DIR/dataset_info.json:NAME)",
        )
    rows = []
    for number, record in iter_records(file):
        try:
            rows.append((number, normalize(record, **layout)))
        except ValueError as exc:
            raise FinqloraError(
                f"{file}: row {number}: {exc}",
                hint="records need instruction/input/output (alpaca), conversations (sharegpt) or messages (OpenAI chat)",
            ) from None
    return file, rows


def write_dataset_info(output: Path, records: list[dict[str, Any]], record_format: str) -> Path:
    """LLaMA-Factory's copy of a built dataset: `<stem>_train.jsonl`, `<stem>_val.jsonl` and their `dataset_info.json` entries.

    The split files hold only the layout's fields (no labels), so LLaMA-Factory's loader reads
    them as documented; the test split stays out (it is held out for evaluation). Entries already
    in the folder's dataset_info.json are kept.
    """
    # The builder writes no system prompt, and LLaMA-Factory reads every column its entry names.
    fields = {"alpaca": ("instruction", "input", "output"), "messages": ("messages",), "sharegpt": ("conversations",)}
    entry: dict[str, Any] = {"formatting": "alpaca"}
    if record_format == "sharegpt":
        entry = {"formatting": "sharegpt", "columns": {"messages": "conversations"}, "tags": dict(SHAREGPT_TAGS)}
    elif record_format == "messages":
        entry = {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": dict(OPENAI_TAGS)}
    info_path = output.parent / "dataset_info.json"
    entries: dict[str, Any] = {}
    if info_path.is_file():
        try:
            entries = json.loads(info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            entries = {}  # not ours and unreadable: replaced by a valid one
    for split, name in (("train", output.stem), ("val", f"{output.stem}_val")):
        chosen = [{k: r[k] for k in fields[record_format] if k in r} for r in records if r.get("split", "train") == split]
        if not chosen:
            continue
        file = output.with_name(f"{output.stem}_{split}.jsonl")
        atomic_write_jsonl(file, chosen)
        entries[name] = {"file_name": file.name, **entry}
    atomic_write_json(info_path, entries)
    return info_path
