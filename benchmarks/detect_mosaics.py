"""The detector on mosaics of held-out-fold patches (issue 19): matching figures, chaining, throughput.

On a mosaic folder (``mitotype data mosaic PATCHES OUT --fold F``: truth.csv, mosaics.json) this
runs the detector over every image through :func:`mitotype.inference.detect.detect_many` (tiles,
candidates, scores, suppression: what ``mitotype detect`` runs) with a low score floor, then reports

- pooled precision, recall and F1 at the detector's threshold and at the F1-maximising one, and
  false positives per mm² of figure-free tissue (image area less a 7.5 um disc around each figure);
- how far matched detections lie from the true centres (the chained classifier's offset);
- the chained classifier (``--classifier``, e.g. the bundle's fold model that never saw fold F) on the
  matched figures, through the points path at each detection, beside the same model on the original
  patches of those figures (the patch path): balanced accuracy of both;
- throughput: ``detect`` end to end vs the detector's bare forward on the same candidate patches
  (the same backend and batch), in mm² per minute, median and spread over ``--repeats`` rounds.

    .venv/bin/python benchmarks/detect_mosaics.py --model runs/det/detector --mosaics runs/det/mosaic-fold0 \\
        --classifier src/mitotype/bundled/fold_0 --out benchmarks/results/detector-mosaics
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mitotype._io import write_csv, write_json
from mitotype.data.slides import PlainSource
from mitotype.evaluation.detection import MATCH_RADIUS_UM, best_f1_threshold, detection_counts, match_detections
from mitotype.evaluation.metrics import binary_metrics
from mitotype.inference.detect import TILE, Detector, classify_detections, detect_many, detection_tiles
from mitotype.inference.runtime import load_scorer

sys.path.insert(0, str(Path(__file__).parent))
from _timing import cpu_line


def run_detector(det: Detector, folder: Path, names: list[str], floor: float) -> tuple[pd.DataFrame, float]:
    """``detect``'s pipeline over the images (:func:`detect_many`, as the command runs it)."""
    start = time.perf_counter()
    jobs = [(name, partial(PlainSource, folder / name, det.mpp), True) for name in names]
    found = [table.assign(image=name) for name, table in detect_many(det, jobs, min_score=floor)]
    return pd.concat(found, ignore_index=True)[["image", "x", "y", "score"]], time.perf_counter() - start


