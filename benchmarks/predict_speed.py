"""Prediction throughput: bare forward per backend vs ``predict`` end to end from PNG files vs a naive per-image PIL loop.

Every side processes the same patches. The bare sides run the model on batches already decoded:
PyTorch eager (the ``Ensemble``), the fp32 ONNX export in an ONNX Runtime session, its int8
(static QDQ) quantization, and the fp32 export compiled by OpenVINO in f32 and bf16 (when installed). The ``predict`` sides run ``predict_manifest`` with each backend: a
background thread pool reads and decodes the PNG files while the model runs. The naive loop opens
each PNG with PIL and runs the PyTorch model on one image at a time, as the field's research
scripts do. Each side is warmed up once, then they alternate, the order rotating each round.

    .venv/bin/python benchmarks/predict_speed.py [--data ../shared/data/ami-br-train] [--model RUN_OR_MODEL] [--n 256] [--rounds 3]

Without --model it saves an untrained model of --recipe to a temporary folder (throughput does
not depend on the weights), so it runs on a fresh clone; with --model it loads that run or model
(a fold ensemble counts every member). Without the data folder it writes synthetic PNGs. The int8
graph is calibrated on the timed patches themselves: its speed is measured here, its accuracy by
``mitotype export --int8 --check-data``. ``--no-onnx`` times PyTorch alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from _patches import DEFAULT_DATA, png_paths  # benchmarks/ is on the path when run as a script
from _timing import Side, Timed, compare, report
from mitotype.config import load_config
from mitotype.data.images import decode_all
from mitotype.inference.backends import OnnxBackend, OpenVinoBackend
from mitotype.inference.graph import inference_graph, write_onnx
from mitotype.inference.onnx_cache import onnx_difference
from mitotype.inference.quantize import quantize_int8
from mitotype.inference.predict import predict_manifest
from mitotype.models.artifact import save_model
from mitotype.models.ensemble import Ensemble
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
    ap.add_argument("--no-onnx", dest="onnx", action="store_false", help="time PyTorch only")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None:
            cfg = load_config(args.recipe, ["model.pretrained=none"] + args.set)
            save_model(create_model(cfg.model), cfg, tmp / "model", threshold=0.5, trained_on={}, metrics={})
            model_text = f"untrained {cfg.recipe} ({cfg.model.backbone} @ {cfg.model.input_size} px)"
        models = Ensemble.load(args.model or tmp / "model", device="cpu")
        if args.model is not None:
            model_text = f"{len(models)} model(s) from {args.model}"
        paths, source = png_paths(args.data, args.n, models.patch_size, tmp)
        onnx = _onnx_files(models, paths, tmp, args.batch_size) if args.onnx else {}
        return _run(models, paths, source, model_text, args.batch_size, args.rounds, onnx)


def _onnx_files(models: Ensemble, paths: list[str], tmp: Path, bs: int) -> dict[str, Path]:
    """The fp32 export (checked against PyTorch) and its int8 quantization, calibrated on ``paths``."""
    graph, size = inference_graph(models), models.patch_size
    write_onnx(graph, size, tmp / "model.onnx")
    print(f"fp32 ONNX export: max |p_onnx - p_torch| {onnx_difference(tmp / 'model.onnx', graph, size):.1e} on random patches")
    store, _ = decode_all(paths, size, models.size_policy)
    calibration = [store.batch(np.arange(s, min(s + bs, len(paths)))).numpy() for s in range(0, len(paths), bs)]
    quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx", calibration)
    try:  # ONNX Runtime's int8 depthwise kernels refuse some tiny feature maps (lite0 at 32 px)
        OnnxBackend(tmp / "model.int8.onnx").p_atypical(calibration[0])
    except Exception as err:
        print(f"NOTE: the int8 graph does not run in ONNX Runtime here ({str(err).splitlines()[0][:120]}); int8 sides left out")
        return {"fp32": tmp / "model.onnx"}
    return {"fp32": tmp / "model.onnx", "int8": tmp / "model.int8.onnx"}


def _run(models: Ensemble, paths: list[str], source: str, model_text: str, bs: int, rounds: int, onnx: dict[str, Path]) -> list[Timed]:
    device, n = torch.device("cpu"), len(paths)
    manifest = pd.DataFrame({"path": paths})
    store, _ = decode_all(paths, models.patch_size, models.size_policy)
    batches = [store.batch(np.arange(s, min(s + bs, n))) for s in range(0, n, bs)]
    nets = models.nets
    backends = {"PyTorch": models}
    backends.update({f"ONNX Runtime {k}": OnnxBackend(path) for k, path in onnx.items()})
    if onnx and importlib.util.find_spec("openvino") is not None:  # the same fp32 graph compiled by OpenVINO
        backends["OpenVINO fp32"] = OpenVinoBackend(onnx["fp32"])
        backends["OpenVINO bf16"] = OpenVinoBackend(onnx["fp32"], precision="bf16")  # f32 where the CPU lacks bf16

    def bare(backend) -> Callable[[], float]:
        def run() -> float:
            tic = time.perf_counter()
            for batch in batches:
                backend.p_atypical(batch)
            return time.perf_counter() - tic
        return run

    def ours(backend) -> Callable[[], float]:
        def run() -> float:
            tic = time.perf_counter()
            predict_manifest(backend, manifest, patch_size=models.patch_size, size_policy=models.size_policy, batch_size=bs)
            return time.perf_counter() - tic
        return run

    @torch.no_grad()
    def naive() -> float:
        tic = time.perf_counter()
        for path in paths:
            x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
            for net in nets:
                net.p_atypical(net({"image": x}))
        return time.perf_counter() - tic

    sides = [Side("bare forward (pre-decoded)" if name == "PyTorch" else f"bare {name} session (pre-decoded)", bare(b), n)
             for name, b in backends.items()]
    sides += [Side("mitotype predict (from PNG)" if name == "PyTorch" else f"mitotype predict --backend {b.name} ({name.split()[-1]})",
                   ours(b), n) for name, b in backends.items()]
    sides.append(Side("naive PIL + torch per image", naive, n))
    results = compare(sides, rounds)
    report(f"Prediction: {source} · {model_text} · batch {bs} · device cpu", results, rounds)
    k = len(backends)
    tic = time.perf_counter()
    decode_all(paths, models.patch_size, models.size_policy, threads=1)
    decode_ms = 1000 * (time.perf_counter() - tic) / n
    print(f"\ndecoding alone, 1 thread: {decode_ms:.2f} ms/patch. If the decoding thread finds no free core, predict / bare "
          "is at best model ms / (model ms + decode ms): the 'no free core' figure below.")
    for (name, _), b_res, p_res in zip(backends.items(), results[:k], results[k:2 * k]):
        per_round = [p / q for p, q in zip(p_res.ratios, b_res.ratios)]
        spread = f"per round {min(per_round):.2f}–{max(per_round):.2f}"
        model_ms = 1000 / b_res.rate
        print(f"{name}: predict end to end / bare = {p_res.rate / b_res.rate:.2f} ({spread}; no free core "
              f"{model_ms / (model_ms + decode_ms):.2f}); bare / PyTorch bare = {b_res.rate / results[0].rate:.2f}; "
              f"predict / naive = {p_res.rate / results[-1].rate:.2f}")
    return results


if __name__ == "__main__":
    main()
