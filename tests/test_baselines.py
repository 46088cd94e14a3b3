"""Plain timm baselines and the AMi-Br benchmark protocol (issue 11, recipe 6): each recipe builds its real
timm network and learns through the one loop; ``imagenet`` weights come from the offline Lite packages, timm,
or nowhere (with one warning), and the card says which; ``bce`` trains a one-logit head as BCEWithLogitsLoss."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import PATCH, fake_hub, run_cli, write_class_folders

from mitotype.config import HeadConfig, LossConfig, load_config, resolve_recipe
from mitotype.errors import MitotypeError
from mitotype.models.artifact import load_model, save_model
from mitotype.models.pretrained import create_backbone
from mitotype.models.registry import create_model
from mitotype.training.losses import HeadLoss, focal_loss

# recipe -> (timm name, input size); the two non-224 sizes are their ImageNet weights' own (timm pretrained_cfg)
BASELINES = {
    "efficientnet-b0": ("efficientnet_b0", 224), "efficientnetv2-m": ("tf_efficientnetv2_m", 224),
    "mobilenetv2": ("mobilenetv2_100", 224), "convnext-tiny": ("convnext_tiny", 224), "regnety-16gf": ("regnety_160", 224),
    "xception": ("legacy_xception", 299), "vit-b16": ("vit_base_patch16_224", 224),
    "swin-b": ("swin_base_patch4_window7_224", 224), "densenet121": ("densenet121", 224), "nasnet-large": ("nasnetalarge", 331),
}
RECIPES = {"amibr-protocol": ("tf_efficientnet_lite0", 224), **BASELINES}
# Only these train their real network in the one-epoch test (2-3 s each on one core); the others take 4-25 s and
# swap in a tiny backbone there, while test_each_recipe_builds_its_real_network... builds and steps every real one.
REAL_IN_LOOP = {"amibr-protocol", "efficientnet-b0", "mobilenetv2"}


def test_amibr_protocol_resolves_to_exactly_the_benchmarks_settings() -> None:
    cfg = load_config("amibr-protocol")
    m, a, t = cfg.model, cfg.augment, cfg.train
    assert (cfg.recipe, m.arch, m.backbone, m.pretrained, m.input_size, m.center_crop) == ("amibr-protocol", "timm", "tf_efficientnet_lite0",
                                                                                           "imagenet", 224, 0)
    assert [vars(h) for h in m.heads] == [{"name": "label", "target": "label", "num_classes": 1, "weight": 1.0, "positive": [1]}]
    assert (m.drop_rate, m.drop_path_rate, m.freeze_groups) == (0.0, 0.0, 0)
    assert (a.flip, a.rot90, a.rotate_degrees, a.crop_scale) == (True, False, 10.0, (0.8, 1.0))
    assert (a.brightness, a.contrast, a.saturation, a.hue, a.hed_sigma, a.hed_bias, a.p) == (0.2, 0.2, 0.2, 0.1, 0.0, 0.0, 1.0)
    assert (cfg.loss.name, cfg.loss.class_weights, cfg.loss.label_smoothing) == ("bce", False, 0.0)
    assert (t.optimizer, t.lr, t.batch_size, t.sampler, t.patience, t.epochs) == ("adam", 5e-5, 8, "balanced", 15, 100)
    assert (t.warmup_epochs, t.min_lr_ratio, t.backbone_lr_scale, t.grad_clip, t.weight_decay) == (0.0, 1.0, 1.0, 0.0, 1e-5)
    assert (cfg.data.val_fraction, cfg.data.patch_size, cfg.data.mpp) == (0.2, 128, 0.25)  # early stopping on an inner split


@pytest.mark.parametrize("recipe", sorted(BASELINES))
def test_each_baseline_is_the_protocol_with_its_own_backbone(recipe: str) -> None:
    name, size = BASELINES[recipe]
    cfg, protocol = load_config(recipe).to_dict(), load_config("amibr-protocol").to_dict()
    assert (cfg["model"].pop("backbone"), cfg["model"].pop("input_size"), cfg.pop("recipe")) == (name, size, recipe)
    for values in (protocol["model"], protocol):
        values.pop(next(k for k in ("backbone", "recipe") if k in values))
    protocol["model"].pop("input_size")
    assert cfg.pop("description") != protocol.pop("description")
    assert cfg == protocol
    text = resolve_recipe(recipe).read_text()
    head = text.split("\ndescription:")[0]
    assert head.startswith("# ") and "AMi-Br benchmark" in head and "MIDOG 2025" in head and "2506.21444" in head
    description = yaml.safe_load(text)["description"]
    assert name in description and "\n" not in description


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_builds_its_real_network_and_takes_a_bce_step(recipe: str) -> None:
    """The recipe's own timm architecture (random init), its one-logit head, one forward and backward.

    A ViT / Swin fixes its input size, so it is shrunk in place with timm's ``set_input_size`` after the
    architecture check; CNNs take 32 px. Either way the network is the recipe's."""
    name, size = RECIPES[recipe]
    cfg = load_config(recipe, ["model.pretrained=none"])
    assert (cfg.model.backbone, cfg.model.input_size) == (name, size)
    torch.manual_seed(0)
    model = create_model(cfg.model)
    with torch.device("meta"):
        reference = timm.create_model(name, num_classes=0)
    assert type(model.backbone) is type(reference)
    assert [(n, p.shape) for n, p in model.backbone.named_parameters()] == [(n, p.shape) for n, p in reference.named_parameters()]
    head = model.heads["label"]
    assert (head.in_features, head.out_features) == (reference.num_features, 1)
    if name.startswith("vit_"):
        model.backbone.set_input_size(img_size=64)
    elif name.startswith("swin_"):
        model.backbone.set_input_size(img_size=(64, 64), window_size=2)
    model.input_size = 64 if name.startswith(("vit_", "swin_")) else 32
    logits = model({"image": torch.rand(2, 3, 32, 32)})["label"]
    assert logits.shape == (2, 1)
    target = torch.tensor([1, 0])
    loss = HeadLoss(cfg.loss, model.head_specs)({"label": logits}, {"label": target})
    assert torch.allclose(loss, torch.nn.BCEWithLogitsLoss()(logits[:, 0], target.float()))
    assert torch.allclose(model.p_atypical({"label": logits}), torch.sigmoid(logits[:, 0]))
    loss.backward()
    first = next(p for p in model.backbone.parameters() if p.requires_grad)
    assert head.weight.grad.abs().sum() > 0 and first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("recipe", ["vit-b16", "swin-b"])
