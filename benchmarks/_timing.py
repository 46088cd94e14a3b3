"""Timing sides against each other on a shared CPU whose speed drifts by ±20% between minutes.

Every speed claim in RESULTS.md is a ratio measured in one run: the machines this project runs on
differ by 3x in speed, so an absolute patches/s says more about the machine than about the code.
Each side runs on the same pre-built batches; all sides are warmed up (oneDNN picks kernels on
first use), then run in rounds, the order rotating each round so drift and cache effects hit
every side alike. A table gives the median and min–max per side and the ratio to the first side.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from statistics import median
from typing import Callable, Sequence

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class Side:
    """One way of doing the same work: ``run`` processes ``items`` patches and returns its seconds."""

    name: str
    run: Callable[[], float]
    items: int


@dataclass(frozen=True)
class Timed:
    name: str
    items: int
    seconds: list[float]  # one per round, in round order
    ratios: list[float]  # this side's throughput / the first side's, per round

    @property
    def rate(self) -> float:
        """Median throughput in items per second."""
        return self.items / median(self.seconds)

    @property
    def rate_range(self) -> tuple[float, float]:
        return self.items / max(self.seconds), self.items / min(self.seconds)


def cpu_flags() -> dict[str, bool]:
    text = _read("/proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {f: f in flags for f in CPU_FLAGS}


def cpu_line() -> str:
    """Model, cores, torch threads and the vector flags that decide which kernels run."""
    text = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "") or platform.processor()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cpu_flags().items())
    return (f"CPU: {model or 'unknown'} · {usable} usable core(s) of {os.cpu_count()} · torch {torch.__version__} threads "
            f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}) · "
            f"ATen capability {torch.backends.cpu.get_cpu_capability()} · {flags}")


def compare(sides: Sequence[Side], rounds: int, warmup: int = 1) -> list[Timed]:
    """Warm every side ``warmup`` times, then ``rounds`` rounds; round r starts at side r mod N."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    for _ in range(warmup):
        for side in sides:
            side.run()
    seconds: list[list[float]] = [[] for _ in sides]
    for r in range(rounds):
        for k in range(len(sides)):
            i = (r + k) % len(sides)
            seconds[i].append(sides[i].run())
    base = sides[0].items
    ratios = [[(s.items / t) / (base / t0) for t, t0 in zip(sec, seconds[0])] for s, sec in zip(sides, seconds)]
    return [Timed(s.name, s.items, sec, rat) for s, sec, rat in zip(sides, seconds, ratios)]


def markdown_table(results: Sequence[Timed], unit: str = "patches/s", per_batch: int | None = None) -> str:
    """Median, min–max, optional ms per batch, ratio of medians to the first row and the per-round ratio range."""
    base = results[0]
    head = f"| side | {unit} (median) | min–max | " + ("ms/batch | " if per_batch else "") + "× first row | per-round ×, min–max |"
    lines = [head, "|" + " --- |" * (5 + bool(per_batch))]
    for r in results:
        lo, hi = r.rate_range
        ms = f"{1000 * per_batch / r.rate:,.0f} | " if per_batch else ""
        lines.append(f"| {r.name} | {r.rate:,.1f} | {lo:,.1f}–{hi:,.1f} | {ms}{r.rate / base.rate:.2f} | "
                     f"{min(r.ratios):.2f}–{max(r.ratios):.2f} |")
    return "\n".join(lines)


def report(title: str, results: Sequence[Timed], rounds: int, *, per_batch: int | None = None, rotating: bool = True) -> None:
    print(cpu_line())
    print(title + f" · {rounds} rounds after warm-up" + (", order rotating" if rotating else ""))
    print()
    print(markdown_table(results, per_batch=per_batch))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
