"""The one training loop. Every recipe runs through ``fit``; a recipe changes configuration, never this.

Read top to bottom: build model, optimiser and schedule; maybe resume; then per epoch draw the
order, gather uint8 batches from the decoded cache, augment on the device, forward, loss, backward,
clip, step, schedule, average the weights (``train.ema_decay``); validate; checkpoint. The best
validated (else the averaged, else the last) weights become the model artifact.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress, TaskID
from timm.utils import ModelEmaV3

from mitotype._io import atomic_path, write_csv
from mitotype.config import Config, record_config, resolve_device, validate_config
from mitotype.data.images import BatchSource, ImageStore
from mitotype.errors import MitotypeError
from mitotype.models.artifact import CARD_NAME, save_model
from mitotype.progress import console, progress_bar
from mitotype.models.registry import MitotypeModel, create_model
from mitotype.training.checkpoint import load_checkpoint, save_checkpoint
from mitotype.training.features import feature_view
from mitotype.training.losses import diversity_loss
from mitotype.training.objectives import Objective, objective_for
from mitotype.training.sampling import centre_descriptors, diverse_weights, diversity_clusters
from mitotype.training.schedule import warmup_cosine
from mitotype.transforms.augment import BatchAugment, augment_with_targets
from mitotype.transforms.batch import build_batch



@dataclass
class FitResult:
    model: MitotypeModel
    history: list[dict[str, Any]]
    threshold: float
    val_predictions: pd.DataFrame | None
    val_metrics: dict[str, Any]
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(labels: np.ndarray, sampler: str, generator: torch.Generator, clusters: np.ndarray | None = None) -> np.ndarray:
    """Positions for one epoch. ``balanced`` draws each class equally often (with replacement), so
    the rare atypical class is seen as often as the normal one without a weighted loss; ``diverse``
    (DGSB, :mod:`mitotype.training.sampling`) also splits each class's share evenly among ``clusters``."""
    if sampler == "diverse":
        if clusters is None:
            raise MitotypeError("train.sampler=diverse needs the rows' clusters")
        weights = torch.from_numpy(diverse_weights(labels, clusters))
        return torch.multinomial(weights, len(labels), replacement=True, generator=generator).numpy()
    if sampler == "balanced":
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        weights = torch.from_numpy(1.0 / counts[labels])
        return torch.multinomial(weights, len(labels), replacement=True, generator=generator).numpy()
    return torch.randperm(len(labels), generator=generator).numpy()


def build_optimizer(model: MitotypeModel, cfg: Config) -> torch.optim.Optimizer:
    """Two parameter groups so the pretrained backbone can learn slower than the fresh heads."""
    t = cfg.train
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n.startswith("backbone.")], "lr": t.lr * t.backbone_lr_scale},
        {"params": [p for n, p in trainable if not n.startswith("backbone.")], "lr": t.lr},
    ]
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


EpochCallback = Callable[[int, int], None]  # (epochs done, epochs in all), after each checkpoint


def stop_after(epoch: int) -> EpochCallback:
    """A callback that stops the run after ``epoch`` epochs (as an interruption would), leaving a
    checkpoint that ``resume=True`` continues from: what the resume tests use."""

    def callback(done: int, total: int) -> None:
        if done >= epoch and done < total:
            raise Interrupted(f"stopped after epoch {done} as asked")

    return callback


@dataclass
class _State:
    """What an epoch changes and a checkpoint keeps (with the model, optimiser and schedule)."""

    sample_gen: torch.Generator
    augment_gen: torch.Generator
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": -math.inf, "epoch": -1, "bad_epochs": 0})
    best_state: dict[str, torch.Tensor] | None = None


