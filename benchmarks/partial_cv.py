"""Held-out figures of the finished folds of a cv run that was stopped early (no summary.json yet).

    .venv/bin/python benchmarks/partial_cv.py runs/e7-lite0-crop64-experts --folds 0,1
    .venv/bin/python benchmarks/partial_cv.py src/mitotype/bundled --splits runs/ANY-5-FOLD-RUN/splits.csv --folds 0,1,2,3,4

(the second re-scores the bundled model's fold models on their own held-out folds: every 5-fold cv
run of the same data and split seed has the same splits.csv.)

Each finished fold model predicts its own held-out rows (from the run's ``splits.csv``); each fold is
then scored at the stored threshold and at the threshold best on the *other* finished folds'
predictions (``train.threshold=oof``'s rule); then the pooled figures per domain (source). Writes ``partial_oof_predictions.csv`` in the run (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype.data.images import decode_all
from mitotype.evaluation.metrics import binary_metrics, cross_fitted_thresholds
from mitotype.models.artifact import load_model
from mitotype.models.ensemble import Ensemble


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="cv run directory (splits.csv, fold_*/)")
    parser.add_argument("--folds", required=True, help="finished folds, comma-separated (at least two)")
    parser.add_argument("--splits", type=Path, default=None, help="the splits.csv that assigned the folds (default: RUN/splits.csv)")
    parser.add_argument("--out", type=Path, default=None, help="predictions CSV (default: RUN/partial_oof_predictions.csv)")
    args = parser.parse_args(argv)
    folds = [int(f) for f in args.folds.split(",")]
    splits = pd.read_csv(args.splits or args.run / "splits.csv")
    rows = splits[splits["fold"].isin(folds)].reset_index(drop=True)
    models = {f: load_model(args.run / f"fold_{f}") for f in folds}
    store, _ = decode_all(rows["path"].tolist(), models[folds[0]].patch_size, models[folds[0]].size_policy)
    y, fold, p = rows["label"].to_numpy(), rows["fold"].to_numpy(), np.full(len(rows), np.nan)
    stored = {}
    for f, loaded in models.items():
        stored[f], idx = loaded.threshold, np.flatnonzero(fold == f)
        p[idx] = Ensemble([loaded.model], device="cpu", members=[loaded]).score_store(store, idx)
    for f, t in cross_fitted_thresholds(y, p, fold).items():
        at = {name: binary_metrics(y[fold == f], p[fold == f], value) for name, value in (("stored", stored[f]), ("other folds'", t))}
        print(f"fold {f}: AUROC {at['stored']['roc_auc']:.3f} | " + " | ".join(
            f"at the {name} threshold {th:.3f}: BA {m['balanced_accuracy']:.3f}, sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}"
            for (name, m), th in zip(at.items(), (stored[f], t))))
    domains = [f"{name or 'no domain'} (n {len(g)}): BA {m['balanced_accuracy']:.3f}, AUROC {m['roc_auc']:.3f}"
               for name, g in rows.assign(p=p).groupby(rows["domain"].fillna(""))
               for m in [binary_metrics(g["label"].to_numpy(), g["p"].to_numpy(), 0.5)]]
    print("pooled over these folds at 0.5, per domain: " + "; ".join(domains))
    rows.assign(p_atypical=p).to_csv(args.out or args.run / "partial_oof_predictions.csv", index=False)


if __name__ == "__main__":
    main()
