"""Answer chats with a loaded model: batched, streamed, or over a whole JSONL file.

Prompts are rendered by `finqlora.core.chat_format` (the same template and stop rules as training
and serving). Batches are left-padded so every row's answer starts at the same position and
the KV cache is reused across decoding steps. Greedy decoding is the default, so evaluation
runs are reproducible; sampling is seeded.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finqlora.core.chat_format import record_to_chat, render_prompt, stop_token_ids
from finqlora.core.config import MAX_NEW_TOKENS
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json
from finqlora.core.safe_input import InputError, json_loads
from finqlora.core.records import user_content

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options. temperature 0 means greedy (deterministic)."""

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FinqloraError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise FinqloraError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FinqloraError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise FinqloraError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise FinqloraError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "eos_token_id": stop_token_ids(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "use_cache": True,
            "do_sample": not self.greedy,
        }
        if self.greedy:
            # Override sampling defaults that a model's generation_config may carry.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kwargs


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool  # True when it stopped on EOS / end of turn, False when it hit max_new_tokens


def _model_device(model: Any):
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def _answer_tokens(row: list[int], stops: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(row):
        if token in stops:
            return row[:i], True
    return row, False


def _progress(total: int, description: str, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}", markup=False),  # descriptions name data (tickers, files)
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
        console=Console(stderr=True),
    )
    return progress, progress.add_task(description, total=total)


