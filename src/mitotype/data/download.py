"""Fetch the public atypical-mitosis datasets from their public homes into a folder mitotype reads.

``download(name, dest)`` streams each file of a dataset to a hidden temporary file inside ``dest``,
checks its sha256 where one is known, unpacks it into a hidden temporary folder, arranges it into a
layout :func:`mitotype.data.readers.read_dataset` understands, and only then renames that folder to
``dest/<name>``. An interrupted or failed download therefore leaves no ``dest/<name>`` behind, and
a second call finds the finished folder (it carries ``.mitotype-download.json``) and returns at once.

Where the data lives, and how sure we are (researched from stored copies of the public pages and
repositories; this module could not be run against the real hosts, which were out of reach):

- **AMi-Br** (Bertram et al., BVM 2025). Its first home is https://github.com/DeepMicroscopy/AMi-Br:
  a CSV of all mitotic figures (slide, dataset, uid, x, y, expert labels, ``majority_atypical``) and
  128 px crops in ``patches/`` (its README; the branch ``main`` is confirmed by links to
  ``AMi-Br/tree/main/patches``). The CSV's file name and the inner layout of ``patches/`` were not
  visible, and the CSV carries no file-name column, so that repository is not what we fetch.
  We fetch the train/test split the benchmark paper published in
  https://github.com/DeepMicroscopy/AMi-Br_Benchmark (Banerjee et al., arXiv:2506.21444; its
  README: "This repository contains the datasets"; the index lists an ``AMi-Br/`` folder). The
  layout ``AMi-Br/{Train,Test}/{Atypical,Normal}/`` is inferred from the paper's training and
  inference scripts (``Datasets_Stratified/AMi-Br/Train/<Atypical|Normal>/<dataset>_<uid>.png``,
  ``.../AMi-Br/Test``), not seen in a listing. The branch name ``main`` is assumed (GitHub's default
  for new repositories), not confirmed. Confidence: medium.
- **AtNorM-Br** (TCGA-BRCA mitoses) and **AtNorM-MD** (multi-domain, from MIDOG++): folders
  ``AtNorM-Br/`` and ``AtNorM-MD/`` of the same benchmark repository (listed under "Contents" in its
  README); class folders ``Atypical/`` + ``Normal/`` per the inference notebooks
  (``Datasets_Stratified/AtNorM-Br/<Atypical|Normal>``). Confidence: medium (same assumptions).
- **MIDOG 2025 atypical training set** (Weiss et al., Zenodo, 17 July 2025,
  doi:10.5281/zenodo.16044804). Public code everywhere reads it as
  ``MIDOG25_Atypical_Classification_Train_Set.csv`` (columns ``image_id`` = patch file,
  ``filename`` = whole-slide image, ``majority`` = AMF/NMF, ``Tumor``, ``Species``, ``Scanner``,
  ``expert1..3``...) plus a folder ``MIDOG25_Binary_Classification_Train_Set/`` of patches, which
  the organisers' notebook distributes as "the zip folder of images and the csv file of labels".
  The Zenodo file names ``MIDOG25_Atypical_Classification_Train_Set.csv`` and
  ``MIDOG25_Binary_Classification_Train_Set.zip`` are inferred from those names, NOT confirmed
  against the record's file list. Confidence: low to medium. The CSV names the whole-slide image
  ``filename``, which a reader would take for the patch name, so after download we write a
  manifest CSV (``path, label, group, domain, expert_1..``) beside the images and keep the
  original CSV under ``source/``.

No checksum is published for any of these files (GitHub archives are not byte-stable; Zenodo
lists md5 sums we could not see), so every ``sha256`` below is ``None``: downloads are verified by
their length (when the server states it), by archive integrity, by the expected layout, and by a
check that the images are images and not Git LFS pointers. None was invented.

``ami-br``, ``atnorm-br`` and ``atnorm-md`` come from the one benchmark archive; each name fetches
it again and keeps only its own folder (nothing large is cached between calls).

``base_url`` (or the environment variable ``MITOTYPE_DOWNLOAD_BASE``) replaces the scheme and host
of every URL and keeps its path and query, so ``http://mirror.example/data`` fetches
``http://mirror.example/data/DeepMicroscopy/AMi-Br_Benchmark/archive/refs/heads/main.zip``; the
tests use it to point at a server on 127.0.0.1.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mitotype.data.manifest import parse_label
from mitotype.data.readers import IMAGE_SUFFIXES, looks_like_dataset
from mitotype.errors import MitotypeError

__all__ = ["DATASETS", "DatasetSource", "RemoteFile", "download", "resolve_url"]

ENV_BASE = "MITOTYPE_DOWNLOAD_BASE"
MARKER = ".mitotype-download.json"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
STALE_S = 3600.0  # leftovers of a killed download older than this are removed by the next call
USER_AGENT = "mitotype-download/0.1 (+https://github.com/)"
LFS_POINTER = b"version https://git-lfs"

BENCHMARK_ZIP = "https://github.com/DeepMicroscopy/AMi-Br_Benchmark/archive/refs/heads/main.zip"
MIDOG25_RECORD = "https://zenodo.org/records/16044804"
BENCHMARK_CITATION = (
    "Banerjee S, Weiss V, Donovan TA, Fick RHJ, Conrad T, Ammeling J, Porsche N, Klopfleisch R, "
    "Kaltenecker C, Breininger K, Aubreville M, Bertram CA. Benchmarking Deep Learning and Vision "
    "Foundation Models for Atypical vs. Normal Mitosis Classification with Cross-Dataset Evaluation. "
    "arXiv:2506.21444 (2025)"
)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it is, what it is, and where its content goes."""

    url: str
    kind: str  # "zip", "tar" (any compression tarfile reads) or "file" (kept as is)
    sha256: str | None  # None: not published; verified by length, archive integrity and layout
    subdir: str = ""  # archives: the folder inside (after the single top folder) that is kept
    target: str = ""  # where it lands inside the dataset folder ("" = its root)
    note: str = ""  # how sure we are of this URL


