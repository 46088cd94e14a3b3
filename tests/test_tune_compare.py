"""``mitotype recipes``, ``tune`` and ``compare``: the listing reads whatever ships, a study resumes to N
trials and prunes after a fold, and compare reuses finished runs. Fits are counted, not inferred from
equal results (CPU training is deterministic, so a retrained fold looks like a reused one)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY, run_cli

import mitotype.workflows.tune as tune_mod
from mitotype import DEFAULT_RECIPE, config
from mitotype.config import load_config, packaged_recipes
from mitotype.models.artifact import load_model
from mitotype.workflows import runs
from mitotype.workflows.compare import COMPARED
from mitotype.workflows.compare import compare as compare_runs
from mitotype.workflows.tune import parse_param

optuna = pytest.importorskip("optuna")
REAL_FIT = runs.fit  # each FitCount wraps this, never an earlier FitCount


def sets(*extra: str) -> list[str]:
    return [arg for item in (*TINY, "train.epochs=1", "train.eval_batch_size=64", *extra) for arg in ("--set", item)]


class FitCount:
    """Counts ``runs.fit`` calls by '<run>/<fold>' folder; ``interrupt`` raises KeyboardInterrupt instead of fitting there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt: str | None = None) -> None:
        self.calls: Counter[str] = Counter()
        real = REAL_FIT

        def fit(cfg, manifest, store, run_dir, *args, **kwargs):
            name = f"{Path(run_dir).parent.name}/{Path(run_dir).name}"
            if name == interrupt:
                raise KeyboardInterrupt
            self.calls[name] += 1
            return real(cfg, manifest, store, run_dir, *args, **kwargs)

        monkeypatch.setattr(runs, "fit", fit)


# --------------------------------------------------------------------------------------------- recipes


def _expected_weights(path: Path) -> str:
    """The weight source read straight from a recipe's YAML: the listing must agree with the file."""
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    pretrained, backbone = str(model.get("pretrained", "none")), str(model.get("backbone", "tf_efficientnet_lite0"))
    if pretrained.startswith("imagenet-lite") or (pretrained == "imagenet" and backbone.startswith("tf_efficientnet_lite")):
        return "offline"
    if pretrained in ("hub", "imagenet"):
        return "hub"
    return "file" if pretrained.startswith("file:") else pretrained


def test_recipes_lists_every_packaged_recipe_with_its_weight_source(monkeypatch, capsys) -> None:
    code, stdout, stderr = run_cli(monkeypatch, capsys, "recipes", "--format", "json")
    assert code == 0, stderr
    rows = {r["name"]: r for r in json.loads(stdout)}
    shipped = packaged_recipes()
    assert sorted(rows) == sorted(shipped) and len(rows) >= 2
    for name, path in shipped.items():
        cfg = load_config(str(path))
        row = rows[name]
        assert row["error"] == "", row
        assert (row["description"], row["arch"], row["backbone"], row["input_size"]) == \
            (cfg.description, cfg.model.arch, cfg.model.backbone, cfg.model.input_size)
        assert row["weights"] == _expected_weights(Path(str(path))), name
    assert (rows["lite0-quick"]["weights"], rows["lite0-quick"]["source"]) == ("offline", "imagenet-lite0")


def test_a_broken_recipe_is_an_error_row_and_the_others_still_list(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "good.yaml").write_text("description: fine\nmodel: {backbone: resnet18, pretrained: hub, input_size: 96}\n")
    (folder / "scratch.yaml").write_text("model: {pretrained: none}\n")
    (folder / "broken.yaml").write_text("model: [unclosed\n")
    (folder / "unknown.yaml").write_text("model: {nope: 1}\n")
    monkeypatch.setattr(config, "RECIPES", folder)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "recipes", "-f", "json")
    assert code == 0, stderr
    rows = {r["name"]: r for r in json.loads(stdout)}
    assert list(rows) == ["broken", "good", "scratch", "unknown"]
    assert (rows["good"]["weights"], rows["good"]["source"], rows["good"]["input_size"]) == ("hub", "resnet18", 96)
    assert (rows["scratch"]["weights"], rows["scratch"]["error"]) == ("none", "")
    assert rows["broken"]["weights"] == "error" and rows["broken"]["error"].startswith("broken.yaml: ")
    assert "not valid YAML" in rows["broken"]["error"]
    assert rows["unknown"]["weights"] == "error" and "unknown config key 'nope'" in rows["unknown"]["error"]
    code, stdout, _ = run_cli(monkeypatch, capsys, "recipes")  # the table survives it too
    assert code == 0 and "broken.yaml" in stdout and "scratch" in stdout


# --------------------------------------------------------------------------------------------- tune


