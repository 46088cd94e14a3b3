"""Heads are configuration: per-head targets, loss weights, missing targets, and the p_atypical reduction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mitotype.config import HeadConfig, LossConfig, ModelConfig
from mitotype.errors import MitotypeError
from mitotype.models.registry import create_model
from mitotype.training.losses import MISSING, HeadLoss, class_weights, focal_loss, head_targets, require_targets

LOGITS = torch.tensor([[2.0, -1.0], [0.3, 0.9], [-1.5, 1.0], [0.2, 0.1], [1.0, 1.5]])


def test_missing_expert_votes_become_missing_targets_not_garbage() -> None:
    manifest = pd.DataFrame({"path": list("abcde"), "label": [1, 0, 1, 0, 1], "expert_2": [1.0, np.nan, 0.0, np.nan, 1.0],
                             "hard": [True, False, False, True, False]})
    heads = {"label": HeadConfig(), "e2": HeadConfig("e2", "expert_2"), "hard": HeadConfig("hard", "hard")}
    targets = head_targets(manifest, heads)
    assert targets["expert_2"].tolist() == [1, MISSING, 0, MISSING, 1]
    assert targets["hard"].tolist() == [1, 0, 0, 1, 0] and targets["label"].tolist() == [1, 0, 1, 0, 1]


@pytest.mark.parametrize("column, values, message", [
    ("nope", None, "head 'label' reads column 'nope', which the data does not have"),
    ("t", [0, 2, 1], r"value 2 of b is not a class index 0..1"),
    ("t", [0, 0.5, 1], r"value 0.5 of b is not a class index"),
    ("t", ["x", 0, 1], r"value 'x' of a is not a class index"),
])
def test_bad_target_columns_are_named(column: str, values, message: str) -> None:
    manifest = pd.DataFrame({"path": list("abc"), "label": [0, 1, 0]})
    if values is not None:
        manifest[column] = values
    with pytest.raises(MitotypeError, match=message):
        head_targets(manifest, {"label": HeadConfig(target=column)})


def test_head_loss_weights_heads_and_skips_missing_rows() -> None:
    heads = {"label": HeadConfig(weight=1.0), "e1": HeadConfig("e1", "expert_1", weight=0.25)}
    outputs = {"label": LOGITS, "e1": LOGITS.flip(0)}
    label = torch.tensor([0, 1, 1, 0, 1])
    expert = torch.tensor([1, MISSING, 0, MISSING, 0])
    got = HeadLoss(LossConfig(name="ce"), heads)(outputs, {"label": label, "expert_1": expert})
    known = expert != MISSING
    want = F.cross_entropy(LOGITS, label) + 0.25 * F.cross_entropy(LOGITS.flip(0)[known], expert[known])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    all_missing = {"label": label, "expert_1": torch.full((5,), MISSING)}
    assert HeadLoss(LossConfig(), heads)(outputs, all_missing).item() == pytest.approx(F.cross_entropy(LOGITS, label).item(), rel=1e-6)


def test_class_weighted_ce_matches_the_reference_formula_for_both_classes() -> None:
    train = torch.tensor([0, 0, 0, 1, MISSING, 0])  # 4 normal, 1 atypical among the labelled rows
    w = class_weights(train, 2)
    assert w.tolist() == pytest.approx([5 / (2 * 4), 5 / (2 * 1)])
    target = torch.tensor([0, 1, 1, 0, 1])
    got = HeadLoss(LossConfig(name="ce", class_weights=True), {"label": HeadConfig()}, {"label": train})(
        {"label": LOGITS}, {"label": target})
    log_p = F.log_softmax(LOGITS, dim=1)[torch.arange(5), target]
    wt = w[target]
    assert got.item() == pytest.approx((-(wt * log_p).sum() / wt.sum()).item(), rel=1e-6)
    unweighted = HeadLoss(LossConfig(name="ce"), {"label": HeadConfig()}, {"label": train})({"label": LOGITS}, {"label": target})
    assert abs(got.item() - unweighted.item()) > 1e-3  # the weights change the loss


def test_focal_alpha_weights_the_positive_classes_of_a_four_class_head() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3, 2, 0])
    p = F.softmax(logits, dim=1)[torch.arange(6), target]
    alpha = torch.where(target >= 2, 0.8, 0.2)
    want = (-alpha * (1 - p) ** 2 * p.log()).mean()
    assert focal_loss(logits, target, alpha=0.8, gamma=2.0, positive=[2, 3]).item() == pytest.approx(want.item(), rel=1e-6)


def test_p_atypical_averages_the_positive_classes_of_the_reduce_heads() -> None:
    cfg = ModelConfig(backbone="test_efficientnet", input_size=32, heads=[
        HeadConfig("label"), HeadConfig("grade", "grade", num_classes=4, positive=[2, 3]), HeadConfig("hard", "hard")],
        reduce_heads=["label", "grade"])
    model = create_model(cfg).eval()
    outputs = {"label": LOGITS[:2], "grade": torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]), "hard": torch.zeros(2, 2)}
    p_label = F.softmax(LOGITS[:2], dim=1)[:, 1]
    p_grade = F.softmax(outputs["grade"], dim=1)[:, 2:].sum(1)
    assert torch.allclose(model.p_atypical(outputs), (p_label + p_grade) / 2)
    assert set(model({"image": torch.rand(2, 3, 32, 32)})) == {"label", "grade", "hard"}


def test_center_crop_sees_only_the_centre_of_the_patch() -> None:
    model = create_model(ModelConfig(backbone="test_efficientnet", input_size=32, center_crop=16)).eval()
    x = torch.rand(2, 3, 32, 32)
    y = x.clone()
    y[..., :8, :] = 0  # change only the border outside the central 16 px
    y[..., :, 24:] = 1
    with torch.no_grad():
        assert torch.equal(model({"image": x})["label"], model({"image": y})["label"])
        z = x.clone()
        z[..., 15, 15] += 0.5  # a change inside the centre does reach the output
        assert not torch.equal(model({"image": x})["label"], model({"image": z})["label"])


def test_a_batch_without_any_target_gives_zero_loss_that_still_backpropagates() -> None:
    heads = {"e1": HeadConfig(name="e1", target="expert_1")}
    logits = torch.randn(4, 2, requires_grad=True)
    loss = HeadLoss(LossConfig(), heads)({"e1": logits}, {"expert_1": torch.full((4,), MISSING)})
    loss.backward()  # a plain zeros() total would have no grad_fn and raise here
    assert loss.item() == 0.0 and logits.grad is not None and torch.equal(logits.grad, torch.zeros(4, 2))


def test_a_weighted_head_without_any_training_target_is_refused_before_training() -> None:
    heads = {"label": HeadConfig(), "e1": HeadConfig(name="e1", target="expert_1", weight=0.5)}
    targets = {"label": torch.tensor([0, 1, 0, 1]), "expert_1": torch.tensor([MISSING, MISSING, 1, MISSING])}
    require_targets(targets, heads, np.array([2, 3]))  # row 2 has an expert vote: fine
    with pytest.raises(MitotypeError, match="head 'e1' has no target in column 'expert_1' on any training row"):
        require_targets(targets, heads, np.array([0, 1, 3]))
    heads["e1"] = HeadConfig(name="e1", target="expert_1", weight=0.0)  # a head without loss weight may lack targets
    require_targets(targets, heads, np.array([0, 1, 3]))
