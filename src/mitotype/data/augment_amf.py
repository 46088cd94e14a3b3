"""The 4x offline atypical augmentation of the DenseNet-121 + SE study: ``mitotype data augment-amf IN OUT``.

Atypical figures are the rare class. That study wrote four fixed variants of every atypical patch to disk
before training, each from one seeded draw:

1. ``rotate``: rotation by 15-30 degrees, white fill;
2. ``hflip_brightness``: horizontal flip, then brightness x0.9-1.1;
3. ``vflip_contrast``: vertical flip, then contrast x0.9-1.1;
4. ``rotate_sharpness``: rotation by 5-15 degrees (white fill), then sharpness x0.9-1.1.

Each rotation's sense (clockwise or not) is drawn too, with even odds; rotations resample bilinearly and
keep the patch size. Originals are byte copies, normal patches are copied, and variants are RGB PNGs named
``<stem>_aug1.png`` .. ``<stem>_aug4.png``. Whatever the input layout, OUT is written in the AMi-Br layout
(``Atypical/``, ``Normal/``, ``metadata.csv``) so every mitotype command reads it back. A variant carries its
original's slide, domain, votes and every other column, so a grouped split never puts an image in one fold
and its copies in another; ``augmented_from``, ``variant`` and ``variant_params`` say what each row is.

Draws come from a generator seeded with (seed, output file name): the same seed gives byte-identical files
wherever the dataset lies, and adding patches changes no other patch's variants.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from mitotype._io import atomic_path, check_output_dir, write_csv
from mitotype.data.manifest import CORE_COLUMNS, UNLABELLED, expert_columns
from mitotype.data.readers import IMAGE_SUFFIXES, read_dataset
from mitotype.errors import MitotypeError

VARIANTS = ("rotate", "hflip_brightness", "vflip_contrast", "rotate_sharpness")
CLASS_DIRS = {1: "Atypical", 0: "Normal"}
WHITE = (255, 255, 255)
ROTATE_DEGREES = (15.0, 30.0)
SMALL_ROTATE_DEGREES = (5.0, 15.0)
FACTOR_RANGE = (0.9, 1.1)
# Column names the AMi-Br reader interprets (file, slide, domain, phase, label, position, scanner):
# a pass-through column so named is written as source_<name> so that it stays a plain column.
READER_NAMES = {"filename", "file", "image", "image_name", "file_name", "slide", "slide_id", "wsi", "patient", "case",
                "tumor_case", "dataset", "domain", "source", "scanner", "tumor", "tumour", "expert1_label", "subtype",
                "phase", "class_name", "majority_atypical", "majority", "label", "x", "y", "path", "group", "split",
                "n_votes", "votes_atypical", "hard", "csv_label"}
ADDED = ("augmented_from", "variant", "variant_params")


@dataclass(frozen=True)
class Variant:
    """One drawn variant: its kind, rotation angle in degrees (counter-clockwise) and enhancement factor.
    Values are rounded before use, so ``params`` rebuilds the exact image."""

    kind: str
    angle: float = 0.0
    factor: float = 1.0

    @property
    def params(self) -> str:
        parts = [f"angle={self.angle:g}"] if "rotate" in self.kind else []
        return ";".join(parts + ([f"factor={self.factor:g}"] if self.kind != "rotate" else []))


@dataclass
class AugmentSummary:
    """What was written: counts per class, and the layout the input was read as."""

    out: Path
    layout: str
    n_normal: int
    n_atypical: int

    @property
    def n_variants(self) -> int:
        return len(VARIANTS) * self.n_atypical

    @property
    def n_images(self) -> int:
        return self.n_normal + self.n_atypical + self.n_variants


def draw_variants(rng: np.random.Generator) -> list[Variant]:
    """The four variants of one atypical patch, in the order of :data:`VARIANTS`."""

    def angle(lo_hi: tuple[float, float]) -> float:
        return round(float(rng.choice([-1.0, 1.0]) * rng.uniform(*lo_hi)), 2)

    def factor() -> float:
        return round(float(rng.uniform(*FACTOR_RANGE)), 4)

    return [Variant("rotate", angle=angle(ROTATE_DEGREES)), Variant("hflip_brightness", factor=factor()),
            Variant("vflip_contrast", factor=factor()),
            Variant("rotate_sharpness", angle=angle(SMALL_ROTATE_DEGREES), factor=factor())]


def apply_variant(image: Image.Image, variant: Variant) -> Image.Image:
    """``variant`` of an RGB image, the same size (rotations fill the uncovered corners with white)."""
    if variant.kind == "rotate":
        return image.rotate(variant.angle, resample=Image.Resampling.BILINEAR, fillcolor=WHITE)
    if variant.kind == "hflip_brightness":
        return ImageEnhance.Brightness(ImageOps.mirror(image)).enhance(variant.factor)
    if variant.kind == "vflip_contrast":
        return ImageEnhance.Contrast(ImageOps.flip(image)).enhance(variant.factor)
    if variant.kind == "rotate_sharpness":
        rotated = image.rotate(variant.angle, resample=Image.Resampling.BILINEAR, fillcolor=WHITE)
        return ImageEnhance.Sharpness(rotated).enhance(variant.factor)
    raise ValueError(f"unknown variant {variant.kind!r}")


def variant_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one patch's draws: from the seed and the patch's output name, not its order or folder."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def augment_amf(src: str | Path, out_folder: str | Path, *, seed: int = 0, skip_missing: bool = False,
                progress: Callable[[int], None] | None = None) -> AugmentSummary:
    """Read ``src`` (any labelled layout), write originals + four variants per atypical patch to ``out_folder``.

    ``out_folder`` must be absent or empty and lie outside the input's image folders. On a failure the files
    written so far are removed again, so the same command can be rerun; ``metadata.csv`` is written last, so a
    folder without it is an interrupted run.
    """
    src, out = Path(src), Path(out_folder)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise MitotypeError(f"{{seed}} {seed}: must be a non-negative integer", options=("seed",))
    if not src.exists():
        raise MitotypeError(f"{src}: no such file or folder")
    check_output_dir(out, "out_folder")
    if out.is_dir() and any(out.iterdir()):
        raise MitotypeError(f"{out}: output folder is not empty; choose another folder or empty it (a folder without "
                            f"metadata.csv is an interrupted run: delete it and rerun)")
    result = read_dataset(src, require_labels=True, skip_missing=skip_missing)
    df = result.manifest
    inside = {out.resolve(), *out.resolve().parents} & {Path(p).parent for p in df["path"]}
    if inside:  # a later read of the input would take the variants for input patches
        raise MitotypeError(f"{out}: lies inside {min(inside)}, a folder of input images of {src}; choose a folder outside it")
    _check_input(df, src)
    names = _output_names(df)
    table = _metadata(df, names)
    written: list[Path] = []
    created_out = not out.exists()
    try:
        table = _write_images(df, names, table, out, seed, written, progress)
        write_csv(out / "metadata.csv", table)
    except BaseException:
        _remove(written, out, created_out)
        raise
    return AugmentSummary(out, result.layout, int((df["label"] == 0).sum()), int((df["label"] == 1).sum()))


def _check_input(df: pd.DataFrame, src: Path) -> None:
    if len(df) == 0:
        raise MitotypeError(f"{src}: the dataset is empty")
    unlabelled = df["label"] == UNLABELLED
    if unlabelled.any():
        raise MitotypeError(f"{src}: {int(unlabelled.sum())} patch(es) have no label, e.g. {df.loc[unlabelled, 'path'].iloc[0]}")
    if not (df["label"] == 1).any():
        raise MitotypeError(f"{src}: no atypical patches to augment ({len(df)} normal)")
    odd = [p for p in df["path"] if Path(p).suffix.lower() not in IMAGE_SUFFIXES]
    if odd:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise MitotypeError(f"{odd[0]}: not an image suffix ({suffixes}); the copy would not be read back")


def _output_names(df: pd.DataFrame) -> list[str]:
    """A file name per row, unique in OUT (split folders may repeat names) together with its variants' names:
    the input's name where free, else ``<stem>-1``, ``<stem>-2``... in manifest order."""
    used: set[str] = set()
    names = []
    for path, label in zip(df["path"], df["label"]):
        p = Path(path)
        base = p.stem.lstrip(".") or "image"  # hidden files are not read back as images
        for k in range(len(df) + 1):
            stem = base if k == 0 else f"{base}-{k}"
            wanted = [stem + p.suffix] + ([_variant_name(stem, i) for i in range(len(VARIANTS))] if label == 1 else [])
            if not any(w.lower() in used for w in wanted):
                break
        used.update(w.lower() for w in wanted)
        names.append(wanted[0])
    return names


