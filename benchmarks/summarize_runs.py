"""Print one Markdown row per cv run directory: the figures the results log (RESULTS.md) records.

    .venv/bin/python benchmarks/summarize_runs.py runs/e1-lite0-ft128 runs/e1-lite0-ft128-loso ...

Each row: run, recipe, folds (or held-out domains), balanced accuracy and AUROC as mean ± sd over
folds with the worst fold, pooled out-of-fold figures, balanced accuracy with each fold scored at
the threshold best on the other folds' out-of-fold predictions, and wall time. Read from
``summary.json`` and ``oof_predictions.csv`` only, so every number in the log comes from a run that
can be opened and checked (runs older than ``cross_fitted_threshold`` get it from the CSV).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype.evaluation.metrics import cross_fitted_metrics


def row(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    ba = [f["balanced_accuracy"] for f in s["per_fold"]]
    auc = [f["roc_auc"] for f in s["per_fold"]]
    if s.get("group_by"):
        folds = "; ".join(f"{f['held_out']} {f['balanced_accuracy']:.3f}" for f in s["per_fold"])
    else:
        folds = f"{s['folds']} folds, worst {min(ba):.3f}"
    pooled = s["out_of_fold"]
    oof = pd.read_csv(run / "oof_predictions.csv")
    y, p, fold = oof["label"].to_numpy(), oof["p_atypical"].to_numpy(), oof["fold"].to_numpy()
    refit = [m["balanced_accuracy"] for _, m in cross_fitted_metrics(y, p, fold).values()]
    return (f"| `{run.name}` | {s['recipe']} | {folds} | {s['mean']['balanced_accuracy']:.3f} ± {s['sd']['balanced_accuracy']:.3f} | "
            f"{s['mean']['roc_auc']:.3f} ± {s['sd']['roc_auc']:.3f} (worst {min(auc):.3f}) | "
            f"{pooled['balanced_accuracy']:.3f} / {pooled['roc_auc']:.3f} | {np.mean(refit):.3f} ± {np.std(refit, ddof=1):.3f} | "
            f"{s['wall_seconds'] / 60:.0f} min |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="cv run directories (each with summary.json)")
    args = parser.parse_args(argv)
    print("| run | recipe | folds | balanced accuracy (mean ± sd) | AUROC (mean ± sd) | pooled OOF BA / AUROC | BA, threshold from the other folds | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        print(row(run))


if __name__ == "__main__":
    main()
