""" "Did you mean" hints for misspelt names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A hint like ``"; did you mean 'lr'?"`` for the closest candidate, or ``""`` if none is close."""
    candidates = [str(c) for c in candidates]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not matches:
        # A case slip ("LR" for "lr") scores low with difflib; catch it separately.
        matches = [c for c in candidates if c.lower() == name.lower()]
    return f"; did you mean '{matches[0]}'?" if matches else ""