def fit(
    cfg: Config, manifest: pd.DataFrame, store: ImageStore, run_dir: Path, *, train_idx: np.ndarray, val_idx: np.ndarray | None = None,
    resume: bool = False, show_progress: bool = True, feature_dir: Path | None = None, on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train one model on manifest rows ``train_idx``; validate on ``val_idx`` when given.

    A frozen backbone's features are cached in ``feature_dir`` (default: ``run_dir/features``; cv
    passes one for all folds) and the loop reads them instead of pixels (training/features.py).
    ``on_epoch(done, total)`` hears each checkpointed epoch and may raise :class:`Interrupted`.
    """
    validate_config(cfg)
    t, run_dir = cfg.train, Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_config(run_dir / "config.yaml", cfg, resume)
    device = resolve_device(t.device)
    seed_everything(t.seed)
    if t.deterministic_algorithms:  # CPU kernels are already deterministic at a fixed thread count
        torch.use_deterministic_algorithms(True, warn_only=True)
    has_val = val_idx is not None and len(val_idx) > 0
    if not has_val:
        for setting, active in (("train.threshold=auto", t.threshold == "auto"), (f"train.patience={t.patience}", t.patience > 0)):
            if active:
                warnings.warn(f"{setting} needs validation rows (data.val_fraction, a validation dataset or a val/ split); ignored", stacklevel=2)
    labels = manifest["label"].to_numpy()
    model = create_model(cfg.model).to(device)
    objective = objective_for(cfg, model, manifest, train_idx)  # targets per row (checked before any work), loss, validation
    targets_all, criterion = objective.targets, objective.criterion.to(device)
    source = feature_view(cfg, model, store, cache_dir=feature_dir or run_dir / "features", device=device)  # pixels or cached features
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_idx) / t.batch_size)
    scheduler = warmup_cosine(optimizer, round(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch, t.min_lr_ratio)
    augment = BatchAugment(cfg.augment).to(device)
    state = _State(torch.Generator().manual_seed(t.seed + 1), torch.Generator().manual_seed(t.seed + 2))
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema_decay > 0 else None
    scored = ema.module if ema is not None else model  # what validation scores and what is saved
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if resume and ckpt_path.is_file():
        _restore(ckpt_path, state, model, optimizer, scheduler, ema, device)
        console.log(f"resumed {run_dir} at epoch {state.start_epoch}/{t.epochs}")

    clusters = None
    if t.sampler == "diverse":  # deterministic for a seed, so a resumed run draws the same clusters
        features = centre_descriptors(store, train_idx, centre=cfg.model.center_crop)
        clusters = diversity_clusters(features, labels[train_idx], k=t.diverse_clusters, seed=t.seed)
    started = time.perf_counter()
    progress = progress_bar("patches", show_progress, extra="loss")
    with progress:
        for epoch in range(state.start_epoch, t.epochs):
            if state.best["bad_epochs"] >= t.patience > 0:
                break
            order = train_idx[epoch_order(labels[train_idx], t.sampler, state.sample_gen, clusters)]
            task = progress.add_task(f"epoch {epoch + 1}/{t.epochs}", total=len(order), loss="")
            tic = time.perf_counter()
            loss_sum = _train_epoch(cfg, model, source, order, targets_all, criterion, optimizer, scheduler, ema,
                                    partial(augment_with_targets, augment, state.augment_gen), device, partial(_report, progress, task))
            if not math.isfinite(loss_sum):  # never checkpoint or save a diverged model
                raise MitotypeError(f"{run_dir}: training diverged in epoch {epoch + 1} (loss {loss_sum}); lower train.lr")
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "lr": optimizer.param_groups[1]["lr"],
                                      "train_seconds": time.perf_counter() - tic}
            if has_val and val_idx is not None:  # has_val implies it
                _validate(objective, scored, source, val_idx, device, record, state, epoch)
            state.history.append(record)
            progress.update(task, description=f"epoch {epoch + 1}/{t.epochs}", loss=_describe(record))
            _checkpoint(ckpt_path, epoch, state, model, optimizer, scheduler, ema, device)
            if t.keep_epoch_checkpoints:
                _save_weights(run_dir / "checkpoints" / f"epoch_{epoch + 1:03d}.safetensors", scored.saved_state_dict())
            if on_epoch is not None:
                on_epoch(epoch + 1, t.epochs)

    if state.best_state is not None:  # the best validated weights, else the average
        model.load_saved_state_dict(state.best_state)
    elif ema is not None:
        model.load_saved_state_dict(ema.module.saved_state_dict())
    write_csv(run_dir / "history.csv", pd.DataFrame(state.history))
    return _finish(cfg, objective, manifest, source, run_dir, model, state.history, train_idx, val_idx, device, time.perf_counter() - started)


def _restore(path: Path, state: _State, model: MitotypeModel, optimizer: torch.optim.Optimizer, scheduler: Any,
             ema: ModelEmaV3 | None, device: torch.device) -> None:
    """Continue exactly where the checkpoint stopped: weights, optimiser, schedule, every RNG, history."""
    saved = load_checkpoint(path)
    model.load_saved_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    state.sample_gen.set_state(saved["rng"]["sampler"])
    state.augment_gen.set_state(saved["rng"]["augment"])
    if device.type == "cuda" and saved["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    state.start_epoch, state.history, state.best = saved["epoch"], saved["history"], saved["best"]
    state.best_state = saved.get("best_model")
    if ema is not None:
        ema.module.load_saved_state_dict(saved["ema"])


def _train_epoch(cfg: Config, model: MitotypeModel, store: BatchSource, order: np.ndarray, targets_all: dict[str, torch.Tensor],
                 criterion: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ema: ModelEmaV3 | None,
                 transform: Callable[..., torch.Tensor], device: torch.device, report: Callable[[int, str], None]) -> float:
    """One pass over ``order``: forward, loss, backward, clip, step, schedule, average; the summed step loss.
    ``transform(x, targets=...)`` augments the images and moves any point targets with them."""
    t = cfg.train
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen: dict[str, torch.Tensor] = {}
    hook = None
    label_col = next(iter(model.head_specs.values())).target  # the InCDP term's classes: the first head's target
    if cfg.loss.incdp_weight > 0:  # the features the heads read, for the InCDP term
        first_head = next(iter(model.heads.values()))
        hook = first_head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("features", args[0]))
    steps = math.ceil(len(order) / t.batch_size)
    for step in range(steps):
        rows = order[step * t.batch_size : (step + 1) * t.batch_size]
        targets = {col: v[rows].to(device, non_blocking=True) for col, v in targets_all.items()}
        batch = build_batch(store.batch(rows), device, transform=partial(transform, targets=targets), channels_last=t.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.amp and device.type == "cuda"):
            outputs = model(batch)
        loss = criterion(outputs, targets)
        if hook is not None:
            loss = loss + cfg.loss.incdp_weight * diversity_loss(seen["features"], targets[label_col])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach()
        if step % 10 == 0 or step == steps - 1:
            report(min(len(order), (step + 1) * t.batch_size), f"loss {loss_sum.item() / (step + 1):.4f}")
    if hook is not None:
        hook.remove()
    return float(loss_sum.item())


def _report(progress: Progress, task: TaskID, done: int, text: str) -> None:
    """An epoch's progress: patches done and the running loss."""
    progress.update(task, completed=done, loss=text)


