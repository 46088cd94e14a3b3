"""DGSB: clusters follow how patches look, and the diverse sampler draws classes, then clusters, evenly."""

from __future__ import annotations

import numpy as np
import torch

from mitotype.data.images import ImageStore
from mitotype.training.loop import epoch_order
from mitotype.training.sampling import centre_descriptors, diverse_weights, diversity_clusters


def test_clusters_follow_the_look_of_the_centre() -> None:
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 60, (30, 16, 16, 3), dtype=np.uint8)
    light = rng.integers(190, 255, (10, 16, 16, 3), dtype=np.uint8)
    light[:, :2] = 0  # the border differs but is outside the centre
    store = ImageStore(np.concatenate([dark, light]), np.arange(40))
    feats = centre_descriptors(store, np.arange(40), centre=8)
    assert feats.shape == (40, 192)
    labels = np.zeros(40, dtype=np.int64)
    clusters = diversity_clusters(feats, labels, k=2, seed=0)
    assert len(set(clusters[:30])) == 1 and len(set(clusters[30:])) == 1 and clusters[0] != clusters[30]


def test_diverse_sampler_gives_each_cluster_of_a_class_the_same_share() -> None:
    labels = np.array([0] * 90 + [0] * 10 + [1] * 20)
    clusters = np.array([0] * 90 + [1] * 10 + [2] * 20)
    w = diverse_weights(labels, clusters)
    assert np.isclose(w[:90].sum(), 0.25) and np.isclose(w[90:100].sum(), 0.25) and np.isclose(w[100:].sum(), 0.5)
    order = epoch_order(labels, "diverse", torch.Generator().manual_seed(0), clusters)
    draws = np.bincount(clusters[order], minlength=3) / len(order)
    assert abs(draws[1] - 0.25) < 0.08 and abs(draws[0] - 0.25) < 0.08  # the rare look is no longer 10% of class 0
    balanced = epoch_order(labels, "balanced", torch.Generator().manual_seed(0))
    assert np.bincount(clusters[balanced], minlength=3)[1] / len(balanced) < 0.12


def test_a_run_with_the_diverse_sampler_records_its_clusters_in_the_draws(amibr, tmp_path, monkeypatch, capsys) -> None:
    import mitotype.training.loop as loop
    from conftest import TINY, run_cli

    seen = {}
    real = loop.epoch_order

    def spy(labels, sampler, generator, clusters=None):
        seen["sampler"], seen["clusters"] = sampler, clusters
        return real(labels, sampler, generator, clusters)

    monkeypatch.setattr(loop, "epoch_order", spy)
    sets = [a for item in (*TINY, "train.epochs=1", "train.sampler=diverse", "train.diverse_clusters=3") for a in ("--set", item)]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", amibr, "--recipe", "lite0-quick", "--out", tmp_path / "run", *sets)
    assert code == 0, err
    assert seen["sampler"] == "diverse" and len(set(seen["clusters"].tolist())) == 6  # 3 per class


def test_incdp_rewards_classes_apart_and_spread_within() -> None:
    from mitotype.training.losses import diversity_loss

    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    apart_spread = torch.tensor([[1, 0.3, 0], [1, -0.3, 0], [1, 0, 0.3], [-1, 0.3, 0], [-1, -0.3, 0], [-1, 0, 0.3]])
    apart_collapsed = torch.tensor([[1.0, 0, 0]] * 3 + [[-1.0, 0, 0]] * 3)
    together = torch.tensor([[1, 0.3, 0], [1, -0.3, 0], [1, 0, 0.3]] * 2)
    a, b, c = (float(diversity_loss(f, labels)) for f in (apart_spread, apart_collapsed, together))
    assert a < b and a < c
    f = apart_spread.clone().requires_grad_()
    diversity_loss(f, labels).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_a_run_with_incdp_adds_the_term_to_the_loss(amibr, tmp_path, monkeypatch, capsys) -> None:
    import mitotype.training.loop as loop
    from conftest import TINY, run_cli

    calls = []
    real = loop.diversity_loss
    monkeypatch.setattr(loop, "diversity_loss", lambda f, y: calls.append(f.shape) or real(f, y))
    sets = [a for item in (*TINY, "train.epochs=1", "loss.incdp_weight=0.5") for a in ("--set", item)]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", amibr, "--recipe", "lite0-quick", "--out", tmp_path / "run", *sets)
    assert code == 0, err
    assert calls and all(len(s) == 2 for s in calls)  # (batch, features) from the heads' input