def _variant_name(stem: str, index: int) -> str:
    return f"{stem}_aug{index + 1}.png"


def _metadata(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """metadata.csv rows of the originals, in the AMi-Br columns the reader joins on (filename, slide, dataset,
    expert votes, label, subtype, x, y) plus every other column; variant rows are added while writing.

    The reader makes a patch's group ``dataset/slide``, so the slide written is the group without its
    ``domain/`` prefix and the manifest read back has the input's groups; without any domain the
    dataset column is left out and the group is the slide."""
    domains, groups = df["domain"].astype(str), df["group"].astype(str)
    table = pd.DataFrame({"filename": names})
    table["label"] = [CLASS_DIRS[int(v)] for v in df["label"]]
    if (domains != "").any():
        table["dataset"] = domains.to_numpy()
        table["slide"] = [g[len(d) + 1:] if d and g.startswith(d + "/") else g for d, g in zip(domains, groups)]
        if (df["scanner"].astype(str) != "").any():  # a column the reader takes as the domain only without dataset
            table["scanner"] = df["scanner"].to_numpy()
    else:
        table["slide"] = groups.to_numpy()
    for col in expert_columns(df):
        table[col] = df[col].to_numpy()
    if (df["subtype"] != "").any():
        table["subtype"] = df["subtype"].to_numpy()
    if (df["split"] != "").any():
        table["source_split"] = df["split"].to_numpy()
    for col in ("x", "y"):
        if col in df:
            table[col] = df[col].to_numpy()
    skip = set(CORE_COLUMNS) | {"scanner", "x", "y"} | set(expert_columns(df))
    for col in (c for c in df.columns if c not in skip):
        name = col
        while name.lower() in READER_NAMES or name in ADDED or name in table:
            name = f"source_{name}"
        table[name] = df[col].to_numpy()
    table["augmented_from"] = ""
    table["variant"] = "original"
    table["variant_params"] = ""
    return table


def _write_images(df: pd.DataFrame, names: list[str], table: pd.DataFrame, out: Path, seed: int,
                  written: list[Path], progress: Callable[[int], None] | None) -> pd.DataFrame:
    """Copy every original, write the variants of the atypical ones; ``table`` with the variants' rows added."""
    rows = []
    for i, (path, label, name) in enumerate(zip(df["path"], df["label"], names)):
        folder = out / CLASS_DIRS[int(label)]
        _copy(Path(path), folder / name, written)
        if label == 1:
            image = _open_rgb(Path(path))
            stem = Path(name).stem
            for k, variant in enumerate(draw_variants(variant_rng(seed, name))):
                target = folder / _variant_name(stem, k)
                with atomic_path(target) as tmp:
                    written.append(target)
                    apply_variant(image, variant).save(tmp, format="PNG")
                row = table.iloc[i].copy()
                row["filename"], row["augmented_from"] = target.name, name
                row["variant"], row["variant_params"] = variant.kind, variant.params
                rows.append(row)
        if progress is not None:
            progress(1 + (len(VARIANTS) if label == 1 else 0))
    return pd.concat([table, pd.DataFrame(rows)], ignore_index=True) if rows else table


def _copy(src: Path, target: Path, written: list[Path]) -> None:
    with atomic_path(target) as tmp:
        written.append(target)
        try:
            shutil.copyfile(src, tmp)
        except FileNotFoundError:
            raise MitotypeError(f"{src}: image disappeared while copying") from None


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MitotypeError(f"{path}: cannot decode image ({reason})") from None


def _remove(written: list[Path], out: Path, created_out: bool) -> None:
    """Undo a failed run: OUT was absent or empty before it, and is left so again."""
    for path in written:
        path.unlink(missing_ok=True)
    for folder in [out / d for d in CLASS_DIRS.values()] + ([out] if created_out else []):
        try:
            folder.rmdir()
        except OSError:
            pass
