"""The ``mitotype`` command line: parse, check, call the library. No logic lives here."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from mitotype.errors import MitotypeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tell atypical from normal mitotic figures in H&E patches.")
data_app = typer.Typer(no_args_is_help=True, help="Read and check datasets.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)

RecipeOpt = typer.Option("lite0-quick", "--recipe", "-r", help="Recipe name in configs/ or a YAML path.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: section.field=value (repeatable).")
SkipBadOpt = typer.Option(False, "--skip-bad", help="Skip unreadable / non-RGB images with a warning instead of stopping.")
SkipMissingOpt = typer.Option(False, "--skip-missing", help="Drop CSV rows whose image is missing, with a warning.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: the config's, auto).")


def _config(recipe: str, overrides: Optional[List[str]], skip_bad: bool = False, device: Optional[str] = None):
    from mitotype.config import load_config

    extra = list(overrides or [])
    if skip_bad:
        extra.append("data.on_bad_image=skip")
    if device:
        extra.append(f"train.device={device}")
    return load_config(recipe, extra)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise MitotypeError(f"{what} {path}: no such file or folder")
    return path


@data_app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="Dataset folder or CSV."),
    skip_missing: bool = SkipMissingOpt,
    decode: bool = typer.Option(True, help="Decode every image to find unreadable ones."),
    patch_size: int = typer.Option(128, help="Expected patch size in px."),
) -> None:
    """Counts per class, group and domain, and every problem found."""
    from mitotype.data.images import BadImage, decode_patch
    from mitotype.data.readers import read_dataset

    result = read_dataset(_existing(path, "dataset"), require_labels=False, skip_missing=skip_missing)
    df = result.manifest
    problems = list(result.problems)
    if decode:
        for p in df["path"]:
            try:
                decode_patch(p, patch_size)
            except BadImage as e:
                problems.append(str(e))
    out.print(f"[bold]{path}[/bold]: {result.layout}, {len(df)} patches, {df['group'].nunique()} groups")
    table = Table("class", "patches", "groups", "hard (experts disagree)")
    for label, name in ((1, "atypical"), (0, "normal"), (-1, "unlabelled")):
        rows = df[df["label"] == label]
        if len(rows):
            table.add_row(name, str(len(rows)), str(rows["group"].nunique()), str(int(rows["hard"].sum())))
    out.print(table)
    if (df["domain"] != "").any():
        dom = Table("domain", "patches", "atypical", "groups")
        for name, rows in df.groupby("domain"):
            dom.add_row(str(name), str(len(rows)), str(int((rows["label"] == 1).sum())), str(rows["group"].nunique()))
        out.print(dom)
    if (df["split"] != "").any():
        out.print("splits: " + ", ".join(f"{k} {v}" for k, v in df["split"].value_counts().items()))
    sizes = df.groupby("group").size()
    out.print(f"patches per group: min {sizes.min()}, median {int(sizes.median())}, max {sizes.max()}")
    if problems:
        out.print(f"[yellow]{len(problems)} problem(s):[/yellow]")
        for line in problems:
            out.print(f"  - {line}", markup=False)
    else:
        out.print("[green]no problems found[/green]")


@app.command()
def train(
    data: Path = typer.Option(..., "--data", "-d", help="Training dataset (folder or CSV)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation dataset (else the data's val/ split or data.val_fraction)."),
    recipe: str = RecipeOpt,
    overrides: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    skip_bad: bool = SkipBadOpt,
    skip_missing: bool = SkipMissingOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Train one model."""
    from mitotype.training.runs import load_dataset, train as train_run

    cfg = _config(recipe, overrides, skip_bad, device)
    ds = load_dataset(_existing(data, "--data"), cfg, skip_missing)
    val_ds = load_dataset(_existing(val, "--val"), cfg, skip_missing) if val else None
    summary = train_run(cfg, ds, out_dir, resume=resume, val=val_ds)
    out.print(f"model written to {out_dir} ({summary['epochs']} epochs, {summary['seconds']} s)")
    if "validation" in summary:
        v = summary["validation"]
        out.print(f"validation: balanced accuracy {v['balanced_accuracy']:.3f}, AUROC {_fmt(v['roc_auc'])}")


