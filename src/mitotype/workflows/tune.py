"""``mitotype tune``: optuna over a recipe's settings, each trial a grouped cross-validation.

A parameter is ``section.field=SPEC``; SPEC is ``float:LO:HI``, ``log:LO:HI`` (log-uniform),
``int:LO:HI`` (inclusive) or ``choice:A,B,...`` (each value read as YAML: ``1e-3``, ``true``, ``focal``).
The default space is the learning rate, dropout and focal alpha and gamma. Alpha and gamma change
nothing under cross-entropy, so while they are searched the trials train with ``loss.name=focal``,
unless ``loss.name`` is itself a parameter (``choice:ce,focal``: the search chooses);
``default_space=False`` searches only the named parameters.

Trial N cross-validates into ``OUT/trial_NNN``; after each fold the mean balanced accuracy of the
finished folds is reported, and the pruner may stop the trial there. ``OUT/optuna.db`` holds the
study (fixed name, seeded TPE sampler): rerunning continues to ``trials`` finished (complete or
pruned) trials in all, and a trial that was interrupted is run again with its parameters in its own
folder, reusing its finished folds. The best trial becomes ``OUT/best.yaml``, a recipe any command
loads with ``--recipe``; ``OUT/trials.csv`` lists every trial.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mitotype._io import check_output_dir, write_csv, write_text
from mitotype.config import Config, dump_config, load_config
from mitotype.errors import MitotypeError
from mitotype.data.dataset import Dataset
from mitotype.workflows.runs import cross_validate

STUDY_NAME = "mitotype-tune"
KINDS = ("float", "log", "int", "choice")
DEFAULT_SPACE = ("train.lr=log:1e-5:1e-2", "model.drop_rate=float:0:0.5", "loss.focal_alpha=float:0.1:0.9",
                 "loss.focal_gamma=float:0:5")
FOCAL_KEYS = ("loss.focal_alpha", "loss.focal_gamma")
DECODED_ONCE = ("data.patch_size", "data.size_policy", "data.on_bad_image", "data.cache_dir")  # the data are decoded once
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


@dataclass(frozen=True)
class Param:
    """One searched field and its distribution; ``text`` is the user's ``key=SPEC``."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()
    text: str = ""

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def values_to_check(self) -> list[Any]:
        return list(self.choices) if self.kind == "choice" else [_number(self.low, self.kind), _number(self.high, self.kind)]


@dataclass(frozen=True)
class TuneResult:
    ran: int  # trials run by this call
    complete: int
    pruned: int
    best_trial: int | None
    best_value: float | None
    best_yaml: Path | None
    trials_csv: Path


def _bad(text: str, why: str) -> MitotypeError:
    return MitotypeError(f"{{param}} '{text}': {why}", options=("param",))


def _number(value: float, kind: str) -> Any:
    return int(value) if kind == "int" else float(value)


def parse_param(text: str) -> Param:
    """``section.field=SPEC`` -> :class:`Param`; the grammar is checked here, the values against the config later."""
    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise _bad(text, "expected section.field=SPEC, e.g. train.lr=log:1e-5:1e-2")
    if key in DECODED_ONCE:
        raise _bad(text, "the patches are decoded once for every trial; set this field on the recipe, not in the search")
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise _bad(text, f"SPEC must start with one of {', '.join(KINDS)} (float:LO:HI, log:LO:HI, int:LO:HI, choice:A,B)")
    if kind == "choice":
        choices = tuple(_yaml_value(v.strip()) for v in rest.split(",")) if rest.strip() else ()
        if not choices or any(v == "" for v in choices):
            raise _bad(text, "choice needs values separated by commas, e.g. choice:ce,focal")
        if any(not isinstance(v, (str, int, float, bool)) or v is None for v in choices):
            raise _bad(text, "choice values must be plain numbers, words or true/false")
        if len(set(map(repr, choices))) != len(choices):
            raise _bad(text, "choice values must be distinct")
        return Param(key, kind, choices=choices, text=text)
    bounds = rest.split(":")
    try:
        low, high = (float(b) for b in bounds) if len(bounds) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        raise _bad(text, f"{kind} needs two numbers, {kind}:LO:HI")
    if not low < high:
        raise _bad(text, f"LO {bounds[0]} must be below HI {bounds[1]}")
    if kind == "log" and low <= 0:
        raise _bad(text, "log needs LO > 0")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise _bad(text, "int needs whole-number bounds")
    return Param(key, kind, low, high, text=text)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _override(key: str, value: Any) -> str:
    return f"{key}={'true' if value is True else 'false' if value is False else value}"


