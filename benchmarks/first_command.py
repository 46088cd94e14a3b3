"""Before / after of ``mitotype predict`` end to end, as a user runs it: one process per run, wall,
user and sys seconds, on one fold's worth of the training split (fold 0 of the default grouped
5-fold split, about 600 patches).

Sides, alternating (the order rotating each round, after one warm-up of each), in one run:
- ``before torch``: ``predict --backend torch`` of an older commit (``--before-src``: the ``src/`` of
  a worktree of it, e.g. ``git worktree add /tmp/base 33067a0``), put first on ``PYTHONPATH``;
- ``torch``: ``predict --backend torch`` of this tree;
- ``default``: ``predict`` of this tree with its default backend (``auto``), the ONNX cache warm;
the first run of ``default`` with an empty cache is timed apart (it exports the graph once).
Labels of every side are compared with the ``before torch`` side's. Results go to ``--out``
(``summary.json``, one CSV of runs) so the figures survive the machine.

    .venv/bin/python benchmarks/first_command.py --before-src /tmp/base/src --out benchmarks/results/fast-by-default
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pandas as pd

from _patches import DEFAULT_DATA  # benchmarks/ is on the path when run as a script
from _timing import cpu_line
from mitotype._io import write_json, write_csv
from mitotype.config import load_config
from mitotype.data.readers import read_dataset
from mitotype.data.splits import grouped_folds


def fold_patches(data: Path, folder: Path, fold: int = 0) -> int:
    """Links to fold ``fold``'s patches (default recipe's grouped 5-fold split) in a flat ``folder``."""
    manifest = read_dataset(data).manifest
    cfg = load_config(None)
    fold_of = grouped_folds(manifest, 5, cfg.data.split_seed, cfg.data.stratify)
    folder.mkdir(parents=True, exist_ok=True)
    paths = manifest["path"].to_numpy()[fold_of == fold]
    for i, path in enumerate(sorted(paths)):
        (folder / f"{i:04d}_{Path(path).name}").symlink_to(Path(path).resolve())
    return len(paths)


def run_once(src: Path | None, patches: Path, out: Path, backend: str | None, env_extra: dict[str, str]) -> dict:
    """One ``mitotype predict`` process: its wall, user and sys seconds and exit status."""
    env = {**os.environ, **env_extra, "COLUMNS": "120"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    command = [sys.executable, "-m", "mitotype", "predict", str(patches), "--out", str(out)]
    if backend:
        command += ["--backend", backend]
    tic = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tic
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "minor_faults": usage.ru_minflt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--before-src", type=Path, required=True, help="src/ of a worktree of the older commit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not (args.before_src / "mitotype" / "cli.py").is_file():
        raise SystemExit(f"--before-src {args.before_src}: no mitotype/cli.py there (pass the src/ of a worktree)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n = fold_patches(args.data, tmp / "patches")
        here = Path(__file__).resolve().parents[1] / "src"
        cache = {"MITOTYPE_CACHE_DIR": str(tmp / "cache")}
        sides = {"before torch": (args.before_src, "torch"), "torch": (here, "torch"), "default": (here, None)}
        cold = run_once(here, tmp / "patches", tmp / "cold.csv", None, cache)  # exports the graph into the empty cache
        rows = []
        names = list(sides)
        for r in range(args.rounds + 1):  # round 0 warms each side up and is not counted
            for name in names[r % len(names):] + names[: r % len(names)]:
                src, backend = sides[name]
                out = tmp / f"{name.replace(' ', '_')}.csv"
                rows.append({"round": r, "side": name, **run_once(src, tmp / "patches", out, backend, cache)})
                print(f"round {r} {name:13s} wall {rows[-1]['wall']:6.1f} s  user {rows[-1]['user']:6.1f}  sys {rows[-1]['sys']:6.1f}", flush=True)
        tables = {name: pd.read_csv(tmp / f"{name.replace(' ', '_')}.csv") for name in names}
    runs = pd.DataFrame(rows)
    write_csv(args.out / "first_command_runs.csv", runs)
    counted = runs[runs["round"] > 0]
    base = counted[counted["side"] == "before torch"].set_index("round")["wall"]
    summary = {"cpu": cpu_line(), "machine": platform.machine(), "threads": os.cpu_count(), "patches": n, "rounds": args.rounds,
               "cold_default": cold, "sides": {}}
    ref = tables["before torch"]
    for name in names:
        side = counted[counted["side"] == name].set_index("round")
        ratios = base / side["wall"]
        summary["sides"][name] = {
            "wall_median": float(median(side["wall"])), "wall_min": float(side["wall"].min()), "wall_max": float(side["wall"].max()),
            "user_median": float(median(side["user"])), "sys_median": float(median(side["sys"])),
            "speedup_vs_before_median": float(median(ratios)), "speedup_min": float(ratios.min()), "speedup_max": float(ratios.max()),
            "labels_agree_with_before": float((tables[name]["label"].to_numpy() == ref["label"].to_numpy()).mean()),
            "max_abs_dp_vs_before": float(np.abs(tables[name]["p_atypical"].to_numpy() - ref["p_atypical"].to_numpy()).max()),
        }
    write_json(args.out / "summary.json", summary)
    print(f"\n{n} patches, {summary['cpu']}, {args.rounds} rounds (median, min-max):")
    for name, s in summary["sides"].items():
        print(f"  {name:13s} wall {s['wall_median']:6.1f} s [{s['wall_min']:.1f}-{s['wall_max']:.1f}]  user {s['user_median']:6.1f}  "
              f"sys {s['sys_median']:6.1f}  speed-up vs before {s['speedup_vs_before_median']:.2f}x "
              f"[{s['speedup_min']:.2f}-{s['speedup_max']:.2f}]  labels agree {s['labels_agree_with_before']:.4f}")
    print(f"  default, first run with an empty ONNX cache (exports once): wall {cold['wall']:.1f} s")
    return summary


if __name__ == "__main__":
    main()
