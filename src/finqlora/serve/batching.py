"""Dynamic batching of generation requests for the API server.

One worker thread owns the model; every request becomes a `GenerationJob` in a bounded
queue. The worker takes the oldest job, waits a short window (default 10 ms) for more jobs
*for the same adapter*, and decodes them together step by step with a KV cache and left
padding. The per-step loop is what makes the serving behaviour controllable:

- a job that reaches a stop token, a stop string or its `max_new_tokens` leaves the batch at
  once (its KV-cache row is dropped, so the rest of the batch gets cheaper);
- a job whose client disconnected (`job.cancel()`) or whose deadline passed is dropped the
  same way, so abandoned requests do not keep burning compute;
- streaming jobs get their text delta after every step.

Jobs for other adapters wait for the next batch (adapters cannot be mixed in one forward
pass of a peft model). A full queue is refused with `QueueFull` (the server answers 429 with
Retry-After), so a burst of traffic never builds an unbounded backlog.

This is *dynamic* batching: a batch runs until its last member finishes and new jobs join
the next batch; jobs do not join a batch that is already decoding (that would need merging
KV caches of different lengths mid-flight).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from finqlora.core.config import MAX_NEW_TOKENS

log = logging.getLogger(__name__)


# A token of the BPE vocabularies served here is 1-2 Chinese characters or ~4 English ones;
# 16 leaves room for long tokens (runs of spaces or digits) so that no prompt that fits
# max_prompt_tokens is refused by the character count.
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class BatchLimits:
    """Capacity and per-request limits of one server (all enforced at submission)."""

    max_batch_size: int = 8
    max_queue: int = 64  # jobs waiting (not yet decoding); more -> QueueFull / HTTP 429
    batch_window_ms: float = 10.0  # how long the oldest job waits for companions
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_new_tokens: int = MAX_NEW_TOKENS  # when a request does not say
    request_timeout_s: float = 300.0  # queueing + generation; then the job fails with 504
    # Characters of prompt text accepted before tokenizing (None: CHARS_PER_TOKEN_BOUND per
    # allowed token), so that a huge prompt is refused without paying for its tokenization.
    max_prompt_chars: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_new_tokens", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("batch_window_ms must be >= 0 and request_timeout_s > 0")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be at least 1, got {self.max_prompt_chars}")

    @property
    def prompt_chars_limit(self) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return CHARS_PER_TOKEN_BOUND * self.max_prompt_tokens


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


# Events a job reports to its owner (called from the worker thread).
@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int  # the HTTP status the server should answer with
    code: str
    message: str


Event = TextDelta | Finished | Failed


class QueueFull(Exception):
    """The queue is at capacity; try again after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy (queue full); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class LimitExceeded(ValueError):
    """A request asks for more than the configured limits allow."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


_job_ids = itertools.count(1)


@dataclass(eq=False)
class GenerationJob:
    """One request's prompt, settings and event sink."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None  # None = the plain base model
    stop_token_ids: Sequence[int]
    on_event: Callable[[Event], None]
    stream: bool = False  # report TextDelta events after each step
    id: int = field(default_factory=lambda: next(_job_ids))
    submitted_at: float = field(default_factory=time.monotonic)
    deadline: float = math.inf
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop this job (client gone): it leaves the queue or its batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # the owner is gone (e.g. its event loop closed): nothing to tell
            log.debug("job %s: event sink failed", self.id, exc_info=True)


AdapterSelector = Callable[[str | None], contextlib.AbstractContextManager[Any]]


def peft_adapter_selector(model: Any) -> AdapterSelector:
    """Switch a peft multi-adapter model between its adapters (None = adapters disabled).

    All adapters stay loaded on the one base; switching only changes which LoRA weights
    the forward pass adds, so it costs nothing per batch.
    """

    @contextlib.contextmanager
    def select(adapter: str | None) -> Iterator[None]:
        if not hasattr(model, "peft_config"):
            if adapter is not None:
                raise ValueError(f"adapter {adapter!r} requested but the model has no adapters")
            yield
            return
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            yield

    return select


@dataclass
class BatcherStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected_queue_full: int = 0
    timed_out: int = 0
    failed: int = 0
    batches: int = 0
    generated_tokens: int = 0
    largest_batch: int = 0