def bare_forward(det: Detector, folder: Path, names: list[str]) -> float:
    """Seconds for the detector's network alone on what ``detect`` runs it on for ``names`` (its tiles
    read beforehand: the candidates' patches, or a heat map's padded tiles)."""
    batches = []
    for name in names:
        source = PlainSource(folder / name, det.mpp)
        size = source.size_at(det.mpp)
        for t in detection_tiles(size, tile=TILE):
            batches += det.network_inputs(det.read_tile(source, t, size))
        source.close()
    start = time.perf_counter()
    for b in batches:
        det.bare_forward(b)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--mosaics", type=Path, required=True)
    ap.add_argument("--classifier", type=Path, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--floor", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speed-images", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    det = Detector.load(args.model, device="cpu", backend=args.backend)
    truth = pd.read_csv(args.mosaics / "truth.csv", keep_default_na=False)
    info = json.loads((args.mosaics / "mosaics.json").read_text())
    names = sorted(set(truth["image"]) | {p.name for p in args.mosaics.glob("mosaic_*.png")})
    radius = MATCH_RADIUS_UM / det.mpp
    table, seconds = run_detector(det, args.mosaics, names, args.floor)
    at = detection_counts(table, truth, radius_px=radius, threshold=det.threshold)["pooled"]
    best_t, best_counts = best_f1_threshold(table, truth, radius_px=radius)
    best = best_counts["pooled"]
    area = sum(v for v in _areas(info, "figure_free_area_mm2", names).values())
    total_area = sum(_areas(info, "area_mm2", names).values())
    kept = table[table["score"] >= det.threshold]
    matched = match_detections(kept, truth, radius_px=radius)
    hits = matched[matched["match"] >= 0]
    t_rows = truth.iloc[hits["match"].to_numpy()] if len(hits) else truth.iloc[:0]
    offset = np.hypot(hits["x"].to_numpy() - t_rows["x"].to_numpy(), hits["y"].to_numpy() - t_rows["y"].to_numpy())
    summary = {
        "model": str(args.model), "mosaics": str(args.mosaics), "images": len(names), "figures": int(len(truth)),
        "area_mm2": total_area, "figure_free_area_mm2": area, "detector_threshold": det.threshold, "floor": args.floor,
        "at_threshold": {**at, "fp_per_mm2_figure_free": at["fp"] / area},
        "best_f1": {**best, "threshold": best_t, "fp_per_mm2_figure_free": best["fp"] / area},
        "matched_offset_px": {"median": float(np.median(offset)) if len(offset) else None,
                              "p90": float(np.percentile(offset, 90)) if len(offset) else None,
                              "share_within_10px": float(np.mean(offset <= 10)) if len(offset) else None},
        "detect_seconds_all_images": seconds, "backend": det.scorer.name, "cpu": cpu_line(),
        "command": "benchmarks/detect_mosaics.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"{len(names)} images, {len(truth)} figures: at {det.threshold:.3f} precision {at['precision']:.3f} recall {at['recall']:.3f} "
          f"F1 {at['f1']:.3f} ({at['fp'] / area:.1f} FP/mm² figure-free); best F1 {best['f1']:.3f} at {best_t:.3f}; "
          f"median offset {summary['matched_offset_px']['median']}", flush=True)
    if args.classifier is not None:
        summary["chained"] = chained(args, hits, t_rows, truth)
    summary["throughput"] = throughput(det, args.mosaics, names[:args.speed_images], args.repeats, info)
    write_csv(args.out / "detections.csv", table)
    write_json(args.out / "summary.json", summary)
    return summary


def _areas(info: dict, key: str, names: list[str]) -> dict[str, float]:
    per = {im["image"]: im[key] for im in info["per_image"]}
    return {n: float(per[n]) for n in names}


def chained(args: argparse.Namespace, hits: pd.DataFrame, t_rows: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """The classifier at each matched detection (points path) vs on the figure's own patch (patch path)."""
    ensemble, scorer = load_scorer(args.classifier, device="cpu", backend=args.backend)
    y = (t_rows["label"].to_numpy() == "atypical").astype(int)
    dets = hits[["image", "x", "y", "score"]].reset_index(drop=True)
    paths = {n: str(args.mosaics / n) for n in dets["image"].unique()}
    p_chain = classify_detections(dets, paths, ensemble, scorer)["p_atypical"].to_numpy()
    src_col = next(c for c in ("source", "source_path", "path") if c in truth.columns)
    p_patch = np.concatenate([scorer.p_atypical(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in chunk]))
                              for chunk in np.array_split(t_rows[src_col].to_numpy(), max(1, len(t_rows) // 32))])
    a, b = (binary_metrics(y, p, ensemble.threshold) for p in (p_chain, p_patch))
    pick = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")
    out = {"classifier": str(args.classifier), "n_matched": int(len(y)), "n_atypical": int(y.sum()),
           "points_path_at_detections": {k: a[k] for k in pick}, "patch_path_same_figures": {k: b[k] for k in pick},
           "ba_difference": a["balanced_accuracy"] - b["balanced_accuracy"]}
    print(f"chained classifier on {len(y)} matched figures: BA {a['balanced_accuracy']:.3f} vs patch path {b['balanced_accuracy']:.3f}")
    return out


def throughput(det: Detector, folder: Path, names: list[str], repeats: int, info: dict) -> dict:
    area = sum(_areas(info, "area_mm2", names).values())
    end_to_end, bare = [], []
    for _ in range(repeats):
        end_to_end.append(run_detector(det, folder, names, det.threshold)[1])
        bare.append(bare_forward(det, folder, names))
    e, b = np.array(end_to_end), np.array(bare)
    ratio = b / e
    out = {"images": len(names), "area_mm2": area, "repeats": repeats,
           "detect_mm2_per_min": {"median": float(np.median(area / e * 60)), "min": float(np.min(area / e * 60)), "max": float(np.max(area / e * 60))},
           "bare_forward_mm2_per_min": {"median": float(np.median(area / b * 60)), "min": float(np.min(area / b * 60)), "max": float(np.max(area / b * 60))},
           "detect_over_bare": {"median": float(np.median(ratio)), "min": float(np.min(ratio)), "max": float(np.max(ratio))}}
    print(f"throughput on {len(names)} images ({area:.3f} mm²): detect {out['detect_mm2_per_min']['median']:.2f} mm²/min, bare forward "
          f"{out['bare_forward_mm2_per_min']['median']:.2f} mm²/min, ratio {out['detect_over_bare']['median']:.2f} "
          f"[{out['detect_over_bare']['min']:.2f}-{out['detect_over_bare']['max']:.2f}]")
    return out


if __name__ == "__main__":
    main()
