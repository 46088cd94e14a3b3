"""``mitotype detect``: figures in images, folders or slides, optionally classified, in one file.

Each input is detected tile by tile (:func:`mitotype.inference.detect.detect_many`); its
detections are written to ``OUT.partial/`` as soon as it is done, so an interrupted run continues
with ``resume`` from the next input, and the final file (CSV, GeoJSON, ASAP XML or MIDOG JSON) is
written atomically at the end. With a classifier chained (the bundled one by default), each
detection gets ``p_atypical, label`` through the points path.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd

from mitotype._io import check_output_file, write_csv, write_json
from mitotype.data.slides import open_source
from mitotype.errors import MitotypeError
from mitotype.inference.detect import Detector, classify_detections, detect_many, iter_inputs
from mitotype.inference.runtime import load_scorer

Progress = Callable[[str, int, int], None]  # (input name, tiles done, tiles in this input)


def partial_dir(out: Path) -> Path:
    return Path(str(out) + ".partial")


def detect(
    model: Path, inputs: Path, out: Path, *, classifier: Path | None = None, fmt: str = "csv", mpp: float | None = None,
    slide_mpp: float | None = None, threshold: float | None = None, min_score: float | None = None, backend: str = "auto",
    device: str = "auto", tile: int = 1024, resume: bool = False, progress: Progress | None = None,
) -> pd.DataFrame:
    """Detect figures in ``inputs`` with the detector at ``model`` and write them to ``out`` in ``fmt``.

    Plain images are taken to be at ``mpp`` (default: the detector's); slides say theirs (else
    ``slide_mpp``). Detections scoring at least ``min_score`` (default: the detector's threshold)
    are kept, so a lower floor gives the whole precision-recall curve to ``evaluate-detections``.
    """
    from mitotype.data.point_formats import point_format, write_points

    fmt = point_format(fmt).value
    check_output_file(out, "out")
    for name, value in (("mpp", mpp), ("slide_mpp", slide_mpp), ("min_score", min_score)):
        if value is not None and not (math.isfinite(value) and 0 <= value < (1 if name == "min_score" else 100)):
            raise MitotypeError(f"{{{name}}} {value}: out of range", options=(name,))
    if tile < 64:
        raise MitotypeError(f"{{tile}} {tile}: tiles must be at least 64 px", options=("tile",))
    files = list(iter_inputs(inputs))
    detector = Detector.load(model, device=device, threshold=threshold, backend=backend)
    chained = load_scorer(classifier, device=device, backend=backend, option="classifier") if classifier is not None else None
    key = _run_key(model, classifier, files, (mpp, slide_mpp, threshold, min_score, tile))
    done = _partial(out, key, resume)
    paths = dict(files)
    jobs = [(name, partial(open_source, path, image_mpp=mpp or detector.mpp, slide_mpp=slide_mpp), True)
            for name, path in files if name not in done]
    for name, found in detect_many(detector, jobs, min_score=min_score, tile=tile, on_tile=progress):
        path = paths[name]
        found.insert(0, "image", name)
        if chained is not None:
            found = classify_detections(found, {name: str(path)}, chained[0], chained[1], image_mpp=mpp, slide_mpp=slide_mpp)
        _save_partial(out, key, done, name, found)
    table = pd.concat([done[name] for name, _ in files], ignore_index=True) if files else pd.DataFrame()
    write_points(table, out, fmt, mpp=detector.mpp)
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    return table


def _run_key(model: Path, classifier: Path | None, files: list[tuple[str, Path]], options: tuple) -> str:
    """What a resumed run must share with the one it continues: models, inputs and options."""
    parts = [str(Path(model).resolve()), str(Path(classifier).resolve()) if classifier else "", repr(options)]
    parts += [f"{n}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for n, p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _partial(out: Path, key: str, resume: bool) -> dict[str, pd.DataFrame]:
    """Detections of inputs finished by an earlier run with the same key (``resume``), else a fresh folder."""
    folder = partial_dir(out)
    meta = folder / "run.json"
    if resume and meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("key") != key:
            raise MitotypeError(f"{folder}: {{resume}} with other models, inputs or options than the interrupted run; start "
                                "afresh without it", options=("resume",))
        return {name: pd.read_csv(folder / file, keep_default_na=False, dtype={"image": str}) for name, file in saved["done"].items()}
    shutil.rmtree(folder, ignore_errors=True)
    write_json(meta, {"key": key, "done": {}})
    return {}


def _save_partial(out: Path, key: str, done: dict[str, pd.DataFrame], name: str, found: pd.DataFrame) -> None:
    """One finished input: its detections, then the index that lists it (both atomic)."""
    folder = partial_dir(out)
    file = f"{len(done):06d}.csv"
    write_csv(folder / file, found)
    done[name] = found
    listed = json.loads((folder / "run.json").read_text())["done"]
    write_json(folder / "run.json", {"key": key, "done": {**listed, name: file}})


__all__ = ["detect", "partial_dir"]
