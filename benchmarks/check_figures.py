"""Check the figures the README and RESULTS.md quote from saved results against those results; exit 1 naming each that drifted.

    .venv/bin/python benchmarks/check_figures.py [--readme README.md] [--results benchmarks/RESULTS.md] [--bundle PATH]

A number typed into prose does not change when the model behind it does: a new bundle, a rerun
fold, a fixed metric would leave the README quoting the old figures. Each row of ``FIGURES`` names
a figure, the document it is in, a pattern whose groups are the figure as printed (matched on the
text with its line breaks and runs of spaces made single spaces) and how to recompute it from the
saved result, rounded as printed. A pattern that no longer matches exactly once fails as well:
the sentence was rewritten, and its row here must follow it.

Saved results: the bundled model's ``bundle.json`` (its 5-fold CV: mean and sd over folds, pooled
out-of-fold, per fold, the data's size; the bundle's bytes) and the ``summary.json`` of each run
committed under ``benchmarks/results/NAME/`` (``bundle-oof``: the bundle's fold models re-scored
on their own held-out folds, per source; ``fast-by-default``: the first command before / after).
Not checked, for want of a saved result: the bootstrap interval of the pooled figure and the
earlier experiments' figures (their runs were lost with their machines).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Figure:
    name: str
    doc: str  # "readme" or "results"
    pattern: str  # one group per printed number
    recompute: Callable[[dict], tuple[str, ...]]  # from bundle.json, formatted as printed


def f3(value: float) -> str:
    return f"{value:.3f}"


def mean_sd(metric: str) -> Callable[[dict], tuple[str, ...]]:
    return lambda b: (f3(b["cv"]["mean"][metric]), f3(b["cv"]["sd"][metric]))


def worst(metric: str) -> Callable[[dict], str]:
    return lambda b: f3(min(fold[metric] for fold in b["cv"]["per_fold"]))


def pooled(b: dict) -> tuple[str, ...]:
    return f3(b["cv"]["out_of_fold"]["balanced_accuracy"]), f3(b["cv"]["out_of_fold"]["roc_auc"])


def per_fold(b: dict) -> tuple[str, ...]:
    return tuple(f3(fold[m]) for fold in sorted(b["cv"]["per_fold"], key=lambda f: f["fold"]) for m in ("balanced_accuracy", "roc_auc"))


FIGURES = (
    Figure("CV balanced accuracy, mean ± sd over folds", "readme",
           r"`lite0-crop64-192` \(the bundled model\).{0,120}balanced accuracy \*\*(\S+) ± (\S+)\*\*", mean_sd("balanced_accuracy")),
    Figure("CV AUROC, mean ± sd over folds", "readme", r", AUROC \*\*(\S+) ± (\S+)\*\* \(mean ± sd over", mean_sd("roc_auc")),
    Figure("CV folds and worst fold's balanced accuracy", "readme", r"\(mean ± sd over (\d+) slide-grouped folds, worst fold (\S+)\)",
           lambda b: (str(b["cv"]["folds"]), worst("balanced_accuracy")(b))),
    Figure("pooled out-of-fold balanced accuracy / AUROC", "readme", r"pooled out-of-fold (\S+) \[[^\]]*\] / (\S+);", pooled),
    Figure("training split: patches, atypical, slides", "readme",
           r"The AMi-Br training split used here \(([\d,]+) patches of 128 × 128 px, (\d+) atypical, (\d+) slides",
           lambda b: (f"{b['cv']['n']:,}", str(b["cv"]["n_atypical"]), str(b["cv"]["groups"]))),
    Figure("experiment 8 row: worst fold, BA and AUROC mean ± sd, worst AUROC, pooled", "results",
           r"\| `e8-lite0-crop64-192` \| lite0-crop64-192 \| 5 folds, worst (\S+) \| (\S+) ± (\S+) \| (\S+) ± (\S+) \(worst (\S+)\) \| "
           r"(\S+) / (\S+) \|",
           lambda b: (worst("balanced_accuracy")(b), *mean_sd("balanced_accuracy")(b), *mean_sd("roc_auc")(b), worst("roc_auc")(b),
                      *pooled(b))),
    Figure("experiment 8 per fold: balanced accuracy / AUROC", "results",
           r"\| 8 `lite0-crop64-192` \| (\S+) / (\S+) \| (\S+) / (\S+) \| (\S+) / (\S+) \| (\S+) / (\S+) \| (\S+) / (\S+) \|", per_fold),
    Figure("experiment 8 log entry: BA and AUROC mean ± sd, pooled", "results",
           r"\| \*\*(\S+) ± (\S+) / (\S+) ± (\S+)\*\* \(experiment 4: [^)]*\); better on folds 0, 2, 3, 4 [^|]*? pooled OOF (\S+) \[[^\]]*\] / (\S+) ",
           lambda b: (*mean_sd("balanced_accuracy")(b), *mean_sd("roc_auc")(b), *pooled(b))),
    Figure("bundle size", "results", r"its `bundle.json` carries the CV figures\): (\S+) MiB in all",
           lambda b: (f"{b['bytes'] / 2**20:.1f}",)),
    Figure("bundled model by source, out of fold (benchmarks/results/bundle-oof)", "readme",
           r"by source in those predictions MIDOG21 (\S+) / (\S+), TUPAC16 (\S+) / (\S+) \(",
           lambda b: tuple(f3(b["_results"]["bundle-oof"]["per_source"][s]["at_0.5"][m])
                           for s in ("MIDOG21", "TUPAC16") for m in ("balanced_accuracy", "roc_auc"))),
    Figure("bf16 labels that differ from torch's (benchmarks/results/backend-agreement)", "readme",
           r"changes (\d+) of the ([\d,]+) labels here \(bf16 arithmetic, max \|Δp\| (\S+);",
           lambda b: (str(b["_results"]["backend-agreement"]["backends"]["openvino-bf16"]["labels_differing_from_torch"]),
                      f"{b['_results']['backend-agreement']['n']:,}",
                      f"{b['_results']['backend-agreement']['backends']['openvino-bf16']['max_abs_dp_vs_torch']:.3f}")),
    Figure("the current bundle at the other folds' threshold vs 0.5 (benchmarks/results/bundle-oof)", "readme",
           r"the current bundle: (\S+) vs (\S+), mean over folds",
           lambda b: (f3(b["_results"]["bundle-oof"]["cross_fitted_threshold"]["mean_balanced_accuracy"]),
                      f3(b["_results"]["bundle-oof"]["mean"]["balanced_accuracy"]))),
    Figure("leave-one-source-out, lite0-crop64 (benchmarks/results/e4-lite0-crop64-loso)", "readme",
           r"`lite0-crop64` scores Aperio CS2 (\S+), Hamamatsu S360 (\S+), Hamamatsu XR (\S+), TUPAC16 (\S+)\.",
           lambda b: tuple(f3(b["_results"]["e4-lite0-crop64-loso"]["per_source"][s]["at_0.5"]["balanced_accuracy"])
                           for s in ("MIDOG21/Aperio ScanScope CS2", "MIDOG21/Hamamatsu S360", "MIDOG21/Hamamatsu XR", "TUPAC16"))),
    Figure("experiment 9 vs lite0-crop64, pooled out of fold (benchmarks/results/e9-lite0-crop64-stain-loso)", "readme",
           r"pooled \+(\S+) \[(\S+), \+(\S+)\]: promising",
           lambda b: (f3(b["_results"]["e9-lite0-crop64-stain-loso"]["against"]["paired_bootstrap"]["difference"]),
                      f3(b["_results"]["e9-lite0-crop64-stain-loso"]["against"]["paired_bootstrap"]["ci95"][0]),
                      f3(b["_results"]["e9-lite0-crop64-stain-loso"]["against"]["paired_bootstrap"]["ci95"][1]))),
    Figure("highest layout-only baseline F1 on fold-0 mosaics (benchmarks/results/mosaic-baselines)", "results",
           r"Every layout-only baseline stays below F1 0\.3 \(highest (\S+)\)",
           lambda b: (f3(b["_results"]["mosaic-baselines"]["max_layout_only_f1"]),)),
    Figure("offset study: BA (AUROC) at 0, 5, 10, 20, 30 px (benchmarks/results/offset-study)", "results",
           r"\| balanced accuracy \(AUROC\) \| (\S+) \((\S+)\) \| (\S+) \((\S+)\) \| (\S+) \((\S+)\) \| (\S+) \((\S+)\) \| (\S+) \((\S+)\) \|",
           lambda b: tuple(f3(b["_results"]["offset-study"]["per_offset"][d][m]) for d in ("0", "5", "10", "20", "30")
                           for m in ("balanced_accuracy", "roc_auc"))),
    Figure("bundled detector on fold-0 mosaics: precision, recall, F1 (benchmarks/results/detector-mosaics)", "readme",
           r"precision \*\*(\S+)\*\*, recall \*\*(\S+)\*\*, F1 \*\*(\S+)\*\* at its threshold",
           lambda b: tuple(f3(b["_results"]["detector-mosaics"]["at_threshold"][m]) for m in ("precision", "recall", "f1"))),
    Figure("chained classifier at detections vs patch path (benchmarks/results/detector-mosaics)", "readme",
           r"matched figures at balanced accuracy (\S+) against (\S+) on their own patches",
           lambda b: tuple(f3(b["_results"]["detector-mosaics"]["chained"][k]["balanced_accuracy"])
                           for k in ("points_path_at_detections", "patch_path_same_figures"))),
    Figure("detect end to end vs bare forward (benchmarks/results/detector-mosaics)", "readme",
           r"`detect` end to end runs at (\S+) mm²/min, (\S+)x \[(\S+)-(\S+)\] the detector's bare forward",
           lambda b: (f"{b['_results']['detector-mosaics']['throughput']['detect_mm2_per_min']['median']:.1f}",
                      *(f"{b['_results']['detector-mosaics']['throughput']['detect_over_bare'][k]:.2f}" for k in ("median", "min", "max")))),
    Figure("analyze vs detect on synthetic slides (benchmarks/results/analyze-synthetic-slides)", "results",
           r"\| `analyze` \(Otsu tissue mask\) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\S+) \| (\S+) \| (\S+) \|",
           lambda b: (*(str(b["_results"]["analyze-synthetic-slides"]["analyze"][k]) for k in ("detections", "tp", "fp", "fn")),
                      *(f3(b["_results"]["analyze-synthetic-slides"]["analyze"][k]) for k in ("precision", "recall", "f1")))),
    Figure("analyze end to end vs bare forward, tissue rate (benchmarks/results/analyze-throughput)", "readme",
           r"End to end it runs at (\S+) mm² of tissue per minute, \*\*(\S+)x\*\* the detector's bare forward",
           lambda b: (f"{b['_results']['analyze-throughput']['tissue_mm2_per_min']:.1f}", f"{b['_results']['analyze-throughput']['end_to_end_vs_bare']:.2f}")),
    Figure("default predict vs the old torch path (benchmarks/results/fast-by-default)", "readme",
           r"default `predict` is \*\*(\S+)x\*\* \((\S+)-(\S+) over 3 rounds\)",
           lambda b: tuple(f"{b['_results']['fast-by-default']['sides']['default'][k]:.2f}"
                           for k in ("speedup_vs_before_median", "speedup_min", "speedup_max"))),
)


def check(docs: dict[str, tuple[str, str]], bundle: dict) -> list[str]:
    """One line per figure that drifted or whose sentence is no longer found; ``docs`` maps
    readme / results to (file name, text)."""
    problems = []
    for fig in FIGURES:
        where, text = docs[fig.doc]
        found = re.findall(fig.pattern, " ".join(text.split()))
        if len(found) != 1:
            problems.append(f"{fig.name}: its pattern matches {len(found)} times in {where}, not once; update FIGURES in {Path(__file__).name}")
            continue
        printed = found[0] if isinstance(found[0], tuple) else (found[0],)
        want = fig.recompute(bundle)
        if printed != want:
            problems.append(f"{fig.name}: {where} says {', '.join(printed)}; bundle.json gives {', '.join(want)}")
    return problems


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--bundle", type=Path, default=ROOT / "src" / "mitotype" / "bundled" / "bundle.json")
    args = ap.parse_args(argv)
    docs = {"readme": (args.readme.name, args.readme.read_text()), "results": (args.results.name, args.results.read_text())}
    bundle = json.loads(args.bundle.read_text())
    bundle["_results"] = {p.parent.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/summary.json"))}  # committed runs
    problems = check(docs, bundle)
    for line in problems:
        print(f"DRIFT {line}")
    print(f"{len(FIGURES)} figures checked against {args.bundle.name} and benchmarks/results: " + (f"{len(problems)} drifted" if problems else "all agree"))
    return problems


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
