"""Assertions shared by several test files (a plain module: ``from helpers import ...``)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def assert_one_line_error(result: subprocess.CompletedProcess | tuple[int, str, str], *needles: str) -> str:
    """A CLI call failed as a user should see it: exit status 2, no traceback, exactly one ``error:``
    line on stderr, and that line names every needle. Takes a subprocess result or run_cli's
    (exit status, stdout, stderr), so in-process and real runs share one definition. Returns the line."""
    if isinstance(result, subprocess.CompletedProcess):
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        code, stdout, stderr = result
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def untrained_model(recipe: str, overrides: list[str], out: Path) -> Path:
    """A recipe's network with seeded random weights, saved as a model artifact at ``out`` (threshold 0.5)."""
    import torch

    from mitotype.config import load_config
    from mitotype.models.artifact import save_model
    from mitotype.models.registry import create_model

    torch.manual_seed(0)
    cfg = load_config(recipe, overrides)
    save_model(create_model(cfg.model), cfg, out, threshold=0.5, trained_on={}, metrics={})
    return out