@dataclass(frozen=True)
class DatasetSource:
    """A registry entry: the files, the citation and licence, and how to make the result readable."""

    name: str
    description: str
    files: tuple[RemoteFile, ...]
    homepage: str
    citation: str
    licence: str
    prepare: Callable[[Path], None] | None = field(default=None, compare=False)


def _prepare_midog25(root: Path) -> None:
    """MIDOG25 CSV + flat image folder -> ``manifest.csv`` (path, label, group, domain, votes)."""
    csvs = sorted(root.glob("*.csv"))
    if len(csvs) != 1:
        raise MitotypeError(f"{root}: expected one label CSV in the MIDOG 2025 download, found {len(csvs)}")
    source = root / "source"
    source.mkdir()
    original = source / csvs[0].name
    csvs[0].rename(original)
    with original.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    lower = {c.lower().strip(): c for c in columns}
    image_col = lower.get("image_id")
    label_col = lower.get("majority") or lower.get("label")
    if image_col is None or label_col is None:
        raise MitotypeError(
            f"{original}: expected columns image_id and majority (the MIDOG 2025 atypical CSV); columns are {', '.join(columns)}"
        )
    images = {p.name: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    slide_col = lower.get("filename")
    domain_col = lower.get("tumor") or lower.get("tumour")
    experts = sorted(
        (int(c[6:]), lower[c]) for c in lower if c.startswith("expert") and c[6:].isdigit()
    )
    used = {image_col, label_col, slide_col, domain_col} | {col for _, col in experts}
    extra = [c for c in columns if c not in used]
    header = ["path", "label", "group", "domain"] + [f"expert_{i}" for i, _ in experts] + [
        f"source_{c}" if c.lower() in {"path", "label", "group", "domain", "split", "subtype", "hard"} else c for c in extra
    ]
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        seen: set[str] = set()
        for row in rows:
            name = Path(str(row[image_col]).strip()).name
            if name in seen:  # public reports mention repeated image_ids; the first row wins
                continue
            seen.add(name)
            found = images.get(name)
            rel = found.relative_to(root).as_posix() if found else f"MIDOG25_Binary_Classification_Train_Set/{name}"
            votes = [_vote(row[col]) for _, col in experts]
            writer.writerow(
                [rel, row[label_col], row[slide_col] if slide_col else "", row[domain_col] if domain_col else ""]
                + votes
                + [row[c] for c in extra]
            )


def _vote(value: str | None) -> str:
    """An expert's vote as the manifest writes it: "1.0" atypical, "0.0" normal, "" unknown."""
    try:
        label = parse_label(value if value is not None else "", "vote")
    except MitotypeError:
        return ""
    return {1: "1.0", 0: "0.0"}.get(label, "")


def _benchmark_folder(name: str, subdir: str, description: str, note: str, citation: str = BENCHMARK_CITATION) -> DatasetSource:
    """A dataset kept as one folder of the AMi-Br_Benchmark repository's archive."""
    return DatasetSource(
        name=name,
        description=description,
        files=(RemoteFile(url=BENCHMARK_ZIP, kind="zip", sha256=None, subdir=subdir, note=note),),  # no published sha256; GitHub archives are not byte-stable
        homepage="https://github.com/DeepMicroscopy/AMi-Br_Benchmark",
        citation=citation,
        licence="not stated in the sources searched; see the repository before redistributing",
    )


DATASETS: dict[str, DatasetSource] = {
    "ami-br": _benchmark_folder(
        "ami-br", "AMi-Br",
        "AMi-Br: mitotic figures of human breast cancer (MIDOG21 + TUPAC16), 3-expert majority labels, the benchmark's train/test split",
        "folder seen in the repository index; Train/Test + Atypical/Normal inferred from its scripts; branch 'main' assumed",
        citation=(
            "Bertram CA, Weiss V, Donovan TA, Banerjee S, Conrad T, Ammeling J, Klopfleisch R, Kaltenecker C, "
            "Aubreville M. Histologic Dataset of Normal and Atypical Mitotic Figures on Human Breast Cancer (AMi-Br). "
            "Bildverarbeitung fuer die Medizin (BVM) 2025, Springer Vieweg; and " + BENCHMARK_CITATION
        ),
    ),  # first home: github.com/DeepMicroscopy/AMi-Br
    "atnorm-br": _benchmark_folder(
        "atnorm-br", "AtNorM-Br",
        "AtNorM-Br: held-out atypical/normal mitoses from the TCGA breast cancer cohort",
        "folder named in the README's Contents; Atypical/Normal inferred from the inference notebooks; branch 'main' assumed",
    ),
    "atnorm-md": _benchmark_folder(
        "atnorm-md", "AtNorM-MD",
        "AtNorM-MD: held-out multi-domain atypical/normal mitoses from the MIDOG++ training set, 5 expert votes",
        "folder named in the README's Contents; Atypical/Normal inferred from the inference notebooks; branch 'main' assumed",
    ),
    "midog25-atypical": DatasetSource(
        name="midog25-atypical",
        description="MIDOG 2025 track 2 training set: atypical/normal mitosis patches over many tumour types, species and scanners",
        files=(
            RemoteFile(
                url=f"{MIDOG25_RECORD}/files/MIDOG25_Atypical_Classification_Train_Set.csv?download=1",
                kind="file",
                sha256=None,  # not published in the sources searched (Zenodo lists an md5 we could not see)
                note="file name used by the organisers' notebook and public code; not confirmed against the record's file list",
            ),
            RemoteFile(
                url=f"{MIDOG25_RECORD}/files/MIDOG25_Binary_Classification_Train_Set.zip?download=1",
                kind="zip",
                sha256=None,  # not published in the sources searched
                target="MIDOG25_Binary_Classification_Train_Set",
                note="zip name inferred from the image folder's name; not confirmed against the record's file list",
            ),
        ),
        homepage=MIDOG25_RECORD,
        citation=(
            "Weiss V, et al. A Dataset of Atypical vs Normal Mitoses Classification for MIDOG 2025. "
            "Zenodo, 17 July 2025. doi:10.5281/zenodo.16044804"
        ),
        licence="see the Zenodo record (not visible in the sources searched)",
        prepare=_prepare_midog25,
    ),
}


def resolve_url(url: str, base_url: str | None = None) -> str:
    """``url`` with its scheme and host replaced by ``base_url`` (whose path is prefixed); as is without one."""
    base = base_url if base_url is not None else os.environ.get(ENV_BASE) or None
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    mirror = urllib.parse.urlsplit(base if "://" in base else "http://" + base)
    path = mirror.path.rstrip("/") + parts.path
    return urllib.parse.urlunsplit((mirror.scheme, mirror.netloc, path, parts.query, ""))


def download(name: str, dest: Path, *, base_url: str | None = None, progress: bool = True) -> Path:
    """Fetch dataset ``name`` into ``dest/<name>`` and return that folder, ready for ``read_dataset``.

    Returns at once when the folder is already there. Raises :class:`MitotypeError` (one line) for
    an unknown name, an unreachable host, an HTTP error, a checksum mismatch, a corrupt archive, or a
    ``dest/<name>`` that exists but holds no dataset.
    """
    source = DATASETS.get(name)
    if source is None:
        raise MitotypeError(f"unknown dataset '{name}'; known datasets: {', '.join(sorted(DATASETS))}")
    dest = Path(dest).expanduser()
    target = dest / name
    if target.exists():
        if (target / MARKER).is_file() or (target.is_dir() and looks_like_dataset(target)):
            return target
        raise MitotypeError(
            f"{target}: exists but is not a {name} dataset (no Atypical/ + Normal/ folders or CSV); move it away or choose another destination"
        )
    if dest.exists() and not dest.is_dir():
        raise MitotypeError(f"{dest}: not a folder; pass a folder to download into")
    dest.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest, name)

    token = uuid.uuid4().hex[:12]
    staging = dest / f".{name}.{token}.tmp"
    parts: list[Path] = []
    try:
        staging.mkdir()
        fetched = []
        for i, remote in enumerate(source.files):
            url = resolve_url(remote.url, base_url)
            part = dest / f".{name}.{token}.{i}.part"
            parts.append(part)
            digest, size = _fetch(url, part, remote.sha256, progress, f"{name} {i + 1}/{len(source.files)}", source.homepage)
            place = staging / remote.target if remote.target else staging
            if remote.kind == "file":
                place.mkdir(parents=True, exist_ok=True)
                shutil.move(str(part), place / _file_name(url))
            else:
                _extract(part, place, remote, url)
                part.unlink()
            fetched.append({"url": url, "sha256": digest, "bytes": size})
        if source.prepare is not None:
            source.prepare(staging)
        _check_layout(staging, name)
        info = {
            "name": name,
            "files": fetched,
            "citation": source.citation,
            "licence": source.licence,
            "homepage": source.homepage,
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(staging, target)
        except OSError:
            if target.is_dir() and (target / MARKER).is_file():  # another process finished first
                return target
            raise
        return target
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _file_name(url: str) -> str:
    return PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "download"


def _fetch(url: str, part: Path, sha256: str | None, progress: bool, label: str, homepage: str = "") -> tuple[str, int]:
    """Stream ``url`` into ``part``; return (sha256, bytes). Deletes ``part`` on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    offline = "offline? download it elsewhere and point mitotype at that folder"
    digest = hashlib.sha256()
    size = 0
    total: int | None = None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with part.open("wb") as out, _progress(progress) as bar:
                task = bar.add_task(label, total=total)
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(task, advance=len(chunk))
    except urllib.error.HTTPError as err:
        part.unlink(missing_ok=True)
        if err.code == 404:
            moved = f" (see {homepage})" if homepage else ""
            raise MitotypeError(f"{url}: not found (HTTP 404); the file may have moved{moved}") from None
        raise MitotypeError(f"{url}: HTTP {err.code} {_one_line(err.reason)}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionRefusedError, socket.gaierror) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or err
        raise MitotypeError(f"could not reach {url} ({_one_line(reason) or type(err).__name__}); {offline}") from None
    except (http.client.HTTPException, ConnectionError) as err:  # the connection broke mid-transfer
        part.unlink(missing_ok=True)
        raise MitotypeError(f"{url}: download broke off after {size} bytes ({_one_line(err) or type(err).__name__}); try again, or {offline}") from None
    except OSError as err:  # writing the temporary file: disk full, permissions
        part.unlink(missing_ok=True)
        raise MitotypeError(f"{part}: could not write the download ({_one_line(err.strerror or err)})") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if total is not None and size != total:
        part.unlink(missing_ok=True)
        raise MitotypeError(f"{url}: download cut short ({size} of {total} bytes); try again")
    got = digest.hexdigest()
    if sha256 is not None and got.lower() != sha256.lower():
        part.unlink(missing_ok=True)
        raise MitotypeError(f"{url}: checksum mismatch (expected sha256 {sha256.lower()}, got {got}); the download was deleted")
    return got, size


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def _members(names: list[str], subdir: str) -> dict[str, str]:
    """Archive member name -> path relative to the kept folder, for every member under it.

    A single top folder (``Repo-main/`` in GitHub archives) is dropped first; names that would land
    outside the destination (absolute, ``..``) are refused.
    """
    parts = {n: PurePosixPath(n.replace("\\", "/")).parts for n in names}
    parts = {n: p for n, p in parts.items() if p}
    tops = {p[0] for p in parts.values()}
    strip = 1 if len(tops) == 1 and any(len(p) > 1 for p in parts.values()) else 0
    keep = PurePosixPath(subdir).parts if subdir else ()
    out: dict[str, str] = {}
    for name, p in parts.items():
        p = p[strip:]
        if p[: len(keep)] != keep or len(p) <= len(keep):
            continue
        rel = p[len(keep):]
        if rel[0].startswith("/") or ".." in rel or ":" in rel[0]:
            raise MitotypeError(f"archive member '{name}' would be written outside the destination; refused")
        out[name] = "/".join(rel)
    return out


def _extract(archive: Path, place: Path, remote: RemoteFile, url: str) -> None:
    """Copy the wanted members of a zip or tar archive under ``place``, one member at a time."""
    where = f" folder '{remote.subdir}'" if remote.subdir else ""
    try:
        with _open_archive(archive, remote.kind, url) as (names, open_member):
            chosen = _members(names, remote.subdir)
            if not chosen:
                raise MitotypeError(f"{url}: the archive has no{where or ' files'}; the dataset may have moved")
            for member, rel in chosen.items():
                out = place / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with open_member(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, zlib.error, EOFError) as err:
        raise MitotypeError(f"{url}: corrupt or truncated {remote.kind} archive ({_one_line(err)}); nothing was kept") from None


@contextmanager
def _open_archive(archive: Path, kind: str, url: str):
    """Yield (regular-file member names, open(name) -> binary stream) for a zip or tar archive."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
            yield list(infos), lambda name: zf.open(infos[name])
    elif kind == "tar":
        with tarfile.open(archive) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            yield list(members), lambda name: tf.extractfile(members[name])
    else:
        raise MitotypeError(f"{url}: unknown archive kind '{kind}' in the registry")


def _check_layout(root: Path, name: str) -> None:
    if not looks_like_dataset(root):
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise MitotypeError(f"{name}: the download holds no dataset layout (Atypical/ + Normal/ or a CSV); found {found}")
    images = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not images:
        raise MitotypeError(f"{name}: the download holds no images")
    for image in images[:16]:
        with image.open("rb") as fh:
            if fh.read(len(LFS_POINTER)) == LFS_POINTER:
                raise MitotypeError(
                    f"{name}: {image.name} is a Git LFS pointer, not an image; clone the repository with git lfs and point mitotype at that folder"
                )


def _remove_stale(dest: Path, name: str) -> None:
    """Leftovers of a download that was killed (not merely interrupted) more than an hour ago."""
    now = time.time()
    for leftover in dest.glob(f".{name}.*"):
        if not (leftover.name.endswith(".part") or leftover.name.endswith(".tmp")):
            continue
        try:
            if now - leftover.stat().st_mtime < STALE_S:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except OSError:
            pass
