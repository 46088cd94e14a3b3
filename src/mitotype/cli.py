"""The ``mitotype`` command line: parse, check, call the library. No logic lives here."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Protocol, cast

import typer
from rich.console import Console
from rich.table import Table

from mitotype import DEFAULT_RECIPE
from mitotype.config import BackendName, BBoxFormat, PointFormat, SizePolicy
from mitotype.errors import MitotypeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tell atypical from normal mitotic figures in H&E patches.")
data_app = typer.Typer(no_args_is_help=True, help="Read and check datasets.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)  # messages and progress go to stderr, results to stdout

RecipeOpt = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="Recipe name (packaged, or in ./configs) or a YAML path.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: section.field=value (repeatable).")
SkipBadOpt = typer.Option(False, "--skip-bad", help="Skip unreadable / non-RGB images with a warning instead of stopping.")
SkipMissingOpt = typer.Option(False, "--skip-missing", help="Drop CSV rows whose image is missing, with a warning.")
SizePolicyOpt = typer.Option(None, "--size-policy", help="Patches of another size than the model's (default: the model's policy).")
AdaptBnOpt = typer.Option(False, "--adapt-bn", help="Re-estimate BatchNorm statistics on these patches first (test-time "
                          "adaptation without labels; torch backend; two passes). Off by default: see benchmarks/RESULTS.md.")
BackendOpt = typer.Option(BackendName.auto, "--backend", help="auto (OpenVINO fp32, else ONNX Runtime fp32, else torch; torch on a "
                          "GPU), torch, onnxruntime, openvino or openvino-bf16. Graph backends export the model once into the cache.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")


def _config(recipe: str, overrides: Optional[List[str]], skip_bad: bool = False, device: Optional[str] = None):
    from mitotype.config import load_config

    return load_config(recipe, _overrides(overrides, skip_bad, device))


def _overrides(overrides: Optional[List[str]], skip_bad: bool = False, device: Optional[str] = None) -> list[str]:
    """--set values, then what --skip-bad and --device mean as config overrides."""
    extra = list(overrides or [])
    if skip_bad:
        extra.append("data.on_bad_image=skip")
    if device and device != "auto":  # auto leaves the recipe's (or --set's) train.device
        extra.append(f"train.device={device}")
    return extra


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
    per_group: bool = typer.Option(False, "--per-group", help="List every group (slide) with its counts."),
) -> None:
    """Counts per class, group and domain, and every problem found."""
    from mitotype.data.inspect import class_counts, domain_counts, group_counts, inspect_dataset

    result = inspect_dataset(_existing(path, "dataset"), skip_missing=skip_missing, decode=decode, patch_size=patch_size)
    df = result.manifest
    out.print(f"[bold]{path}[/bold]: {result.layout}, {len(df)} patches, {df['group'].nunique()} groups")
    out.print(_table(("class", "patches", "groups", "hard (experts disagree)"), class_counts(df)))
    if domains := domain_counts(df):
        out.print(_table(("domain", "patches", "atypical", "groups"), domains))
    if (df["split"] != "").any():
        out.print("splits: " + ", ".join(f"{k} {v}" for k, v in df["split"].value_counts().items()))
    if len(df):
        sizes = df.groupby("group").size()
        out.print(f"patches per group: min {sizes.min()}, median {int(sizes.median())}, max {sizes.max()}")
    if per_group:
        out.print(_table(("group", "patches", "atypical", "domain"), group_counts(df)))
    if result.problems:
        out.print(f"[yellow]{len(result.problems)} problem(s):[/yellow]")
        for line in result.problems:
            out.print(f"  - {line}", markup=False)
    else:
        out.print("[green]no problems found[/green]")


def _table(header: tuple[str, ...], rows: list[tuple]) -> Table:
    table = Table(*header)
    for row in rows:
        table.add_row(*map(str, row))
    return table


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="ami-br, atnorm-br, atnorm-md or midog25-atypical."),
    dest: Path = typer.Argument(Path("data"), help="Folder to download into."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Mirror replacing the public host (also MITOTYPE_DOWNLOAD_BASE)."),
) -> None:
    """Fetch a public dataset from its home into DEST (needs the internet)."""
    from mitotype.data.download import DATASETS, download

    folder = download(name, dest, base_url=base_url)
    out.print(f"{name} → {folder}\ncite: {DATASETS[name].citation}")


@data_app.command("augment-amf")
def data_augment_amf(
    src: Path = typer.Argument(..., metavar="IN", help="Labelled dataset (any layout mitotype reads)."),
    out_folder: Path = typer.Argument(..., metavar="OUT", help="New or empty folder: Atypical/, Normal/, metadata.csv."),
    seed: int = typer.Option(0, "--seed", help="Seed of the variants' draws; the same seed writes identical files."),
    skip_missing: bool = SkipMissingOpt,
) -> None:
    """Write each atypical patch plus 4 variants (rotations, flips, brightness/contrast/sharpness); copy normal ones."""
    from mitotype.data.augment_amf import augment_amf

    s = augment_amf(_existing(src, "dataset"), out_folder, seed=seed, skip_missing=skip_missing)
    out.print(f"{s.n_images} patches → {out_folder}: {s.n_atypical} atypical + {s.n_variants} variants, {s.n_normal} normal "
              f"(seed {seed}); read as {s.layout}", markup=False)


@data_app.command("mosaic")
def data_mosaic(
    patches: Path = typer.Argument(..., metavar="PATCHES", help="Labelled patches (any layout mitotype reads), a figure at each centre."),
    out_folder: Path = typer.Argument(..., metavar="OUT", help="New or empty folder: mosaic_NNNN.png, truth.csv, mosaics.json."),
    seed: int = typer.Option(..., "--seed", help="Seed of every draw; the same seed and patches write identical images."),
    folds: Optional[int] = typer.Option(None, "--folds", "-k", help="With --fold / --exclude-fold: the grouped K-fold split of "
                                        "`mitotype cv --folds K` (default 5)."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Only the patches of held-out fold I (validation mosaics)."),
    exclude_fold: Optional[int] = typer.Option(None, "--exclude-fold", help="All patches but those of fold I (training mosaics)."),
    images: Optional[int] = typer.Option(None, "--images", help="Number of images (default: enough to paste every patch once)."),
    size: int = typer.Option(1024, "--size", help="Image side in px (at the patches' 0.25 um/px)."),
    figures: int = typer.Option(8, "--figures", help="Figures per image at most (one slide per image)."),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="With --fold / --exclude-fold: the recipe whose split seed and "
                               "strata cv uses."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the mosaics a previous run wrote in OUT."),
    skip_missing: bool = SkipMissingOpt,
) -> None:
    """Validation images for a mitosis detector: figures pasted into figure-free tissue, with truth.csv for evaluate-detections."""
    from mitotype.data.mosaic import check_mosaic_folder, select_fold, write_mosaics
    from mitotype.data.readers import read_dataset
    from mitotype.progress import progress_bar

    if fold is not None and exclude_fold is not None:
        raise MitotypeError("--fold and --exclude-fold both choose the patches; give one of them")
    if folds is not None and fold is None and exclude_fold is None:
        raise MitotypeError(f"--folds {folds}: give --fold I or --exclude-fold I with it")
    check_mosaic_folder(out_folder, overwrite=overwrite)
    manifest = read_dataset(_existing(patches, "PATCHES"), skip_missing=skip_missing).manifest
    selection: dict = {"patches": str(patches)}
    if fold is not None or exclude_fold is not None:
        cfg = _config(recipe, None)
        k = 5 if folds is None else folds
        manifest = select_fold(manifest, folds=k, fold=fold, exclude_fold=exclude_fold, split_seed=cfg.data.split_seed, stratify=cfg.data.stratify)
        selection.update(folds=k, fold=fold, exclude_fold=exclude_fold, split_seed=cfg.data.split_seed, stratify=list(cfg.data.stratify),
                         recipe=cfg.recipe)
    with progress_bar("images", transient=True) as bar:
        task = bar.add_task("mosaics", total=images)
        s = write_mosaics(manifest, out_folder, n_images=images, size=size, figures_per_image=figures, seed=seed, overwrite=overwrite,
                          selection=selection, progress=lambda n: bar.advance(task, n))
    out.print(f"{s['n_images']} mosaics of {size} px, {s['n_figures']} figures ({s['n_atypical']} atypical, {s['n_normal']} normal) from "
              f"{s['n_slides']} slide(s) → {out_folder}/truth.csv (seed {seed})", markup=False)


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
    device: str = DeviceOpt,
) -> None:
    """Train one model."""
    from mitotype.workflows.runs import check_run_dir, load_dataset, train as train_run

    cfg = _config(recipe, overrides, skip_bad, device)
    check_run_dir(out_dir, resume)
    ds = load_dataset(_existing(data, "--data"), cfg, skip_missing=skip_missing)
    val_ds = load_dataset(_existing(val, "--val"), cfg, skip_missing=skip_missing) if val else None
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
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Leave one domain out: one fold per value of these manifest "
                                           "columns, e.g. domain or domain,scanner (replaces --folds)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse finished folds; continue the interrupted one."),
    skip_bad: bool = SkipBadOpt,
    skip_missing: bool = SkipMissingOpt,
    device: str = DeviceOpt,
) -> None:
    """Grouped K-fold cross-validation (or leave-one-domain-out): K models, out-of-fold predictions, summary.json."""
    from mitotype.workflows.runs import check_run_dir, cross_validate, load_dataset

    cfg = _config(recipe, overrides, skip_bad, device)
    columns = [c.strip() for c in group_by.split(",") if c.strip()] if group_by else None
    if group_by is not None and not columns:
        raise MitotypeError(f"--group-by '{group_by}': name one or more manifest columns, e.g. domain,scanner")
    if columns and split_file:
        raise MitotypeError("--group-by and --split-file both choose the folds; give one of them")
    out_dir = out_dir or Path("runs") / (f"{cfg.recipe}-by-{'-'.join(columns)}" if columns else f"{cfg.recipe}-cv{folds}")
    check_run_dir(out_dir, resume)
    ds = load_dataset(_existing(data, "--data"), cfg, skip_missing=skip_missing)
    summary = cross_validate(cfg, ds, folds=folds, out=out_dir, resume=resume, split_file=split_file, group_by=columns)
    _print_cv(summary, out_dir)


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (model.json) or a cv run directory (fold ensemble)."),
    data: Path = typer.Option(..., "--data", "-d", help="Labelled dataset (folder or CSV)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where metrics.json, roc.png, confusion.png, report.html go."),
    tta: bool = typer.Option(False, "--tta", help="Average the 8 flips/rotations."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the model's)."),
    skip_missing: bool = SkipMissingOpt,
    device: str = DeviceOpt,
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% intervals."),
    size_policy: Optional[SizePolicy] = SizePolicyOpt,
    skip_bad: bool = SkipBadOpt,
    backend: BackendName = BackendOpt,
    adapt_bn: bool = AdaptBnOpt,
) -> None:
    """Score a model (or the averaged fold ensemble) on a labelled dataset."""
    from mitotype.workflows.evaluate import evaluate_model

    with _progress() as advance:
        metrics, n_models = evaluate_model(_existing(model, "--model"), _existing(data, "--data"), out_dir, tta=tta, threshold=threshold,
                                           skip_missing=skip_missing, device=device, n_boot=n_boot, progress=advance,
                                           size_policy=_policy(size_policy), skip_bad=skip_bad, backend=backend.value, adapt_bn=adapt_bn)
    ci = metrics["ci95"]["balanced_accuracy"]
    out.print(f"{n_models} model(s) on {metrics['n']} patches: balanced accuracy {metrics['balanced_accuracy']:.3f} "
              f"[{_fmt(ci[0])}, {_fmt(ci[1])}], AUROC {_fmt(metrics['roc_auc'])} → {out_dir}/metrics.json, {out_dir}/report.html")


@app.command()
def predict(
    inputs: Optional[Path] = typer.Argument(None, help="Folder of patches (class folders optional) or a manifest CSV."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder or cv run directory (fold ensemble); "
                                         "default: the bundled model."),
    out_csv: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="Output CSV."),
    tta: bool = typer.Option(False, "--tta", help="Average the 8 flips/rotations."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the model's)."),
    skip_missing: bool = SkipMissingOpt,
    device: str = DeviceOpt,
    size_policy: Optional[SizePolicy] = SizePolicyOpt,
    skip_bad: bool = SkipBadOpt,
    backend: BackendName = BackendOpt,
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="With a graph backend: a file from `mitotype export` of this model."),
    adapt_bn: bool = AdaptBnOpt,
    points: Optional[Path] = typer.Option(None, "--points", help="Moved to `mitotype points POINTS` (still run from here, with a warning)."),
    images: Optional[Path] = typer.Option(None, "--images", hidden=True, help="With --points: folder the image names resolve in."),
) -> None:
    """Write path, p_atypical, label (+ every input column) for each patch (points: `mitotype points`)."""
    from mitotype.inference.predict import predict_path, report_html_path, skipped_csv_path

    if points is not None:  # the old form keeps working and names the new command
        if inputs is not None:
            raise MitotypeError(f"predict: give INPUT ({inputs}) or --points ({points}), not both")
        used = [flag for flag, value in (("--size-policy", size_policy), ("--skip-bad", skip_bad), ("--onnx", onnx), ("--adapt-bn", adapt_bn))
                if value]
        if used:
            raise MitotypeError(f"{used[0]}: not used with --points")
        warnings.warn(f"predict --points is now its own command: mitotype points {points} --out {out_csv} ... "
                      "(there also --resume, --mpp, --slide-mpp, --summary-csv, --bbox-format)", stacklevel=1)
        return points_cmd(points, out_csv, images=images, model=model, tta=tta, threshold=threshold, resume=False, mpp=None, slide_mpp=None,
                          summary_csv=None, skip_missing=skip_missing, bbox_format=BBoxFormat.auto, device=device, backend=backend)
    if images is not None:
        raise MitotypeError("--images: only used with --points (mitotype points)")
    if inputs is None:
        raise MitotypeError("predict: give INPUT (a folder or manifest of patches); for points use `mitotype points`")
    with _progress() as advance:
        table = predict_path(_model_path(model), _existing(inputs, "input"), out_csv, tta=tta, threshold=threshold,
                             skip_missing=skip_missing, device=device, progress=advance, size_policy=_policy(size_policy),
                             skip_bad=skip_bad, backend=backend.value, onnx=onnx, adapt_bn=adapt_bn)
    n_atyp, n_done = int((table["label"] == "atypical").sum()), int((table["label"] != "").sum())
    skipped = f", {len(table) - n_done} skipped (listed in {skipped_csv_path(out_csv)})" if n_done < len(table) else ""
    out.print(f"{n_done} patches → {out_csv}: {n_atyp} atypical ({n_atyp / max(n_done, 1):.1%}){skipped}; "
              f"report → {report_html_path(out_csv)}")


@app.command("points")
def points_cmd(
    points: Path = typer.Argument(..., help="Points to classify: a CSV (image, x, y[, label]), a MitDet folder (png/ + csv/) "
                                  "or a MIDOG/COCO JSON."),
    out_csv: Path = typer.Option(..., "--out", "-o", help="Output CSV (image, x, y, p_atypical, label + input columns)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder the image names resolve in."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder or cv run directory; default: the bundled model."),
    tta: bool = typer.Option(False, "--tta", help="Average the 8 flips/rotations."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the model's)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.partial.csv."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="um/px of plain images (default: the model's)."),
    slide_mpp: Optional[float] = typer.Option(None, "--slide-mpp", help="um/px of slides that do not say theirs."),
    summary_csv: Optional[Path] = typer.Option(None, "--summary-csv", help="Per-image summary CSV (default OUT.summary.csv)."),
    skip_missing: bool = SkipMissingOpt,
    bbox_format: BBoxFormat = typer.Option(BBoxFormat.auto, "--bbox-format", help="COCO boxes: auto, xyxy (MIDOG) or xywh (COCO)."),
    device: str = DeviceOpt,
    backend: BackendName = BackendOpt,
) -> None:
    """Classify a patch centred on each point of images or whole-slide images, at the model's resolution."""
    from mitotype.inference.points import predict_points, summary_csv_path

    with _progress() as advance:
        table, summary = predict_points(_model_path(model), _existing(points, "points"), out_csv,
                                        images=_existing(images, "--images") if images else None, progress=advance, tta=tta,
                                        threshold=threshold, resume=resume, mpp=mpp, slide_mpp=slide_mpp, summary_csv=summary_csv,
                                        skip_missing=skip_missing, bbox_format=bbox_format.value, device=device, backend=backend.value)
    n_atyp = int((table["label"] == "atypical").sum())
    share = n_atyp / max(len(table), 1)
    out.print(f"{len(table)} points on {len(summary)} image(s) → {out_csv}: {n_atyp} atypical ({share:.1%}); "
              f"summary → {summary_csv or summary_csv_path(out_csv)}")


