"""The AMi-Br benchmark job: cross-validate on the training set, then score every test set with
each fold model and their ensemble (the tables live in :mod:`mitotype.evaluation.benchmark`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mitotype.data.splits import evaluation_rows
from mitotype.evaluation.benchmark import score_test_set, write_benchmark
from mitotype.models.ensemble import Ensemble
from mitotype.data.dataset import load_dataset
from mitotype.workflows.runs import cross_validate


def run_benchmark(cfg, train_data: Path, tests: list[tuple[str, Path]], *, folds: int, out: Path, resume: bool = False, tta: bool = False) -> str:
    """Read and decode every test set first (a bad image stops the run before hours of training),
    cross-validate, then score each decoded test set with every fold model."""
    test_sets = []
    for name, path in tests:  # like evaluate: a layout's test split when it has one
        ds = load_dataset(path, cfg)
        test_sets.append((name, ds.subset(evaluation_rows(ds.manifest))))
    summary = cross_validate(cfg, load_dataset(train_data, cfg), folds=folds, out=out, resume=resume)
    ensemble = Ensemble.load(out, device=cfg.train.device)
    results = []
    for name, ds in test_sets:
        rows = np.arange(len(ds.manifest))
        per_fold = [fold.score_store(ds.store, rows, batch_size=cfg.train.eval_batch_size, tta=tta) for fold in ensemble.each()]
        results.append(score_test_set(name, ds.manifest["label"].to_numpy(), per_fold, [fold.threshold for fold in ensemble.each()]))
    return write_benchmark(out, cfg.recipe, results, summary)
