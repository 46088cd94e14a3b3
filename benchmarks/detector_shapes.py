"""The two detector shapes of issue 19 side by side on the same held-out mosaics: haematoxylin
candidates + a lite0 patch classifier (``detector-lite0``, the bundled detector) against a dense
heat map on the lite0 backbone (``detector-heatmap-lite0``).

For each ``--models NAME=PATH[@BACKEND]`` it runs ``detect``'s pipeline (:func:`detect_many`, as the command
runs it, each detector's default backend unless ``--backend``) over every mosaic with a low score
floor, then reports, from those detections:

- precision, recall, F1 and false positives per mm² of figure-free tissue at the detector's own
  threshold (chosen on training-fold mosaics, never on these), and the F1-maximising ones for reference;
- how far the matched detections at the threshold lie from the annotated centres (median, p90 in
  px: a chained classifier sees the central 64 px, flat to about 10 px off centre);
- recall at equal false positives: at most 2, 4 and 6.6 per mm² of figure-free tissue
  (:func:`detector_equal_fp.recall_at_fp`);
- CPU seconds per mm² (process CPU time, so a reading thread counts too) over ``--speed-images``
  mosaics, all detectors in the same process, warmed up, in ``--rounds`` rounds whose order rotates
  (``_timing.compare``);

and writes ``summary.json`` and ``per_image.csv`` (TP / FP / FN per image and detector at its threshold).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detector_shapes.py --mosaics runs/det/mosaic-fold0-seed1 \\
        --models candidates=src/mitotype/bundled_detector heatmap=runs/heatmap --out benchmarks/results/detector-heatmap
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype._io import write_csv, write_json
from mitotype.evaluation.detection import MATCH_RADIUS_UM, best_f1_threshold, detection_counts, match_detections
from mitotype.inference.detect import Detector

sys.path.insert(0, str(Path(__file__).parent))
from _timing import Side, compare, cpu_line
from detect_mosaics import _areas, run_detector
from detector_equal_fp import recall_at_fp


def cpu_seconds(det: Detector, folder: Path, names: list[str]) -> float:
    """Process CPU seconds for ``detect``'s pipeline over ``names`` at the detector's threshold."""
    start = time.process_time()
    run_detector(det, folder, names, det.threshold)
    return time.process_time() - start


def offsets(table: pd.DataFrame, truth: pd.DataFrame, threshold: float, radius: float) -> dict[str, float]:
    """Median and 90th percentile distance (px) of the detections matched at ``threshold`` to their figure."""
    hits = match_detections(table[table["score"] >= threshold], truth, radius_px=radius)
    hits = hits[hits["match"] >= 0]
    true = truth.iloc[hits["match"].to_numpy()]
    d = np.hypot(hits["x"].to_numpy() - true["x"].to_numpy(), hits["y"].to_numpy() - true["y"].to_numpy())
    return {"median": float(np.median(d)), "p90": float(np.percentile(d, 90))} if len(d) else {}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mosaics", type=Path, required=True)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=PATH[@BACKEND] of each detector (default backend: --backend)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--floor", type=float, default=0.05)
    ap.add_argument("--images", type=int, default=0, help="only the first N mosaics (0: all)")
    ap.add_argument("--speed-images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    truth = pd.read_csv(args.mosaics / "truth.csv", keep_default_na=False)
    info = json.loads((args.mosaics / "mosaics.json").read_text())
    names = sorted(set(truth["image"]) | {p.name for p in args.mosaics.glob("mosaic_*.png")})
    names = names[: args.images] if args.images else names
    truth = truth[truth["image"].isin(names)].reset_index(drop=True)
    free = sum(_areas(info, "figure_free_area_mm2", names).values())
    paths = dict(item.split("=", 1) for item in args.models)
    detectors = {name: Detector.load(Path(path.split("@")[0]), device="cpu", backend=path.split("@")[1] if "@" in path else args.backend)
                 for name, path in paths.items()}
    results, per_image = {}, []
    for name, det in detectors.items():
        radius = MATCH_RADIUS_UM / det.mpp
        table, seconds = run_detector(det, args.mosaics, names, args.floor)
        counts = detection_counts(table, truth, radius_px=radius, threshold=det.threshold)
        at = counts["pooled"]
        best_t, best = best_f1_threshold(table, truth, radius_px=radius)
        results[name] = {
            "model": paths[name], "kind": type(det).__name__, "backend": det.scorer.name,
            "threshold": det.threshold, "at_threshold": {**at, "fp_per_mm2_figure_free": at["fp"] / free},
            "best_f1": {**best["pooled"], "threshold": best_t, "fp_per_mm2_figure_free": best["pooled"]["fp"] / free},
            **recall_at_fp(table, truth, area_mm2=free, radius_px=radius), "matched_offset_px": offsets(table, truth, det.threshold, radius),
            "detect_seconds_all_images": seconds,
        }
        per_image += [{"detector": name, "image": image, **c} for image, c in counts["per_image"].items()]
        print(f"{name}: at {det.threshold:.3f} P {at['precision']:.3f} R {at['recall']:.3f} F1 {at['f1']:.3f} "
              f"({at['fp'] / free:.1f} FP/mm²); offset {results[name]['matched_offset_px'].get('median', -1):.1f} px; recall at <= 2/4/6.6 FP/mm² "
              + " / ".join(f"{v:.3f}" for k, v in results[name].items() if k.startswith("recall_at")), flush=True)
    speed = names[: args.speed_images]
    area = sum(_areas(info, "area_mm2", speed).values())
    sides = [Side(name, lambda det=det: cpu_seconds(det, args.mosaics, speed), len(speed)) for name, det in detectors.items()]
    for timed in compare(sides, args.rounds):
        cpu = sorted(timed.seconds)
        results[timed.name]["cpu_seconds_per_mm2"] = {"median": cpu[len(cpu) // 2] / area, "min": cpu[0] / area, "max": cpu[-1] / area}
        print(f"{timed.name}: {cpu[len(cpu) // 2] / area:.1f} CPU s per mm² [{cpu[0] / area:.1f}-{cpu[-1] / area:.1f}]")
    summary = {"mosaics": str(args.mosaics), "images": len(names), "figures": int(len(truth)), "figure_free_area_mm2": free,
               "speed_images": len(speed), "speed_area_mm2": area, "rounds": args.rounds, "floor": args.floor, "detectors": results,
               "cpu": cpu_line(), "command": "benchmarks/detector_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(summary["cpu"])
    write_csv(args.out / "per_image.csv", pd.DataFrame(per_image))
    write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
