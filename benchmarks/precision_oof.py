"""Out-of-fold balanced accuracy of a cv run's fold models in OpenVINO float32 vs bfloat16.

    .venv/bin/python benchmarks/precision_oof.py RUN [--threads 1]

Each fold model is exported to ONNX once, compiled by OpenVINO with ``INFERENCE_PRECISION_HINT``
f32 and bf16, and scored on the patches its fold held out (``RUN/splits.csv``) at its own stored
threshold; the pooled calls give each precision's out-of-fold balanced accuracy and AUROC, the
figure ``mitotype export --int8`` gates int8 on (within 0.01 of fp32). bf16 runs natively only on
CPUs with AVX-512 BF16 or AMX; elsewhere OpenVINO emulates it (slow), so the speed column says
which. One process, same patches, sides alternating.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mitotype.data.images import decode_all
from mitotype.evaluation.metrics import binary_metrics
from mitotype.inference.graph import INPUT_NAME, inference_graph, write_onnx
from mitotype.models.artifact import model_dirs
from mitotype.models.ensemble import Ensemble


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    import openvino as ov

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = pd.read_csv(args.run / "splits.csv")
    folds = model_dirs(args.run)
    precisions = ("f32", "bf16")
    y, calls, p, seconds = [], {k: [] for k in precisions}, {k: [] for k in precisions}, {k: 0.0 for k in precisions}
    with tempfile.TemporaryDirectory() as tmp:
        for k, fold_dir in enumerate(folds):
            models = Ensemble.load(fold_dir, device="cpu")
            graph, size = inference_graph(models), models.patch_size
            path = Path(tmp) / f"fold_{k}.onnx"
            write_onnx(graph, size, path)
            rows = splits[splits["fold"] == k]
            store, _ = decode_all(rows["path"].tolist(), size, models.size_policy)
            x = store.batch(np.arange(len(store))).numpy()
            y.append(rows["label"].to_numpy())
            for precision in precisions:
                compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                                      "INFERENCE_PRECISION_HINT": precision})
                request = compiled.create_infer_request()
                request.infer({INPUT_NAME: x[: args.batch_size]})  # warm-up
                tic = time.perf_counter()
                got = np.concatenate([request.infer({INPUT_NAME: x[i : i + args.batch_size]})[0]
                                      for i in range(0, len(x), args.batch_size)])
                seconds[precision] += time.perf_counter() - tic
                p[precision].append(got)
                calls[precision].append(got >= models.threshold)
            print(f"fold {k}: {len(rows)} held-out patches; max |p_bf16 - p_f32| {np.abs(p['bf16'][-1] - p['f32'][-1]).max():.4f}",
                  flush=True)
    labels = np.concatenate(y)
    result = {}
    for precision in precisions:
        called = np.concatenate(calls[precision]).astype(float)
        ba = binary_metrics(labels, called, 0.5)["balanced_accuracy"]
        auroc = binary_metrics(labels, np.concatenate(p[precision]), 0.5)["roc_auc"]
        result[precision] = {"balanced_accuracy": ba, "roc_auc": auroc, "patches_per_s": len(labels) / seconds[precision]}
        print(f"OpenVINO {precision}: out-of-fold balanced accuracy {ba:.4f}, AUROC {auroc:.4f} on {len(labels)} patches; "
              f"{result[precision]['patches_per_s']:.0f} patches/s ({args.threads} thread(s))")
    drop = result["f32"]["balanced_accuracy"] - result["bf16"]["balanced_accuracy"]
    print(f"bf16 drop in balanced accuracy: {drop:+.4f} (int8's gate: at most 0.01); speed bf16 / f32 "
          f"{result['bf16']['patches_per_s'] / result['f32']['patches_per_s']:.2f}")
    return result


if __name__ == "__main__":
    main()
