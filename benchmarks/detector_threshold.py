"""The bundled detector's threshold, chosen without held-out data: the F1-maximising score on
mosaics of its own training folds (``--mosaics``, e.g. ``data mosaic --exclude-fold 0``).

Those figures were seen in training, so their scores run high; the look-alikes mostly were not
(a training set keeps 4 per figure of about a hundred candidates), so the false positives there
are nearly honest. The held-out figures (``detect_mosaics.py``) are reported at this threshold.

    .venv/bin/python benchmarks/detector_threshold.py --model runs/det/detector --mosaics runs/det/mosaic-train \\
        --images 60 --out benchmarks/results/detector-threshold [--write-card]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from mitotype._io import write_json
from mitotype.evaluation.detection import MATCH_RADIUS_UM, best_f1_threshold
from mitotype.inference.detect import Detector
from mitotype.models.artifact import set_card_threshold

sys.path.insert(0, str(Path(__file__).parent))
from detect_mosaics import run_detector
from _timing import cpu_line


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--mosaics", type=Path, required=True)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--write-card", action="store_true", help="store the threshold in the model's card")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    det = Detector.load(args.model, device="cpu")
    truth = pd.read_csv(args.mosaics / "truth.csv", keep_default_na=False)
    names = sorted(truth["image"].unique())[:args.images]
    table, seconds = run_detector(det, args.mosaics, names, 0.05)
    t, counts = best_f1_threshold(table, truth[truth["image"].isin(names)], radius_px=MATCH_RADIUS_UM / det.mpp)
    best = counts["pooled"]
    summary = {"model": str(args.model), "mosaics": str(args.mosaics), "images": len(names), "threshold": t, "at_threshold": best,
               "seconds": seconds, "cpu": cpu_line(), "command": "benchmarks/detector_threshold.py " + " ".join(argv or sys.argv[1:])}
    print(f"F1-maximising threshold on {len(names)} training-fold mosaics: {t:.3f} (F1 {best['f1']:.3f}, precision "
          f"{best['precision']:.3f}, recall {best['recall']:.3f})")
    if args.write_card:
        set_card_threshold(args.model, t, "F1-maximising on training-fold mosaics (benchmarks/detector_threshold.py)")
    write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
