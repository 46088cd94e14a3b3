"""Prediction throughput: bare forward vs ``predict`` end to end from PNG files vs a naive per-image PIL loop.

All three sides process the same patches: the bare forward runs ``predict_batch`` on batches
already decoded; ``predict_manifest`` reads and decodes the PNG files on a background thread pool
while the model runs; the naive loop opens each PNG with PIL and runs the model on one image at a
time, as the field's research scripts do. Each side is warmed up once, then they alternate.

    .venv/bin/python benchmarks/predict_speed.py [--data ../shared/data/ami-br-train] [--model RUN_OR_MODEL] [--n 256] [--rounds 3]

Without --model it saves an untrained model of --recipe to a temporary folder (throughput does
not depend on the weights), so it runs on a fresh clone; with --model it loads that run or model
(a fold ensemble counts every member). Without the data folder it writes synthetic PNGs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from _patches import DEFAULT_DATA, png_paths  # benchmarks/ is on the path when run as a script
from _timing import Side, Timed, compare, report
from mitotype.config import load_config
from mitotype.data.images import decode_all
from mitotype.inference.engine import predict_batch
from mitotype.inference.predict import predict_manifest
from mitotype.models.artifact import load_ensemble, save_model
from mitotype.models.registry import create_model


def main(argv: list[str] | None = None) -> list[Timed]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="patch folder (default: %(default)s)")
    ap.add_argument("--model", type=Path, default=None, help="run directory or model folder (default: untrained --recipe model)")
    ap.add_argument("--recipe", default="lite0-quick")
    ap.add_argument("--set", action="append", default=[], help="config override for the untrained model (repeatable)")
    ap.add_argument("--n", type=int, default=256, help="patches per side and round")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds after one warm-up of each side")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None:
            cfg = load_config(args.recipe, ["model.pretrained=none"] + args.set)
            save_model(create_model(cfg.model), cfg, tmp / "model", 0.5, {}, {})
            model_text = f"untrained {cfg.recipe} ({cfg.model.backbone} @ {cfg.model.input_size} px)"
        models = load_ensemble(args.model or tmp / "model")
        if args.model is not None:
            model_text = f"{len(models)} model(s) from {args.model}"
        paths, source = png_paths(args.data, args.n, models[0].patch_size, tmp)
        return _run(models, paths, source, model_text, args.batch_size, args.rounds)


def _run(models: list, paths: list[str], source: str, model_text: str, bs: int, rounds: int) -> list[Timed]:
    device, n = torch.device("cpu"), len(paths)
    manifest = pd.DataFrame({"path": paths})
    store, _ = decode_all(paths, models[0].patch_size, models[0].size_policy)
    batches = [store.batch(np.arange(s, min(s + bs, n))) for s in range(0, n, bs)]
    nets = [m.model.eval() for m in models]

    def bare() -> float:
        tic = time.perf_counter()
        for batch in batches:
            predict_batch(nets, batch, device)
        return time.perf_counter() - tic

    def ours() -> float:
        tic = time.perf_counter()
        predict_manifest(models, manifest, batch_size=bs, device=device)
        return time.perf_counter() - tic

    @torch.no_grad()
    def naive() -> float:
        tic = time.perf_counter()
        for path in paths:
            x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
            for net in nets:
                net.p_atypical(net({"image": x}))
        return time.perf_counter() - tic

    sides = [Side("bare forward (pre-decoded)", bare, n), Side("mitotype predict (from PNG)", ours, n),
             Side("naive PIL + torch per image", naive, n)]
    results = compare(sides, rounds)
    report(f"Prediction: {source} · {model_text} · batch {bs} · device cpu", results, rounds)
    return results


if __name__ == "__main__":
    main()
