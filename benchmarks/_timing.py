"""Timing two sides on a shared CPU whose speed drifts by ±20% between minutes."""

from __future__ import annotations

from statistics import median
from typing import Callable


def alternate(first: Callable[[], float], second: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Warm both (oneDNN / cuDNN pick kernels on first use), then run them in turn, so drift hits
    both sides alike; each callable returns its own seconds. Returns the two medians."""
    first(), second()
    a, b = [], []
    for _ in range(rounds):
        a.append(first())
        b.append(second())
    return median(a), median(b)
