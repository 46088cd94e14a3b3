"""CPU levers behind the recipe defaults, each a ratio to the default step measured in one run on the same batches.

The default is lite0-quick's CPU training step: channels-last tensors, the first three of timm's
parameter groups frozen (``model.freeze_groups: 3``), float32, torch's deterministic mode off.
Each other side changes one thing: contiguous (NCHW) tensors, ``torch.use_deterministic_algorithms``
on (``train.deterministic_algorithms``), nothing frozen, or bfloat16 autocast on the CPU (fast
only where the CPU has AVX-512 BF16 or AMX; the CPU line says which). All sides run forward,
cross-entropy, backward and an AdamW step (or, with ``--step predict``, a no-grad forward) on the
same pre-built batches, warmed up once, in alternating rounds.

    .venv/bin/python benchmarks/cpu_levers.py [--data ../shared/data/ami-br-train] [--batches 2] [--batch-size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from _patches import DEFAULT_DATA, decoded_rows  # benchmarks/ is on the path when run as a script
from _timing import Side, Timed, compare, cpu_flags, report
from mitotype.config import Config, load_config
from mitotype.transforms.batch import to_input
from mitotype.models.registry import MitotypeModel, create_model
from mitotype.training.loop import build_optimizer


def main(argv: list[str] | None = None) -> list[Timed]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled patch folder (default: %(default)s)")
    ap.add_argument("--recipe", default="lite0-quick")
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value (repeatable)")
    ap.add_argument("--step", choices=("train", "predict"), default="train", help="train step or no-grad forward")
    ap.add_argument("--batches", type=int, default=2, help="batches per side and round")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds after one warm-up of each side")
    args = ap.parse_args(argv)

    cfg = load_config(args.recipe, ["model.freeze_groups=3"] + args.set)
    bs = args.batch_size
    manifest, store, source = decoded_rows(args.data, cfg, bs * args.batches)
    rows = [range(s, s + bs) for s in range(0, len(manifest) - bs + 1, bs)]
    labels = torch.as_tensor(manifest["label"].to_numpy().astype("int64"))
    nhwc = [(to_input(store.batch(list(r)), torch.device("cpu"), channels_last=True), labels[list(r)]) for r in rows]
    nchw = [(x.contiguous(), y) for x, y in nhwc]
    n = len(rows) * bs

    torch.manual_seed(0)
    default = _model(cfg, channels_last=True)
    contiguous = _model(cfg, channels_last=False)
    unfrozen = _model(load_config(args.recipe, args.set + ["model.freeze_groups=0"]), channels_last=True)
    sides = [
        Side("default (channels-last, freeze_groups 3, fp32)", _runner(default, cfg, nhwc, args.step), n),
        Side("contiguous NCHW", _runner(contiguous, cfg, nchw, args.step), n),
        Side("deterministic algorithms on", _runner(default, cfg, nhwc, args.step, deterministic=True), n),
        Side("freeze_groups 0", _runner(unfrozen, cfg, nhwc, args.step), n),
        Side("bf16 autocast", _runner(default, cfg, nhwc, args.step, bf16=True), n),
    ]
    results = compare(sides, args.rounds)
    report(f"CPU levers ({args.step} step): {source} · {cfg.model.backbone} @ {cfg.model.input_size} px · {len(rows)} batches of {bs} · "
           f"avx512_bf16 {'yes' if cpu_flags()['avx512_bf16'] else 'no'}", results, args.rounds, per_batch=bs)
    return results


def _model(cfg: Config, channels_last: bool) -> MitotypeModel:
    model = create_model(cfg.model)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _runner(model: MitotypeModel, cfg: Config, batches: list, step: str, *, deterministic: bool = False,
            bf16: bool = False) -> Callable[[], float]:
    """One pass over ``batches``; the deterministic flag is global in torch, so it is set and reset around the pass."""
    opt = build_optimizer(model, cfg) if step == "train" else None

    def run() -> float:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        try:
            tic = time.perf_counter()
            if opt is None:
                model.eval()
                with torch.no_grad(), autocast:
                    for x, _ in batches:
                        model.p_atypical(model({"image": x}))
            else:
                model.train()
                for x, y in batches:
                    with autocast:
                        loss = F.cross_entropy(model({"image": x})["label"], y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            return time.perf_counter() - tic
        finally:
            torch.use_deterministic_algorithms(False)

    return run


if __name__ == "__main__":
    main()