@app.command()
def cv(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset (folder or CSV)."),
    folds: int = typer.Option(5, "--folds", "-k", help="Number of folds, grouped by slide, stratified on label."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<recipe>-cv<K>)."),
    recipe: str = RecipeOpt,
    overrides: Optional[List[str]] = SetOpt,
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="CSV assigning each path or group a fold / split."),
    resume: bool = typer.Option(False, "--resume", help="Reuse finished folds; continue the interrupted one."),
    skip_bad: bool = SkipBadOpt,
    skip_missing: bool = SkipMissingOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Grouped K-fold cross-validation: K models, out-of-fold predictions, summary.json."""
    from mitotype.training.runs import cross_validate, load_dataset

    cfg = _config(recipe, overrides, skip_bad, device)
    out_dir = out_dir or Path("runs") / f"{cfg.recipe}-cv{folds}"
    ds = load_dataset(_existing(data, "--data"), cfg, skip_missing)
    summary = cross_validate(cfg, ds, folds, out_dir, resume=resume, split_file=split_file)
    _print_cv(summary, out_dir)


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (model.json) or a cv run directory (fold ensemble)."),
    data: Path = typer.Option(..., "--data", "-d", help="Labelled dataset (folder or CSV)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where metrics.json, roc.png, confusion.png go."),
    tta: bool = typer.Option(False, "--tta", help="Average the 8 flips/rotations."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the model's)."),
    skip_missing: bool = SkipMissingOpt,
    device: str = typer.Option("auto", "--device"),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% intervals."),
) -> None:
    """Score a model (or the averaged fold ensemble) on a labelled dataset."""
    from mitotype.data.manifest import require_labels
    from mitotype.data.readers import read_dataset
    from mitotype.evaluation.report import write_evaluation
    from mitotype.inference.predict import load_models, predict_manifest, prediction_table, write_csv

    models, dev = load_models(_existing(model, "--model"), device)
    df = read_dataset(_existing(data, "--data"), skip_missing=skip_missing).manifest
    require_labels(df, str(data))
    t = _threshold(threshold, models)
    p = _run_predict(models, df, tta, dev)
    write_csv(prediction_table(df, p, t), out_dir / "predictions.csv")
    metrics = write_evaluation(df.assign(p_atypical=p)[["label", "p_atypical", "domain"]], out_dir, threshold=t, n_boot=n_boot, title=f"{model.name} on {data.name}")
    out.print(f"{len(models)} model(s) on {len(df)} patches: balanced accuracy {metrics['balanced_accuracy']:.3f} "
              f"[{_fmt(metrics['ci95']['balanced_accuracy'][0])}, {_fmt(metrics['ci95']['balanced_accuracy'][1])}], "
              f"AUROC {_fmt(metrics['roc_auc'])} → {out_dir}/metrics.json")


@app.command()
def predict(
    inputs: Path = typer.Argument(..., help="Folder of patches (class folders optional) or a manifest CSV."),
    model: Path = typer.Option(..., "--model", "-m", help="Model folder or cv run directory (fold ensemble)."),
    out_csv: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="Output CSV."),
    tta: bool = typer.Option(False, "--tta", help="Average the 8 flips/rotations."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the model's)."),
    skip_missing: bool = SkipMissingOpt,
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Write path, p_atypical, label (+ every input column) for each patch."""
    from mitotype.data.readers import read_dataset
    from mitotype.inference.predict import load_models, predict_manifest, prediction_table, write_csv

    models, dev = load_models(_existing(model, "--model"), device)
    df = read_dataset(_existing(inputs, "input"), require_labels=False, skip_missing=skip_missing).manifest
    if df.empty:
        raise MitotypeError(f"{inputs}: no images found")
    t = _threshold(threshold, models)
    p = _run_predict(models, df, tta, dev)
    table = prediction_table(df, p, t)
    write_csv(table, out_csv)
    n_atyp = int((table["label"] == "atypical").sum())
    out.print(f"{len(df)} patches → {out_csv}: {n_atyp} atypical ({n_atyp / len(df):.1%}) at threshold {t:.3f}")


@app.command()
def benchmark(
    train_data: Path = typer.Option(..., "--train", help="Training dataset."),
    tests: List[str] = typer.Option(..., "--test", help="Test set as NAME=PATH (repeatable)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory (cv folds + benchmark.md)."),
    recipe: str = RecipeOpt,
    folds: int = typer.Option(5, "--folds", "-k"),
    overrides: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Reuse finished folds."),
    tta: bool = typer.Option(False, "--tta"),
    device: Optional[str] = DeviceOpt,
) -> None:
    """AMi-Br protocol: grouped K-fold CV on --train; every fold model and their ensemble on each --test."""
    from mitotype.data.manifest import require_labels
    from mitotype.data.readers import read_dataset
    from mitotype.evaluation.benchmark import score_test_set, write_benchmark
    from mitotype.inference.predict import load_models, predict_manifest
    from mitotype.training.runs import cross_validate, load_dataset

    cfg = _config(recipe, overrides, device=device)
    named = [_named_path(t) for t in tests]
    test_sets = []
    for name, path in named:  # check every test set before hours of training
        df = read_dataset(path).manifest
        require_labels(df, f"--test {name}")
        test_sets.append((name, df))
    ds = load_dataset(_existing(train_data, "--train"), cfg)
    summary = cross_validate(cfg, ds, folds, out_dir, resume=True if resume else False)
    models, dev = load_models(out_dir, cfg.train.device)
    results = []
    for name, df in test_sets:
        per_fold = [_run_predict([m], df, tta, dev, label=f"{name} fold {i}") for i, m in enumerate(models)]
        results.append(score_test_set(name, df["label"].to_numpy(), per_fold, [m.threshold for m in models]))
    text = write_benchmark(out_dir, cfg.recipe, results, summary)
    out.print(text)


def _named_path(text: str) -> tuple[str, Path]:
    if "=" not in text:
        raise MitotypeError(f"--test '{text}': expected NAME=PATH")
    name, path = text.split("=", 1)
    return name, _existing(Path(path), f"--test {name}")


def _threshold(threshold: Optional[float], models) -> float:
    if threshold is not None:
        if not 0 < threshold < 1:
            raise MitotypeError(f"--threshold {threshold}: must be in (0, 1)")
        return threshold
    return float(sum(m.threshold for m in models) / len(models))


def _run_predict(models, df, tta: bool, device, label: str = "predict"):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mitotype.inference.predict import predict_manifest

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(label, total=len(df))
        return predict_manifest(models, df, tta=tta, device=device, progress=lambda n: progress.advance(task, n))


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _print_cv(summary: dict, out_dir: Path) -> None:
    table = Table("metric", "mean ± sd over folds", "out-of-fold (pooled)")
    for m in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1"):
        mean, sd = summary["mean"][m], summary["sd"][m]
        table.add_row(m, "–" if mean is None else f"{mean:.3f} ± {sd:.3f}", _fmt(summary["out_of_fold"][m]))
    out.print(table)
    out.print(f"{summary['folds']} folds, {summary['n']} patches, {summary['wall_seconds']} s → {out_dir}/summary.json")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        app(standalone_mode=False)
    except MitotypeError as e:
        err.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            err.print("aborted")
            sys.exit(130)
        raise
