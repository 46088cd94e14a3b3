"""Detectors compared at equal false positives: recall when at most R false positives per mm² of
figure-free tissue are allowed, from each run's ``detections.csv`` (``detect_mosaics.py``, score floor
0.05) on the same mosaics. The MitDet switches (DGSB, UnSA, InCDP) are compared this way.

    .venv/bin/python benchmarks/detector_equal_fp.py --mosaics runs/det/mosaic-fold0-seed1 \\
        --runs benchmarks/results/detector-mosaics benchmarks/results/detector-dgsb --out benchmarks/results/detector-equal-fp
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype._io import write_json
from mitotype.evaluation.detection import MATCH_RADIUS_UM, match_detections

RATES = (2.0, 4.0, 6.6)


def recall_at_fp(detections: pd.DataFrame, truth: pd.DataFrame, *, area_mm2: float, radius_px: float,
                 rates: tuple[float, ...] = RATES) -> dict[str, float]:
    """Recall at the lowest score floor that keeps false positives at or below each rate (per mm² of
    figure-free tissue), matching once at the lowest floor: greedy matching by score is the same at
    every higher floor for the detections that remain."""
    m = match_detections(detections, truth, radius_px=radius_px)
    order = np.argsort(-m["score"].to_numpy(), kind="stable")
    hit = m["match"].to_numpy()[order] >= 0
    tp, fp = np.cumsum(np.r_[False, hit]), np.cumsum(np.r_[False, ~hit])  # from "nothing kept": a rate the first FP passes gives 0
    return {f"recall_at_fp_per_mm2_{r:g}": float(tp[np.flatnonzero(fp / area_mm2 <= r)[-1]] / len(truth)) for r in rates}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mosaics", type=Path, required=True)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    truth = pd.read_csv(args.mosaics / "truth.csv", keep_default_na=False)
    area = json.loads((args.mosaics / "mosaics.json").read_text())["figure_free_area_mm2"]
    runs = {}
    for run in args.runs:
        runs[run.name] = recall_at_fp(pd.read_csv(run / "detections.csv"), truth, area_mm2=area, radius_px=MATCH_RADIUS_UM / args.mpp)
        print(run.name, {k: round(v, 3) for k, v in runs[run.name].items()})
    summary = {"mosaics": str(args.mosaics), "figures": len(truth), "figure_free_area_mm2": area, "runs": runs,
               "command": "benchmarks/detector_equal_fp.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