def test_fixed_size_backbones_are_built_at_the_configured_input_size(recipe: str) -> None:
    """``--set model.input_size=64`` on a ViT / Swin recipe builds the transformer for 64 px (timm's
    ``img_size``), as it would resize a CNN's input; an ``img_size`` in ``model.kwargs`` wins."""
    model = create_model(load_config(recipe, ["model.pretrained=none", "model.input_size=64"]).model)
    assert tuple(model.backbone.patch_embed.img_size) == (64, 64)
    assert model({"image": torch.rand(2, 3, 32, 32)})["label"].shape == (2, 1)
    kept = create_model(load_config(recipe, ["model.pretrained=none", "model.input_size=64", "model.kwargs.img_size=224"]).model)
    assert tuple(kept.backbone.patch_embed.img_size) == (224, 224)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("baselines") / "data", n_atypical=8, n_normal=16, n_slides=8)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_trains_one_epoch_through_mitotype_train(recipe: str, small_set: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """All of the recipe's settings (BCE on one logit, Adam, batch 8, balanced sampler, protocol augmentation, the
    inner validation split) through the one loop at 32 px; the heavy backbones are swapped for a tiny one here."""
    name, _ = RECIPES[recipe]
    backbone = name if recipe in REAL_IN_LOOP else "test_efficientnet"
    pretrained = "imagenet" if recipe == "amibr-protocol" else "none"  # the Lite0 package: ImageNet weights offline
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", small_set, "--out", tmp_path / "run", "--recipe", recipe,
                             "--set", f"model.backbone={backbone}", "--set", f"model.pretrained={pretrained}",
                             "--set", f"model.input_size={PATCH}", "--set", f"data.patch_size={PATCH}", "--set", "train.epochs=1",
                             "--set", "train.eval_batch_size=32")
    assert code == 0, err
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["build"]["backbone"] == backbone and card["build"]["heads"][0]["num_classes"] == 1
    assert card["provenance"]["recipe"] == recipe and card["provenance"]["config"]["loss"]["name"] == "bce"
    assert card["provenance"]["weights"] == ("imagenet-lite0" if recipe == "amibr-protocol" else "none")
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "val_balanced_accuracy" in history[0]  # one epoch, validated on the inner split
    loaded = load_model(tmp_path / "run")
    x = torch.rand(3, 3, PATCH, PATCH)
    with torch.no_grad():
        logits = loaded.model({"image": x})["label"]
        assert logits.shape == (3, 1) and torch.equal(loaded.model.p_atypical({"label": logits}), torch.sigmoid(logits[:, 0]))