def search_space(recipe: str, overrides: list[str], params: list[str], *, default_space: bool = True) -> tuple[dict[str, Param], list[str]]:
    """The searched parameters by key (the user's replace the defaults of the same field) and the fixed overrides
    they imply; every bound or choice is checked against the recipe, so a bad one fails before any training."""
    space = {p.key: p for p in map(parse_param, DEFAULT_SPACE)} if default_space else {}
    named: set[str] = set()
    for text in params:
        param = parse_param(text)
        if param.key in named:
            raise _bad(text, f"{param.key} is named twice")
        named.add(param.key)
        space[param.key] = param
    if not space:
        raise MitotypeError("{param}: nothing to search; name a field (e.g. train.lr=log:1e-5:1e-2) or keep the default space",
                            options=("param",))
    fixed = ["loss.name=focal"] if any(k in space for k in FOCAL_KEYS) and "loss.name" not in space else []
    for param in space.values():
        for value in param.values_to_check():
            try:
                load_config(recipe, [*overrides, *fixed, _override(param.key, value)])
            except MitotypeError as err:
                raise _bad(param.text, str(err)) from None
    return space, fixed


def _optuna():
    try:
        import optuna
    except ImportError:
        raise MitotypeError("tune needs optuna, which is not installed: pip install 'mitotype[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_pruner() -> Any:
    """Median pruning once three trials have finished: a trial whose running mean after a fold is below the
    median of earlier trials at that fold stops there."""
    return _optuna().pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def _search_record(recipe: str, overrides: list[str], space: dict[str, Param], fixed: list[str], folds: int, data: Dataset) -> dict:
    """What makes a study the same search: rerunning with another one in the same folder is refused."""
    paths = "\n".join(sorted(map(str, data.manifest["path"])))
    return {"recipe": recipe, "overrides": [o for o in overrides if not o.startswith("train.device=")],
            "space": sorted(p.text for p in space.values()), "fixed": fixed, "folds": folds,
            "data": f"{len(data.manifest)} patches, sha1 {hashlib.sha1(paths.encode()).hexdigest()[:12]}"}


def _open_study(optuna: Any, out: Path, record: dict, seed: int, pruner: Any) -> Any:
    db = out / "optuna.db"
    if not db.exists() and any(out.glob("trial_*")):
        raise MitotypeError(f"{out}: trial folders without optuna.db; choose another {{out_dir}}", options=("out_dir",))
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{db.resolve()}", study_name=STUDY_NAME, direction="maximize",
                                load_if_exists=True, pruner=pruner)
    old = study.user_attrs.get("search")
    if old is None:
        study.set_user_attr("search", record)
    elif old != record:
        changed = next(k for k in record if old.get(k) != record[k])
        raise MitotypeError(f"{out}: holds a study of another search ({changed}: {old.get(changed)!r} -> {record[changed]!r}); "
                            f"rerun it as it was, or choose another {{out_dir}}", options=("out_dir",))
    # a new seed per session: a resumed study must not draw its first trials again
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def _requeue_interrupted(optuna: Any, study: Any) -> int:
    """Trials left running (a killed process) or failed (Ctrl-C, an error) are run once more with their
    parameters in their own folder, so their finished folds are reused."""
    state = optuna.trial.TrialState
    retried = set(study.user_attrs.get("retried", []))
    again = 0
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING, state.FAIL)):
        if t.number in retried:
            continue
        if t.state == state.RUNNING:
            study.tell(t.number, state=state.FAIL)
        study.enqueue_trial(t.params, user_attrs={"dir": t.user_attrs.get("dir", f"trial_{t.number:03d}")})
        retried.add(t.number)
        again += 1
    study.set_user_attr("retried", sorted(retried))
    return again


