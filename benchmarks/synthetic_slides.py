"""Synthetic whole-slide images of known figures: pyramidal JPEG TIFFs (0.25 um/px in the TIFF
resolution tags) and their truth, for ``mitotype analyze``'s benchmarks and the README's example.

Three kinds:

- ``--mosaics DIR``: the images of ``mitotype data mosaic`` (figures blended into figure-free tissue;
  e.g. ``--fold 0`` for a held-out fold) laid ``--grid`` x ``--grid`` per slide in a glass margin,
  with their truth moved to slide coordinates: what the issue's synthetic-slide figures use.

- ``--patches DATA``: mosaics of real figure patches (any layout mitotype reads, e.g. the AMi-Br
  training split: 128 px at 0.25 um/px, one figure at each centre). ``--groups-from RUN/splits.csv
  --fold K`` keeps only the patches of the groups (slides) held out in fold K of that split file, so
  a model cross-validated with it never saw them. Each slide is a grid of patches, side by side, in
  a tissue region with a glass margin; the truth is every patch centre with its label.
- no ``--patches``: drawn scenes (pink stroma, pale nuclei, dark lobed 'figures'; a third of them
  larger and irregular), no data needed. These are cartoons: they exercise the pipeline, not a
  trained detector's accuracy.

Writes ``OUT/slide_NN.tif`` and ``OUT/truth.csv`` (image, x, y in level-0 pixels, label) atomically.

    .venv/bin/python benchmarks/synthetic_slides.py --out demo/slides                      # 2 drawn slides, no data
    .venv/bin/python benchmarks/synthetic_slides.py --out bench/slides --patches ../shared/data/ami-br-train \\
        --groups-from RUN/splits.csv --fold 0 --n 4 --per-slide 64                          # held-out-fold mosaics
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mitotype._io import write_csv
from mitotype.data.pyramid import write_pyramid

MPP = 0.25
GLASS = 243
STROMA = np.array([232, 190, 214], np.int16)
NUCLEUS = np.array([105, 65, 150], np.uint8)
FIGURE = np.array([70, 35, 100], np.uint8)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for slide_NN.tif and truth.csv")
    ap.add_argument("--n", type=int, default=2, help="slides (default %(default)s)")
    ap.add_argument("--patches", type=Path, default=None, help="figure patches to tile (a dataset folder or manifest CSV)")
    ap.add_argument("--groups-from", type=Path, default=None, help="a split file (cv run's splits.csv): keep the groups of --fold")
    ap.add_argument("--fold", type=int, default=0, help="the held-out fold of --groups-from (default %(default)s)")
    ap.add_argument("--per-slide", type=int, default=64, help="patches per mosaic slide (default %(default)s)")
    ap.add_argument("--size", default="4096x3072", help="drawn slides: width x height in px (default %(default)s)")
    ap.add_argument("--figures", type=int, default=40, help="drawn slides: figures per slide (default %(default)s)")
    ap.add_argument("--margin", type=int, default=512, help="glass around the tissue, px (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mosaics", type=Path, default=None, help="a `mitotype data mosaic` folder whose images become slides")
    ap.add_argument("--grid", type=int, default=4, help="--mosaics: images per slide side (default %(default)s)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    if args.mosaics is not None:
        truth = pd.read_csv(args.mosaics / "truth.csv", keep_default_na=False)
        names = sorted(p.name for p in args.mosaics.glob("mosaic_*.png"))
        per = args.grid * args.grid
        for i in range(min(args.n, len(names) // per)):
            img, placed = tiled(args.mosaics, names[i * per:(i + 1) * per], truth, grid=args.grid, margin=args.margin)
            rows += _save(args.out, i, img, placed)
    elif args.patches is not None:
        patches = _patches(args.patches, args.groups_from, args.fold)
        order = rng.permutation(len(patches))
        need = args.n * args.per_slide
        if len(order) < need:
            print(f"note: {len(order)} patches for {args.n} x {args.per_slide}; slides are filled in turn")
        for i in range(args.n):
            chosen = patches.iloc[order[i * args.per_slide:(i + 1) * args.per_slide]]
            if chosen.empty:
                break
            img, truth = mosaic(chosen, margin=args.margin)
            rows += _save(args.out, i, img, truth)
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        for i in range(args.n):
            img, truth = drawn(w, h, args.figures, margin=args.margin, rng=rng)
            rows += _save(args.out, i, img, truth)
    table = pd.DataFrame(rows, columns=["image", "x", "y", "label"])
    write_csv(args.out / "truth.csv", table)
    print(f"{table['image'].nunique()} slide(s), {len(table)} figures ({int((table['label'] == 'atypical').sum())} atypical) "
          f"→ {args.out}/ (truth.csv)")
    return table


def _save(out: Path, i: int, img: np.ndarray, truth: list[tuple[float, float, str]]) -> list[dict]:
    name = f"slide_{i:02d}.tif"
    write_pyramid(out / name, img, mpp=MPP)
    return [{"image": name, "x": x, "y": y, "label": label} for x, y, label in truth]


def _patches(data: Path, groups_from: Path | None, fold: int) -> pd.DataFrame:
    from mitotype.data.readers import read_dataset

    manifest = read_dataset(data).manifest
    manifest = manifest[manifest["label"].isin([0, 1])]
    if groups_from is not None:
        split = pd.read_csv(groups_from)
        held = set(split.loc[split["fold"] == fold, "group"].astype(str))
        manifest = manifest[manifest["group"].astype(str).isin(held)]
        print(f"{len(manifest)} patches of {len(held)} groups held out in fold {fold} of {groups_from}")
    if manifest.empty:
        raise SystemExit("no labelled patches to tile")
    return manifest.reset_index(drop=True)


def mosaic(patches: pd.DataFrame, *, margin: int) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The patches side by side on a near-square grid inside a glass margin; a figure at each centre."""
    first = np.asarray(Image.open(patches["path"].iloc[0]).convert("RGB"))
    side = first.shape[0]
    cols = math.ceil(math.sqrt(len(patches)))
    rows = math.ceil(len(patches) / cols)
    img = np.full((rows * side + 2 * margin, cols * side + 2 * margin, 3), GLASS, np.uint8)
    truth = []
    for k, (path, label) in enumerate(zip(patches["path"], patches["label"])):
        patch = np.asarray(Image.open(path).convert("RGB").resize((side, side)))
        y0, x0 = margin + (k // cols) * side, margin + (k % cols) * side
        img[y0:y0 + side, x0:x0 + side] = patch
        truth.append((float(x0 + side // 2), float(y0 + side // 2), "atypical" if label == 1 else "normal"))
    return img, truth


def tiled(folder: Path, names: list[str], truth: pd.DataFrame, *, grid: int, margin: int) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Mosaic images ``names`` laid ``grid`` x ``grid`` inside a glass margin; their truth moved along."""
    first = np.asarray(Image.open(folder / names[0]).convert("RGB"))
    side = first.shape[0]
    img = np.full((grid * side + 2 * margin, grid * side + 2 * margin, 3), GLASS, np.uint8)
    placed = []
    for k, name in enumerate(names):
        y0, x0 = margin + (k // grid) * side, margin + (k % grid) * side
        img[y0:y0 + side, x0:x0 + side] = np.asarray(Image.open(folder / name).convert("RGB"))
        for x, y, label in truth.loc[truth["image"] == name, ["x", "y", "label"]].itertuples(index=False):
            placed.append((float(x0 + x), float(y0 + y), str(label)))
    return img, placed


def drawn(w: int, h: int, n_figures: int, *, margin: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """A tissue ellipse with pale nuclei and ``n_figures`` dark lobed figures, at least 60 px apart."""
    img = np.full((h, w, 3), GLASS, np.uint8)
    yy, xx = np.ogrid[:h, :w]
    inside = ((xx - w / 2) / (w / 2 - margin)) ** 2 + ((yy - h / 2) / (h / 2 - margin)) ** 2 <= 1
    noise = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    img[inside] = np.clip(STROMA + noise[inside], 0, 255).astype(np.uint8)
    del noise
    figures: list[tuple[float, float, str]] = []
    while len(figures) < n_figures:
        x, y = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        if inside[int(y), int(x)] and all(math.hypot(x - a, y - b) > 60 for a, b, _ in figures):
            figures.append((x, y, "atypical" if len(figures) % 3 == 0 else "normal"))
    for _ in range(int(inside.sum()) // 3600):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if inside[int(y), int(x)] and all(math.hypot(x - a, y - b) > 40 for a, b, _ in figures):
            _blob(img, x, y, rng.uniform(4, 6), NUCLEUS, rng)
    for x, y, label in figures:
        _blob(img, x, y, 13 if label == "atypical" else 9, FIGURE, rng, lobes=5 if label == "atypical" else 3)
    return img, [(round(x), round(y), label) for x, y, label in figures]


def _blob(img: np.ndarray, x: float, y: float, r: float, colour: np.ndarray, rng: np.random.Generator, lobes: int = 0) -> None:
    h, w = img.shape[:2]
    reach = int(math.ceil(r * 1.3)) + 1
    x0, y0, x1, y1 = max(0, int(x) - reach), max(0, int(y) - reach), min(w, int(x) + reach + 1), min(h, int(y) + reach + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    radius = r * (1 + (0.25 * np.sin(lobes * np.arctan2(yy - y, xx - x) + rng.uniform(0, 6.28)) if lobes else 0))
    img[y0:y1, x0:x1][np.hypot(xx - x, yy - y) <= radius] = colour


if __name__ == "__main__":
    main()
