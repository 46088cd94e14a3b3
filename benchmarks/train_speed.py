"""Training throughput: a mitotype ``fit`` epoch beside the bare train step, on the same rows in the same order.

The bare loop is what a hand-written script would do with batches already decoded, converted and
on the device: forward, cross-entropy, backward, AdamW step. ``fit`` adds what it does per step:
gathering uint8 rows from the decoded cache, conversion, batched augmentation (flips, rotations,
colour and HED jitter), the named-output loss, gradient clipping and the schedule. Its progress
bar is off here (``show_progress=False``; the bar's update calls still run), and model set-up,
checkpointing and saving the artifact fall outside the timed epoch. The gap is our per-step cost.

Both sides get the rows fit's sampler draws for its first epoch (recomputed here, and checked
against the rows fit actually gathers on the warm-up call), so they see the same batches.

    .venv/bin/python benchmarks/train_speed.py [--data ../shared/data/ami-br-train] [--recipe lite0-quick] [--steps 8] [--rounds 3]

Without the data folder it uses synthetic patches (and says so).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _patches import DEFAULT_DATA, decoded_rows  # benchmarks/ is on the path when run as a script
from _timing import Side, Timed, compare, report
from mitotype.config import load_config
from mitotype.data.images import ImageStore
from mitotype.config import resolve_device
from mitotype.transforms.batch import to_input
from mitotype.models.registry import create_model
from mitotype.training.loop import build_optimizer, epoch_order, fit


class RecordingStore(ImageStore):
    """An ImageStore that can note which rows ``fit`` gathers, to prove both sides saw the same batches."""

    log: list[np.ndarray] | None = None

    def batch(self, index):
        if self.log is not None:
            self.log.append(np.asarray(index).copy())
        return super().batch(index)


def main(argv: list[str] | None = None) -> list[Timed]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled patch folder (default: %(default)s)")
    ap.add_argument("--recipe", default="lite0-quick")
    ap.add_argument("--steps", type=int, default=8, help="training steps (batches) per timed epoch")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds after one warm-up of each side")
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value (repeatable)")
    args = ap.parse_args(argv)

    cfg = load_config(args.recipe, ["train.epochs=1", "train.warmup_epochs=0"] + args.set)
    t, bs = cfg.train, cfg.train.batch_size
    manifest, store, source = decoded_rows(args.data, cfg, bs * args.steps)
    store = RecordingStore(store.array, store.rows)
    train_idx = np.arange(len(manifest))
    # fit draws its first epoch's order from a generator seeded with train.seed + 1 (training/loop.py).
    order = train_idx[epoch_order(manifest["label"].to_numpy(), t.sampler, torch.Generator().manual_seed(t.seed + 1))]
    batches_rows = [order[s:s + bs] for s in range(0, len(order), bs)]
    device = resolve_device(t.device)

    torch.manual_seed(0)
    model = create_model(cfg.model).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = build_optimizer(model, cfg)
    labels = torch.as_tensor(manifest["label"].to_numpy().astype(np.int64))
    batches = [(to_input(store.batch(r), device, channels_last=t.channels_last), labels[r].to(device)) for r in batches_rows]

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

    def fit_epoch() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return fit(cfg, manifest, store, Path(tmp), train_idx=train_idx, show_progress=False).history[0]["train_seconds"]

    bare_epoch()  # warm-up of each side (oneDNN picks kernels on first use); fit's records the rows it gathers
    store.log = []
    fit_epoch()
    seen, store.log = store.log, None
    if len(seen) != len(batches_rows) or not all(np.array_equal(a, b) for a, b in zip(seen, batches_rows)):
        raise SystemExit("train_speed: fit gathered other rows than the bare loop's batches; update the order in this script")
    n = len(order)
    sides = [Side("bare train step", bare_epoch, n), Side("mitotype fit epoch", fit_epoch, n)]
    results = compare(sides, args.rounds, warmup=0)
    report(f"Training: {source} · recipe {cfg.recipe} · {cfg.model.backbone} @ {cfg.model.input_size} px · freeze_groups "
           f"{cfg.model.freeze_groups} · channels_last {t.channels_last} · {len(batches)} batches of {bs} ({t.sampler} order, same "
           f"rows both sides) · device {device}", results, args.rounds, per_batch=bs)
    return results


if __name__ == "__main__":
    main()