def test_imagenet_source_uses_the_offline_lite_package_for_lite_backbones() -> None:
    from mitotype.models.lite_weights import lite_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the package has the weights
        backbone, norm = create_backbone("tf_efficientnet_lite0", "imagenet")
    reference = lite_state_dict("imagenet-lite0")
    assert torch.equal(backbone.conv_stem.weight, reference["conv_stem.weight"])
    assert torch.equal(backbone.blocks[3][0].conv_pw.weight, reference["blocks.3.0.conv_pw.weight"])
    assert backbone.weights_source == "imagenet-lite0" and norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5)


def test_imagenet_source_takes_timms_weights_when_they_can_be_had(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A local file stands in for the Hugging Face cache (timm's own pretrained loading)."""
    reference = fake_hub(monkeypatch, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone, norm = create_backbone("test_efficientnet", "imagenet")
    assert torch.equal(backbone.conv_stem.weight, reference.conv_stem.weight)
    assert backbone.weights_source == "hub:timm/test_efficientnet.r160_in1k"
    assert norm.mean == tuple(reference.pretrained_cfg["mean"])


def test_imagenet_source_falls_back_to_scratch_offline_with_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture, small_set: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone, _ = create_backbone("test_efficientnet", "imagenet")
    assert [str(w.message).split(" (")[0] for w in caught] == ["model.pretrained=imagenet: no ImageNet weights for test_efficientnet here"]
    assert str(caught[0].message).endswith("; training it from scratch") and backbone.weights_source == "none"
    with pytest.raises(MitotypeError, match="model.pretrained=hub: could not fetch"):
        create_backbone("test_efficientnet", "hub")  # hub stays strict
    with warnings.catch_warnings(record=True) as caught, pytest.raises(MitotypeError, match="'no_such_net' is not a timm model name"):
        warnings.simplefilter("always")
        create_backbone("no_such_net", "imagenet")
    assert caught == []
    # through the CLI: one warning, one line naming the backbone, and the card records the scratch start
    with warnings.catch_warnings(record=True) as caught:
        code, _, err = run_cli(monkeypatch, capsys, "train", "--data", small_set, "--out", tmp_path / "run", "--recipe", "efficientnet-b0",
                               "--set", "model.backbone=test_efficientnet", "--set", f"model.input_size={PATCH}",
                               "--set", f"data.patch_size={PATCH}", "--set", "train.epochs=1")
    assert code == 0, err
    shown = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught if "ImageNet" in str(w.message)]
    assert shown == [("warning: model.pretrained=imagenet: no ImageNet weights for test_efficientnet here "
                      "(not cached and not downloadable: LocalEntryNotFoundError); training it from scratch\n")]
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["provenance"]["weights"] == "none" and card["provenance"]["config"]["model"]["pretrained"] == "imagenet"


def test_bce_on_a_one_logit_head_is_torchs_bce_with_logits_by_hand() -> None:
    z = torch.tensor([[0.3], [-1.2], [2.0], [0.7]])
    y = torch.tensor([1, 0, 1, -1])  # the last row has no label: left out
    head = {"label": HeadConfig("label", num_classes=1)}
    loss = HeadLoss(LossConfig(name="bce"), head)({"label": z}, {"label": y})
    s = torch.sigmoid(torch.tensor([0.3, -1.2, 2.0]))
    by_hand = -(torch.log(s[0]) + torch.log(1 - s[1]) + torch.log(s[2])) / 3
    assert torch.allclose(loss, by_hand) and torch.allclose(loss, F.binary_cross_entropy_with_logits(z[:3, 0], y[:3].float()))
    # class weights: a weighted mean, as cross-entropy's; weights [0.75, 1.5] for 2 normal vs 1 atypical
    train = {"label": torch.tensor([0, 0, 1])}
    weighted = HeadLoss(LossConfig(name="bce", class_weights=True), head, train)({"label": z}, {"label": y})
    w = torch.tensor([1.5, 0.75, 1.5])
    per_row = F.binary_cross_entropy_with_logits(z[:3, 0], y[:3].float(), reduction="none")
    assert torch.allclose(weighted, (w * per_row).sum() / w.sum())
    # label smoothing pulls the targets to 1/2, as two-class cross-entropy's smoothing does
    smooth = HeadLoss(LossConfig(name="bce", label_smoothing=0.2), head)({"label": z}, {"label": y})
    assert torch.allclose(smooth, F.binary_cross_entropy_with_logits(z[:3, 0], torch.tensor([0.9, 0.1, 0.9])))


def test_bce_on_a_two_class_head_is_the_positive_log_odds_and_equals_cross_entropy() -> None:
    logits = torch.tensor([[0.2, 1.1], [1.5, -0.4], [0.0, 0.3]])
    y = torch.tensor([1, 0, 0])
    head = {"label": HeadConfig("label")}
    bce = HeadLoss(LossConfig(name="bce"), head)({"label": logits}, {"label": y})
    assert torch.allclose(bce, F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], y.float()))
    assert torch.allclose(bce, F.cross_entropy(logits, y))
    four = {"g": HeadConfig("g", target="g", num_classes=4, positive=[2, 3])}  # atypical = classes 2 and 3
    z4 = torch.tensor([[0.1, 0.2, 1.5, -0.3], [2.0, 0.0, -1.0, 0.5]])
    log_odds = z4[:, 2:].logsumexp(1) - z4[:, :2].logsumexp(1)
    got = HeadLoss(LossConfig(name="bce"), four)({"g": z4}, {"g": torch.tensor([3, 1])})
    assert torch.allclose(got, F.binary_cross_entropy_with_logits(log_odds, torch.tensor([1.0, 0.0])))