def tune(recipe: str, data: Dataset, out: Path, *, trials: int, folds: int = 5, overrides: list[str] | None = None,
         params: list[str] | None = None, default_space: bool = True, seed: int = 0, pruner: Any = None, n_boot: int = 1000,
         on_trial: Callable[[dict], None] | None = None) -> TuneResult:
    """Run trials until ``trials`` have finished in ``out``'s study; write ``best.yaml`` and ``trials.csv``."""
    if trials < 1:
        raise MitotypeError(f"{{trials}}: {trials} must be at least 1", options=("trials",))
    if folds < 2:
        raise MitotypeError(f"{{folds}}: {folds} must be at least 2", options=("folds",))
    optuna = _optuna()
    out, overrides = Path(out), list(overrides or [])
    check_output_dir(out, "out_dir")
    space, fixed = search_space(recipe, overrides, list(params or []), default_space=default_space)
    study = _open_study(optuna, out, _search_record(recipe, overrides, space, fixed, folds, data), seed,
                        pruner if pruner is not None else default_pruner())
    state = optuna.trial.TrialState

    def finished() -> int:
        return len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))

    def objective(trial: Any) -> float:
        values = {key: param.suggest(trial) for key, param in space.items()}
        name = trial.user_attrs.get("dir", f"trial_{trial.number:03d}")
        trial_overrides = [*overrides, *fixed, *(_override(k, v) for k, v in values.items())]
        trial.set_user_attr("dir", name)
        trial.set_user_attr("overrides", trial_overrides)
        cfg = load_config(recipe, trial_overrides)
        run_dir = out / name
        done: list[float] = []

        def report(fold: int, metrics: dict) -> None:
            done.append(metrics["balanced_accuracy"])
            trial.report(float(np.mean(done)), fold)
            if trial.should_prune():
                raise optuna.TrialPruned(f"after fold {fold}")

        resume = run_dir.is_dir() and any(run_dir.iterdir())
        summary = cross_validate(cfg, data, folds=folds, out=run_dir, resume=resume, n_boot=n_boot, on_fold=report)
        trial.set_user_attr("sd", summary["sd"]["balanced_accuracy"])
        return float(summary["mean"]["balanced_accuracy"])

    def after(study: Any, trial: Any) -> None:
        write_outputs(study, recipe, out, overrides)
        if on_trial is not None:
            on_trial({"trial": trial.number, "state": trial.state.name, "value": trial.value})

    ran = 0
    _requeue_interrupted(optuna, study)
    while finished() < trials:  # one at a time, so a requeued trial that fails again stops the loop with its error
        study.optimize(objective, n_trials=1, callbacks=[after])
        ran += 1
    if ran == 0:  # every trial had finished before: outputs from this study's state (the callback wrote them otherwise)
        write_outputs(study, recipe, out, overrides)
    best_yaml = out / "best.yaml" if (out / "best.yaml").is_file() else None
    complete = study.get_trials(deepcopy=False, states=(state.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None
    return TuneResult(ran, len(complete), len(study.get_trials(deepcopy=False, states=(state.PRUNED,))),
                      best.number if best else None, best.value if best else None, best_yaml, out / "trials.csv")


def trials_table(study: Any) -> pd.DataFrame:
    """One row per trial: state, mean ± sd balanced accuracy (complete ones), folds reported, parameters, folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = t.intermediate_values
        rows.append({"trial": t.number, "state": t.state.name, "mean_balanced_accuracy": t.value,
                     "sd_balanced_accuracy": t.user_attrs.get("sd"), "folds_done": len(steps),
                     "last_reported": steps[max(steps)] if steps else None, **t.params, "dir": t.user_attrs.get("dir", ""),
                     "seconds": round(t.duration.total_seconds(), 1) if t.duration else None})
    return pd.DataFrame(rows)


def write_outputs(study: Any, recipe: str, out: Path, overrides: list[str]) -> Path | None:
    """trials.csv always; best.yaml once a trial has completed (the best so far)."""
    import optuna

    write_csv(out / "trials.csv", trials_table(study))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    device = [o for o in overrides if o.startswith("train.device=")]  # where it ran is not part of the recipe
    cfg = load_config(recipe, [o for o in best.user_attrs["overrides"] if o not in device])
    write_text(out / "best.yaml", _best_yaml(cfg, study, best, recipe))
    return out / "best.yaml"


def _best_yaml(cfg: Config, study: Any, best: Any, recipe: str) -> str:
    import optuna

    state = optuna.trial.TrialState
    n_done = len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))
    n_pruned = len(study.get_trials(deepcopy=False, states=(state.PRUNED,)))
    search = study.user_attrs["search"]
    chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    cfg.recipe = f"{cfg.recipe}-tuned"
    cfg.description = f"{cfg.description.rstrip('. ')}. Tuned by mitotype tune: {chosen}.".lstrip(". ")
    header = [
        (f"# mitotype tune: trial {best.number}, the best of {n_done} finished trial(s) ({n_pruned} pruned): mean balanced accuracy "
         f"{best.value:.4f} ± {best.user_attrs.get('sd') or 0.0:.4f} over {search['folds']} grouped folds ({search['data']})."),
        f"# Base recipe {recipe}; overrides: {', '.join(search['overrides']) or 'none'}; fixed: {', '.join(search['fixed']) or 'none'}.",
        f"# Searched: {', '.join(search['space'])}.",
    ]
    return "\n".join(header) + "\n" + dump_config(cfg)
