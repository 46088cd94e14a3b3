"""Decoding a dataset's PNGs into the uint8 cache once, beside re-opening that cache memory-mapped.

``decode_all`` with a cache folder is what every training run and every fold starts with: the
first call decodes on a thread pool and writes a ``.npy``; later calls with unchanged files only
memory-map it. Each round decodes into a fresh temporary cache folder, then re-opens it (the
re-open must follow its decode, so the two do not rotate like the other scripts' sides).

    .venv/bin/python benchmarks/decode_speed.py [--data ../shared/data/ami-br-train] [--n 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _patches import DEFAULT_DATA, png_paths  # benchmarks/ is on the path when run as a script
from _timing import Timed, report
from mitotype.data.images import decode_all


def main(argv: list[str] | None = None) -> list[Timed]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="patch folder (default: %(default)s)")
    ap.add_argument("--n", type=int, default=0, help="patches (0: all of --data; synthetic: 512)")
    ap.add_argument("--patch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="rounds after one warm-up (each decodes into a fresh cache)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "png").mkdir()
        paths, source = png_paths(args.data, args.n or (10**9 if args.data.is_dir() else 512), args.patch_size, tmp / "png")
        decoded, reopened = [], []
        for r in range(args.rounds + 1):  # round 0 warms up (imports, page cache) and is dropped
            cache = tmp / f"cache{r}"
            tic = time.perf_counter()
            decode_all(paths, args.patch_size, cache_dir=cache)
            mid = time.perf_counter()
            decode_all(paths, args.patch_size, cache_dir=cache)
            decoded.append(mid - tic)
            reopened.append(time.perf_counter() - mid)
        n = len(paths)
        results = [Timed("decode PNGs into the cache", n, decoded[1:], [1.0] * args.rounds),
                   Timed("re-open the memory-mapped cache", n, reopened[1:], [d / o for d, o in zip(decoded[1:], reopened[1:])])]
        report(f"Decoding: {source} at {args.patch_size} px · mitotype's default decode threads", results, args.rounds, rotating=False)
        return results


if __name__ == "__main__":
    main()
