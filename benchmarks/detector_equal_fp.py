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
        m = match_detections(pd.read_csv(run / "detections.csv"), truth, radius_px=MATCH_RADIUS_UM / args.mpp)
        order = np.argsort(-m["score"].to_numpy(), kind="stable")
        hit = m["match"].to_numpy()[order] >= 0
        tp, fp = np.cumsum(hit), np.cumsum(~hit)
        runs[run.name] = {f"recall_at_fp_per_mm2_{r:g}": float(tp[np.flatnonzero(fp / area <= r)[-1]] / len(truth)) for r in RATES}
        print(run.name, {k: round(v, 3) for k, v in runs[run.name].items()})
    summary = {"mosaics": str(args.mosaics), "figures": len(truth), "figure_free_area_mm2": area, "runs": runs,
               "command": "benchmarks/detector_equal_fp.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