def test_param_specs_parse() -> None:
    lr = parse_param("train.lr=log:1e-5:1e-2")
    assert (lr.key, lr.kind, lr.low, lr.high) == ("train.lr", "log", 1e-5, 1e-2)
    batch = parse_param("train.batch_size=int:8:64")
    assert (batch.kind, batch.low, batch.high) == ("int", 8, 64)
    assert parse_param("loss.name=choice:ce,focal").choices == ("ce", "focal")
    assert parse_param("train.amp=choice:true,false").choices == (True, False)
    drop = parse_param("model.drop_rate=float:0:0.5")
    assert (drop.kind, drop.low, drop.high) == ("float", 0.0, 0.5)


@pytest.mark.parametrize("spec, why", [
    ("train.lr", "expected section.field=SPEC"),
    ("lr=float:0:1", "expected section.field=SPEC"),
    ("train.lr=uniform:0:1", "SPEC must start with one of"),
    ("train.lr=float:1e-2:1e-5", "must be below HI"),
    ("train.lr=log:0:1e-2", "log needs LO > 0"),
    ("train.lr=float:1e-3", "float needs two numbers"),
    ("train.batch_size=int:1.5:4", "int needs whole-number bounds"),
    ("loss.name=choice:", "choice needs values"),
    ("train.epochs=float:1:3", "expected int"),  # checked against the config: epochs is an int
    ("model.nope=float:0:1", "unknown config key 'nope'"),
    ("loss.name=choice:ce,bogus", "'bogus' is not one of ce, focal"),
    ("data.patch_size=int:32:64", "decoded once"),
])
def test_bad_param_specs_exit_2_naming_the_flag(spec: str, why: str, amibr: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, stderr = run_cli(monkeypatch, capsys, "tune", "--data", amibr, "--trials", "1", "--out", tmp_path / "t", *sets(),
                              "--param", spec)
    assert code == 2
    assert stderr.startswith(f"error: --param '{spec}': ") and why in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_tune_writes_the_best_trial_as_a_recipe_and_a_rerun_adds_only_the_missing_trials(amibr: Path, tmp_path: Path, monkeypatch,
                                                                                          capsys) -> None:
    out = tmp_path / "tune"
    fits = FitCount(monkeypatch)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "tune", "--data", amibr, "--trials", "2", "--folds", "2", "--out", out, *sets())
    assert code == 0, stderr
    assert fits.calls == {f"trial_00{t}/fold_{f}": 1 for t in range(2) for f in range(2)}
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:  # a trial's value is its CV's mean balanced accuracy; each fold reported the running mean
        summary = json.loads((out / f"trial_00{t.number}" / "summary.json").read_text())
        per_fold = [f["balanced_accuracy"] for f in summary["per_fold"]]
        assert t.value == summary["mean"]["balanced_accuracy"]
        assert t.intermediate_values == {0: per_fold[0], 1: float(np.mean(per_fold))}
        assert set(t.params) == {"train.lr", "model.drop_rate", "loss.focal_alpha", "loss.focal_gamma"}
    first = study.trials  # a snapshot: ``study.trials`` reads the database again
    best = max(first, key=lambda t: t.value)
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# mitotype tune: trial {best.number}, the best of 2 finished trial(s) (0 pruned): "
                           f"mean balanced accuracy {best.value:.4f}")
    cfg = load_config(str(out / "best.yaml"))
    assert (cfg.train.lr, cfg.model.drop_rate) == (best.params["train.lr"], best.params["model.drop_rate"])
    assert (cfg.loss.focal_alpha, cfg.loss.focal_gamma, cfg.loss.name) == \
        (best.params["loss.focal_alpha"], best.params["loss.focal_gamma"], "focal")  # focal: alpha and gamma matter
    assert (cfg.model.backbone, cfg.train.epochs, cfg.recipe) == ("test_efficientnet", 1, f"{DEFAULT_RECIPE}-tuned")
    table = pd.read_csv(out / "trials.csv")
    assert table["trial"].tolist() == [0, 1] and table["state"].tolist() == ["COMPLETE", "COMPLETE"]
    assert table["mean_balanced_accuracy"].tolist() == [t.value for t in first]

    again = FitCount(monkeypatch)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "tune", "--data", amibr, "--trials", "3", "--folds", "2", "--out", out, *sets())
    assert code == 0, stderr
    assert again.calls == {"trial_002/fold_0": 1, "trial_002/fold_1": 1} and "1 trial(s) run now" in stdout
    assert pd.read_csv(out / "trials.csv")["state"].tolist() == ["COMPLETE"] * 3
    new = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'optuna.db'}").trials[2]
    assert new.params not in [t.params for t in first]  # the resumed session does not redraw trial 0

    code, _, stderr = run_cli(monkeypatch, capsys, "tune", "--data", amibr, "--trials", "3", "--folds", "3", "--out", out, *sets())
    assert code == 2 and "holds a study of another search (folds: 2 -> 3)" in stderr and "--out" in stderr


