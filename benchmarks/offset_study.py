"""How far off centre can a detection be before the chained classifier suffers? (issue 19)

The bundled classifier looks at the central 64 px of a patch, so a detection 20-30 px from the
figure's centre shows it half a figure. Each fold model of the bundle scores its own held-out fold
(the split remade as ``bundle_oof.py`` does) with every patch shifted by 0, 5, 10, 20 and 30 px in
a random direction (seeded; the same directions for every model). A shift of up to 32 px keeps the
64 px view inside the 128 px patch, so the view holds real pixels only. Pooled balanced accuracy at
the bundle's threshold, sensitivity and specificity per offset go to ``summary.json``; the detector's
own offsets (how far its detections lie from the true centres on the mosaics) are in its results.

    .venv/bin/python benchmarks/offset_study.py [--model DIR] --out benchmarks/results/offset-study
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _patches import DEFAULT_DATA  # benchmarks/ is on the path when run as a script
from _timing import cpu_line
from mitotype._io import write_csv, write_json
from mitotype.config import load_config
from mitotype.data.candidates import padded_crop
from mitotype.data.dataset import learnable, load_dataset
from mitotype.data.splits import grouped_folds
from mitotype.evaluation.metrics import binary_metrics
from mitotype.inference.runtime import load_scorer
from mitotype.models.artifact import model_dirs
from mitotype.models.bundled import bundle_info, bundled_model_dir

OFFSETS = (0, 5, 10, 20, 30)


def shifted(batch: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Each patch re-centred on (c + dx, c + dy): the figure lands (dx, dy) px from the centre."""
    c = batch.shape[1] // 2
    return np.stack([padded_crop(img, c + x, c + y, batch.shape[1]) for img, x, y in zip(batch, dx, dy)])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", type=Path, default=None, help="A cv run or bundle (default: the bundled classifier).")
    ap.add_argument("--folds", type=int, default=None)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    folder = args.model or bundled_model_dir()
    info = bundle_info() if args.model is None else {}
    recipe, k = args.recipe or info.get("recipe"), args.folds or info.get("folds", 5)
    cfg = load_config(recipe)
    data = learnable(load_dataset(args.data, cfg))
    fold_of = grouped_folds(data.manifest, k, cfg.data.split_seed, cfg.data.stratify)
    y = data.manifest["label"].to_numpy()
    angle = np.random.default_rng(args.seed).uniform(0, 2 * np.pi, len(y))
    p = {d: np.full(len(y), np.nan) for d in OFFSETS}
    threshold = []
    for fold, member in enumerate(model_dirs(folder)):
        ensemble, scorer = load_scorer(member, device="cpu", backend=args.backend)
        threshold.append(ensemble.threshold)
        rows = np.flatnonzero(fold_of == fold)
        for s in range(0, len(rows), 64):
            idx = rows[s:s + 64]
            batch = data.store.batch(idx).numpy()
            for d in OFFSETS:
                dx, dy = np.round(d * np.cos(angle[idx])), np.round(d * np.sin(angle[idx]))
                p[d][idx] = scorer.p_atypical(shifted(batch, dx, dy) if d else batch)
        print(f"fold {fold}: {len(rows)} patches", flush=True)
    t = float(np.mean(threshold))
    per_offset = {}
    for d in OFFSETS:
        m = binary_metrics(y, p[d], t)
        per_offset[str(d)] = {name: m[name] for name in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")}
        print(f"offset {d:2d} px ({d * 0.25:.2f} um): BA {m['balanced_accuracy']:.3f}, AUROC {m['roc_auc']:.3f}, "
              f"sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}")
    write_csv(args.out / "oof_predictions.csv", data.manifest[["path", "label", "group", "domain"]].assign(
        fold=fold_of, angle=angle, **{f"p_offset_{d}": p[d] for d in OFFSETS}))
    summary = {"model": str(folder), "recipe": recipe, "folds": k, "threshold": t, "n": int(len(y)), "offsets_px": list(OFFSETS),
               "mpp": 0.25, "per_offset": per_offset, "seed": args.seed, "backend": args.backend, "cpu": cpu_line(),
               "command": "benchmarks/offset_study.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
