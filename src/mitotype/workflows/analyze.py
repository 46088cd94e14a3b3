"""``mitotype analyze``: slides to counts, one task per slide, in-process or mapped over Dask.

Each input (a slide, a plain image at ``--mpp``, or every one in a folder) is analysed by
:func:`mitotype.workflows.slide.analyze_slide` into ``OUT/<slide>/``; ``OUT/summary.csv`` (a row per
slide, input order) is rewritten atomically as each slide's result arrives. A slide's
``result.json`` holds a key (the mitotype version, the models' weights, the options, the file's
size and modification time): a rerun skips every slide whose key matches, so an interrupted batch
continues where it stopped. A slide that fails is recorded (``error`` column, ``OUT/<slide>/error.txt``
with the traceback) and the others go on; it is tried again on the next run.

Where the work runs: one slide, or one worker, runs in this process. Several slides with
``dask.distributed`` installed (the ``dask`` extra) go to an embedded ``LocalCluster`` (``workers``
processes of one task each, every worker's model threads capped at ``threads`` so workers do not
fight over the cores), or to an existing cluster at ``scheduler``. Each worker loads the models once
(a per-process cache) and writes its slides' folders itself (the slides and ``OUT`` must be on a
filesystem the workers see); tile progress reaches this process as worker events. mitotype
schedules nothing of its own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
import traceback
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

import mitotype
from mitotype._io import check_output_dir, write_csv, write_text
from mitotype.data.slides import is_slide
from mitotype.errors import MitotypeError
from mitotype.inference.detect import iter_inputs
from mitotype.inference.runtime import check_backend
from mitotype.models.ensemble import check_threshold
from mitotype.workflows.slide import ERROR_FILE, RESULT_FILE, SUMMARY_COLUMNS, AnalyzeOptions, Models, ModelSpec, analyze_slide, summary_frame

Progress = Callable[[str, str, int, int], None]  # ("tiles", slide, done, total) or ("slides", last slide, done, total)
TOPIC = "mitotype-analyze"  # worker events carrying tile progress
CORES_PER_WORKER = 4  # an inference worker's threads by default: lite0 forward scales to about this many


@dataclass(frozen=True)
class SlideJob:
    """One task: everything a worker needs, plain and picklable."""

    name: str
    path: Path
    out_dir: Path
    key: str
    models: ModelSpec
    options: AnalyzeOptions
    threads: int | None = None  # the model's threads on this worker (None: the process's own setting)


def analyze(
    inputs: Path, out: Path, *, model: Path, classifier: Path | None, options: AnalyzeOptions = AnalyzeOptions(),
    device: str = "auto", backend: str = "auto", threshold: float | None = None, scheduler: str | None = None,
    workers: int | None = None, threads_per_worker: int | None = None, processes: bool = True, progress: Progress | None = None,
    spell: Callable[[str], str] = str,
) -> pd.DataFrame:
    """Analyse every slide of ``inputs`` into ``out`` (see the module's note) and return the summary
    table (a row per slide; ``error`` non-empty where a slide failed, the options it names written
    by ``spell``, as :meth:`MitotypeError.render` does)."""
    out = check_output_dir(out, "out")
    options.check()
    check_backend(backend)
    if threshold is not None:
        check_threshold(threshold)
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and value < 1:
            raise MitotypeError(f"{{{name}}} {value}: must be at least 1", options=(name,))
    files = list(iter_inputs(inputs))
    plain = [p for _, p in files if not is_slide(p)]
    if plain and options.mpp is None:
        raise MitotypeError(f"{plain[0]}: a plain image does not say its microns per pixel; give {{mpp}} (counts per mm² would "
                            "be silently wrong)", options=("mpp",))
    spec = ModelSpec(Path(model), Path(classifier) if classifier else None, device, backend, threshold)
    identity = models_identity(spec)
    dirs = slide_dirs([name for name, _ in files])
    jobs = [SlideJob(name, path, out / dirs[name], slide_key(path, identity, options), spec, options) for name, path in files]
    rows: dict[str, dict[str, Any]] = {}
    order = [job.name for job in jobs]

    def record(row: dict[str, Any]) -> None:
        options = row.pop("error_options", None)
        if options:
            row["error"] = MitotypeError(row["error"], options=tuple(options)).render(spell)
        rows[row["slide"]] = row
        table = summary_frame([rows[n] for n in order if n in rows])
        write_csv(out / "summary.csv", table)
        for message in row.pop("warnings", None) or []:
            warnings.warn(message, stacklevel=3)
        if progress:
            progress("slides", row["slide"], len(rows), len(jobs))

    todo = []
    for job in jobs:
        saved = finished_row(job)
        if saved is not None:
            rows[job.name] = saved
        else:
            todo.append(job)
    if rows or not todo:
        write_csv(out / "summary.csv", summary_frame([rows[n] for n in order if n in rows]))
    if progress:
        progress("slides", "", len(rows), len(jobs))
    n_workers, threads = plan(len(todo), scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker)
    if todo:  # here first: a wrong model is one error before any work (and a graph backend's export is cached for the workers)
        cached_models(spec)
    if scheduler is None and n_workers <= 1:
        run_in_process([replace(job, threads=threads_per_worker) for job in todo], record, progress)
    else:
        run_on_dask([replace(job, threads=threads) for job in todo], record, progress, scheduler=scheduler, workers=n_workers,
                    processes=processes)
    return summary_frame([rows[n] for n in order])


def plan(n_slides: int, *, scheduler: str | None, workers: int | None, threads_per_worker: int | None) -> tuple[int, int | None]:
    """(workers, model threads per worker): ``workers`` if given, else one per CORES_PER_WORKER cores
    (at most one per slide); threads: the cores shared out between the workers, unless given. One
    worker runs in this process; more, or a ``scheduler``, need dask.distributed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    have_dask = importlib.util.find_spec("distributed") is not None
    if (scheduler is not None or (workers or 1) > 1) and not have_dask:
        option = "scheduler" if scheduler is not None else "workers"
        raise MitotypeError(f"{{{option}}} needs dask.distributed: pip install 'mitotype[dask]'", options=(option,))
    if scheduler is not None:
        return 0, threads_per_worker
    if workers is None:
        workers = max(1, cores // CORES_PER_WORKER) if have_dask else 1
    workers = max(1, min(workers, n_slides))
    return workers, threads_per_worker or max(1, cores // workers)


def run_in_process(jobs: list[SlideJob], record: Callable[[dict[str, Any]], None], progress: Progress | None) -> None:
    for job in jobs:
        record(run_slide(job, (lambda name, d, n: progress("tiles", name, d, n)) if progress else None))


def run_on_dask(jobs: list[SlideJob], record: Callable[[dict[str, Any]], None], progress: Progress | None, *,
                scheduler: str | None, workers: int, processes: bool) -> None:
    """One task per slide on an embedded LocalCluster (``workers`` x one task each) or the cluster at
    ``scheduler``; each result is recorded as it arrives, a task that died is recorded as failed."""
    from distributed import Client, LocalCluster, as_completed

    if not jobs:
        return
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=None,
                               silence_logs=logging.ERROR)
    client = Client(cluster if cluster is not None else scheduler)
    try:
        if progress:
            client.subscribe_topic(TOPIC, lambda event: progress("tiles", event[1]["slide"], event[1]["done"], event[1]["total"]))
        run = uuid.uuid4().hex[:8]  # keys of this run only: a long-lived scheduler never hands back an earlier run's result
        futures = client.map(run_slide, jobs, key=[f"mitotype-analyze-{run}-{i}" for i in range(len(jobs))], pure=False)
        by_future = dict(zip(futures, jobs))
        for future in as_completed(futures):
            job = by_future[future]
            try:
                row = future.result()
            except Exception as err:  # the task itself died (a worker killed by the OS, ...): the others go on
                row = failed_row(job, err, traceback.format_exc())
            record(row)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_slide(job: SlideJob, on_tile: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Analyse one slide (a Dask task, or a step of the in-process loop): its summary row, with the
    warnings it raised and, where it failed, the error (then ``error.txt`` holds the traceback)."""
    if job.threads:
        _cap_threads(job.threads)
    report = on_tile or _worker_reporter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            models = cached_models(job.models)
            row = analyze_slide(job.path, job.out_dir, models=models, options=job.options, name=job.name, key=job.key,
                                on_tile=(lambda d, n: report(job.name, d, n)) if report else None)
            (job.out_dir / ERROR_FILE).unlink(missing_ok=True)
        except Exception as err:  # a failed slide is recorded and the others go on
            row = failed_row(job, err, traceback.format_exc())
    notes = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    row["warnings"] = list(dict.fromkeys(notes))  # re-raised where the row is recorded, then dropped
    row["warning"] = " | ".join(row["warnings"])
    return row


def failed_row(job: SlideJob, err: BaseException, trace: str) -> dict[str, Any]:
    """The summary row of a slide that failed, and its ``error.txt``."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not isinstance(err, MitotypeError):
        message = f"{type(err).__name__}: {message}"
    try:
        write_text(job.out_dir / ERROR_FILE, f"{job.path}\n{message}\n\n{trace}")
    except MitotypeError:
        pass  # the row still says it
    row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
    row.update({"slide": job.name, "path": str(job.path), "warning": "", "error": message})
    if isinstance(err, MitotypeError) and err.options:  # rendered by whoever records the row (the CLI: as flags)
        row.update({"error": err.message.splitlines()[0], "error_options": list(err.options)})
    return row


def finished_row(job: SlideJob) -> dict[str, Any] | None:
    """The summary row of a slide an earlier run finished with the same key, else None."""
    try:
        saved = json.loads((job.out_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != job.key or not isinstance(saved.get("row"), dict):
        return None
    return {**dict.fromkeys(SUMMARY_COLUMNS), **saved["row"], "slide": job.name}


def slide_dirs(names: Iterable[str]) -> dict[str, str]:
    """A folder name per input: its path without the suffix, ``/`` as ``__``; where two inputs would
    share one (``a.tif``, ``a.svs``), the suffix is kept (``a_tif``)."""
    names = list(names)

    def base(name: str) -> str:
        path = Path(name)
        return str(path.with_suffix("")).replace(os.sep, "__").replace("/", "__")

    counts: dict[str, int] = {}
    for name in names:
        counts[base(name)] = counts.get(base(name), 0) + 1
    return {name: base(name) if counts[base(name)] == 1 else name.replace(os.sep, "__").replace("/", "__").replace(".", "_")
            for name in names}


def models_identity(spec: ModelSpec) -> str:
    """A digest of the models' weights and cards (contents, not paths) and how they run."""
    digest = hashlib.sha256(f"{spec.backend}|{spec.threshold}|".encode())
    for root in (spec.detector, spec.classifier):
        if root is None:
            digest.update(b"none|")
            continue
        root = Path(root)
        files = sorted(root.rglob("*.safetensors")) + sorted(root.rglob("model.json")) if root.is_dir() else [root]
        for f in files:
            digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}|".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:20]


def slide_key(path: Path, identity: str, options: AnalyzeOptions) -> str:
    """What a slide's result depends on: mitotype's version, the models, the options (a mask file by
    its size and time too) and the slide file's size and modification time."""
    parts = [mitotype.__version__, identity, repr(options), _file_stamp(path)]
    if options.tissue not in ("otsu", "none"):
        parts.append(_file_stamp(Path(options.tissue)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _file_stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


_MODELS: dict[str, tuple[ModelSpec, Models]] = {}  # per worker: the models its last task used
_MODELS_LOCK = threading.Lock()


def cached_models(spec: ModelSpec) -> Models:
    """The models of ``spec``, loaded once per worker (per process when not on Dask)."""
    worker = _worker_id()
    with _MODELS_LOCK:
        held = _MODELS.get(worker)
        if held is None or held[0] != spec:
            _MODELS[worker] = (spec, Models.load(spec))
        return _MODELS[worker][1]


def clear_model_cache() -> None:
    with _MODELS_LOCK:
        _MODELS.clear()


def _worker_id() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().id)
    except (ImportError, ValueError):
        return "local"


def _worker_reporter() -> Callable[[str, int, int], None] | None:
    """On a Dask worker: tile progress sent to the client as events on TOPIC; else nothing."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return lambda name, done, total: worker.log_event(TOPIC, {"slide": name, "done": done, "total": total})


def _cap_threads(threads: int) -> None:
    """This worker's model threads (torch; the graph backends take torch's count when built) and decoding threads."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if _worker_id() != "local":  # a worker process of ours: its decoding threads too (never the user's own process)
        os.environ["MITOTYPE_DECODE_THREADS"] = str(max(1, min(4, threads // 2)))


__all__ = ["AnalyzeOptions", "ModelSpec", "Models", "analyze", "analyze_slide", "plan", "run_slide", "slide_dirs"]
