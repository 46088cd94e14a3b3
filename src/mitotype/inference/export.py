"""Export the whole inference graph to ONNX or TorchScript, self-described by a JSON card.

The exported graph (:mod:`mitotype.inference.graph`) takes what the streaming readers produce, uint8 RGB patches (B, H, W, 3) at the
model's patch size with any batch size, and returns ``p_atypical`` (B,): the /255, centre crop,
resize and normalisation live inside it, so a user of the file needs nothing else. A fold-ensemble
run directory exports as ONE graph that averages its folds (one file to ship and one session to
run; the fold mean is exact, as the ``Ensemble`` computes it). TTA stays outside the graph (the backend
runs the 8 dihedral views), so one file serves both.

An export is checked before it is written: the ONNX file's probabilities must equal PyTorch's to
:data:`TOLERANCE` on random patches, or nothing is written. An int8 ONNX file (static QDQ
quantization, calibrated on unlabelled patches) is written only when its balanced accuracy on a
labelled set the model did not train on is at most :data:`INT8_MAX_DROP` below the fp32 graph's.
The card beside the file (``OUT.json``) holds the model card's build, the threshold, the format,
the input contract and these checks.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mitotype._io import atomic_path, check_output_file, write_json
from mitotype.errors import MitotypeError
from mitotype.inference.graph import (
    TOLERANCE, InferenceGraph, check_difference, export_card, export_card_path, file_hash, inference_graph, random_patches, torch_p,
    write_onnx,
)
from mitotype.inference.onnx_cache import CHECK_INPUTS, onnx_difference
from mitotype.inference.quantize import int8_export
from mitotype.models.ensemble import Ensemble

FORMATS = ("onnx", "torchscript")


def export_model(
    model_path: Path, out: Path, fmt: str = "onnx", *, int8: bool = False, check_data: Path | None = None,
    calib_data: Path | None = None, calib_n: int = 256, batch_size: int = 64, progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Export MODEL (a model folder or a cv run's fold ensemble) to ``out`` in ``fmt``; write the
    card beside it; return the card. Options are checked before any model is loaded."""
    out = Path(out)
    if fmt not in FORMATS:
        raise MitotypeError(f"{{fmt}} '{fmt}': must be one of {', '.join(FORMATS)}", options=("fmt",))
    if int8 and fmt != "onnx":
        raise MitotypeError("{int8} quantizes ONNX graphs only; use {fmt} onnx", options=("int8", "fmt"))
    if int8 and check_data is None:
        raise MitotypeError("{int8} needs {check_data}: a labelled set the model did not train on, to measure the int8 loss",
                            options=("int8", "check_data"))
    if not int8 and (check_data is not None or calib_data is not None):
        raise MitotypeError("{check_data} and {calib_data} only apply with {int8}", options=("check_data", "calib_data", "int8"))
    if calib_n < 1:
        raise MitotypeError(f"{{calib_n}} {calib_n}: must be at least 1", options=("calib_n",))
    check_output_file(out, "out_file")
    check_output_file(export_card_path(out), "out_file")
    ensemble = Ensemble.load(model_path, device="cpu")
    graph, size = inference_graph(ensemble), ensemble.patch_size
    card = export_card(ensemble, fmt, "int8" if int8 else "fp32")
    with tempfile.TemporaryDirectory(prefix="mitotype-export-") as tmp_name:
        tmp = Path(tmp_name)
        if fmt == "torchscript":
            made, card["check"] = _torchscript(graph, size, tmp / "model.pt", out)
        else:
            made = tmp / "model.onnx"
            write_onnx(graph, size, made)
            diff = onnx_difference(made, graph, size)
            check_difference(diff, out)
            card["check"] = {"max_abs_diff_vs_torch": diff, "tolerance": TOLERANCE, "inputs": CHECK_INPUTS}
            if int8:
                assert check_data is not None  # refused above: int8 needs check_data
                made, card["int8"] = int8_export(made, ensemble, tmp, check_data=Path(check_data), calib_data=Path(calib_data or check_data), calib_n=calib_n,
                                                 batch_size=batch_size, progress=progress, out=out)
        card["sha256"] = file_hash(made)
        with atomic_path(out) as target:
            shutil.copyfile(made, target)
    write_json(export_card_path(out), card)
    return card


def _torchscript(graph: InferenceGraph, size: int, path: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch marks TorchScript deprecated; it is still what C++ / mobile runtimes load
        traced = torch.jit.trace(graph, (random_patches(2, size),), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    diff = max(float(np.abs(torch_p(loaded, p) - torch_p(graph, p)).max())
               for p in (random_patches(8, size), random_patches(1, size, seed=1)))
    check_difference(diff, out, "TorchScript")
    return path, {"max_abs_diff_vs_torch": diff, "tolerance": TOLERANCE, "inputs": CHECK_INPUTS}