def _validate(objective: Objective, scored: MitotypeModel, store: BatchSource, val_idx: np.ndarray, device: torch.device,
              record: dict[str, Any], state: _State, epoch: int) -> None:
    """Score the validation rows into ``record``; keep the weights of the best validation score so far
    (balanced accuracy for a classifier, minus the loss for a heat-map detector)."""
    entries, score = objective.validate(scored, store, val_idx, device)
    record.update(entries)
    if score > state.best["score"]:
        state.best = {"score": score, "epoch": epoch + 1, "bad_epochs": 0}
        state.best_state = {k: v.detach().cpu().clone() for k, v in scored.saved_state_dict().items()}
    else:
        state.best["bad_epochs"] += 1


def _checkpoint(path: Path, epoch: int, state: _State, model: MitotypeModel, optimizer: torch.optim.Optimizer, scheduler: Any,
                ema: ModelEmaV3 | None, device: torch.device) -> None:
    """Everything a resumed run needs to end where an uninterrupted one would."""
    save_checkpoint(path, {
        "epoch": epoch + 1, "model": model.saved_state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "best": state.best, "best_model": state.best_state, "history": state.history,
        "ema": ema.module.saved_state_dict() if ema is not None else None,
        "rng": {"torch": torch.get_rng_state(), "sampler": state.sample_gen.get_state(), "augment": state.augment_gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
    })


class Interrupted(RuntimeError):
    """Raised by a :func:`stop_after` callback: the run stopped on purpose and can be resumed."""


def _finish(cfg, objective, manifest, store, run_dir, model, history, train_idx, val_idx, device, seconds) -> FitResult:
    """Pick the threshold, score the validation rows and write the model artifact."""
    threshold, val_metrics, val_predictions = objective.finish(model, store, val_idx, device)
    train_rows = manifest.iloc[train_idx]
    trained_on = {
        "source": os.path.commonpath(train_rows["path"].tolist()) if len(train_rows) else "",
        "n": int(len(train_rows)), "n_atypical": int((train_rows["label"] == 1).sum()),
        "groups": int(train_rows["group"].nunique()), "domains": sorted(d for d in train_rows["domain"].unique() if d),
        "epochs": len(history),
    }
    save_model(model, cfg, run_dir, threshold=threshold, trained_on=trained_on, metrics={"validation": val_metrics} if val_metrics else {})
    return FitResult(model, history, threshold, val_predictions, val_metrics, seconds)


def is_complete(run_dir: Path) -> bool:
    return (Path(run_dir) / CARD_NAME).is_file()


def _describe(record: dict[str, Any]) -> str:
    text = f"loss {record['train_loss']:.4f}"
    if "val_balanced_accuracy" in record:
        text += f" · val BA {record['val_balanced_accuracy']:.3f} · AUROC {record['val_roc_auc'] or float('nan'):.3f}"
    if "val_loss" in record:
        text += f" · val loss {record['val_loss']:.4f}"
    return text


def _save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
