"""The bundled model's out-of-fold predictions, recomputed: each fold model of the bundle scores its
own held-out fold of the training split, so the bundle's per-source figures have a command.

The 5 slide-grouped folds are made again exactly as ``mitotype cv --folds 5`` made them (the
recipe's split seed and strata on the same data); the script refuses to go on unless every fold
holds as many patches as ``bundle.json`` says its run's fold held. Writes ``oof_predictions.csv``
(the manifest columns, fold, p_atypical) and ``summary.json`` (per fold, pooled, and per source at
0.5 and at the threshold chosen on the other sources' predictions) to ``--out``.

    .venv/bin/python benchmarks/bundle_oof.py [--data ../shared/data/ami-br-train] --out benchmarks/results/bundle-oof
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _patches import DEFAULT_DATA  # benchmarks/ is on the path when run as a script
from mitotype._io import write_json, write_csv
from mitotype.config import load_config
from mitotype.data.dataset import learnable, load_dataset
from mitotype.data.splits import grouped_folds
from mitotype.evaluation.metrics import METRIC_NAMES, best_threshold, binary_metrics, cross_fitted_metrics
from mitotype.models.artifact import model_dirs
from mitotype.models.bundled import bundle_info, bundled_model_dir
from mitotype.models.ensemble import Ensemble


def per_group(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, dict]:
    """Each group's figures at 0.5 and at the threshold best on the other groups' predictions."""
    out = {}
    for g in sorted(set(groups)):
        held, rest = groups == g, groups != g
        t = best_threshold(y[rest], p[rest])
        at = {name: binary_metrics(y[held], p[held], th) for name, th in (("at_0.5", 0.5), ("at_other_sources_threshold", t))}
        out[str(g)] = {"n": int(held.sum()), "n_atypical": int(y[held].sum()), "other_sources_threshold": t,
                       **{k: {m: v[m] for m in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")} for k, v in at.items()}}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    info, folder = bundle_info(), bundled_model_dir()
    cfg = load_config(info["recipe"])
    data = learnable(load_dataset(args.data, cfg))
    fold_of = grouped_folds(data.manifest, info["folds"], cfg.data.split_seed, cfg.data.stratify)
    want = [f["n"] for f in info["cv"]["per_fold"]]
    got = [int((fold_of == k).sum()) for k in range(info["folds"])]
    if got != want:
        raise SystemExit(f"the folds made here hold {got} patches, the bundle's run held {want}: not the same split")
    y, p = data.manifest["label"].to_numpy(), np.full(len(fold_of), np.nan)
    per_fold = []
    for k, member in enumerate(model_dirs(folder)):
        ensemble = Ensemble.load(member, device="cpu")
        rows = np.flatnonzero(fold_of == k)
        p[rows] = ensemble.score_store(data.store, rows)
        m = binary_metrics(y[rows], p[rows], ensemble.threshold)
        per_fold.append({"fold": k, "n": int(len(rows)), **{name: m[name] for name in METRIC_NAMES},
                         "bundle_json_balanced_accuracy": info["cv"]["per_fold"][k]["balanced_accuracy"]})
        print(f"fold {k}: BA {m['balanced_accuracy']:.3f} (bundle.json {per_fold[-1]['bundle_json_balanced_accuracy']:.3f}), "
              f"AUROC {m['roc_auc']:.3f}", flush=True)
    write_csv(args.out / "oof_predictions.csv", data.manifest.assign(fold=fold_of, p_atypical=p))
    pooled = binary_metrics(y, p, 0.5)
    fitted = cross_fitted_metrics(y, p, fold_of)
    summary = {
        "bundle": str(folder), "recipe": info["recipe"], "weights": info["weights"], "folds": info["folds"], "n": int(len(y)),
        "per_fold": per_fold,
        "mean": {m: float(np.mean([f[m] for f in per_fold])) for m in ("balanced_accuracy", "roc_auc")},
        "sd": {m: float(np.std([f[m] for f in per_fold], ddof=1)) for m in ("balanced_accuracy", "roc_auc")},
        "pooled_at_0.5": {m: pooled[m] for m in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")},
        # the threshold study: each fold at the threshold best on the other folds' predictions (train.threshold=oof's rule)
        "cross_fitted_threshold": {"thresholds": {str(k): t for k, (t, _) in fitted.items()},
                                   "mean_balanced_accuracy": float(np.mean([m["balanced_accuracy"] for _, m in fitted.values()]))},
        "per_source": per_group(y, p, data.manifest["domain"].to_numpy()),
    }
    write_json(args.out / "summary.json", summary)
    print(f"mean BA over folds at 0.5 {summary['mean']['balanced_accuracy']:.3f}, at the other folds' threshold "
          f"{summary['cross_fitted_threshold']['mean_balanced_accuracy']:.3f}")
    for source, s in summary["per_source"].items():
        a, b = s["at_0.5"], s["at_other_sources_threshold"]
        print(f"{source}: n {s['n']}, at 0.5 BA {a['balanced_accuracy']:.3f} / AUROC {a['roc_auc']:.3f} (sens {a['sensitivity']:.3f}, "
              f"spec {a['specificity']:.3f}); at the other sources' threshold {s['other_sources_threshold']:.3f}: "
              f"BA {b['balanced_accuracy']:.3f} (sens {b['sensitivity']:.3f}, spec {b['specificity']:.3f})")
    return summary


if __name__ == "__main__":
    main()
