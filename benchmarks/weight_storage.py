"""What storing a classifier's weights smaller costs in p_atypical: float16, and int8 weight-only
(symmetric, one scale per output channel, dequantised to float at load), against float32.

The question behind it (issue 21): a diverse ensemble of two recipes' fold models (10 lite0 members)
is 66 MiB in float16, over the bundle's 40 MiB; int8 weights would halve it, if they kept the
scores. Each model scores the same seeded sample of real patches three ways; the script prints the
largest and mean |delta p| and how many calls at 0.5 flip, and writes ``summary.json``.

    .venv/bin/python benchmarks/weight_storage.py runs/lite0-crop64-shift-cv5/fold_0 runs/lite0-crop64-loso/fold_0 \
        --out benchmarks/results/weight-storage
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from _patches import DEFAULT_DATA, decoded_rows  # benchmarks/ is on the path when run as a script
from mitotype._io import check_output_dir, write_json
from mitotype.config import load_config
from mitotype.errors import MitotypeError
from mitotype.models.ensemble import Ensemble


def int8_per_channel(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to int8 with one symmetric scale per output channel, back in its dtype;
    vectors (biases, BatchNorm) are kept as they are, as a weight-only scheme would keep them."""
    if not t.is_floating_point() or t.ndim < 2:
        return t
    flat = t.reshape(t.shape[0], -1).float()
    scale = flat.abs().amax(1).clamp_min(1e-12) / 127
    return (torch.round(flat / scale[:, None]).clamp(-127, 127) * scale[:, None]).reshape(t.shape).to(t.dtype)


def half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float() if t.is_floating_point() else t


def stored_as(ensemble: Ensemble, full: list[dict[str, torch.Tensor]], cast, images: np.ndarray) -> np.ndarray:
    """p_atypical with every member's float32 weights ``full`` passed through ``cast``."""
    for net, state in zip(ensemble.nets, full):
        net.load_state_dict({k: cast(v) for k, v in state.items()})
    return ensemble.p_atypical(images)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="float32 model folders")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=480)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
    except MitotypeError as err:
        ap.error(str(err))
    _, store, where = decoded_rows(args.data, load_config(), args.n)
    images = store.batch(np.arange(len(store)))
    result: dict = {"patches": where, "models": {}}
    for model in args.models:
        ensemble = Ensemble.load(model)  # loaded once; each storage is a cast of the same float32 weights
        weights = [{k: v.clone() for k, v in net.state_dict().items()} for net in ensemble.nets]
        full = ensemble.p_atypical(images)
        row = {}
        for name, cast in (("float16", half), ("int8_per_channel", int8_per_channel)):
            p = stored_as(ensemble, weights, cast, images)
            row[name] = {"max_abs_dp": float(np.abs(p - full).max()), "mean_abs_dp": float(np.abs(p - full).mean()),
                         "flips_at_0.5": int(((p >= 0.5) != (full >= 0.5)).sum())}
            print(f"{model}: {name:17s} max |dp| {row[name]['max_abs_dp']:.4f}  mean {row[name]['mean_abs_dp']:.4f}  "
                  f"flips {row[name]['flips_at_0.5']} of {len(full)}")
        result["models"][str(model)] = row
    write_json(args.out / "summary.json", result)
    return result


if __name__ == "__main__":
    main()
