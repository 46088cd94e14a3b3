"""Readers: each published layout in, one manifest out (see :mod:`mitotype.data.manifest`).

Understood layouts
- class folders: ``Atypical/`` + ``Normal/`` (case-insensitive; also ``AMF/`` + ``NMF/``), optionally
  joined with a metadata CSV beside them: AMi-Br style (``filename, slide, dataset,
  expert{1,2,3}_atypical, majority_atypical, label``) or expert-votes style (AtNorM-MD:
  ``Filename, Expert_1..Expert_5, Majority`` with Normal/Atypical values);
- split folders: ``train/``, ``val/``, ``test/``, each with class folders;
- a CSV file: our manifest (``path, label, ...``) or an expert-votes / AMi-Br CSV whose images lie
  beside it (in the CSV's folder or its class folders);
- an unlabelled folder of images (``require_labels=False`` only: prediction).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype.data.manifest import CORE_COLUMNS, NO_SLIDE, UNLABELLED, finalize, parse_label, read_csv_checked, read_manifest_csv
from mitotype.errors import MitotypeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
CLASS_FOLDERS = {"atypical": 1, "amf": 1, "normal": 0, "nmf": 0}
SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")
CORE_NAMES = set(CORE_COLUMNS) | {"filename", "csv_label"}
LAYOUTS = (
    "class folders (Atypical/ + Normal/, or AMF/ + NMF/, optionally with a metadata CSV)",
    "split folders (train/ val/ test/ each with class folders)",
    "a manifest CSV (path, label, ...)",
    "an expert-votes CSV (Filename, Expert_1.., Majority) or AMi-Br metadata CSV beside its images",
)


@dataclass
class ReadResult:
    """A manifest plus what the reader noticed on the way (for ``data inspect`` and warnings)."""

    manifest: pd.DataFrame
    layout: str
    problems: list[str] = field(default_factory=list)


def read_dataset(path: str | Path, require_labels: bool = True, skip_missing: bool = False) -> ReadResult:
    """Read any understood layout; raise a one-line error naming the layouts otherwise."""
    path = Path(path)
    if not path.exists():
        raise MitotypeError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise MitotypeError(f"{path}: expected a folder or a CSV file; understood layouts: {'; '.join(LAYOUTS)}")
        return _read_csv_file(path, skip_missing)
    splits = [d for d in _subdirs(path) if d.name.lower() in SPLIT_FOLDERS and _class_dirs(d)]
    if splits:
        return _read_split_folders(path, splits, skip_missing)
    if _class_dirs(path):
        return _read_class_folders(path, skip_missing)
    csv = _metadata_csv(path)
    if csv is not None:
        return _read_csv_file(csv, skip_missing)
    if not require_labels:
        images = _images_in(path)
        if images:
            df = pd.DataFrame({"path": images, "label": UNLABELLED})
            return ReadResult(finalize(df), "unlabelled folder")
    raise MitotypeError(f"{path}: layout not understood; understood layouts: {'; '.join(LAYOUTS)}")


def looks_like_dataset(folder: Path) -> bool:
    """Class folders, split folders holding class folders, or a CSV: a layout the readers take."""
    if not folder.is_dir():
        return False
    if _class_dirs(folder) or any(folder.glob("*.csv")):
        return True
    return any(d.name.lower() in SPLIT_FOLDERS and _class_dirs(d) for d in _subdirs(folder))


def _subdirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_dirs(path: Path) -> dict[Path, int]:
    return {d: CLASS_FOLDERS[d.name.lower()] for d in _subdirs(path) if d.name.lower() in CLASS_FOLDERS}


def _images_in(folder: Path) -> list[str]:
    """Image files below ``folder``; hidden files (macOS ``._x.png`` forks) are not images."""
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def _metadata_csv(root: Path) -> Path | None:
    """The per-patch CSV beside class folders: the only CSV, or ``metadata.csv`` among several."""
    csvs = sorted(root.glob("*.csv"))
    if len(csvs) <= 1:
        return csvs[0] if csvs else None
    if (root / "metadata.csv").is_file():
        return root / "metadata.csv"
    raise MitotypeError(f"{root}: several CSVs ({', '.join(c.name for c in csvs)}); name the per-patch one metadata.csv or pass a CSV path")


def _folder_rows(root: Path) -> pd.DataFrame:
    rows = [(p, label) for d, label in _class_dirs(root).items() for p in _images_in(d)]
    return pd.DataFrame(rows, columns=["path", "label"])


def _read_class_folders(root: Path, skip_missing: bool, split: str = "") -> ReadResult:
    df = _folder_rows(root)
    problems: list[str] = []
    csv = _metadata_csv(root)
    if csv is not None:
        df, found = _join_metadata(df, csv, skip_missing)
        problems += found
    if split:
        df["split"] = split
    if "group" not in df:
        problems.append(f"{root}: no slide information; each patch is its own group, so grouped splits cannot keep slides apart")
    return ReadResult(finalize(df), "class folders" + (f" + {csv.name}" if csv else ""), problems)


def _read_split_folders(root: Path, splits: list[Path], skip_missing: bool) -> ReadResult:
    parts = [_read_class_folders(d, skip_missing, split=_split_name(d.name)) for d in splits]
    df = pd.concat([p.manifest for p in parts], ignore_index=True)
    problems = [msg for p in parts for msg in p.problems]
    return ReadResult(finalize(df), "split folders (" + ", ".join(d.name for d in splits) + ")", problems)


def _split_name(name: str) -> str:
    name = name.lower()
    return "val" if name in ("valid", "validation") else name


def _read_csv_file(csv_path: Path, skip_missing: bool) -> ReadResult:
    columns = set(read_csv_checked(csv_path, nrows=0).columns)
    if "path" in columns:
        df, problems = _drop_missing_files(read_manifest_csv(csv_path), skip_missing, csv_path)
        if "group" in columns or "slide" in columns:
            problems += _no_slide_problems(df, csv_path, "an empty group/slide cell")
        return ReadResult(df, "manifest CSV", problems)
    folder_df = _folder_rows(csv_path.parent) if _class_dirs(csv_path.parent) else pd.DataFrame(columns=["path", "label"])
    if folder_df.empty:  # images directly beside the CSV
        images = [p for p in _images_in(csv_path.parent) if Path(p).parent == csv_path.parent]
        folder_df = pd.DataFrame({"path": images, "label": UNLABELLED})
    df, problems = _join_metadata(folder_df, csv_path, skip_missing, labels_from_csv=True)
    return ReadResult(finalize(df), f"metadata CSV {csv_path.name}", problems)


def _drop_missing_files(df: pd.DataFrame, skip_missing: bool, source: Path) -> tuple[pd.DataFrame, list[str]]:
    exists = np.array([Path(p).is_file() for p in df["path"]], dtype=bool)
    if exists.all():
        return df, []
    msg = f"{source}: {int((~exists).sum())} row(s) point to missing images, e.g. {df.loc[~exists, 'path'].iloc[0]}"
    if not skip_missing:
        raise MitotypeError(msg + " (use {skip_missing} to drop them)", options=("skip_missing",))
    warnings.warn(msg + "; dropped", stacklevel=2)
    return df[exists].reset_index(drop=True), [msg + " (dropped)"]


def _find_column(columns: list[str], *names: str) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    for name in names:
        if name in lower:
            return lower[name]
    return None


def _join_metadata(
    images: pd.DataFrame, csv_path: Path, skip_missing: bool, labels_from_csv: bool = False
) -> tuple[pd.DataFrame, list[str]]:
    """Join image files with a per-patch CSV on file name; votes, slide and domain come from it."""
    meta = read_csv_checked(csv_path)
    cols = list(meta.columns)
    fname = _find_column(cols, "filename", "file", "image", "image_name", "file_name")
    if fname is None:
        raise MitotypeError(
            f"{csv_path}: missing column 'path' (a manifest: path, label, ...) or a file-name column (filename, Filename, image); columns are {', '.join(cols)}"
        )
    problems: list[str] = []
    meta = meta.rename(columns={fname: "filename"})
    meta["filename"] = meta["filename"].astype(str).map(lambda s: Path(s).name)
    dup = meta["filename"].duplicated()
    if dup.any():
        raise MitotypeError(f"{csv_path}: file name '{meta.loc[dup, 'filename'].iloc[0]}' appears in {int(dup.sum()) + 1} rows")

    out = pd.DataFrame({"filename": meta["filename"]})
    expert_cols = [c for c in cols if _expert_index(c) is not None and c != fname]
    for col in expert_cols:
        out[f"expert_{_expert_index(col)}"] = [
            np.nan if pd.isna(v) else float(parse_label(v, f"{csv_path} row {i + 2} column {col}")) for i, v in enumerate(meta[col])
        ]
    slide = _find_column(cols, "slide", "slide_id", "wsi", "patient", "case", "tumor_case")
    domain = _find_column(cols, "dataset", "domain", "source", "scanner", "tumor", "tumour")
    if slide:  # an empty slide cell stays empty: finalize makes that patch its own group
        prefix = meta[domain].fillna("").astype(str) + "/" if domain else ""
        out["group"] = (prefix + meta[slide].astype(str)).where(meta[slide].notna())
    if domain:
        out["domain"] = meta[domain].astype(str)
    phase = _find_column(cols, "expert1_label", "subtype", "phase", "class_name")
    if phase:
        out["subtype"] = meta[phase].fillna("").astype(str)
    label_col = _find_column(cols, "majority_atypical", "majority", "label")
    if label_col:
        out["csv_label"] = [parse_label(v, f"{csv_path} row {i + 2}") for i, v in enumerate(meta[label_col])]
    for col in ("x", "y"):
        if col in meta:
            out[col] = meta[col]
    passthrough = [c for c in cols if c not in (fname, slide, domain, phase, label_col, "x", "y") and c not in expert_cols]
    for col in passthrough:  # keep every other column; rename those that clash with the manifest's
        out[f"source_{col}" if col.lower() in CORE_NAMES else col] = meta[col]

    images = images.assign(filename=[Path(p).name for p in images["path"]])
    dup_img = images["filename"].duplicated()
    if dup_img.any():
        name = images.loc[dup_img, "filename"].iloc[0]
        raise MitotypeError(f"{csv_path.parent}: image name '{name}' occurs in more than one folder; cannot join with {csv_path.name}")
    merged = out.merge(images, on="filename", how="outer", indicator=True)
    no_image = merged["_merge"] == "left_only"
    if no_image.any():
        first_row = int(out.index[out["filename"] == merged.loc[no_image, "filename"].iloc[0]][0]) + 2
        msg = f"{csv_path}: {int(no_image.sum())} row(s) have no matching image, e.g. row {first_row} ({merged.loc[no_image, 'filename'].iloc[0]})"
        if not skip_missing:
            raise MitotypeError(msg + "; use {skip_missing} to drop them", options=("skip_missing",))
        warnings.warn(msg + "; dropped", stacklevel=2)
        problems.append(msg + " (dropped)")
    no_row = merged["_merge"] == "right_only"
    if no_row.any():
        example = merged.loc[no_row, "filename"].iloc[0]
        problems.append(f"{csv_path}: {int(no_row.sum())} image(s) have no CSV row, e.g. {example}; label taken from their folder")
    merged = merged[merged["_merge"] != "left_only"].drop(columns="_merge")
    if "csv_label" in merged:
        has_both = merged["label"].notna() & (merged["label"] != UNLABELLED) & merged["csv_label"].notna()
        disagree = has_both & (merged["label"] != merged["csv_label"])
        if disagree.any():
            example = merged.loc[disagree, "filename"].iloc[0]
            problems.append(f"{csv_path}: {int(disagree.sum())} image(s) lie in a class folder that disagrees with the CSV label, "
                            f"e.g. {example}; folder kept")
        use_csv = merged["label"].isna() | (merged["label"] == UNLABELLED)
        if labels_from_csv or use_csv.any():
            merged.loc[use_csv, "label"] = merged.loc[use_csv, "csv_label"]
        merged = merged.drop(columns="csv_label")
    merged["label"] = merged["label"].fillna(UNLABELLED).astype(int)
    merged = merged.drop(columns="filename").reset_index(drop=True)
    if slide:
        problems += _no_slide_problems(finalize(merged), csv_path, "no slide value or no CSV row")
    return merged, problems


def _no_slide_problems(df: pd.DataFrame, source: Path, why: str) -> list[str]:
    """Patches whose slide is unknown each form their own group; say how many, since a grouped
    split cannot keep them with their slide-mates."""
    alone = df["group"].str.startswith(NO_SLIDE)
    if not alone.any():
        return []
    return [f"{source}: {int(alone.sum())} patch(es) have {why}, e.g. {Path(df.loc[alone, 'path'].iloc[0]).name}; each is its own group"]


def _expert_index(column: str) -> int | None:
    """expert1_atypical, Expert_3, expert_2 -> 1, 3, 2; phase labels (expert1_label) are not votes."""
    name = column.lower().strip()
    if not name.startswith("expert") or name.endswith("_label"):
        return None
    digits = "".join(ch for ch in name[6:] if ch.isdigit())
    rest = name[6:].replace(digits, "", 1).strip("_ ")
    if not digits or rest not in ("", "atypical", "vote"):
        return None
    return int(digits)