def _cache_argument_name(model: Any) -> str:
    """The forward argument for the KV cache: `cache` in recent transformers 5.x, `past_key_values` before
    (recent versions still take the old name but warn on every step)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class _RowState:
    """Decoding state of one job inside a running batch."""

    def __init__(self, job: GenerationJob, tokenizer: Any, generator: torch.Generator | None) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.generator = generator
        self.tokens: list[int] = []
        self.sent = 0  # characters already reported as TextDelta
        self.needs_text = job.stream or bool(job.params.stop)

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def after_token(self) -> str | None:
        """Report new text; return the final text when a stop string was produced."""
        if not self.needs_text:
            return None
        text = self.text()
        stops = self.job.params.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._send(text[:cut])
            return text[:cut]
        # Hold back an incomplete UTF-8 character and any tail that may begin a stop string.
        ready = len(text.rstrip("\ufffd"))
        for stop in stops:
            for k in range(min(len(stop) - 1, ready), 0, -1):
                if text[:ready].endswith(stop[:k]):
                    ready -= k
                    break
        self._send(text[:ready])
        return None

    def _send(self, text: str) -> None:
        if self.job.stream and len(text) > self.sent:
            self.job.emit(TextDelta(text[self.sent :]))
            self.sent = len(text)


class Batcher:
    """Owns the model in one worker thread and runs queued jobs in dynamic batches."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        limits: BatchLimits | None = None,
        *,
        select_adapter: AdapterSelector | None = None,
        max_context_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits or BatchLimits()
        self.select_adapter = select_adapter or peft_adapter_selector(model)
        self.max_context_tokens = max_context_tokens
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self._cache_kwarg = _cache_argument_name(model)
        self.stats = BatcherStats()
        self._pending: collections.deque[GenerationJob] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._seconds_per_batch = 1.0  # running average, for Retry-After
        self._thread = threading.Thread(target=self._work, name="finqlora-batcher", daemon=True)
        self._thread.start()

    # ---- submission (any thread) -------------------------------------------------------

    def validate(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise LimitExceeded when a request breaks the per-request limits."""
        limits = self.limits
        if max_new_tokens < 1:
            raise LimitExceeded("max_tokens must be at least 1", param="max_tokens")
        if max_new_tokens > limits.max_new_tokens:
            raise LimitExceeded(
                f"max_tokens={max_new_tokens} is more than this server allows ({limits.max_new_tokens})",
                param="max_tokens",
            )
        if prompt_tokens > limits.max_prompt_tokens:
            raise LimitExceeded(
                f"the prompt has {prompt_tokens} tokens, more than this server allows ({limits.max_prompt_tokens}); "
                "shorten the messages",
                param="messages",
                code="context_length_exceeded",
            )
        if self.max_context_tokens and prompt_tokens + max_new_tokens > self.max_context_tokens:
            raise LimitExceeded(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_new_tokens}) exceeds the model's context "
                f"length ({self.max_context_tokens}); lower max_tokens or shorten the messages",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def submit(self, job: GenerationJob) -> None:
        self.validate(len(job.prompt_ids), job.params.max_new_tokens)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher is shut down")
            if len(self._pending) >= self.limits.max_queue:
                self.stats.rejected_queue_full += 1
                raise QueueFull(self.retry_after_s())
            job.deadline = min(job.deadline, job.submitted_at + self.limits.request_timeout_s)
            self._pending.append(job)
            self.stats.submitted += 1
            self._cond.notify()

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained enough to take a new job."""
        batches_ahead = len(self._pending) / self.limits.max_batch_size + (1 if self._busy else 0)
        return max(1, min(60, math.ceil(batches_ahead * self._seconds_per_batch)))

    @property
    def queued(self) -> int:
        return len(self._pending)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, fail the queued ones (503), and end the worker after its batch."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            self._cond.notify_all()
        for job in pending:
            job.emit(Failed(503, "server_shutting_down", "the server is shutting down"))
        self._thread.join(timeout)

    # ---- worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            started = time.monotonic()
            self._busy = True
            try:
                self._run_batch(batch)
            except torch.cuda.OutOfMemoryError:
                log.exception("out of GPU memory in a batch of %d", len(batch))
                self._fail(batch, Failed(503, "out_of_memory", "the server ran out of GPU memory; retry with a shorter request"))
            except Exception:
                # A bug, not a user error: keep the worker alive and tell the waiting clients.
                log.exception("generation failed for a batch of %d", len(batch))
                self._fail(batch, Failed(500, "internal_error", "generation failed; see the server log"))
            finally:
                self._busy = False
                elapsed = time.monotonic() - started
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed

    def _fail(self, jobs: Sequence[GenerationJob], event: Failed) -> None:
        self.stats.failed += len(jobs)
        for job in jobs:
            job.emit(event)

    def _drop_dead(self, now: float) -> None:
        """Remove cancelled and expired jobs from the queue (caller holds the lock)."""
        alive: collections.deque[GenerationJob] = collections.deque()
        for job in self._pending:
            if job.cancelled:
                self.stats.cancelled += 1
                job.emit(Finished("", "cancelled", len(job.prompt_ids), 0))
            elif now >= job.deadline:
                self.stats.timed_out += 1
                job.emit(Failed(504, "timeout", "the request timed out waiting in the queue; the server is overloaded"))
            else:
                alive.append(job)
        self._pending = alive

    def _next_batch(self) -> list[GenerationJob] | None:
        window = self.limits.batch_window_ms / 1000
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            # Wait for companions for the same adapter, counted from the oldest job's arrival:
            # a job that already waited while the model was busy starts at once.
            while not self._stopping:
                same = sum(1 for job in self._pending if job.adapter == first.adapter)
                remaining = first.submitted_at + window - time.monotonic()
                if same >= self.limits.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._drop_dead(time.monotonic())
            if not self._pending:
                return []
            adapter = self._pending[0].adapter
            batch: list[GenerationJob] = []
            rest: collections.deque[GenerationJob] = collections.deque()
            for job in self._pending:
                if job.adapter == adapter and len(batch) < self.limits.max_batch_size:
                    batch.append(job)
                else:
                    rest.append(job)
            self._pending = rest
            return batch

    @torch.inference_mode()
    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        rows = []
        for job in jobs:
            generator = None
            if job.params.temperature > 0:
                generator = torch.Generator(device=self.device)
                # OpenAI allows any integer seed; torch takes 64 bits.
                generator.manual_seed((job.params.seed if job.params.seed is not None else time.time_ns()) % 2**64)
            rows.append(_RowState(job, self.tokenizer, generator))

        longest = max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.full((len(jobs), longest), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(jobs), longest), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: every row's last token is at the end
            input_ids[i, longest - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            attention[i, longest - len(job.prompt_ids) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        with self.select_adapter(jobs[0].adapter):
            out = self.model(
                input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            cache = _output_cache(out)
            logits = out.logits[:, -1, :]
            next_position = positions[:, -1] + 1
            while True:
                tokens = self._pick_tokens(logits, rows)
                keep = [i for i, row in enumerate(rows) if not self._advance(row, int(tokens[i]))]
                if not keep:
                    return
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    attention, next_position, tokens = attention[index], next_position[index], tokens[index]
                    rows = [rows[i] for i in keep]
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=-1)
                out = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=attention,
                    position_ids=next_position[:, None],
                    use_cache=True,
                    **{self._cache_kwarg: cache},
                )
                logits = out.logits[:, -1, :]
                next_position = next_position + 1

    def _pick_tokens(self, logits: torch.Tensor, rows: list[_RowState]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            params = row.job.params
            if params.temperature <= 0:
                continue
            # A vanishing temperature would overflow to inf/NaN: below 1e-5 it is greedy anyway.
            probs = torch.softmax(logits[i].float() / max(params.temperature, 1e-5), dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest set of tokens whose mass reaches top_p (at least one).
                outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
                sorted_probs[outside] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            tokens[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return tokens

    def _advance(self, row: _RowState, token: int) -> bool:
        """Take one new token for a row; return True when the row is done (and reported)."""
        job = row.job
        if job.cancelled:
            self.stats.cancelled += 1
            job.emit(Finished(row.text(), "cancelled", len(job.prompt_ids), len(row.tokens)))
            return True
        if time.monotonic() >= job.deadline:
            self.stats.timed_out += 1
            job.emit(Failed(504, "timeout", f"generation timed out after {self.limits.request_timeout_s:g} s"))
            return True
        if token in job.stop_token_ids:
            return self._finish(row, row.text(), "stop")
        row.tokens.append(token)
        self.stats.generated_tokens += 1
        stopped_text = row.after_token()
        if stopped_text is not None:
            return self._finish(row, stopped_text, "stop")
        if len(row.tokens) >= job.params.max_new_tokens:
            return self._finish(row, row.text(), "length")
        return False

    def _finish(self, row: _RowState, text: str, reason: str) -> bool:
        row._send(text)
        self.stats.completed += 1
        row.job.emit(Finished(text, reason, len(row.job.prompt_ids), len(row.tokens)))
        return True
