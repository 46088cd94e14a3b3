"""``mitotype analyze`` throughput: end to end vs the detector's bare forward on the same tissue tiles,
tissue mm² per minute, and slides per hour with 1 and 2 Dask workers.

The bare side is the detector network alone (the same backend, the same batches: each tissue tile's
candidates in batches of the inference batch size, as analyze scores them), on patches cut
beforehand; the end-to-end side is :func:`analyze_slide` on the same slides with the same loaded
models: thumbnail and tissue mask, tile reads and JPEG decoding, candidates, the detector, the
classifier on each figure, hotspots, the files and the report. Both count the same candidates, so
the ratio of their throughputs is analyze's efficiency (the issue asks >= 0.8). The sides
alternate, the order rotating each round (``_timing.compare``). Slides per hour run
:func:`mitotype.workflows.analyze.analyze` on the whole folder into a fresh folder with 1 worker
(in this process) and with 2 (an embedded LocalCluster of worker processes, its start-up
included), each model thread count sized to the cores as analyze sizes it.

    .venv/bin/python benchmarks/synthetic_slides.py --out build/slides --patches ... (see its header)
    .venv/bin/python benchmarks/analyze_throughput.py --slides build/slides --model DETECTOR [--classifier bundled] \\
        [--backend auto] [--rounds 3] --out benchmarks/results/analyze-throughput

Without a trained detector the numbers say nothing about a real slide (a random detector's
threshold passes arbitrary candidates); ``--model`` is required.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _timing import Side, compare, cpu_line, markdown_table  # benchmarks/ is on the path when run as a script
from mitotype._io import write_json
from mitotype.data.slides import open_slide
from mitotype.inference.detect import iter_inputs
from mitotype.models.bundled import bundled_model_dir
from mitotype.models.ensemble import INFERENCE_BATCH
from mitotype.workflows.analyze import analyze
from mitotype.workflows.slide import AnalyzeOptions, Models, ModelSpec, analyze_slide, plan_tiles


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=Path, required=True, help="a folder of slides (benchmarks/synthetic_slides.py writes some)")
    ap.add_argument("--model", type=Path, required=True, help="the detector (model folder or cv run)")
    ap.add_argument("--classifier", default="bundled", help="'bundled', a model folder or cv run, or 'none'")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--threshold", type=float, default=None, help="detection threshold (default: the detector's)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds after one warm-up of each side")
    ap.add_argument("--workers", default="1,2", help="worker counts for slides per hour (default %(default)s; empty: skip)")
    ap.add_argument("--max-patches", type=int, default=20000, help="refuse to cut more candidate patches than this (memory)")
    ap.add_argument("--out", type=Path, required=True, help="results folder: summary.json")
    args = ap.parse_args(argv)

    classifier = None if args.classifier == "none" else bundled_model_dir() if args.classifier == "bundled" else Path(args.classifier)
    spec = ModelSpec(args.model, classifier, backend=args.backend, threshold=args.threshold)
    models = Models.load(spec)
    options = AnalyzeOptions(tile=args.tile)
    slides = [path for _, path in iter_inputs(args.slides)]
    batches = candidate_batches(slides, models, options, args.max_patches)
    n = sum(len(b) for b in batches)
    print(cpu_line())
    print(f"{len(slides)} slide(s), {n} candidates in {len(batches)} batches of at most {INFERENCE_BATCH}; detector backend "
          f"{models.detector.scorer.name}" + (f", classifier backend {models.classifier[1].name}" if models.classifier else ""))
    rows: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="analyze-throughput-"))
    try:
        def bare() -> float:
            tic = time.perf_counter()
            for batch in batches:
                models.detector.bare_forward(batch)
            return time.perf_counter() - tic

        def end_to_end() -> float:
            rows.clear()
            tic = time.perf_counter()
            for i, path in enumerate(slides):
                rows.append(analyze_slide(path, scratch / "e2e" / str(i), models=models, options=options))
            return time.perf_counter() - tic

        timed = compare([Side("detector bare forward", bare, n), Side("analyze end to end", end_to_end, n)], args.rounds)
        tissue_mm2 = float(sum(r["tissue_mm2"] for r in rows))
        e2e_minutes = float(np.median(timed[1].seconds)) / 60
        per_hour = {}
        for w in [int(v) for v in args.workers.split(",") if v.strip()]:
            out = scratch / f"workers-{w}"
            tic = time.perf_counter()
            table = analyze(args.slides, out, model=args.model, classifier=classifier, options=options, backend=args.backend,
                            threshold=args.threshold, workers=w)
            seconds = time.perf_counter() - tic
            failed = int((table["error"] != "").sum())
            per_hour[str(w)] = {"seconds": round(seconds, 2), "slides": len(table), "failed": failed,
                                "slides_per_hour": round(3600 * len(table) / seconds, 1)}
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(markdown_table(timed, unit="candidates/s"))
    ratio = timed[1].rate / timed[0].rate
    print(f"\nanalyze end to end / bare forward: {ratio:.2f} (per round {min(timed[1].ratios):.2f}-{max(timed[1].ratios):.2f}); "
          f"{tissue_mm2:.2f} mm² of tissue: {tissue_mm2 / e2e_minutes:.2f} mm²/min")
    for w, r in per_hour.items():
        print(f"{w} worker(s): {r['slides']} slides in {r['seconds']:.1f} s = {r['slides_per_hour']:.1f} slides/hour"
              + (f" ({r['failed']} failed)" if r["failed"] else ""))
    summary = {
        "cpu": cpu_line(), "machine": platform.node(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "slides": [str(s) for s in slides], "model": str(args.model), "classifier": str(classifier), "backend": models.detector.scorer.name,
        "tile": args.tile, "candidates": n, "batches": len(batches), "rounds": args.rounds,
        "sides": [{"name": t.name, "items": t.items, "seconds": t.seconds, "rate_median": t.rate, "ratios": t.ratios} for t in timed],
        "end_to_end_vs_bare": ratio, "tissue_mm2": tissue_mm2, "tissue_mm2_per_min": tissue_mm2 / e2e_minutes,
        "slides_per_hour": per_hour, "command": "benchmarks/analyze_throughput.py " + " ".join(argv or []),
    }
    write_json(args.out / "summary.json", summary)
    print(f"→ {args.out}/summary.json")
    return summary


def candidate_batches(slides: list[Path], models: Models, options: AnalyzeOptions, limit: int) -> list[np.ndarray]:
    """The detector's batches over every tissue tile of ``slides``, cut as analyze cuts them (each tile
    read with the detector's margin, its candidates in batches of INFERENCE_BATCH)."""
    det = models.detector
    batches: list[np.ndarray] = []
    total = 0
    for path in slides:
        source = open_slide(path)
        try:
            size = source.size_at(det.mpp)
            for t in plan_tiles(source, det, options, path.name).kept:
                inputs = det.network_inputs(det.read_tile(source, t, size))  # exactly what analyze's network runs on
                batches += inputs
                total += sum(len(b) for b in inputs)
                if total > limit:
                    raise SystemExit(f"more than {limit} candidate patches: use fewer or smaller slides, or raise --max-patches")
        finally:
            source.close()
    return batches


if __name__ == "__main__":
    main()
