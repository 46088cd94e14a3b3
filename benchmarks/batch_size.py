"""The bare PyTorch forward of a model per inference batch size, with and without the allocator
change (``tune_allocator``): why ``INFERENCE_BATCH`` is 32 and why the allocator is tuned.

The allocator setting is process-wide, so each setting runs in its own process; inside one, each
batch size runs on the same random patches, warmed up once, median of ``--rounds``.

    .venv/bin/python benchmarks/batch_size.py [--model src/mitotype/bundled] [--n 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from _timing import cpu_line

SIZES = (16, 32, 64, 128)


def child(model: Path, n: int, rounds: int, tuned: bool) -> dict[str, float]:
    """Patches/s per batch size in this process (run as ``--child``)."""
    import torch

    from mitotype.models import ensemble as ens

    if not tuned:
        ens._ALLOCATOR_TUNED = True  # pretend: the Ensemble then leaves glibc's defaults alone
    model_ = ens.Ensemble.load(model, device="cpu")
    x = torch.randint(0, 256, (n, model_.patch_size, model_.patch_size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rates = {}
    for size in SIZES:
        model_.p_atypical(x[:size])
        times = []
        for _ in range(rounds):
            tic = time.perf_counter()
            for s in range(0, n, size):
                model_.p_atypical(x[s : s + size])
            times.append(time.perf_counter() - tic)
        rates[str(size)] = n / median(times)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "mitotype" / "bundled")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=("tuned", "plain"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.n, args.rounds, args.child == "tuned")))
        return
    got = {}
    for mode in ("plain", "tuned"):
        run = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--n", str(args.n), "--rounds", str(args.rounds),
                              "--child", mode], capture_output=True, text=True, check=True)
        got[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{cpu_line()}\nbare PyTorch forward of {args.model}, {args.n} patches, median of {args.rounds} rounds (patches/s):")
    print("| batch | glibc defaults | allocator tuned |\n| --- | --- | --- |")
    for size in SIZES:
        print(f"| {size} | {got['plain'][str(size)]:.1f} | {got['tuned'][str(size)]:.1f} |")


if __name__ == "__main__":
    main()
