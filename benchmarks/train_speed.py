"""Training throughput: mitotype's epoch (``fit``) beside the bare model's train step, same batches.

The bare loop is what a hand-written script would do with batches already decoded, normalised
and on the device: forward, cross-entropy, backward, AdamW step. ``fit`` adds everything we do per
step (gathering uint8 rows from the decoded cache, conversion, batched augmentation incl. HED
jitter, the named-output loss, gradient clipping, the schedule, progress). The gap is our cost.

    .venv/bin/python benchmarks/train_speed.py [--data ../shared/data/ami-br-train] [--recipe lite0-quick] [--steps 12]

Without the data folder it uses synthetic patches. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _timing import alternate  # benchmarks/ is on the path when run as a script
from mitotype.config import load_config
from mitotype.data.images import ImageStore
from mitotype.inference.engine import to_input
from mitotype.models.registry import create_model
from mitotype.training.loop import build_optimizer, fit
from mitotype.workflows.runs import load_dataset

DEFAULT_DATA = Path(os.environ.get("MITOTYPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "ami-br-train"


def synthetic(n: int, size: int):
    import pandas as pd

    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 4 == 0).astype(int)
    manifest = pd.DataFrame({"path": [f"s{i}.png" for i in range(n)], "label": labels, "group": [str(i % 20) for i in range(n)]})
    return manifest, ImageStore(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.arange(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--recipe", default="lite0-quick")
    ap.add_argument("--steps", type=int, default=16, help="training steps per epoch measured")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare / mitotype epochs")
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
    args = ap.parse_args()

    cfg = load_config(args.recipe, ["train.epochs=1", "train.warmup_epochs=0"] + args.set)
    if args.data.is_dir():
        ds = load_dataset(args.data, cfg)
        manifest, store, source = ds.manifest, ds.store, str(args.data)
    else:
        manifest, store = synthetic(2048, cfg.data.patch_size)
        source = "synthetic"
    bs = cfg.train.batch_size
    n = min(len(manifest), bs * args.steps)
    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(len(manifest), n, replace=False))
    # Keep the sampled rows' classes as they are; fit's balanced sampler draws n rows per epoch.
    threads = torch.get_num_threads()
    print(f"data: {source} · recipe {cfg.recipe} · backbone {cfg.model.backbone} @ {cfg.model.input_size}px · batch {bs} · "
          f"{n // bs} steps · device {cfg.train.device} · torch threads {threads}")

    # Bare: the same batches, pre-decoded and on the device, no augmentation, no bookkeeping.
    device = torch.device("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = create_model(cfg.model).to(device).to(memory_format=torch.channels_last).train()
    opt = build_optimizer(model, cfg)
    labels = torch.as_tensor(manifest["label"].to_numpy()[index])
    batches = [(to_input(store.batch(index[s:s + bs]), device, channels_last=True), labels[s:s + bs].to(device)) for s in range(0, n - bs + 1, bs)]

    def bare_epoch() -> float:
        tic = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model({"image": x})["label"], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tic

    def ours_epoch() -> float:
        """The real loop: one ``fit`` epoch over the same rows (model set-up is not timed)."""
        with tempfile.TemporaryDirectory() as tmp:
            return fit(cfg, manifest, store, Path(tmp), index, show_progress=False).history[0]["train_seconds"]

    bare, ours = alternate(bare_epoch, ours_epoch, args.rounds)
    steps = len(batches)
    bare_ps, ours_ps = steps * bs / bare, steps * bs / ours
    print(f"bare train step : {bare_ps:8.1f} patches/s ({bare / steps * 1000:.0f} ms/step)")
    print(f"mitotype epoch  : {ours_ps:8.1f} patches/s ({ours / steps * 1000:.0f} ms/step)")
    print(f"overhead        : {100 * (bare_ps - ours_ps) / bare_ps:+.1f}% (target < 10%)")


if __name__ == "__main__":
    sys.exit(main())
