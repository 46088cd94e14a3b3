"""``mitotype analyze`` against the truth of synthetic slides, beside ``mitotype detect`` on the same pixels.

Both run with the same detector (and classifier) on the slides of a folder written by
``benchmarks/synthetic_slides.py`` (its ``truth.csv``); each one's figures are matched one-to-one to
the true figures within 7.5 um (MIDOG's rule, greedy by score: ``evaluation.detection``). The issue
asks: analyze's recall and precision equal detect's within 0.01 (the tissue mask, the tile
selection and the rest of analyze lose nothing), on at least 200 figures, and its count within 20%
of the true count. With truth labels (mosaics of labelled patches), the atypical counts are compared
too. Writes ``summary.json`` to ``--out``.

    .venv/bin/python benchmarks/analyze_accuracy.py --slides build/slides --model DETECTOR [--classifier bundled] \\
        --out benchmarks/results/analyze-accuracy
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from _timing import cpu_line  # benchmarks/ is on the path when run as a script
from mitotype._io import write_json
from mitotype.evaluation.detection import detection_counts
from mitotype.models.bundled import bundled_model_dir
from mitotype.workflows.analyze import analyze, slide_dirs
from mitotype.workflows.detect import detect
from mitotype.workflows.slide import AnalyzeOptions

MATCH_UM = 7.5


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=Path, required=True, help="folder of slides with truth.csv (image, x, y[, label])")
    ap.add_argument("--model", type=Path, required=True, help="the detector (model folder or cv run)")
    ap.add_argument("--classifier", default="bundled", help="'bundled', a model folder or cv run, or 'none'")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--threshold", type=float, default=None, help="detection threshold (default: the detector's)")
    ap.add_argument("--tissue-mask", default="otsu")
    ap.add_argument("--out", type=Path, required=True, help="results folder: summary.json")
    args = ap.parse_args(argv)

    classifier = None if args.classifier == "none" else bundled_model_dir() if args.classifier == "bundled" else Path(args.classifier)
    truth = pd.read_csv(args.slides / "truth.csv")
    scratch = Path(tempfile.mkdtemp(prefix="analyze-accuracy-"))
    try:
        table = analyze(args.slides, scratch / "analyze", model=args.model, classifier=classifier, backend=args.backend,
                        threshold=args.threshold, options=AnalyzeOptions(tissue=args.tissue_mask, tile=args.tile), workers=1)
        if (table["error"] != "").any():
            raise SystemExit(f"analyze failed on: {table.loc[table['error'] != '', ['slide', 'error']].to_dict('records')}")
        dirs = slide_dirs(table["slide"])
        ours = pd.concat([pd.read_csv(scratch / "analyze" / dirs[s] / "figures.csv").assign(image=s) for s in table["slide"]],
                         ignore_index=True)
        theirs = detect(args.model, args.slides, scratch / "detect.csv", classifier=classifier, backend=args.backend,
                        threshold=args.threshold, tile=args.tile)
        mpp = float(table["mpp"].iloc[0])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    radius = MATCH_UM / mpp
    result = {"cpu": cpu_line(), "slides": len(table), "true_figures": len(truth), "mpp": mpp, "match_um": MATCH_UM,
              "tissue_mm2": float(table["tissue_mm2"].sum()), "model": str(args.model), "classifier": str(classifier)}
    for name, found in (("analyze", ours), ("detect", theirs)):
        pooled = detection_counts(found[["image", "x", "y", "score"]], truth[["image", "x", "y"]], radius_px=radius)["pooled"]
        result[name] = {"detections": len(found), **{k: pooled[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")}}
        if "label" in truth and "label" in found:
            result[name]["atypical_called"] = int((found["label"] == "atypical").sum())
    result["true_atypical"] = int((truth["label"] == "atypical").sum()) if "label" in truth else None
    a, d = result["analyze"], result["detect"]
    result["recall_difference"] = abs(a["recall"] - d["recall"])
    result["precision_difference"] = abs(a["precision"] - d["precision"])
    result["count_vs_truth"] = a["detections"] / max(len(truth), 1)
    result["meets_issue"] = {"figures >= 200": len(truth) >= 200, "recall and precision within 0.01 of detect":
                             result["recall_difference"] <= 0.01 and result["precision_difference"] <= 0.01,
                             "count within 20%": abs(result["count_vs_truth"] - 1) <= 0.2}
    print(cpu_line())
    print(f"{len(table)} slide(s), {len(truth)} true figures, {result['tissue_mm2']:.2f} mm² of tissue")
    print("| | detections | TP | FP | FN | precision | recall | F1 |" + (" atypical called |" if "atypical_called" in a else ""))
    print("| --- |" + " --- |" * (7 + ("atypical_called" in a)))
    for name in ("analyze", "detect"):
        r = result[name]
        extra = f" {r['atypical_called']} |" if "atypical_called" in r else ""
        print(f"| {name} | {r['detections']} | {r['tp']} | {r['fp']} | {r['fn']} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['f1']:.3f} |{extra}")
    print(f"|Δ recall| {result['recall_difference']:.4f}, |Δ precision| {result['precision_difference']:.4f}; analyze's count / "
          f"true count {result['count_vs_truth']:.3f}" + (f"; true atypical {result['true_atypical']}" if result["true_atypical"] is not None else ""))
    print("meets the issue: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in result["meets_issue"].items()))
    write_json(args.out / "summary.json", result)
    print(f"→ {args.out}/summary.json")
    return result


if __name__ == "__main__":
    main()