class PruneTrialOne(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number == 1


def test_a_pruned_trial_stops_after_its_fold_and_an_interrupted_one_resumes_its_folds(amibr: Path, tmp_path: Path, monkeypatch,
                                                                                       capsys) -> None:
    monkeypatch.setattr(tune_mod, "default_pruner", lambda: PruneTrialOne())
    out = tmp_path / "tune"
    fits = FitCount(monkeypatch)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "tune", "--data", amibr, "--trials", "2", "--folds", "3", "--out", out, *sets())
    assert code == 0, stderr
    assert fits.calls == {**{f"trial_000/fold_{f}": 1 for f in range(3)}, "trial_001/fold_0": 1}  # pruned after its first fold
    assert not (out / "trial_001" / "summary.json").exists()
    table = pd.read_csv(out / "trials.csv")
    assert table["state"].tolist() == ["COMPLETE", "PRUNED"] and table["folds_done"].tolist() == [3, 1]
    assert "best: trial 0" in stdout and "1 complete, 1 pruned" in stdout

    cut = FitCount(monkeypatch, interrupt="trial_002/fold_1")  # Ctrl-C in the middle of trial 2
    with pytest.raises(KeyboardInterrupt):
        tune_mod.tune(DEFAULT_RECIPE, runs.load_dataset(amibr, load_config(DEFAULT_RECIPE, TINY + ["train.epochs=1",
                      "train.eval_batch_size=64"])), out, trials=3, folds=3,
                      overrides=TINY + ["train.epochs=1", "train.eval_batch_size=64"], pruner=optuna.pruners.NopPruner())
    assert cut.calls == {"trial_002/fold_0": 1}
    resumed = FitCount(monkeypatch)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "tune", "--data", amibr, "--trials", "3", "--folds", "3", "--out", out, *sets())
    assert code == 0, stderr
    assert resumed.calls == {"trial_002/fold_1": 1, "trial_002/fold_2": 1}  # fold 0 of the interrupted trial is reused
    table = pd.read_csv(out / "trials.csv")
    assert table["state"].tolist() == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert table["dir"].tolist() == ["trial_000", "trial_001", "trial_002", "trial_002"]
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'optuna.db'}")
    assert study.trials[3].params == study.trials[2].params


# --------------------------------------------------------------------------------------------- compare


def _recipes(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "rec" / "a.yaml", tmp_path / "rec" / "b.yaml"
    a.parent.mkdir()
    a.write_text("description: a\nmodel: {drop_rate: 0.1}\n")
    b.write_text("description: b\nmodel: {drop_rate: 0.3}\ntrain: {lr: 3.0e-3}\n")
    return [a, b]


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("*/fold_*/model.safetensors"))}


