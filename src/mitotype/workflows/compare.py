"""``mitotype compare``: the same grouped cross-validation for several recipes, and one table of them.

Each recipe's run lives in ``OUT/<recipe>/`` and is the unit of reuse: a finished run (summary.json)
with the same resolved config (the device aside), the same number of folds and the same patches is
reused, not retrained; an interrupted one resumes its finished folds; one whose config, folds or
data changed (e.g. another ``--set``) is replaced. The table holds mean ± sd over folds of the
metrics the field reports, the run's wall time and device (from its summary.json), and the fold-0
model's parameter count and throughput, measured now on fixed batches (median of a few rounds).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import pandas as pd

from mitotype._io import check_output_dir, write_csv, write_text
from mitotype.config import Config, config_change, load_config
from mitotype.errors import MitotypeError
from mitotype.evaluation.plots import plot_metric_bars
from mitotype.config import resolve_device
from mitotype.models.ensemble import Ensemble
from mitotype.models.artifact import load_model
from mitotype.data.dataset import Dataset, learnable, load_dataset
from mitotype.workflows.runs import cross_validate

COMPARED = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1")
LABELS = {"balanced_accuracy": "balanced accuracy", "roc_auc": "AUROC", "sensitivity": "sensitivity",
          "specificity": "specificity", "precision": "precision", "f1": "F1"}
CHARTED = ("balanced_accuracy", "roc_auc")
_NAME = re.compile(r"^[\w.+-]+$")


def run_name(recipe: str) -> str:
    """The run folder of a recipe: its name, or a YAML path's stem."""
    name = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    if not _NAME.match(name):
        raise MitotypeError(f"{{recipes}}: '{recipe}' does not make a folder name (letters, digits, . _ + - only)", options=("recipes",))
    return name