@app.command("evaluate-detections")
def evaluate_detections_cmd(
    detections: Path = typer.Argument(..., help="Detections CSV: image, x, y, score (level-0 pixels)."),
    truth: Path = typer.Option(..., "--truth", "-t", help="True figures: a CSV (image, x, y), a MitDet folder or a MIDOG/COCO JSON."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where metrics.json, per_image.csv, matched.csv and overlays/ go."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder the truth's image names resolve in."),
    mpp: float = typer.Option(0.25, "--mpp", help="Microns per pixel of the images (the match radius is 7.5 um)."),
    threshold: float = typer.Option(0.0, "--threshold", help="Score threshold for the counts (the F1-maximising one is reported too)."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Draw TP / FP / missed figures on each plain image."),
) -> None:
    """Match point detections to true figures within 7.5 um (MIDOG): precision, recall, F1, the best threshold."""
    from mitotype.workflows.detections import evaluate_detections

    m = evaluate_detections(_existing(detections, "detections"), _existing(truth, "--truth"), out_dir,
                            images=_existing(images, "--images") if images else None, mpp=mpp, threshold=threshold, overlays=overlays)
    a, b = m["at_threshold"], m["best_f1"]
    out.print(f"{m['n_detections']} detections, {m['n_true']} true figures on {m['n_images']} image(s): at {a['threshold']:g} precision "
              f"{_fmt(a['precision'])}, recall {_fmt(a['recall'])}, F1 {_fmt(a['f1'])}; best F1 {_fmt(b['f1'])} at {b['threshold']:g} "
              f"→ {out_dir}/metrics.json")


@data_app.command("candidates")
def data_candidates(
    points: Path = typer.Argument(..., help="Every figure of some images: a CSV (image, x, y[, label]; a mosaic's truth.csv), "
                                  "a MitDet folder, a MIDOG/COCO JSON or an ICPR 2012 folder."),
    out_folder: Path = typer.Argument(..., metavar="OUT", help="New or empty folder: patches/ + candidates.csv (a manifest)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder the image names resolve in."),
    recipe: str = typer.Option("detector-lite0", "--recipe", "-r", help="Detector recipe whose candidates section (and patch "
                               "size, um/px) is used."),
    overrides: Optional[List[str]] = SetOpt,
    mpp: Optional[float] = typer.Option(None, "--mpp", help="um/px of the images (default: the recipe's data.mpp)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the look-alikes drawn at random."),
) -> None:
    """Write a detector's training set: patches centred on haematoxylin candidates, mitosis (within 7.5 um of a
    true figure) or look-alike; train on it with `mitotype train --data OUT/candidates.csv --recipe detector-lite0`."""
    from mitotype.data.candidates import write_candidate_set
    from mitotype.data.points import read_points

    cfg = _config(recipe, overrides)
    if cfg.task != "detect":
        raise MitotypeError(f"{{recipe}} {recipe}: not a detector recipe (task: {cfg.task})", options=("recipe",))
    scale = mpp or cfg.data.mpp or 0.25
    if not (0 < scale < 100):
        raise MitotypeError(f"{{mpp}} {scale}: expected microns per pixel in (0, 100)", options=("mpp",))
    table = read_points(_existing(points, "points"), _existing(images, "--images") if images else None, negatives=True)
    m = write_candidate_set(table, out_folder, cfg=cfg.candidates, mpp=scale, patch_size=cfg.data.patch_size, seed=seed)
    n_pos = int(m["label"].sum())
    out.print(f"{len(m)} patches → {out_folder}/candidates.csv: {n_pos} mitosis, {len(m) - n_pos} look-alike "
              f"(candidate recall in {out_folder}/summary.json)", markup=False)


@data_app.command("crops")
def data_crops(
    points: Path = typer.Argument(..., help="Every figure of some images, in any format `data candidates` reads (a mosaic's truth.csv, "
                                  "a MitDet folder, a MIDOG/COCO JSON, an ICPR 2012 folder)."),
    out_folder: Path = typer.Argument(..., metavar="OUT", help="New or empty folder: crops/ + crops.csv (a manifest with each crop's points)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder the image names resolve in."),
    size: int = typer.Option(256, "--size", help="Crop side in pixels (a multiple of 32), at the images' own resolution."),
    per_figure: int = typer.Option(1, "--per-figure", help="Crops around each figure (placed at random)."),
    background: int = typer.Option(2, "--background", help="Crops anywhere, per image."),
    seed: int = typer.Option(0, "--seed", help="Seed of the crops' placement."),
) -> None:
    """Write a heat-map detector's training set: crops of point-annotated images with their figures' centres;
    train on it with `mitotype train --data OUT/crops.csv --recipe detector-heatmap-lite0`."""
    from mitotype.data.crops import write_crop_set
    from mitotype.data.points import read_points

    table = read_points(_existing(points, "points"), _existing(images, "--images") if images else None, negatives=True)
    m = write_crop_set(table, out_folder, crop=size, per_figure=per_figure, background=background, seed=seed)
    out.print(f"{len(m)} crops → {out_folder}/crops.csv: {int(m['label'].sum())} with figures, {int((m['label'] == 0).sum())} without",
              markup=False)


@app.command()
def detect(
    inputs: Path = typer.Argument(..., metavar="INPUT", help="An image, a whole-slide image or a folder of them."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Output file: image, x, y, score (level-0 pixels)[, p_atypical, label]."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Detector model folder or cv run; default: the bundled detector."),
    classifier: Optional[str] = typer.Option("bundled", "--classifier", help="Classifier chained on each detection: 'bundled', "
                                             "a model folder or cv run, or 'none'."),
    fmt: PointFormat = typer.Option(PointFormat.csv, "--format", help="csv, geojson (QuPath points), asap (XML dots, one file per "
                                    "image when several) or midog (MIDOG-style JSON)."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="um/px of plain images (default: the detector's)."),
    slide_mpp: Optional[float] = typer.Option(None, "--slide-mpp", help="um/px of slides that do not say theirs."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Detection threshold (default: the detector's)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Keep detections scoring at least this (default: the "
                                              "threshold); lower it to give evaluate-detections the whole curve."),
    tile: int = typer.Option(1024, "--tile", help="Tile side in detector pixels (memory per tile, not per image)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.partial/."),
    device: str = DeviceOpt,
    backend: BackendName = BackendOpt,
) -> None:
    """Find mitotic figures (haematoxylin candidates scored by the detector, or a heat-map detector's peaks) and classify
    each as atypical or normal."""
    from mitotype.progress import progress_bar
    from mitotype.workflows.detect import detect as run_detect

    chained = None if classifier in (None, "none") else _model_path(None if classifier == "bundled" else Path(str(classifier)))
    with progress_bar("tiles", transient=True) as bar:
        task = bar.add_task("detect", total=None)

        def advance(name: str, done: int, total: int) -> None:
            bar.update(task, description=f"detect {name}", completed=done, total=total)

        table = run_detect(_detector_path(model), _existing(inputs, "input"), out_file, classifier=chained, fmt=fmt.value, mpp=mpp,
                           slide_mpp=slide_mpp, threshold=threshold, min_score=min_score, backend=backend.value, device=device,
                           tile=tile, resume=resume, progress=advance)
    extra = ""
    if "label" in table.columns:
        n_atyp = int((table["label"] == "atypical").sum())
        extra = f", {n_atyp} atypical ({n_atyp / max(len(table), 1):.1%})"
    n_images = table["image"].nunique() if len(table) else 0
    out.print(f"{len(table)} detections on {n_images} image(s) with figures{extra} → {out_file}", markup=False)


@app.command()
def analyze(
    inputs: Path = typer.Argument(..., metavar="SLIDE_OR_DIR", help="A whole-slide image, a plain image (with --mpp) or a folder of them."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder: OUT/<slide>/ (figures.csv, figures.geojson, tissue.png, "
                                 "report.html) and OUT/summary.csv."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Detector model folder or cv run; default: the bundled detector."),
    classifier: str = typer.Option("bundled", "--classifier", help="Classifier of each figure: 'bundled', a model folder or cv run, "
                                   "or 'none' (counts only)."),
    tissue_mask: str = typer.Option("otsu", "--tissue-mask", help="otsu (on a thumbnail), none (all tissue: ROI crops) or a mask "
                                    "image (white = tissue) covering the whole slide."),
    roi: Optional[str] = typer.Option(None, "--roi", help="Analyse only x,y,w,h (level-0 pixels)."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="um/px of plain images and of slides that do not say theirs (required "
                                        "for them: counts per mm² depend on it)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Detection threshold (default: the detector's)."),
    tile: int = typer.Option(1024, "--tile", help="Tile side in detector pixels (memory per tile, not per slide)."),
    gallery: int = typer.Option(24, "--gallery", help="Figures called atypical shown in each report."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Dask workers of the embedded LocalCluster (default: one per 4 "
                                          "cores; 1 runs in this process)."),
    threads_per_worker: Optional[int] = typer.Option(None, "--threads-per-worker", help="Model threads of each worker (default: "
                                                     "the cores shared out)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of an existing Dask scheduler (tcp://host:8786)."),
    device: str = DeviceOpt,
    backend: BackendName = BackendOpt,
) -> None:
    """Slides to counts: tissue, figures, atypical fraction, mitoses per mm², hotspots, and a report per slide."""
    import pandas as pd
    from rich.progress import TaskID

    from mitotype.progress import progress_bar
    from mitotype.workflows.analyze import analyze as run_analyze
    from mitotype.workflows.slide import AnalyzeOptions

    chained = None if classifier == "none" else _model_path(None) if classifier == "bundled" else _existing(Path(classifier), "--classifier")
    options = AnalyzeOptions(tissue=tissue_mask, roi=_roi(roi) if roi else None, mpp=mpp, tile=tile, gallery=gallery)
    with progress_bar("tiles", transient=True) as bar:
        slides = bar.add_task("slides", total=None)
        tiles: dict[str, TaskID] = {}
        finished: set[str] = set()

        def advance(kind: str, name: str, done: int, total: int) -> None:
            if kind == "slides":
                bar.update(slides, completed=done, total=total)
                finished.add(name)
                if name in tiles:
                    bar.remove_task(tiles.pop(name))
                return
            if name in finished:  # a worker's late tile event
                return
            if name not in tiles:
                tiles[name] = bar.add_task(f"  {name}", total=total)
            bar.update(tiles[name], completed=done, total=total)

        table = run_analyze(_existing(inputs, "input"), out_dir, model=_detector_path(model), classifier=chained, options=options,
                            device=device, backend=backend.value, threshold=threshold, scheduler=scheduler, workers=workers,
                            threads_per_worker=threads_per_worker, progress=advance, spell=_flag)
    shown = Table("slide", "figures", "atypical", "per mm²", "tissue mm²", "hotspot 10 HPF")
    failed = table[table["error"].fillna("").astype(str) != ""]
    for r in table.itertuples():
        if r.Index in failed.index:
            shown.add_row(str(r.slide), "failed", "", "", "", "")
            continue
        share = "" if pd.isna(r.atypical_fraction) else f" ({r.atypical_fraction:.1%})"
        atyp = "–" if pd.isna(r.atypical_count) else f"{int(r.atypical_count)}{share}"
        shown.add_row(str(r.slide), str(r.mitotic_count), atyp, f"{r.mitoses_per_mm2:.2f}", f"{r.tissue_mm2:.2f}", str(r.hotspot_10hpf_count))
    out.print(shown)
    out.print(f"{len(table) - len(failed)} of {len(table)} slide(s) analysed → {out_dir}/summary.csv", markup=False)
    if len(failed):
        for r in failed.itertuples():
            err.print(f"error: {r.slide}: {r.error}", style="red", markup=False, highlight=False, soft_wrap=True)
        err.print(f"{len(failed)} slide(s) failed (details in {out_dir}/<slide>/error.txt); a rerun retries them and skips the others",
                  markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


def _roi(text: str) -> tuple[int, int, int, int]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise MitotypeError(f"{{roi}} '{text}': expected x,y,w,h in level-0 pixels", options=("roi",))
    return values


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model folder, cv run directory (one graph averaging its folds) or 'bundled'."),
    out_file: Path = typer.Argument(..., help="Output file (.onnx / .pt); its card goes to OUT.json beside it."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    int8: bool = typer.Option(False, "--int8", help="Quantize to int8 (ONNX); written only if balanced accuracy drops <= 0.01."),
    check_data: Optional[Path] = typer.Option(None, "--check-data", help="With --int8: labelled patches it did not train on, "
                                              "or a fold ensemble's splits.csv (each fold scored on its own held-out rows)."),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help="With --int8: patches to calibrate on (default: check data)."),
    calib_n: int = typer.Option(256, "--calib-n", help="With --int8: calibration patches drawn from --calib-data."),
) -> None:
    """Export the whole inference graph (uint8 patches in, p_atypical out), checked against PyTorch."""
    from mitotype.inference.export import export_card_path, export_model

    if check_data is not None:
        _existing(check_data, "--check-data")
    if calib_data is not None:
        _existing(calib_data, "--calib-data")
    with _progress() as advance:
        source = _model_path(None) if str(model) == "bundled" and not model.exists() else _existing(model, "model")
        card = export_model(source, out_file, fmt, int8=int8, check_data=check_data, calib_data=calib_data,
                            calib_n=calib_n, progress=advance)
    check = f"fp32 graph max |Δp| vs PyTorch {card['check']['max_abs_diff_vs_torch']:.1e}"
    if "int8" in card:
        check += f"; {card['int8']['summary']} on {card['int8']['n']} patches"
    out.print(f"{card['export_format']} ({card['precision']}, {len(card['members'])} model(s)) → {out_file} + "
              f"{export_card_path(out_file).name}: {check}", markup=False, soft_wrap=True)


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
    device: str = DeviceOpt,
) -> None:
    """AMi-Br protocol: grouped K-fold CV on --train; every fold model and their ensemble on each --test."""
    from mitotype.workflows.benchmark import run_benchmark

    from mitotype.workflows.runs import check_run_dir

    cfg = _config(recipe, overrides, device=device)
    named = [_named_path(t) for t in tests]
    check_run_dir(out_dir, resume)
    out.print(run_benchmark(cfg, _existing(train_data, "--train"), named, folds=folds, out=out_dir, resume=resume, tta=tta))


@app.command()
def explain(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder or cv run directory (a fold ensemble: mean of its maps)."),
    inputs: Path = typer.Argument(..., metavar="INPUT", help="Folder of patches or a manifest CSV (anything predict reads)."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Overlays (same relative names), explanations.csv, contact_sheet.png."),
    n: int = typer.Option(16, "--n", help="Patches per contact-sheet row: most confident / most uncertain calls of each class."),
    target: str = typer.Option("atypical", "--target", help="Map the evidence for: atypical, or the predicted class."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the model's)."),
    skip_missing: bool = SkipMissingOpt,
    device: str = DeviceOpt,
    size_policy: Optional[SizePolicy] = SizePolicyOpt,
) -> None:
    """Grad-CAM overlay beside each patch and a contact sheet of the clearest and hardest calls."""
    from mitotype.inference.explain import SHEET_NAME, explain_path

    with _progress() as advance:
        table = explain_path(_existing(model, "model"), _existing(inputs, "input"), out_dir, n=n, target=target, threshold=threshold,
                             device=device, size_policy=_policy(size_policy), skip_missing=skip_missing, progress=advance)
    out.print(f"{len(table)} overlays (target {target}) → {out_dir}; contact sheet → {out_dir / SHEET_NAME}")


@app.command()
def recipes(
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
) -> None:
    """Every recipe that ships: description, architecture, backbone, input size and where its weights come from."""
    from mitotype.workflows.recipes import list_recipes

    if fmt not in ("table", "csv", "json"):
        raise MitotypeError(f"--format '{fmt}': must be table, csv or json")
    rows = [r.as_dict() for r in list_recipes()]
    if fmt == "json":
        import json

        print(json.dumps(rows, indent=2))
    elif fmt == "csv":
        import pandas as pd

        print(pd.DataFrame(rows, columns=["name", "description", "arch", "backbone", "input_size", "weights", "source", "error"])
              .to_csv(index=False), end="")
    elif out.width >= _recipes_table_width(rows):
        from rich.table import Column

        table = Table(*(Column(h, no_wrap=True) for h in ("recipe", "arch", "backbone", "input")), Column("weights", overflow="fold"),
                      Column("description", overflow="fold"), show_lines=True)
        for r in rows:
            text = f"[red]{r['error']}[/red]" if r["error"] else r["description"]
            table.add_row(r["name"], r["arch"], r["backbone"], _fmt_int(r["input_size"]), _recipe_weights(r), text)
        out.print(table)
    else:
        _print_recipe_blocks(rows)


RECIPES_MIN_DESCRIPTION = 30  # below this a description column reads worse than one block per recipe


def _recipe_weights(r: dict) -> str:
    return f"{r['weights']} ({r['source']})" if r["source"] and r["source"] != r["weights"] else r["weights"]


def _recipes_table_width(rows: list[dict]) -> int:
    """Terminal columns the recipes table needs to show names, architectures, backbones and weight
    sources whole: squeezed, rich cuts a cell to 'amibr-prot…', and a name cut is one a user cannot type."""
    def longest(key: str, header: str) -> int:
        return max([len(header), *(len(str(r[key] if r[key] is not None else "–")) for r in rows)])

    words = max((len(word) for r in rows for word in _recipe_weights(r).split()), default=0)
    fixed = longest("name", "recipe") + longest("arch", "arch") + longest("backbone", "backbone") + longest("input_size", "input")
    return fixed + max(words, len("weights")) + RECIPES_MIN_DESCRIPTION + 6 * 3 + 1  # 2 padding per column, 7 borders


def _print_recipe_blocks(rows: list[dict]) -> None:
    """One block per recipe, for terminals (and pipes) too narrow for the table. Lines wrap between
    words only and rich does not wrap them again (soft_wrap), so a name, backbone or weight source
    longer than the terminal is left to the terminal to wrap, never cut."""
    import textwrap

    from rich.text import Text

    def show(text: str, style: str = "", indent: str = "  ") -> None:
        if not text:
            return
        lines = textwrap.fill(text, max(out.width, 20), initial_indent=indent, subsequent_indent=indent, break_long_words=False,
                              break_on_hyphens=False)
        out.print(Text(lines, style=style), soft_wrap=True)

    for i, r in enumerate(rows):
        if i:
            out.print()
        show(r["name"], "bold", indent="")
        if r["error"]:  # a recipe that does not load has no model to describe
            show(r["error"], "red")
            continue
        show(f"{r['arch']} · {r['backbone']} · {_fmt_int(r['input_size'])} px")
        show(f"weights: {_recipe_weights(r)}")
        show(r["description"])


def _fmt_int(value) -> str:
    return "–" if value is None else str(value)


@app.command()
def tune(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset (folder or CSV)."),
    trials: int = typer.Option(..., "--trials", "-n", help="Finished trials wanted in all (a rerun continues the study)."),
    recipe: str = RecipeOpt,
    folds: int = typer.Option(5, "--folds", "-k", help="Grouped folds per trial."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Study folder (default runs/<recipe>-tune)."),
    params: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Also search section.field=SPEC (repeatable); SPEC: "
                                               "float:LO:HI, log:LO:HI, int:LO:HI or choice:A,B."),
    default_space: bool = typer.Option(True, "--default-space/--no-default-space", help="Search lr, dropout and focal alpha/gamma "
                                       "(trials then use focal loss unless loss.name is a --param)."),
    seed: int = typer.Option(0, "--seed", help="Sampler seed."),
    overrides: Optional[List[str]] = SetOpt,
    skip_bad: bool = SkipBadOpt,
    skip_missing: bool = SkipMissingOpt,
    device: str = DeviceOpt,
) -> None:
    """Optuna search, each trial a grouped CV pruned after each fold; resumable; the best config → OUT/best.yaml."""
    from mitotype._io import check_output_dir
    from mitotype.workflows.runs import load_dataset
    from mitotype.workflows.tune import search_space, tune as tune_run

    extra = _overrides(overrides, skip_bad, device)
    cfg = _config(recipe, extra)
    search_space(recipe, extra, list(params or []), default_space=default_space)  # bad --param fails before decoding
    out_dir = out_dir or Path("runs") / f"{cfg.recipe}-tune"
    check_output_dir(out_dir, "out_dir")  # before decoding; tune checks it again
    ds = load_dataset(_existing(data, "--data"), cfg, skip_missing=skip_missing, skipped_note=f"skipped.csv in {out_dir}/trial_*")
    report = lambda t: err.print(f"trial {t['trial']}: {t['state'].lower()}" + (f", mean balanced accuracy {t['value']:.3f}"  # noqa: E731
                                                                                  if t["value"] is not None else ""))
    result = tune_run(recipe, ds, out_dir, trials=trials, folds=folds, overrides=extra, params=list(params or []),
                      default_space=default_space, seed=seed, on_trial=report)
    out.print(f"{result.ran} trial(s) run now; {result.complete} complete, {result.pruned} pruned → {result.trials_csv}")
    if result.best_yaml:
        out.print(f"best: trial {result.best_trial}, mean balanced accuracy {result.best_value:.3f} → {result.best_yaml} "
                  f"(use --recipe {result.best_yaml})")
    else:
        out.print("no trial has completed yet: no best.yaml")


@app.command()
def compare(
    recipes_: str = typer.Option(..., "--recipes", help="Recipes separated by commas (names or YAML paths)."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset (folder or CSV)."),
    folds: int = typer.Option(5, "--folds", "-k", help="Grouped folds per recipe."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="One cv run per recipe + compare.md/.csv/.png."),
    overrides: Optional[List[str]] = SetOpt,
    skip_bad: bool = SkipBadOpt,
    skip_missing: bool = SkipMissingOpt,
    device: str = DeviceOpt,
) -> None:
    """The same grouped CV for each recipe (finished runs reused), then one table: mean ± sd metrics, time, size, speed."""
    from mitotype._io import check_output_dir
    from mitotype.workflows.compare import LABELS, compare as compare_runs, parse_recipes, pm

    names = parse_recipes(recipes_)
    check_output_dir(out_dir, "out_dir")  # before decoding; compare checks it again
    table = compare_runs(names, _existing(data, "--data"), out_dir, folds=folds, overrides=_overrides(overrides, skip_bad, device),
                         skip_missing=skip_missing, on_status=lambda name, what: err.print(f"{name}: {what}"))
    shown = Table("recipe", *LABELS.values(), "wall s", "device", "params", "patches/s")
    for r in table.to_dict("records"):
        cells = [pm(r[f"{m}_mean"], r[f"{m}_sd"]) for m in LABELS]
        shown.add_row(r["recipe"], *cells, f"{r['wall_seconds']:.1f}", r["device"], f"{r['params']:,}", f"{r['patches_per_s']:,.1f}")
    out.print(shown)
    out.print(f"→ {out_dir}/compare.md, compare.csv, compare.png")


def _model_path(model: Optional[Path]) -> Path:
    """The model the user named, else the one bundled with mitotype."""
    if model is not None:
        return _existing(model, "--model")
    from mitotype.models.bundled import bundled_model_dir

    return bundled_model_dir()


def _detector_path(model: Optional[Path]) -> Path:
    """The detector the user named, else the one bundled with mitotype."""
    if model is not None:
        return _existing(model, "--model")
    from mitotype.models.bundled import bundled_detector_dir

    return bundled_detector_dir()


def _named_path(text: str) -> tuple[str, Path]:
    if "=" not in text:
        raise MitotypeError(f"--test '{text}': expected NAME=PATH")
    name, path = text.split("=", 1)
    return name, _existing(Path(path), f"--test {name}")


@contextmanager
def _progress():
    """A transient patches/s bar on stderr; yields the callback the library advances."""
    from mitotype.progress import progress_bar

    with progress_bar("patches", transient=True) as bar:
        task = bar.add_task("predict", total=None)
        yield lambda n: bar.advance(task, n)


def _policy(value: Optional[SizePolicy]) -> Optional[str]:
    return value.value if value is not None else None


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _print_cv(summary: dict, out_dir: Path) -> None:
    from mitotype.workflows.compare import pm

    table = Table("metric", "mean ± sd over folds", "out-of-fold (pooled)", "threshold from the other folds")
    refit = summary["cross_fitted_threshold"]
    for m in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1"):
        table.add_row(m, pm(summary["mean"][m], summary["sd"][m]), _fmt(summary["out_of_fold"][m]), pm(refit["mean"][m], refit["sd"][m]))
    out.print(table)
    if summary.get("group_by"):
        held = Table("held out", "patches", "balanced accuracy", "AUROC")
        for fold in summary["per_fold"]:
            held.add_row(fold["held_out"], str(fold["n"]), _fmt(fold["balanced_accuracy"]), _fmt(fold["roc_auc"]))
        out.print(held)
    out.print(f"{summary['folds']} folds, {summary['n']} patches, {summary['wall_seconds']} s → {out_dir}/summary.json")


def _flag(option: str) -> str:
    """The flag of a library parameter named in an error (skip_missing -> --skip-missing)."""
    flags = {"out_dir": "--out", "out_csv": "--out", "train_data": "--train", "fmt": "--format", "out_file": "OUT",
             "explain_dir": "OUT_DIR", "out_folder": "OUT", "n_images": "--images", "figures_per_image": "--figures"}
    return flags.get(option, "--" + option.replace("_", "-"))


class _ClickError(Protocol):
    """What main() uses of a click.ClickException (click's own or the copy typer may vendor)."""

    exit_code: int

    def format_message(self) -> str: ...

    def show(self) -> None: ...


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        code = app(standalone_mode=False)  # Ctrl-C: typer returns 130 here instead of raising
        if isinstance(code, int) and code:
            err.print("aborted" if code == 130 else f"exit status {code}")
            sys.exit(code)
    except MitotypeError as e:
        err.print(f"error: {e.render(_flag)}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click usage errors arrive here in standalone_mode=False (typer may vendor its own click)
        kind = {cls.__name__ for cls in type(e).__mro__}
        click_error = cast(_ClickError, e)  # matched by class name below, whichever click defined it
        if "BadParameter" in kind:  # e.g. an enum choice: one line naming the option and the choices
            message = click_error.format_message().replace("Value error, ", "")
            err.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        if "ClickException" in kind:
            click_error.show()
            sys.exit(click_error.exit_code)
        if "Abort" in kind:
            err.print("aborted")
            sys.exit(130)
        raise