def test_ce_and_focal_take_a_one_logit_head_as_the_two_class_head_zero_z() -> None:
    z = torch.tensor([[0.3], [-1.2], [2.0]])
    y = torch.tensor([1, 0, 0])
    head = {"label": HeadConfig("label", num_classes=1)}
    two = torch.cat([torch.zeros(3, 1), z], dim=1)
    ce = HeadLoss(LossConfig(name="ce"), head)({"label": z}, {"label": y})
    assert torch.allclose(ce, F.binary_cross_entropy_with_logits(z[:, 0], y.float()))
    focal = HeadLoss(LossConfig(name="focal", focal_alpha=0.75, focal_gamma=2.0), head)({"label": z}, {"label": y})
    p = torch.sigmoid(z[:, 0])
    pt = torch.where(y == 1, p, 1 - p)
    alpha = torch.where(y == 1, 0.75, 0.25)
    assert torch.allclose(focal, (-alpha * (1 - pt) ** 2 * torch.log(pt)).mean())
    assert torch.allclose(focal, focal_loss(two, y, alpha=0.75, gamma=2.0, positive=[1]))


def test_one_logit_heads_are_checked_and_survive_the_card_export_and_explain(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    import pandas as pd

    from mitotype.inference.explain import atypical_log_odds
    from mitotype.inference.export import export_model
    from mitotype.training.losses import head_targets

    head = HeadConfig("label", num_classes=1)
    frame = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "label": [1, 0, 2]})
    with pytest.raises(MitotypeError, match="value 2 of c.png is not a class index 0..1 or missing"):
        head_targets(frame, {"label": head})
    assert head_targets(frame.iloc[:2], {"label": head})["label"].tolist() == [1, 0]
    cfg = load_config("amibr-protocol", ["model.pretrained=none", "model.input_size=32", "data.patch_size=32"])
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    torch.manual_seed(1)
    patches = (torch.rand(6, 1, 1, 1) * torch.rand(6, 32, 32, 3) * 255).to(torch.uint8)  # dark to bright
    images = patches.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():  # logits of a few units around 0, so p spreads over (0, 1) and equality means something
        model.heads["label"].weight.normal_(0, 0.5)
        model.heads["label"].bias -= model({"image": images})["label"].median()
    save_model(model, cfg, tmp_path / "m", threshold=0.5, trained_on={}, metrics={})
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["build"]["heads"][0]["num_classes"] == 1 and card["provenance"]["weights"] == "none"
    loaded = load_model(tmp_path / "m")
    x = {"image": torch.rand(4, 3, 32, 32)}
    with torch.no_grad():
        z = model(x)["label"]
        assert torch.allclose(loaded.model.p_atypical(loaded.model(x)), torch.sigmoid(z[:, 0]), atol=1e-6)
        assert torch.allclose(atypical_log_odds(loaded.model, loaded.model(x)), z[:, 0], atol=1e-5)  # Grad-CAM's target
    export_model(tmp_path / "m", tmp_path / "m.onnx", "onnx")
    onnx_p = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": patches.numpy()})[0]
    with torch.no_grad():
        want = torch.sigmoid(model({"image": images})["label"][:, 0]).numpy()
    assert want.std() > 0.05
    np.testing.assert_allclose(onnx_p, want, atol=1e-4, rtol=0)