def parse_recipes(text: str) -> list[str]:
    """``A,B,C`` -> names: at least one, none twice (by run folder)."""
    recipes = [r.strip() for r in text.split(",") if r.strip()]
    if not recipes:
        raise MitotypeError(f"{{recipes}} '{text}': name recipes separated by commas, e.g. lite0-quick,lite0-crop80", options=("recipes",))
    names = [run_name(r) for r in recipes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MitotypeError(f"{{recipes}}: {', '.join(twice)} named twice (run folders are named by recipe)", options=("recipes",))
    return recipes


def run_state(run_dir: Path, cfg: Config, folds: int, data: Dataset) -> tuple[str, str]:
    """("new" | "reuse" | "resume" | "replace", why) for a recipe's run folder."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new", ""
    if not (run_dir / "config.yaml").is_file():
        raise MitotypeError(f"{run_dir}: not a cv run (no config.yaml); move it away or choose another {{out_dir}}", options=("out_dir",))
    if changed := config_change(run_dir / "config.yaml", cfg):
        return "replace", f"config changed ({changed})"
    splits = run_dir / "splits.csv"
    if splits.is_file():
        table = pd.read_csv(splits, usecols=["path", "fold"])
        if int(table["fold"].max()) + 1 != folds:
            return "replace", f"{int(table['fold'].max()) + 1} folds, now {folds}"
        if set(table["path"].astype(str)) != set(learnable(data).manifest["path"].astype(str)):
            return "replace", "the data changed"
    return ("reuse", "") if (run_dir / "summary.json").is_file() else ("resume", "")


def throughput(model: Any, data: Dataset, device: Any, *, batches: int = 4, batch_size: int = 32, rounds: int = 3,
               amp: bool = False) -> float:
    """Patches/s of one model predicting the same ``batches`` fixed uint8 batches: median of ``rounds`` after a warm-up."""
    index = np.arange(batches * batch_size) % len(data.store)
    fixed = [data.store.batch(index[s : s + batch_size]) for s in range(0, len(index), batch_size)]
    ensemble = Ensemble([model], device=device, amp=amp)

    def once() -> float:
        tic = time.perf_counter()
        for batch in fixed:
            ensemble.p_atypical(batch)  # returns on the CPU: the device has finished
        return time.perf_counter() - tic

    once()
    return len(index) / median(once() for _ in range(rounds))


def compare(recipes: list[str], data_path: Path, out: Path, *, folds: int = 5, overrides: list[str] | None = None,
            skip_missing: bool = False, n_boot: int = 1000, rounds: int = 3, batches: int = 4, batch_size: int = 32,
            on_status: Callable[[str, str], None] | None = None) -> pd.DataFrame:
    """Cross-validate (or reuse) each recipe in ``out/<recipe>/``; write compare.md, compare.csv and compare.png."""
    if folds < 2:
        raise MitotypeError(f"{{folds}}: {folds} must be at least 2", options=("folds",))
    configs = {run_name(r): load_config(r, overrides) for r in recipes}  # every recipe checked before any training
    out = Path(out)
    check_output_dir(out, "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    decoded: dict[tuple, Dataset] = {}
    rows = []
    for name, cfg in configs.items():
        d = cfg.data
        key = (d.patch_size, d.size_policy, d.on_bad_image, d.cache_dir)
        if key not in decoded:
            decoded[key] = load_dataset(data_path, cfg, skip_missing=skip_missing, skipped_note=f"skipped.csv in {out}/<recipe>")
        data, run_dir = decoded[key], out / name
        state, why = run_state(run_dir, cfg, folds, data)
        if state == "replace":
            warnings.warn(f"{run_dir}: {why}; retraining", stacklevel=2)
            shutil.rmtree(run_dir)
        if on_status is not None:
            on_status(name, {"new": "training", "replace": "training", "resume": "resuming", "reuse": "reused"}[state])
        if state != "reuse":
            cross_validate(cfg, data, folds=folds, out=run_dir, resume=state == "resume", n_boot=n_boot)
        rows.append(_row(name, cfg, run_dir, data, state, rounds=rounds, batches=batches, batch_size=batch_size))
    table = pd.DataFrame(rows)
    write_csv(out / "compare.csv", table)
    write_text(out / "compare.md", markdown(table, data_path, folds, list(overrides or []), rounds=rounds, patches=batches * batch_size))
    plot_metric_bars(table["recipe"].tolist(), {LABELS[m]: (table[f"{m}_mean"].tolist(), table[f"{m}_sd"].tolist()) for m in CHARTED},
                     out / "compare.png", title=f"{folds}-fold grouped CV, mean ± sd over folds")
    return table


def _row(name: str, cfg: Config, run_dir: Path, data: Dataset, state: str, **timing: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    device = resolve_device(cfg.train.device)
    model = load_model(run_dir / "fold_0", device).model
    row: dict[str, Any] = {"recipe": name, "folds": summary["folds"], "n": summary["n"]}
    for m in COMPARED:
        row[f"{m}_mean"], row[f"{m}_sd"] = summary["mean"][m], summary["sd"][m]
    row.update({"wall_seconds": summary["wall_seconds"], "device": summary["device"],
                "params": int(sum(p.numel() for p in model.parameters())),
                "patches_per_s": round(throughput(model, data, device, amp=cfg.train.amp, **timing), 1),
                "throughput_device": str(device), "run": "reused" if state == "reuse" else "trained", "dir": str(run_dir)})
    return row


def pm(mean: float | None, sd: float | None) -> str:
    return "–" if mean is None or pd.isna(mean) else f"{mean:.3f} ± {sd:.3f}"


def markdown(table: pd.DataFrame, data_path: Path, folds: int, overrides: list[str], *, rounds: int, patches: int) -> str:
    head = ["recipe", *(LABELS[m] for m in COMPARED), "wall time (s)", "device", "parameters", "patches/s"]
    lines = [
        "# mitotype compare", "",
        f"{folds}-fold grouped cross-validation on `{data_path}`; mean ± sd over folds"
        + (f"; overrides: `{' '.join(overrides)}`" if overrides else "") + ".",
        (f"Wall time and device: the run's summary.json (a resumed run counts its last session only). Throughput: the fold-0 "
         f"model predicting {patches} fixed patches, median of {rounds} rounds after a warm-up, measured by this command."), "",
        "| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
    ]
    for r in table.to_dict("records"):
        cells = [r["recipe"], *(pm(r[f"{m}_mean"], r[f"{m}_sd"]) for m in COMPARED), f"{r['wall_seconds']:.1f}", r["device"],
                 f"{r['params']:,}", f"{r['patches_per_s']:,.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"
