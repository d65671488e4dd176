"""A closure that fails once, and the training loop that retries it: how the tests check that a
step interrupted mid-way (say, out of memory in the user's forward) is taken back, recorded in the
History, and still replays bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FailOnce:
    """``loss()`` on every call but the ``fail_at``-th (1-based, counted over the closure's whole
    life), which raises MemoryError."""

    def __init__(self, loss: Callable[[], Any], fail_at: int) -> None:
        self.loss, self.fail_at, self.calls = loss, fail_at, 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise MemoryError("out of memory")
        return self.loss()


def step_retrying(opt: Any, closure: Callable[[], Any], steps: int) -> list[tuple[int, int, Any]]:
    """``steps`` ZOSGD steps; a step whose closure raises MemoryError is retried once, as a loop
    that catches out-of-memory errors would. Returns (step index, ``opt.steps``, ``opt.pending``)
    as they were at each failure."""
    failures = []
    for t in range(steps):
        try:
            opt.step(closure)
        except MemoryError:
            failures.append((t, opt.steps, opt.pending))
            opt.step(closure)
    return failures
