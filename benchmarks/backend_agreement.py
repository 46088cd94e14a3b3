"""How far each backend's calls move from PyTorch's: labels that differ and the largest |Δp| over a
patch set, for the bundled model (or ``--model``), every backend scoring the same decoded batches.

This is the figure behind "bf16 is never chosen for you": reduced precision changes some labels,
and how many depends on the CPU (AVX-512 BF16 or AMX kernels, or f32 where the CPU has neither).

    .venv/bin/python benchmarks/backend_agreement.py [--data ../shared/data/ami-br-train] --out benchmarks/results/backend-agreement
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _patches import DEFAULT_DATA  # benchmarks/ is on the path when run as a script
from _timing import cpu_line
from mitotype._io import write_json
from mitotype.data.readers import read_dataset
from mitotype.inference.quantize import score_backends
from mitotype.inference.runtime import make_backend
from mitotype.models.bundled import bundled_model_dir
from mitotype.models.ensemble import Ensemble

BACKENDS = ("torch", "onnxruntime", "openvino", "openvino-bf16")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", type=Path, default=None, help="model or cv run (default: the bundled model)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    ensemble = Ensemble.load(args.model or bundled_model_dir(), device="cpu")
    paths = read_dataset(args.data, require_labels=False).manifest["path"].tolist()
    scorers = {name: make_backend(name, ensemble) for name in BACKENDS}
    p = score_backends(scorers, paths, ensemble)
    ref = ensemble.labels(p["torch"])
    out = {"cpu": cpu_line(), "model": str(args.model or "bundled"), "n": len(paths), "threshold": ensemble.threshold, "backends": {}}
    for name in BACKENDS:
        out["backends"][name] = {"labels_differing_from_torch": int((ensemble.labels(p[name]) != ref).sum()),
                                 "max_abs_dp_vs_torch": float(np.abs(p[name] - p["torch"]).max()),
                                 "called_atypical": int(ensemble.labels(p[name]).sum())}
        print(f"{name:14s} labels differing from torch {out['backends'][name]['labels_differing_from_torch']:4d} of {len(paths)}, "
              f"max |dp| {out['backends'][name]['max_abs_dp_vs_torch']:.2e}", flush=True)
    write_json(args.out / "summary.json", out)
    return out


if __name__ == "__main__":
    main()
