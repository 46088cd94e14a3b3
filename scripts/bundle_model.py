"""Make the bundled model from a finished cv run of the default recipe (developers only).

    .venv/bin/python scripts/bundle_model.py runs/NAME [--domain-run runs/NAME-loso] [--oof-thresholds] [--data ../shared/data/ami-br-train]

Writes src/mitotype/bundled/ (fold_*/model.{safetensors,json} in float16, bundle.json) and prints
its size and the largest change in p_atypical that halving the weights causes on the training
patches (measured on --data, first 512 patches).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mitotype.data.images import decode_all
from mitotype.data.readers import read_dataset
from mitotype.workflows.bundle import bundle_run, half_precision_gap

OUT = Path(__file__).resolve().parents[1] / "src" / "mitotype" / "bundled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="cv run directory (fold_*/ models + summary.json)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ami-br-train"), help="patches for the half-precision check")
    parser.add_argument("--command", default="", help="the command that trained the run (recorded in bundle.json)")
    parser.add_argument("--domain-run", type=Path, default=None, help="the recipe's leave-one-source-out cv run (--group-by)")
    parser.add_argument("--oof-thresholds", action="store_true",
                        help="each fold model's threshold: the best on the other folds' out-of-fold predictions (instead of the stored one)")
    args = parser.parse_args()
    info = bundle_run(args.run, OUT, command=args.command, domain_run=args.domain_run, oof_thresholds=args.oof_thresholds)
    paths = read_dataset(args.data).manifest["path"].tolist()[:512]
    store, _ = decode_all(paths, 128)
    gap = half_precision_gap(args.run, OUT, store.batch(np.arange(len(paths))))
    print(f"bundled {info['folds']} fold model(s) of {args.run} ({info['recipe']}) -> {OUT}: {info['bytes'] / 2**20:.1f} MiB, "
          f"float16 weights change p_atypical by at most {gap:.2e} on {len(paths)} patches")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
