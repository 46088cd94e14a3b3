"""Prediction throughput: ``predict_manifest`` end to end (PNG files in, probabilities out) beside
the bare model's forward pass on the same batches already decoded, and a naive per-image
PIL + torch loop, so the gap is what our streaming costs (target < 10%).

    .venv/bin/python benchmarks/predict_speed.py [--data ../shared/data/ami-br-train] [--model RUN_OR_MODEL] [--n 1024]

Without --model it saves a fresh (untrained) model of the recipe: throughput does not depend on
the weights. Without the data folder it writes synthetic PNGs to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _timing import alternate  # benchmarks/ is on the path when run as a script
from mitotype.config import load_config
from mitotype.data.images import decode_all
from mitotype.data.readers import read_dataset
from mitotype.inference.engine import predict_batch
from mitotype.inference.predict import predict_manifest
from mitotype.models.artifact import load_ensemble, save_model
from mitotype.models.registry import create_model

DEFAULT_DATA = Path(os.environ.get("MITOTYPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "ami-br-train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--recipe", default="lite0-quick")
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternating predict / bare runs")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.data.is_dir():
        manifest = read_dataset(args.data).manifest.sample(frac=1, random_state=0).head(args.n).reset_index(drop=True)
    else:
        import pandas as pd

        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.n):
            Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
            paths.append(str(tmp / f"{i}.png"))
        manifest = pd.DataFrame({"path": paths})
    if args.model is None:
        cfg = load_config(args.recipe, ["model.pretrained=none"])
        save_model(create_model(cfg.model), cfg, tmp / "model", 0.5, {}, {})
        args.model = tmp / "model"
    models = load_ensemble(args.model)
    device = torch.device("cpu")
    n, bs = len(manifest), args.batch_size
    print(f"{n} patches from {args.data if args.data.is_dir() else 'synthetic PNGs'} · {len(models)} model(s) · batch {bs} · torch threads {torch.get_num_threads()}")

    store, _ = decode_all(manifest["path"].tolist(), models[0].patch_size)
    batches = [store.batch(np.arange(s, min(s + bs, n))) for s in range(0, n, bs)]
    nets = [m.model for m in models]

    def ours_run() -> float:
        tic = time.perf_counter()
        predict_manifest(models, manifest, batch_size=bs, device=device)
        return time.perf_counter() - tic

    def bare_run() -> float:
        tic = time.perf_counter()
        for batch in batches:
            predict_batch(nets, batch, device)
        return time.perf_counter() - tic

    ours, bare = alternate(ours_run, bare_run, args.rounds)

    naive_n = min(n, 256)
    tic = time.perf_counter()
    with torch.no_grad():
        for path in manifest["path"].head(naive_n):
            x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
            for net in nets:
                net.p_atypical(net({"image": x}))
    naive = time.perf_counter() - tic

    print(f"bare forward (pre-decoded) : {n / bare:8.1f} patches/s")
    print(f"mitotype predict (from PNG): {n / ours:8.1f} patches/s")
    print(f"naive PIL + torch per image: {naive_n / naive:8.1f} patches/s")
    print(f"overhead vs bare forward   : {100 * (ours - bare) / ours:+.1f}% of predict time (target < 10%)")


if __name__ == "__main__":
    main()
