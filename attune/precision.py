"""The precision convention of every forward pass: a *factory* of autocast contexts.

Functions that run a model take ``precision: Precision | None`` — a callable returning a fresh
context manager (``run.precision``, a bound method) — and enter a new one per forward pass with
:func:`entered`. A context manager object itself is never passed around: most are single-use,
and a factory works for any number of passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

Precision = Callable[[], contextlib.AbstractContextManager]
"""Makes the context a forward pass runs in (autocast, or a no-op)."""


def entered(precision: Precision | None) -> contextlib.AbstractContextManager:
    """A fresh context from ``precision`` to enter, or a no-op one when it is None."""
    return precision() if precision is not None else contextlib.nullcontext()
