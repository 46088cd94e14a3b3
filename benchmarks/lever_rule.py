"""Issue 21's rule for a lever that wins, and its goal, checked on out-of-fold predictions.

A lever wins when its pooled out-of-fold balanced accuracy beats the base's on both the
leave-one-source-out run and the 5-fold CV (same folds), with the 95% interval of the paired slide
bootstrap above 0, and no held-out source of the leave-one-out run loses more than 0.01. The goal
(the issue's "done") is every leave-one-out source at least 0.80, the 5-fold CV at least 0.83, and,
at the threshold, sensitivity within 0.05 of specificity on every leave-one-out source.

Each of RUN / BASE is a cv run directory (or a folder with its ``oof_predictions.csv``), or several
joined by ``+`` for the mean of their p_atypical: an ensemble of recipes trained on the same folds.

    .venv/bin/python benchmarks/lever_rule.py --loso runs/lite0-crop64-shift-loso --loso-base runs/lite0-crop64-loso \
        --cv runs/lite0-crop64-shift-cv5 --cv-base benchmarks/results/bundle-oof --out benchmarks/results/e11-shift
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from _oof import paired_bootstrap, read_oof  # benchmarks/ is on the path when run as a script
from mitotype._io import check_output_dir, write_csv, write_json
from mitotype.errors import MitotypeError
from mitotype.evaluation.metrics import binary_metrics

KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")
MAX_SOURCE_LOSS = 0.01
GOAL = {"loso_source": 0.80, "cv": 0.83, "sens_spec_gap": 0.05}


def _metrics(frame: pd.DataFrame, threshold: float) -> dict[str, float]:
    got = binary_metrics(frame["label"].to_numpy(), frame["p_atypical"].to_numpy(), threshold)
    return {k: got[k] for k in KEYS} | {"n": int(len(frame))}


def _parts(oof: pd.DataFrame, summary: dict) -> dict[str, pd.DataFrame]:
    """Held-out sources of a leave-one-out run (by fold), or domains of a K-fold run."""
    held = [f.get("held_out") for f in summary.get("per_fold", [])]
    if summary.get("group_by") and all(held):
        return {held[k]: part for k, part in oof.groupby("fold")}
    return {str(name): part for name, part in oof.groupby("domain")} if "domain" in oof else {}


def half(run_spec: str, base_spec: str, threshold: float) -> dict:
    """One half of the rule: per source / domain and pooled, run vs base, with the paired bootstrap."""
    run, run_summary = read_oof(run_spec)
    base, base_summary = read_oof(base_spec)
    if set(run["path"]) != set(base["path"]):
        raise SystemExit(f"{run_spec} and {base_spec}: other patches")
    merged = base[["path", "fold"]].merge(run[["path", "fold"]], on="path", suffixes=("_base", "_run"))
    if not (merged["fold_base"] == merged["fold_run"]).all():
        raise SystemExit(f"{run_spec} and {base_spec}: other folds (the rule compares the same folds)")
    run_parts, base_parts = _parts(run, run_summary), _parts(base, base_summary)
    parts = {name: {"run": _metrics(part, threshold), "base": _metrics(base_parts[name], threshold)} for name, part in run_parts.items()}
    for v in parts.values():
        v["difference"] = v["run"]["balanced_accuracy"] - v["base"]["balanced_accuracy"]
    return {"run": run_spec, "base": base_spec, "threshold": threshold, "parts": parts,
            "pooled": {"run": _metrics(run, threshold), "base": _metrics(base, threshold)},
            "paired_bootstrap": paired_bootstrap(base, run, threshold=threshold), "oof": run}


def verdict(loso: dict, cv: dict | None) -> dict:
    """The rule (wins or not, and why) and the goal, from the two halves."""
    why = []
    if loso["paired_bootstrap"]["ci95"][0] <= 0:
        why.append("leave-one-out interval reaches 0")
    worst = min(v["difference"] for v in loso["parts"].values())
    if worst < -MAX_SOURCE_LOSS:
        why.append(f"a held-out source loses {-worst:.3f}")
    if cv is None:
        why.append("5-fold half not run")
    elif cv["paired_bootstrap"]["ci95"][0] <= 0:
        why.append("5-fold interval reaches 0")
    sources = {name: v["run"] for name, v in loso["parts"].items()}
    goal = {"every_source_at_least_0.80": all(m["balanced_accuracy"] >= GOAL["loso_source"] for m in sources.values()),
            "cv_at_least_0.83": cv is not None and cv["pooled"]["run"]["balanced_accuracy"] >= GOAL["cv"],
            "sensitivity_within_0.05_of_specificity": all(abs(m["sensitivity"] - m["specificity"]) <= GOAL["sens_spec_gap"] for m in sources.values())}
    return {"wins": not why, "why_not": why, "worst_source_difference": worst, "goal": goal, "goal_reached": all(goal.values())}


def _print(name: str, h: dict) -> None:
    print(f"{name}: {h['run']} vs {h['base']} at {h['threshold']}")
    for part, v in h["parts"].items():
        r, b = v["run"], v["base"]
        print(f"  {part:28s} n {r['n']:4d}  BA {r['balanced_accuracy']:.3f} (sens {r['sensitivity']:.3f} / spec {r['specificity']:.3f}, "
              f"AUROC {r['roc_auc']:.3f})  base {b['balanced_accuracy']:.3f}  {v['difference']:+.3f}")
    pb = h["paired_bootstrap"]
    print(f"  pooled BA {h['pooled']['run']['balanced_accuracy']:.3f} vs {h['pooled']['base']['balanced_accuracy']:.3f}: "
          f"{pb['difference']:+.4f} [{pb['ci95'][0]:+.4f}, {pb['ci95'][1]:+.4f}] (slide bootstrap, {pb['resamples']})")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loso", required=True, help="leave-one-source-out run (cv --group-by domain,scanner), or RUN+RUN")
    ap.add_argument("--loso-base", required=True, help="the base's leave-one-out run, same folds")
    ap.add_argument("--cv", default=None, help="5-fold run, or RUN+RUN")
    ap.add_argument("--cv-base", default=None, help="the base's 5-fold run, same folds")
    ap.add_argument("--threshold", type=float, default=0.5, help="the one threshold the bundle would ship")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if (args.cv is None) != (args.cv_base is None):
        ap.error("--cv and --cv-base go together")
    try:
        check_output_dir(args.out, "--out")
    except MitotypeError as err:
        ap.error(str(err))
    loso = half(args.loso, args.loso_base, args.threshold)
    cv = half(args.cv, args.cv_base, args.threshold) if args.cv else None
    result = {"loso": {k: v for k, v in loso.items() if k != "oof"}, "verdict": verdict(loso, cv)}
    write_csv(args.out / "oof_loso.csv", loso["oof"])
    _print("leave one source out", loso)
    if cv is not None:
        result["cv"] = {k: v for k, v in cv.items() if k != "oof"}
        write_csv(args.out / "oof_cv.csv", cv["oof"])
        _print("5-fold CV", cv)
    write_json(args.out / "summary.json", result)
    v = result["verdict"]
    print(("WINS" if v["wins"] else "does not win: " + "; ".join(v["why_not"])) + f" | goal reached: {v['goal_reached']} {v['goal']}")
    return result


if __name__ == "__main__":
    main()