def generate(
    model: Any,
    tokenizer: Any,
    list_of_messages: Sequence[Messages],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Generation]:
    """Answer each chat; returns texts with token counts, in the input order."""
    import torch

    settings = settings or GenerationSettings()
    if batch_size < 1:
        raise FinqloraError(f"batch_size must be at least 1, got {batch_size}")
    prompts = [render_prompt(tokenizer, messages) for messages in list_of_messages]
    lengths = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    # Longest first: similar lengths share a batch (less padding) and memory errors show early.
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    kwargs = settings.generate_kwargs(tokenizer)
    stops = set(kwargs["eos_token_id"])
    results: list[Generation | None] = [None] * len(prompts)
    device = _model_device(model)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    bar, task = _progress(len(prompts), "generating", progress and len(prompts) > 1)
    try:
        with bar, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                encoded = tokenizer(
                    [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                if not settings.greedy:
                    torch.manual_seed(settings.seed + start)
                output = model.generate(**encoded, **kwargs)
                new = output[:, encoded["input_ids"].shape[1] :].tolist()
                for i, row in zip(batch, new):
                    tokens, finished = _answer_tokens(row, stops)
                    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    results[i] = Generation(text, lengths[i], len(tokens) + int(finished), finished)
                bar.advance(task, len(batch))
    finally:
        tokenizer.padding_side = previous_side
    return [r for r in results if r is not None]


def generate_answers(
    model: Any,
    tokenizer: Any,
    list_of_messages: Sequence[Messages],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Answer each chat (a list of {"role", "content"} messages); texts in the input order."""
    return [g.text for g in generate(model, tokenizer, list_of_messages, settings, batch_size, progress)]


class StopWhenAsked:
    """A stopping criterion for `generate` that ends every row once `event` is set.

    Duck-typed like transformers' StoppingCriteria (a callable returning one bool per row),
    so this module does not import transformers before a model is used.
    """

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_answer(
    model: Any, tokenizer: Any, messages: Messages, settings: GenerationSettings | None = None
) -> Iterator[str]:
    """Yield the answer to one chat piece by piece as it is generated.

    Closing the generator early (a client hung up, Ctrl-C) stops the generation at the next
    token instead of letting it run to the end in the background.
    """
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    settings = settings or GenerationSettings()
    encoded = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False).to(
        _model_device(model)
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []
    cancelled = threading.Event()

    def run() -> None:
        try:
            if not settings.greedy:
                torch.manual_seed(settings.seed)
            with torch.inference_mode():
                model.generate(
                    **encoded,
                    **settings.generate_kwargs(tokenizer),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([StopWhenAsked(cancelled)]),
                )
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, name="finqlora-generate", daemon=True)
    worker.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        cancelled.set()
        worker.join()
    if failure:
        raise failure[0]


def build_messages(text: str, *, instruction: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    """One question as chat messages, laid out like a dataset record (instruction + input)."""
    messages = [{"role": "system", "content": system}] if system else []
    content = user_content(instruction, text) if instruction else text.strip()
    messages.append({"role": "user", "content": content})
    return messages


def ask_prompts(
    loaded: Any,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    instruction: str | None = None,
    system: str | None = None,
    compare: bool = False,
    batch_size: int = 8,
) -> list[dict[str, str]]:
    """Answers of a `LoadedModel` to plain-text prompts: `{"prompt", "answer"}` each, or
    `{"prompt", "base", "finetuned"}` with `compare` (the adapter switched off, then on)."""
    chats = [build_messages(p, instruction=instruction, system=system) for p in prompts]
    answers = generate_answers(loaded.model, loaded.tokenizer, chats, settings, batch_size, progress=len(chats) > 1)
    if not compare:
        return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    if loaded.adapter is None:
        raise FinqloraError("compare needs an adapter (it compares the base model with the fine-tuned one)")
    with loaded.base_only():
        base = generate_answers(loaded.model, loaded.tokenizer, chats, settings, batch_size, progress=len(chats) > 1)
    return [{"prompt": p, "base": b, "finetuned": a} for p, b, a in zip(prompts, base, answers)]


def context_limit(model: Any) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def trim_history(
    model: Any, tokenizer: Any, prefix: Messages, history: list[dict[str, str]], max_new_tokens: int
) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turns until prompt + answer fit the model's context window.

    Returns the kept history and how many messages were dropped; the last message is kept.
    """
    limit = context_limit(model)
    dropped = 0
    if limit is None:
        return history, dropped
    while len(history) > 1:
        prompt = render_prompt(tokenizer, list(prefix) + history)
        if len(tokenizer.encode(prompt, add_special_tokens=False)) + max_new_tokens <= limit:
            break
        # Drop a whole user/assistant pair so roles keep alternating.
        cut = 2 if len(history) > 2 else 1
        history = history[cut:]
        dropped += cut
    return history, dropped


# --- JSONL files -------------------------------------------------------------------------

_PASSTHROUGH = ("type", "split", "event_id", "event_time", "label")


@dataclass(frozen=True)
class PromptRow:
    line: int  # 1-based line number in the input file
    id: str
    messages: list[dict[str, str]]
    reference: str
    extra: dict[str, Any]


def read_prompts(path: Path) -> list[PromptRow]:
    """Read prompts: dataset records (instruction/input or messages) or {"prompt": "..."} rows."""
    if not path.is_file():
        raise FinqloraError(f"input file not found: {path}", hint="pass a JSONL file, one prompt or record per line")
    rows: list[PromptRow] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json_loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise FinqloraError(f"{path}:{number}: not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})",
                                    hint="each line must be one JSON object, in UTF-8") from None
            except InputError as exc:
                raise FinqloraError(f"{path}:{number}: not valid JSON ({exc})", hint="each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise FinqloraError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            if "prompt" in record and "instruction" not in record and "messages" not in record:
                messages = [{"role": "system", "content": str(record["system"])}] if record.get("system") else []
                messages.append({"role": "user", "content": str(record["prompt"])})
                reference = str(record.get("output") or "")
            else:
                try:
                    example = record_to_chat(record)
                except FinqloraError as exc:
                    raise FinqloraError(
                        f"{path}:{number}: {exc.message}",
                        hint="use {\"prompt\": ...}, Alpaca instruction/input, or OpenAI messages",
                    ) from None
                except (KeyError, TypeError) as exc:
                    raise FinqloraError(f"{path}:{number}: malformed messages ({exc})") from None
                messages, reference = example.messages, example.answer
            extra = {key: record[key] for key in _PASSTHROUGH if key in record}
            rows.append(PromptRow(number, str(record.get("id", f"line-{number}")), messages, reference, extra))
    return rows


def _read_done(output: Path) -> dict[int, str]:
    """Lines already answered in `output` ({input line: id}); cuts off a half-written last line."""
    done: dict[int, str] = {}
    if not output.exists():
        return done
    good_bytes = 0
    with open(output, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break  # a crash mid-write: this row is redone
            try:
                row = json.loads(raw)
                done[int(row["line"])] = str(row["id"])
            except (ValueError, KeyError, TypeError):
                break
            good_bytes += len(raw)
    if good_bytes != output.stat().st_size:
        with open(output, "r+b") as handle:
            handle.truncate(good_bytes)
    return done


@dataclass(frozen=True)
class GenerateFileResult:
    total: int
    skipped: int  # already answered in an earlier run
    written: int
    new_tokens: int
    seconds: float


def generate_file(
    model: Any,
    tokenizer: Any,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    settings: GenerationSettings | None = None,
    *,
    run_info: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> GenerateFileResult:
    """Answer every prompt of a JSONL file into another JSONL file, resumably.

    Each output line is `{"id", "line", "answer", "reference", "prompt_tokens", "new_tokens",
    "finished", ...type/split/event_id/event_time/label copied from the input}`. Rows are
    appended (and fsynced) a chunk at a time; re-running the same command skips answered
    lines. `OUTPUT.meta.json` records the model and settings, and a resume with different
    ones is refused (pass overwrite=True to start over).
    """
    import time

    settings = settings or GenerationSettings()
    input_path, output_path = Path(input_path), Path(output_path)
    prompts = read_prompts(input_path)
    meta_path = output_path.with_name(output_path.name + ".meta.json")
    meta = {"input": str(input_path.resolve()), "settings": asdict(settings), **(dict(run_info or {}))}
    if overwrite:
        output_path.unlink(missing_ok=True)
    elif output_path.exists() and output_path.stat().st_size > 0:
        try:
            previous = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != json.loads(json.dumps(meta)):
            changed = sorted(k for k in set(meta) | set(previous or {}) if (previous or {}).get(k) != meta.get(k))
            raise FinqloraError(
                f"{output_path} was written by a run with other settings ({', '.join(changed) or 'unknown: no ' + meta_path.name})",
                hint="pass --overwrite to start over, or use the same options to resume",
            )
    done = _read_done(output_path)
    by_line = {row.line: row for row in prompts}
    for line, id_ in done.items():
        if line not in by_line or by_line[line].id != id_:
            raise FinqloraError(
                f"{output_path} does not match {input_path} (line {line} has id {id_!r} in the output)",
                hint="the input changed since the last run; pass --overwrite to start over",
            )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)
    pending = [row for row in prompts if row.line not in done]
    started = time.perf_counter()
    new_tokens = 0
    bar, task = _progress(len(prompts), f"generating -> {output_path.name}", progress)
    chunk = max(batch_size * 4, 1)
    with bar, open(output_path, "a", encoding="utf-8") as out:
        bar.advance(task, len(prompts) - len(pending))
        for start in range(0, len(pending), chunk):
            rows = pending[start : start + chunk]
            answers = generate(model, tokenizer, [r.messages for r in rows], settings, batch_size, progress=False)
            for row, answer in zip(rows, answers):
                out.write(
                    json.dumps(
                        {
                            "id": row.id,
                            "line": row.line,
                            "answer": answer.text,
                            "reference": row.reference or None,
                            "prompt_tokens": answer.prompt_tokens,
                            "new_tokens": answer.new_tokens,
                            "finished": answer.finished,
                            **row.extra,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                new_tokens += answer.new_tokens
            out.flush()
            os.fsync(out.fileno())
            bar.advance(task, len(rows))
    return GenerateFileResult(len(prompts), len(done), len(pending), new_tokens, time.perf_counter() - started)
