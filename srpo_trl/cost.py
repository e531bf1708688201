"""What generation costs: tokens prefilled and generated, and requests, counted where they happen.

The backends report what each call costs with :func:`add`; whoever wants the total for a piece of
work wraps it in :func:`track`::

    with cost.track() as c:
        backend.generate(requests, num_samples=10)
    c.as_dict()   # {"prefill_tokens": ..., "generated_tokens": ..., "requests": ..., "seconds": ...}

The tracker lives in a context variable, so concurrent records explored on threads each count their
own calls (a backend that fans a call out to worker threads copies the context to them:
:func:`bind_context`). A backend that reports nothing leaves the counts at 0.

What is counted:

* ``prefill_tokens``: prompt tokens the model computes (in process: per distinct request with prefix
  reuse, per sample without; from a server: the ``usage.prompt_tokens`` it reports, which a server
  with prefix caching may partly serve from its cache);
* ``generated_tokens``: tokens sampled (stop tokens included; ``usage.completion_tokens`` from a server);
* ``requests``: HTTP requests sent to a server, or prefills run in process.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


__all__ = ["Cost", "track", "add", "bind_context", "COST_KEYS"]

COST_KEYS = ("prefill_tokens", "generated_tokens", "requests", "seconds")


@dataclass
class Cost:
    prefill_tokens: int = 0
    generated_tokens: int = 0
    requests: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, prefill_tokens: int = 0, generated_tokens: int = 0, requests: int = 0) -> None:
        with self._lock:
            self.prefill_tokens += int(prefill_tokens)
            self.generated_tokens += int(generated_tokens)
            self.requests += int(requests)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
        }


_current: contextvars.ContextVar[tuple[Cost, ...]] = contextvars.ContextVar("srpo_trl_cost", default=())


@contextlib.contextmanager
def track() -> Iterator[Cost]:
    """Count what the backends report inside the block (nested trackers all count it)."""
    cost = Cost()
    token = _current.set(_current.get() + (cost,))
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - start
        _current.reset(token)


def add(prefill_tokens: int = 0, generated_tokens: int = 0, requests: int = 0) -> None:
    """Report a cost to every tracker of the current context (nothing happens outside one)."""
    for cost in _current.get():
        cost.add(prefill_tokens, generated_tokens, requests)


def bind_context(fn: Callable, *args: Any) -> Callable[[], Any]:
    """``fn(*args)`` bound to a copy of the caller's context, for ``pool.submit(bind_context(fn, x))``:
    a worker thread then reports to the caller's trackers."""
    ctx = contextvars.copy_context()
    return lambda: ctx.run(fn, *args)
