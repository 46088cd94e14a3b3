"""The layered house: no import cycle, no upward import (the project's checkers in ../shared/tools),
and the lower layers stay light (training never loads matplotlib)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT.parent / "shared" / "tools"


@pytest.mark.parametrize("tool, args", [("import_cycles.py", ["src", "mitotype"]), ("layers.py", ["src"])])
def test_the_house_has_no_cycle_and_no_upward_import(tool: str, args: list[str]) -> None:
    if not (TOOLS / tool).is_file():
        pytest.skip(f"{TOOLS / tool} absent: the layer checkers live in the project's shared/ folder")
    run = subprocess.run([sys.executable, str(TOOLS / tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] in ("cycles: 0", "upward imports: 0")


def test_training_does_not_load_matplotlib() -> None:
    code = "import sys, mitotype.training.loop, mitotype.models.ensemble; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert run.stdout.strip() == "[]"
