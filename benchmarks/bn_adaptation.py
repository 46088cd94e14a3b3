"""Issue 21's test-time adaptation lever on the leave-one-source-out proxy: each fold model of a
``cv --group-by`` run scores its held-out source with and without BatchNorm statistics re-estimated
on that source's patches (``Ensemble.adapt_batchnorm``, what ``predict --adapt-bn`` does), at the
source's own atypical share and at 10% and 22% (held-out patches subsampled, seeded), since BN
adaptation is known to break when the class prior moves.

    .venv/bin/python benchmarks/bn_adaptation.py runs/lite0-crop64-loso --out benchmarks/results/e4-loso-bn-adaptation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype._io import write_json
from mitotype.data.images import decode_all
from mitotype.evaluation.metrics import binary_metrics
from mitotype.models.ensemble import INFERENCE_BATCH, Ensemble

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
            got = {"n": int(len(keep)), "atypical_share": float(y.mean()),
                   "plain": {m: binary_metrics(y, p0, 0.5)[m] for m in KEYS}, "adapted": {m: binary_metrics(y, p1, 0.5)[m] for m in KEYS}}
            result["sources"].setdefault(name, {})[label] = got
            a, b = got["plain"], got["adapted"]
            print(f"{name:30s} share {got['atypical_share']:.2f} (n {got['n']:4d}): BA {a['balanced_accuracy']:.3f} -> "
                  f"{b['balanced_accuracy']:.3f}, sens {a['sensitivity']:.3f} -> {b['sensitivity']:.3f}, "
                  f"spec {a['specificity']:.3f} -> {b['specificity']:.3f}, AUROC {a['roc_auc']:.3f} -> {b['roc_auc']:.3f}", flush=True)
    write_json(args.out / "summary.json", result)
    return result


if __name__ == "__main__":
    main()