def test_compare_tables_each_recipe_and_reuses_finished_runs(amibr: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    a, b = _recipes(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", "--recipes", f"{a},{b}", "--data", amibr, "--folds", "2", "--out", out, *sets()]
    fits = FitCount(monkeypatch)
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert fits.calls == {f"{r}/fold_{f}": 1 for r in "ab" for f in range(2)}
    table = pd.read_csv(out / "compare.csv")
    assert table["recipe"].tolist() == ["a", "b"] and table["run"].tolist() == ["trained", "trained"]
    md = (out / "compare.md").read_text()
    for row in table.to_dict("records"):
        summary = json.loads((out / row["recipe"] / "summary.json").read_text())
        for m in COMPARED:
            assert (row[f"{m}_mean"], row[f"{m}_sd"]) == (summary["mean"][m], summary["sd"][m]), m
        assert (row["wall_seconds"], row["device"], row["folds"]) == (summary["wall_seconds"], summary["device"], 2)
        model = load_model(out / row["recipe"] / "fold_0").model
        assert row["params"] == sum(p.numel() for p in model.parameters()) and row["patches_per_s"] > 0
        ba = f"{summary['mean']['balanced_accuracy']:.3f} ± {summary['sd']['balanced_accuracy']:.3f}"
        assert f"| {row['recipe']} | {ba} |" in md
    assert len([line for line in md.splitlines() if line.startswith("| ") and "±" in line]) == 2
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = _mtimes(out)
    again = FitCount(monkeypatch)
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert again.calls == {} and _mtimes(out) == before and len(before) == 4  # finished runs are reused, not retrained
    assert pd.read_csv(out / "compare.csv")["run"].tolist() == ["reused", "reused"]
    assert pd.read_csv(out / "compare.csv")["balanced_accuracy_mean"].tolist() == table["balanced_accuracy_mean"].tolist()

    changed = FitCount(monkeypatch)
    with pytest.warns(UserWarning, match=r"config changed \(train.weight_decay: 0.01 -> 0.05\); retraining") as caught:
        code, _, stderr = run_cli(monkeypatch, capsys, *args, "--set", "train.weight_decay=0.05")
    assert code == 0, stderr
    assert changed.calls == {f"{r}/fold_{f}": 1 for r in "ab" for f in range(2)}  # another --set: every recipe retrains
    assert sorted(Path(str(w.message).split(":")[0]).name for w in caught) == ["a", "b"]
    assert load_config(str(out / "a" / "config.yaml")).train.weight_decay == 0.05


def test_compare_resumes_an_interrupted_recipe_and_refuses_bad_lists(amibr: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    a, b = _recipes(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", "--recipes", f"{a},{b}", "--data", amibr, "--folds", "2", "--out", out, *sets()]
    FitCount(monkeypatch, interrupt="b/fold_1")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in b's second fold (the library call: the CLI turns it into an exit status)
        compare_runs([str(a), str(b)], amibr, out, folds=2, overrides=TINY + ["train.epochs=1", "train.eval_batch_size=64"])
    resumed = FitCount(monkeypatch)
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert resumed.calls == {"b/fold_1": 1}  # a finished, b's first fold done: only b's second fold is left
    assert pd.read_csv(out / "compare.csv")["run"].tolist() == ["reused", "trained"]

    code, _, stderr = run_cli(monkeypatch, capsys, "compare", "--recipes", f"{a},{a}", "--data", amibr, "--out", tmp_path / "x")
    assert code == 2 and stderr.startswith("error: --recipes: a named twice")
    code, _, stderr = run_cli(monkeypatch, capsys, "compare", "--recipes", " , ", "--data", amibr, "--out", tmp_path / "x")
    assert code == 2 and stderr.startswith("error: --recipes ' , ': name recipes")


def test_best_yaml_is_the_highest_scoring_complete_trial(tmp_path: Path) -> None:
    """Tiny CV runs often tie; here the trials' scores are set, so only the best one can be written."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("search", {"recipe": "lite0-quick", "overrides": [], "space": ["train.lr=log:1e-5:1e-2"],
                                   "fixed": [], "folds": 3, "data": "40 patches"})
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    for lr, value, state in ((1e-4, 0.7, "COMPLETE"), (2e-3, 0.9, "COMPLETE"), (5e-3, 0.95, "PRUNED"), (3e-4, 0.6, "COMPLETE")):
        study.add_trial(optuna.trial.create_trial(
            params={"train.lr": lr}, distributions=dist, value=value if state == "COMPLETE" else None,
            intermediate_values={0: value}, state=getattr(optuna.trial.TrialState, state),
            user_attrs={"overrides": [f"train.lr={lr}"], "sd": 0.01, "dir": "x"}))
    assert tune_mod.write_outputs(study, "lite0-quick", tmp_path, []) == tmp_path / "best.yaml"
    cfg = load_config(str(tmp_path / "best.yaml"))
    assert (cfg.train.lr, cfg.recipe, cfg.model.backbone) == (2e-3, "lite0-quick-tuned", "tf_efficientnet_lite0")
    assert (tmp_path / "best.yaml").read_text().startswith("# mitotype tune: trial 1, the best of 4 finished trial(s) (1 pruned): "
                                                           "mean balanced accuracy 0.9000 ± 0.0100 over 3 grouped folds")
    assert pd.read_csv(tmp_path / "trials.csv")["state"].tolist() == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]


def test_an_out_that_is_a_file_is_refused_in_one_line_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    from conftest import write_class_folders

    from mitotype.errors import MitotypeError

    data = write_class_folders(tmp_path / "d", n_atypical=4, n_normal=6, n_slides=3)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for command in (["tune", "--recipe", "lite0-quick", "--trials", "1"], ["compare", "--recipes", "lite0-quick"]):
        code, _, err = run_cli(monkeypatch, capsys, *command, "--data", data, "--out", afile, *(f"--set={s}" for s in TINY))
        assert code == 2 and err.strip() == f"error: --out {afile}: is a file; expected a folder", command
    cfg = load_config(None, TINY)
    with pytest.raises(MitotypeError, match="is a file"):  # the library checks it too, not only the CLI
        tune_mod.tune("lite0-quick", runs.load_dataset(data, cfg), afile, trials=1, folds=2, overrides=TINY)
    with pytest.raises(MitotypeError, match="is a file"):
        compare_runs(["lite0-quick"], data, afile, folds=2, overrides=TINY)
    assert afile.read_text() == "keep"
