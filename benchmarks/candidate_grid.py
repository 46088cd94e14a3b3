"""The candidate finder on every pixel vs on the 0.5 um grid (``candidates.grid_um``), beside the
detector's bare forward on the same tiles' patches: what the reading thread costs next to the network.

Each side processes every tissue tile of the slides as ``analyze`` reads them (tile + margin):
the finder (haematoxylin density, peaks, patches) at ``grid_um`` 0 and 0.5, and the candidates
detector's network alone on the grid side's patches. Rotating rounds after a warm-up; one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/candidate_grid.py --slides runs/det/slides-fold0 \\
        --model runs/det/detector --out benchmarks/results/candidate-grid
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
import time
from pathlib import Path

from _timing import Side, compare, cpu_line, markdown_table  # benchmarks/ is on the path when run as a script
from mitotype._io import write_json
from mitotype.data.slides import open_slide
from mitotype.inference.detect import Detector, iter_inputs
from mitotype.workflows.slide import AnalyzeOptions, plan_tiles


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="a candidates detector (model folder or run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    det = Detector.load(args.model, device="cpu", backend="auto")
    sources = [open_slide(path) for _, path in iter_inputs(args.slides)]
    plans = [(s, s.size_at(det.mpp), plan_tiles(s, det, AnalyzeOptions(), "slide").kept) for s in sources]
    n_tiles = sum(len(kept) for _, _, kept in plans)

    def finder(grid_um: float) -> float:
        det.candidates = dataclasses.replace(det.candidates, grid_um=grid_um)
        tic = time.perf_counter()
        for source, size, kept in plans:
            for t in kept:
                det.read_tile(source, t, size)
        return time.perf_counter() - tic

    det.candidates = dataclasses.replace(det.candidates, grid_um=0.5)
    batches = [b for source, size, kept in plans for t in kept for b in det.network_inputs(det.read_tile(source, t, size))]

    def bare() -> float:
        tic = time.perf_counter()
        for b in batches:
            det.bare_forward(b)
        return time.perf_counter() - tic

    timed = compare([Side("detector bare forward (its patches)", bare, n_tiles), Side("candidate finder, every pixel", lambda: finder(0.0), n_tiles),
                     Side("candidate finder, 0.5 um grid", lambda: finder(0.5), n_tiles)], args.rounds)
    print(cpu_line())
    print(markdown_table(timed, unit="tiles/s"))
    result = {"cpu": cpu_line(), "slides": len(sources), "tiles": n_tiles, "patches": sum(len(b) for b in batches),
              "sides": [{"name": t.name, "seconds": t.seconds, "tiles_per_s_median": t.rate} for t in timed],
              "command": "benchmarks/candidate_grid.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for s in sources:
        s.close()
    write_json(args.out / "summary.json", result)
    return result


if __name__ == "__main__":
    main()
