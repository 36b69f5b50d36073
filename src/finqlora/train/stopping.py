"""Stopping on Ctrl-C / SIGTERM: within the current step, with the last complete step checkpointed.

Container runtimes kill a process 10-30 s after SIGTERM, and one optimizer step of a 0.5B model
on a busy CPU takes over a minute, so finishing the step is too slow. The signal handler only sets
a flag; hooks on every transformer block check it (before each block's forward, and as its
gradient arrives in the backward pass) and raise `StepAbandoned`. Nothing of the abandoned step
has touched the weights, optimizer or schedule yet (the optimizer step is never interrupted), so
the Trainer saves the state the last complete step left, random-number generators included:
resume is as exact as after a stop between steps. The bound is then one block's forward or
backward, plus the save (docs/training.md, "Stopping").

Under several processes (torchrun) every rank must stop at the same step, or the next gradient
all-reduce hangs: there the flag is only acted on at the end of a step, on all ranks together.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class StepAbandoned(Exception):
    """Raised inside a training step after a stop request: the rest of the step is skipped."""


class StopRequest:
    """Set by SIGINT/SIGTERM; checked inside steps (see the module docstring) and after every step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.within_step = False  # True while a training micro-batch may be abandoned

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: stopping within this step, saving the last complete step, then exiting "
            "(press Ctrl-C again to stop at once without saving)",
            file=sys.stderr,
            flush=True,
        )

    def abandon_step_if_asked(self, *_hook_args: Any) -> None:
        """Raise StepAbandoned when a stop was asked while a step may be abandoned (hook-compatible)."""
        if self.within_step and self.signal_name is not None:
            raise StepAbandoned(self.signal_name)

    @contextlib.contextmanager
    def abandonable(self, allowed: bool = True) -> Iterator[None]:
        """Mark a training micro-batch (forward + backward) as safe to abandon."""
        self.within_step = allowed
        try:
            yield
        finally:
            self.within_step = False


@contextlib.contextmanager
def signals_handled(stop: StopRequest) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `stop` while training (only the main thread may install handlers)."""
    previous = {}
    if threading_main():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


_BLOCK_NAME = re.compile(r"(^|\.)layers\.\d+$")


def install_block_stop_hooks(model: Any, stop: StopRequest) -> list[Any]:
    """Hooks that abandon the step at the next transformer block, forward or backward; returns their handles."""
    import torch

    def on_block_output(_module: Any, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # Runs when this block's output gradient is ready: the backward pass reached the block.
            hidden.register_hook(lambda grad: stop.abandon_step_if_asked() or grad)

    handles = []
    for name, module in model.named_modules():
        if _BLOCK_NAME.search(name):
            handles.append(module.register_forward_pre_hook(stop.abandon_step_if_asked))
            handles.append(module.register_forward_hook(on_block_output))
    return handles


def capture_rng_state() -> dict[str, Any]:
    """The generators a training step draws from (dropout, shuffling), as the Trainer checkpoints them."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.random.set_rng_state_all(state["cuda"])
