"""Issue 21's out-of-domain figures from leave-one-source-out cv runs (``cv --group-by domain,scanner``).

For each run: every held-out source at 0.5 and at the threshold chosen on the *other* sources'
out-of-fold predictions (cross-fitted across sources: what a model shipped to a new scanner can
know), with sensitivity and specificity; and calibration, the expected calibration error of the
out-of-fold probabilities before and after a temperature fitted on the other sources' logits.
Given a second run (``--against BASE``, the same folds), the paired slide bootstrap of the pooled
out-of-fold balanced accuracy difference (run - base) with its 95% interval, and the per-source
differences: the issue's rule for a lever that wins.

    .venv/bin/python benchmarks/shift_levers.py runs/lite0-crop64-stain-loso --against runs/lite0-crop64-loso \
        --out benchmarks/results/e9-stain-loso
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from _oof import paired_bootstrap  # benchmarks/ is on the path when run as a script
from mitotype._io import write_json, write_csv
from mitotype.evaluation.metrics import best_threshold, binary_metrics

KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width bins of p_atypical."""
    edges = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(y[edges == b].mean() - p[edges == b].mean()) * (edges == b).mean() for b in range(bins) if (edges == b).any()))


def temperature(y: np.ndarray, z: np.ndarray) -> float:
    """The temperature T minimising the log loss of sigmoid(z / T)."""
    def nll(log_t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-z / np.exp(log_t))), 1e-9, 1 - 1e-9)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def per_source(oof: pd.DataFrame, held: list[str]) -> dict[str, dict]:
    y, p, fold = oof["label"].to_numpy(), oof["p_atypical"].to_numpy(), oof["fold"].to_numpy()
    out = {}
    for k, name in enumerate(held):
        mine, rest = fold == k, fold != k
        t = best_threshold(y[rest], p[rest])
        temp = temperature(y[rest], _logit(p[rest]))
        scaled = 1 / (1 + np.exp(-_logit(p[mine]) / temp))
        at = {"at_0.5": binary_metrics(y[mine], p[mine], 0.5), "at_other_sources_threshold": binary_metrics(y[mine], p[mine], t)}
        out[name] = {"n": int(mine.sum()), "n_atypical": int(y[mine].sum()), "other_sources_threshold": t,
                     **{k2: {m: v[m] for m in KEYS} for k2, v in at.items()},
                     "ece": ece(y[mine], p[mine]), "temperature_from_other_sources": temp, "ece_after_temperature": ece(y[mine], scaled)}
    return out


def read_run(run: Path) -> tuple[pd.DataFrame, dict]:
    summary = json.loads((run / "summary.json").read_text())
    if not summary.get("group_by"):
        raise SystemExit(f"{run}: not a leave-one-source-out run (cv --group-by)")
    return pd.read_csv(run / "oof_predictions.csv"), summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--against", type=Path, default=None, help="the base run of the same folds")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    oof, summary = read_run(args.run)
    held = [f["held_out"] for f in summary["per_fold"]]
    result: dict = {"run": str(args.run), "recipe": summary["recipe"], "group_by": summary["group_by"], "per_source": per_source(oof, held),
                    "pooled_at_0.5": {m: binary_metrics(oof["label"].to_numpy(), oof["p_atypical"].to_numpy(), 0.5)[m] for m in KEYS}}
    if args.against is not None:
        base, base_summary = read_run(args.against)
        if [f["held_out"] for f in base_summary["per_fold"]] != held:
            raise SystemExit(f"{args.against}: other held-out sources than {args.run}")
        base_sources = per_source(base, held)
        result["against"] = {"run": str(args.against), "paired_bootstrap": paired_bootstrap(base, oof),
                             "per_source_difference_at_0.5": {s: result["per_source"][s]["at_0.5"]["balanced_accuracy"]
                                                              - base_sources[s]["at_0.5"]["balanced_accuracy"] for s in held}}
    write_json(args.out / "summary.json", result)
    write_csv(args.out / "oof_predictions.csv", oof)
    for s, v in result["per_source"].items():
        a, b = v["at_0.5"], v["at_other_sources_threshold"]
        print(f"{s:28s} n {v['n']:4d}  at 0.5: BA {a['balanced_accuracy']:.3f} AUROC {a['roc_auc']:.3f} sens {a['sensitivity']:.3f} "
              f"spec {a['specificity']:.3f} | at other sources' t={v['other_sources_threshold']:.3f}: BA {b['balanced_accuracy']:.3f} "
              f"sens {b['sensitivity']:.3f} spec {b['specificity']:.3f} | ECE {v['ece']:.3f} -> {v['ece_after_temperature']:.3f} "
              f"(T {v['temperature_from_other_sources']:.2f})")
    if "against" in result:
        pb = result["against"]["paired_bootstrap"]
        print(f"pooled BA difference vs {args.against.name}: {pb['difference']:+.4f} [{pb['ci95'][0]:+.4f}, {pb['ci95'][1]:+.4f}] (slide bootstrap); "
              + ", ".join(f"{s} {d:+.3f}" for s, d in result["against"]["per_source_difference_at_0.5"].items()))
    return result


if __name__ == "__main__":
    main()
