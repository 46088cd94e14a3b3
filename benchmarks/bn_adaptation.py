"""Issue 21's test-time adaptation lever on the leave-one-source-out proxy: each fold model of a
``cv --group-by`` run scores its held-out source with and without BatchNorm statistics re-estimated
on that source's patches (``Ensemble.adapt_batchnorm``, what ``predict --adapt-bn`` does), at the
source's own atypical share and at 10% and 22% (held-out patches subsampled, seeded), since BN
adaptation is known to break when the class prior moves. At the source's own share it also writes
the out-of-fold predictions with and without adaptation (``oof_adapted.csv``) and cross-fits a
threshold for each: each held-out source at the threshold best on the *other* sources' adapted
predictions (:func:`shift_levers.per_source`), since adaptation moves every score and 0.5 is then
nobody's choice.

    .venv/bin/python benchmarks/bn_adaptation.py runs/lite0-crop64-loso --out benchmarks/results/e4-loso-bn-adaptation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype._io import write_csv, write_json
from mitotype.data.images import decode_all
from mitotype.evaluation.metrics import binary_metrics
from mitotype.models.ensemble import INFERENCE_BATCH, Ensemble
from shift_levers import paired_bootstrap, per_source  # benchmarks/ is on the path when run as a script

SHARES = (None, 0.10, 0.22)  # None: the source's own atypical share
KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")


def subsample(y: np.ndarray, share: float | None, rng: np.random.Generator) -> np.ndarray:
    """Row positions keeping every patch of the rarer side of ``share`` and dropping the other class down to it."""
    rows = np.arange(len(y))
    if share is None:
        return rows
    pos, neg = rows[y == 1], rows[y == 0]
    n_pos = min(len(pos), int(round(share / (1 - share) * len(neg))))
    n_neg = min(len(neg), int(round(n_pos * (1 - share) / share)))
    return np.sort(np.r_[rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    splits = pd.read_csv(args.run / "splits.csv")
    result: dict = {"run": str(args.run), "recipe": summary["recipe"], "batch": INFERENCE_BATCH, "sources": {}}
    rng = np.random.default_rng(args.seed)
    oof: list[pd.DataFrame] = []
    for fold in summary["per_fold"]:
        k, name = fold["fold"], fold["held_out"]
        rows = splits[splits["fold"] == k].reset_index(drop=True)
        y_all = rows["label"].to_numpy()
        store = None
        for share in SHARES:
            keep = subsample(y_all, share, rng)
            plain = Ensemble.load(args.run / f"fold_{k}", device="cpu")
            if store is None:
                store, _ = decode_all(rows["path"].tolist(), plain.patch_size, plain.size_policy)
            p0 = plain.score_store(store, keep)
            adapted = Ensemble.load(args.run / f"fold_{k}", device="cpu")
            adapted.adapt_batchnorm(store.batch(keep[s : s + INFERENCE_BATCH]) for s in range(0, len(keep), INFERENCE_BATCH))
            p1 = adapted.score_store(store, keep)
            y = y_all[keep]
            label = "own" if share is None else f"{share:.2f}"
            if share is None:
                oof.append(pd.DataFrame({"path": rows["path"], "label": y, "fold": k, "p_plain": p0, "p_adapted": p1}))
            got = {"n": int(len(keep)), "atypical_share": float(y.mean()),
                   "plain": {m: binary_metrics(y, p0, 0.5)[m] for m in KEYS}, "adapted": {m: binary_metrics(y, p1, 0.5)[m] for m in KEYS}}
            result["sources"].setdefault(name, {})[label] = got
            a, b = got["plain"], got["adapted"]
            print(f"{name:30s} share {got['atypical_share']:.2f} (n {got['n']:4d}): BA {a['balanced_accuracy']:.3f} -> "
                  f"{b['balanced_accuracy']:.3f}, sens {a['sensitivity']:.3f} -> {b['sensitivity']:.3f}, "
                  f"spec {a['specificity']:.3f} -> {b['specificity']:.3f}, AUROC {a['roc_auc']:.3f} -> {b['roc_auc']:.3f}", flush=True)
    table = pd.concat(oof, ignore_index=True)
    held = [f["held_out"] for f in sorted(summary["per_fold"], key=lambda f: f["fold"])]
    result["cross_fitted"] = {kind: per_source(table.assign(p_atypical=table[f"p_{kind}"]), held) for kind in ("plain", "adapted")}
    for name in held:
        a, b = (result["cross_fitted"][kind][name] for kind in ("plain", "adapted"))
        print(f"{name:30s} other sources' threshold: plain {a['other_sources_threshold']:.3f} BA "
              f"{a['at_other_sources_threshold']['balanced_accuracy']:.3f}; adapted {b['other_sources_threshold']:.3f} BA "
              f"{b['at_other_sources_threshold']['balanced_accuracy']:.3f} (sens {b['at_other_sources_threshold']['sensitivity']:.3f}, "
              f"spec {b['at_other_sources_threshold']['specificity']:.3f})")
    # The adapted calls at each source's cross-fitted threshold, as scores whose 0.5 is that threshold,
    # against the plain model at 0.5 (the bundle's rule): pooled, and the paired slide bootstrap.
    cut = table["fold"].map({k: result["cross_fitted"]["adapted"][name]["other_sources_threshold"] for k, name in enumerate(held)})
    table["p_adapted_calls"] = (table["p_adapted"] - cut + 0.5).clip(0, 1)
    groups = pd.read_csv(args.run / "oof_predictions.csv", usecols=["path", "group"])
    base = table.merge(groups, on="path").assign(p_atypical=lambda t: t["p_plain"])
    run = table.assign(p_atypical=table["p_adapted_calls"])
    y = table["label"].to_numpy()
    result["pooled"] = {"plain_at_0.5": {m: binary_metrics(y, table["p_plain"].to_numpy(), 0.5)[m] for m in KEYS},
                        "adapted_at_cross_fitted": {m: binary_metrics(y, table["p_adapted_calls"].to_numpy(), 0.5)[m] for m in KEYS},
                        "paired_bootstrap_adapted_minus_plain": paired_bootstrap(base, run)}
    boot = result["pooled"]["paired_bootstrap_adapted_minus_plain"]
    print(f"pooled BA plain at 0.5 {result['pooled']['plain_at_0.5']['balanced_accuracy']:.4f}, adapted at the cross-fitted "
          f"thresholds {result['pooled']['adapted_at_cross_fitted']['balanced_accuracy']:.4f}: {boot['difference']:+.4f} "
          f"[{boot['ci95'][0]:+.4f}, {boot['ci95'][1]:+.4f}]")
    write_csv(args.out / "oof_adapted.csv", table)
    write_json(args.out / "summary.json", result)
    return result


if __name__ == "__main__":
    main()
