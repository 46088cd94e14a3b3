"""Which int8 quantization choices keep a fold model within 0.01 balanced accuracy of fp32?

    .venv/bin/python benchmarks/int8_choices.py MODEL CHECK.csv CALIB.csv [--calib-n 256] [--out DIR] [VARIANT ...]

Exports MODEL to fp32 ONNX once, then quantizes it with each variant (which nodes stay fp32, which
calibration) and prints balanced accuracy / AUROC on CHECK.csv (labelled, e.g. the fold's held-out
patches) at the model's threshold, beside fp32, with single-thread speed on 128 patches. One thread,
so timings are comparable only within one run on a quiet machine.
"""
import argparse
import time
import warnings
from pathlib import Path
import numpy as np
import torch
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static, CalibrationMethod
from onnxruntime.quantization.shape_inference import quant_pre_process
from mitotype.inference.graph import INPUT_NAME, inference_graph, write_onnx
from mitotype.models.ensemble import Ensemble
from mitotype.data.images import decode_all
from mitotype.evaluation.metrics import binary_metrics
import pandas as pd

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("check"); ap.add_argument("calib")
ap.add_argument("--calib-n", type=int, default=256); ap.add_argument("--out", default="build/int8_choices")
ap.add_argument("variants", nargs="*")
args = ap.parse_args()
out = Path(args.out); out.mkdir(parents=True, exist_ok=True); models = Ensemble.load(Path(args.model), device="cpu")
graph, size = inference_graph(models), models.patch_size
fp32 = out / "fp32.onnx"
if not fp32.exists():
    write_onnx(graph, size, fp32)
test = pd.read_csv(args.check); calib = pd.read_csv(args.calib).sample(frac=1, random_state=0).head(args.calib_n)
ts, _ = decode_all(test["path"].tolist(), size, "error"); cs, _ = decode_all(calib["path"].tolist(), size, "error")
X = ts.batch(np.arange(len(ts))).numpy(); C = cs.batch(np.arange(len(cs))).numpy(); y = test["label"].to_numpy()
thr = models.threshold
def scores(s, A):
    return np.concatenate([s.run(None, {INPUT_NAME: A[i:i+64]})[0] for i in range(0, len(A), 64)])
sessions = {}
def run(path):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = sessions[str(path)] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    p = scores(s, X)
    t = []
    for _ in range(3):
        tic = time.perf_counter(); s.run(None, {INPUT_NAME: X[:128]}); t.append(time.perf_counter() - tic)
    return p, 128 / np.median(t)
p32, v32 = run(fp32); b32 = binary_metrics(y, p32, thr)["balanced_accuracy"]
print(f"fp32: BA {b32:.4f} AUROC {binary_metrics(y, p32, thr)['roc_auc']:.4f} {v32:.0f}/s (1 thread)", flush=True)
prepared = out / "prepared.onnx"
with warnings.catch_warnings():
    warnings.simplefilter("ignore"); quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
m = onnx.load(str(prepared)); nodes = m.graph.node
convs = [n for n in nodes if n.op_type == "Conv"]
def group(n): return next((a.i for a in n.attribute if a.name == "group"), 1)
dw = [n.name for n in convs if group(n) > 1]
first_conv = [i for i, n in enumerate(nodes) if n.op_type == "Conv"][0]
pre = [n.name for n in nodes[:first_conv]]
gemm = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
print("ops before first conv:", [n.op_type for n in nodes[:first_conv]], "convs", len(convs), "dw", len(dw), flush=True)
class R(CalibrationDataReader):
    def __init__(self, n): self.it = iter([C[i:i+32] for i in range(0, n, 32)])
    def get_next(self):
        b = next(self.it, None); return None if b is None else {INPUT_NAME: b}
tail = [n.name for n in nodes[[i for i, n in enumerate(nodes) if n.op_type == "Conv"][-1]:]]
adds = [n.name for n in nodes if n.op_type == "Add" and n.name not in pre]
early = [c.name for c in convs[:12]]
# Names: the nodes kept fp32 beyond the first conv and the heads (pre: everything before the first conv;
# noadd: residual Adds; dw: depthwise convs; early: the first 12 convs; tail: everything after the last
# conv) and the calibration (pct: Percentile 99.999; pct9999: 99.99; else MinMax). "minmax-old" was
# the default until 2026-11-23; "pct+noadd" is what `mitotype export --int8` does now.
variants = {
    "pct+noadd+dw": dict(ex=pre + [convs[0].name] + gemm + adds + dw, method=CalibrationMethod.Percentile),
    "pct+noadd+early": dict(ex=pre + [convs[0].name] + gemm + adds + early, method=CalibrationMethod.Percentile),
    "pct9999": dict(ex=pre + [convs[0].name] + gemm, method=CalibrationMethod.Percentile, extra={"CalibPercentile": 99.99}),
    "pct+noadd": dict(ex=pre + [convs[0].name] + gemm + adds, method=CalibrationMethod.Percentile),
    "pct+dw": dict(ex=pre + [convs[0].name] + dw + gemm, method=CalibrationMethod.Percentile),
    "pct+tail": dict(ex=pre + [convs[0].name] + tail, method=CalibrationMethod.Percentile),
    "pct+dw+tail": dict(ex=pre + [convs[0].name] + dw + tail, method=CalibrationMethod.Percentile),
    "minmax-old": dict(ex=[convs[0].name] + gemm),
    "no-pre": dict(ex=pre + [convs[0].name] + gemm),
    "no-pre+last2": dict(ex=pre + [convs[0].name] + [c.name for c in convs[-2:]] + gemm),
    "no-pre+dw": dict(ex=pre + [convs[0].name] + dw + gemm),
    "no-pre+percentile": dict(ex=pre + [convs[0].name] + gemm, method=CalibrationMethod.Percentile),
    "no-pre+entropy": dict(ex=pre + [convs[0].name] + gemm, method=CalibrationMethod.Entropy),
}
only = args.variants or list(variants)
for name in only:
    v = variants[name]; path = out / f"{name}.onnx"; tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(prepared), str(path), R(len(C)), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=v["ex"],
                        calibrate_method=v.get("method", CalibrationMethod.MinMax), extra_options=v.get("extra", {}))
    p, speed = run(path); met = binary_metrics(y, p, thr)
    # int8 threshold moved so that it flags the same share of the (unlabelled) calibration patches as fp32
    rate = (scores(sessions[str(fp32)], C) >= thr).mean()
    matched = binary_metrics(y, p, float(np.quantile(scores(sessions[str(path)], C), 1 - rate)))["balanced_accuracy"]
    print(f"{name}: BA {met['balanced_accuracy']:.4f} (drop {b32 - met['balanced_accuracy']:+.4f}) AUROC {met['roc_auc']:.4f} "
          f"max|dp| {np.abs(p - p32).max():.3f} mean dp {np.mean(p - p32):+.4f} BA at rate-matched threshold {matched:.4f} {speed:.0f}/s ({speed / v32:.2f}x fp32) [{time.perf_counter() - tic:.0f}s]", flush=True)
