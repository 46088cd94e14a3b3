"""The literature's custom layers and recipes (issue 11: densenet121-se, resnet50-experts[-4class],
context-stain): blocks, builders, save/load, label4, stratified folds, one epoch of each recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import PATCH, run_cli, write_class_folders

from mitotype.config import Config, HeadConfig, ModelConfig, load_config
from mitotype.data.manifest import finalize, read_manifest_csv
from mitotype.data.splits import grouped_folds, strata, train_val_split
from mitotype.errors import MitotypeError
from mitotype.models.artifact import load_model, save_model
from mitotype.models.blocks import Neck, NonLocalBlock, SqueezeExcite
from mitotype.models.custom import HED_MEAN, HED_STD, AttentionModel, ContextStainModel
from mitotype.models.registry import create_model
from mitotype.transforms.stain import rgb_to_hed

RECIPES = ("densenet121-se", "resnet50-experts", "resnet50-experts-4class", "context-stain")


# --- blocks -------------------------------------------------------------------------------------------


def test_squeeze_excite_gates_each_channel_by_its_pooled_response() -> None:
    torch.manual_seed(0)
    se = SqueezeExcite(8, reduction=4)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = se(x)
    assert y.shape == x.shape and se.reduce.out_channels == 2
    pooled = x.mean(dim=(2, 3))
    gate = torch.sigmoid(F.relu(pooled @ se.reduce.weight[:, :, 0, 0].T + se.reduce.bias) @ se.expand.weight[:, :, 0, 0].T + se.expand.bias)
    torch.testing.assert_close(y, x * gate[:, :, None, None])
    y.square().sum().backward()
    for name, p in [*se.named_parameters(), ("input", x)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_non_local_block_starts_as_identity_then_attends_over_all_positions() -> None:
    torch.manual_seed(0)
    block = NonLocalBlock(6)
    x = torch.randn(2, 6, 4, 3, requires_grad=True)
    y = block(x)
    assert torch.equal(y, x)  # zero-initialised output projection: the identity at init
    y.sum().backward()
    assert block.out.weight.grad.abs().sum() > 0  # the output projection learns first

    torch.nn.init.normal_(block.out.weight)
    x.grad = None
    y = block(x)
    flat = lambda conv: conv(x).flatten(2).transpose(1, 2)  # noqa: E731  (B, HW, d)
    q, k, v = flat(block.theta), flat(block.phi), flat(block.g)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(3), dim=-1)  # d = C / 2 = 3
    want = x + block.out((attn @ v).transpose(1, 2).reshape(2, 3, 4, 3))
    torch.testing.assert_close(y, want)
    y.square().sum().backward()
    for name, p in [*block.named_parameters(), ("input", x)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_neck_is_linear_then_relu() -> None:
    torch.manual_seed(0)
    neck = Neck(5, 3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(neck(x), F.relu(x @ neck[0].weight.T + neck[0].bias))
    assert neck.out_features == 3


# --- builders -------------------------------------------------------------------------------------------


def _model_cfg(arch: str, backbone: str = "test_efficientnet", **options) -> ModelConfig:
    return ModelConfig(arch=arch, backbone=backbone, pretrained="none", input_size=PATCH, center_crop=0, drop_rate=0.0,
                       options=options)


def test_attention_model_hooks_its_block_into_the_chosen_stage_and_trains_it() -> None:
    torch.manual_seed(0)
    model = create_model(_model_cfg("timm-attention", se_reduction=4, attention_stage="blocks.2"))
    assert isinstance(model, AttentionModel)
    stage = model.backbone.get_submodule("blocks.2")
    seen = {}
    stage.register_forward_hook(lambda m, i, o: seen.update(channels=o.shape[1]))  # returns None: output unchanged
    batch = {"image": torch.rand(3, 3, PATCH, PATCH)}
    model.eval()
    before = model(batch)["label"]
    assert model.attention.theta.in_channels == seen["channels"]  # sized from the stage it sits on
    assert model.se.reduce.in_channels == model.backbone.num_features
    torch.nn.init.normal_(model.attention.out.weight, std=0.5)
    after = model(batch)["label"]
    assert not torch.allclose(before, after)  # the hooked block acts on the stage's output
    model.train()
    model(batch)["label"].square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("attention.theta.weight", "attention.out.weight", "se.reduce.weight", "se.expand.weight", "backbone.conv_stem.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    groups = {n.split(".")[0] for n in grads}
    assert groups == {"backbone", "heads", "se", "attention"}  # blocks: submodules of the model, not the backbone


def test_attention_at_the_final_map_is_identity_at_init() -> None:
    torch.manual_seed(0)
    model = create_model(_model_cfg("timm-attention", se_reduction=4)).eval()
    x = torch.rand(2, 3, PATCH, PATCH)
    fmap = model.se(model.backbone.forward_features(model.prepare(x)))
    pooled = model.backbone.forward_head(fmap, pre_logits=True)
    torch.testing.assert_close(model.embed({"image": x}), pooled)  # the non-local block adds zero at init
    torch.nn.init.normal_(model.attention.out.weight)
    attended = model.backbone.forward_head(model.attention(fmap), pre_logits=True)  # after SE, before pooling
    assert not torch.allclose(attended, pooled)
    torch.testing.assert_close(model.embed({"image": x}), attended)


def test_context_stain_feeds_two_six_channel_views_through_one_backbone() -> None:
    torch.manual_seed(0)
    import timm

    reference = timm.create_model("test_efficientnet", num_classes=0)
    torch.manual_seed(0)
    model = create_model(_model_cfg("context-stain", context_crop=16, neck_dim=7)).eval()
    assert isinstance(model, ContextStainModel)
    stem = model.backbone.conv_stem
    assert stem.in_channels == 6 and stem.weight.shape[1] == 6
    torch.testing.assert_close(stem.weight, torch.cat([reference.conv_stem.weight] * 2, dim=1) * 0.5)  # timm's adapt_input_conv
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.rand(2, 3, PATCH, PATCH)
    out = model({"image": x})["label"]
    views = torch.cat([x, F.interpolate(x[..., 8:24, 8:24], size=(PATCH, PATCH), mode="bilinear", align_corners=False)])
    rgb = (views - model.mean) / model.std
    hed = (rgb_to_hed(views) - torch.tensor(HED_MEAN).view(1, 3, 1, 1)) / torch.tensor(HED_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["x"], torch.cat([rgb, hed], dim=1))
    pooled = model.backbone(seen["x"])
    features = torch.cat([pooled[:2], pooled[2:]], dim=1)
    assert model.neck[0].in_features == 2 * model.backbone.num_features
    torch.testing.assert_close(out, model.heads["label"](model.neck(features)))


def test_neck_on_the_plain_timm_arch_and_unchanged_keys_without_it() -> None:
    plain = create_model(_model_cfg("timm"))
    assert plain.neck is None and not any(k.startswith("neck") for k in plain.state_dict())
    assert {k.split(".")[0] for k in plain.state_dict()} == {"backbone", "heads"}
    necked = create_model(_model_cfg("timm", neck_dim=12)).eval()
    assert necked.heads["label"].in_features == 12 and necked.neck[0].in_features == necked.backbone.num_features
    x = torch.rand(2, 3, PATCH, PATCH)
    torch.testing.assert_close(necked({"image": x})["label"], necked.heads["label"](necked.neck(necked.embed({"image": x}))))


@pytest.mark.parametrize("arch, options", [
    ("timm", {"neck_dim": 16}),
    ("timm-attention", {"se_reduction": 4, "attention_stage": "blocks.1", "neck_dim": 16}),
    ("timm-attention", {}),
    ("context-stain", {"context_crop": 16}),
])
def test_builders_round_trip_through_save_and_load(arch: str, options: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = _model_cfg(arch, **options)
    cfg.model.heads = [HeadConfig("a", "expert_1"), HeadConfig("h", "label4", num_classes=4, positive=[2, 3])]
    cfg.model.reduce_heads = ["a", "h"]
    cfg.data.patch_size = PATCH
    model = create_model(cfg.model)
    for module in model.modules():  # make every block non-trivial, so a block left out on load would show
        if isinstance(module, NonLocalBlock):
            torch.nn.init.normal_(module.out.weight)
    model = model.eval().to(memory_format=torch.channels_last)  # as load_model returns it: same kernels, same numbers
    save_model(model, cfg, tmp_path / "m", threshold=0.5, trained_on={}, metrics={})
    loaded = load_model(tmp_path / "m").model
    assert type(loaded) is type(model)
    x = {"image": torch.rand(3, 3, PATCH, PATCH)}
    with torch.no_grad():
        want, got = model(x), loaded(x)
    for name in ("a", "h"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    torch.testing.assert_close(loaded.p_atypical(got), model.p_atypical(want), rtol=0, atol=0)


@pytest.mark.parametrize("arch, options, message", [
    ("timm", {"neck": 5}, "model.options.neck: not an option of arch 'timm'"),
    ("timm", {"neck_dim": 0}, "model.options.neck_dim: 0 must be an integer >= 1"),
    ("timm-attention", {"attention_stage": "layer9"}, "model.options.attention_stage: 'layer9' is not a submodule of test_efficientnet"),
    ("timm-attention", {"se_reduction": 1.5}, "model.options.se_reduction: 1.5 must be an integer >= 1"),
    ("context-stain", {"context_crop": 4}, "model.options.context_crop: 4 must be at least 8 px"),
])
def test_bad_options_are_refused_in_one_line(arch: str, options: dict, message: str) -> None:
    with pytest.raises(MitotypeError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        create_model(_model_cfg(arch, **options))


# --- label4 and stratified folds -----------------------------------------------------------------------------


def test_label4_is_label_and_hardness_and_missing_without_two_votes() -> None:
    df = finalize(pd.DataFrame({
        "path": [f"/x/{i}.png" for i in range(7)],
        "label": [0, 0, 1, 1, 1, 0, -1],
        "expert_1": [0.0, 0.0, 1.0, 1.0, 1.0, np.nan, 1.0],
        "expert_2": [0.0, 1.0, 1.0, 0.0, np.nan, np.nan, 1.0],
        "expert_3": [0.0, 0.0, 1.0, 1.0, np.nan, 0.0, 1.0],
    }))
    # NMF-easy, NMF-hard, AMF-easy, AMF-hard, one vote (unknown), one vote (unknown), unlabelled
    assert df["label4"].tolist()[:4] == [0.0, 1.0, 2.0, 3.0]
    assert df["label4"].iloc[4:].isna().all()


def _hardness_table(n_slides: int = 24, seed: int = 0) -> pd.DataFrame:
    """Slides whose hard figures cluster: a few slides hold most of them, as real ones do."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_slides):
        p_hard = 0.8 if s % 6 == 0 else 0.05
        for i in range(int(rng.integers(8, 16))):
            rows.append({"group": f"s{s}", "label": int(rng.random() < 0.3), "hard": bool(rng.random() < p_hard), "path": f"s{s}/{i}"})
    return pd.DataFrame(rows)


def test_default_stratification_keeps_todays_folds() -> None:
    from sklearn.model_selection import StratifiedGroupKFold

    df = _hardness_table()
    want = np.full(len(df), -1)
    for fold, (_, test) in enumerate(StratifiedGroupKFold(5, shuffle=True, random_state=42).split(df, df["label"], df["group"])):
        want[test] = fold
    assert np.array_equal(grouped_folds(df, 5), want)
    assert np.array_equal(grouped_folds(df, 5, 42, ["label"]), want)
    assert np.array_equal(train_val_split(df, 0.2)[1], np.flatnonzero(want == 0))
    assert load_config(None, []).data.stratify == ["label"]


def test_stratifying_on_label_and_hard_balances_hardness_across_folds() -> None:
    df = _hardness_table()
    assert len(np.unique(strata(df, ["label", "hard"]))) == 4
    spread = {}
    for stratify in (["label"], ["label", "hard"]):
        folds = grouped_folds(df, 4, 42, stratify)
        assert not pd.Series(folds).groupby(df["group"]).nunique().gt(1).any()  # still grouped
        share = pd.Series(df["hard"].to_numpy()).groupby(folds).mean()
        spread[tuple(stratify)] = share.max() - share.min()
    assert spread[("label", "hard")] < spread[("label",)] / 2, spread
    train, val = train_val_split(df, 0.25, 42, ["label", "hard"])
    assert np.array_equal(val, np.flatnonzero(grouped_folds(df, 4, 42, ["label", "hard"]) == 0))


def test_stratify_names_a_missing_column() -> None:
    with pytest.raises(MitotypeError, match="config data.stratify: column 'hardness' is not in the data"):
        grouped_folds(_hardness_table(), 4, 42, ["label", "hardness"])


# --- recipes ------------------------------------------------------------------------------------------------


def test_recipes_say_what_the_issue_asks() -> None:
    se = load_config("densenet121-se")
    assert (se.model.arch, se.model.backbone, se.model.input_size, se.train.batch_size, se.train.epochs) == ("timm-attention", "densenet121", 224, 32, 50)
    assert (se.loss.name, se.loss.focal_alpha, se.loss.focal_gamma, se.train.optimizer) == ("focal", 0.75, 2.0, "adam")
    assert se.model.options["attention_stage"] == "features.denseblock3" and [h.num_classes for h in se.model.heads] == [2]

    ex = load_config("resnet50-experts")
    weights = {h.name: (h.target, h.weight) for h in ex.model.heads}
    assert weights == {"expert_1": ("expert_1", 0.16666667), "expert_2": ("expert_2", 0.16666667),
                       "expert_3": ("expert_3", 0.16666667), "hardness": ("hard", 0.5)}  # theta = 0.5
    assert ex.model.reduce_heads == ["expert_1", "expert_2", "expert_3"] and ex.model.options == {"neck_dim": 512}
    assert (ex.train.optimizer, ex.train.lr, ex.train.batch_size, ex.train.patience, ex.data.val_fraction) == ("adamw", 1e-4, 8, 20, 0.2)
    assert ex.data.stratify == ["label", "hard"] and ex.loss.name == "focal" and ex.model.input_size == 224

    four = load_config("resnet50-experts-4class")
    assert [(h.target, h.num_classes, h.positive) for h in four.model.heads] == [("label4", 4, [2, 3])]
    ctx = load_config("context-stain")
    assert ctx.model.arch == "context-stain" and ctx.model.options == {"neck_dim": 512, "context_crop": 80}
    assert ctx.model.heads == ex.model.heads and ctx.train == ex.train  # resnet50-experts with two views
    for recipe in RECIPES:
        assert load_config(recipe).description


# Each recipe with a tiny backbone (the real ones take 10-25 s an epoch here even at 32 px).
_TINY_RECIPE = {
    "densenet121-se": ["model.backbone=test_efficientnet", "model.options={se_reduction: 4, attention_stage: blocks.2}"],
    "resnet50-experts": ["model.backbone=test_resnet", "model.options={neck_dim: 16}"],
    "resnet50-experts-4class": ["model.backbone=test_resnet", "model.options={neck_dim: 16}"],
    "context-stain": ["model.backbone=test_resnet", "model.options={neck_dim: 16, context_crop: 16}"],
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_one_epoch_through_the_cli_with_a_tiny_stand_in_backbone(
        recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The recipe's architecture, heads, options and inner split through ``mitotype train``, but on a tiny
    stand-in backbone (test_efficientnet / test_resnet, ``_TINY_RECIPE``), not its real DenseNet-121 or
    ResNet-50: this shows the recipe's wiring trains, not that its real network does."""
    data = write_class_folders(tmp_path / "data", n_atypical=12, n_normal=20, n_slides=8)
    overrides = [*_TINY_RECIPE[recipe], "model.pretrained=none", f"model.input_size={PATCH}", f"data.patch_size={PATCH}",
                 "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=32", "data.val_fraction=0.25"]
    code, out, err = run_cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "run", "--recipe", recipe,
                             *[a for o in overrides for a in ("--set", o)])
    assert code == 0, err
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 1 and np.isfinite(history["train_loss"]).all() and "val_balanced_accuracy" in history
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    want_cfg = load_config(recipe, overrides)
    want = want_cfg.model
    assert card["build"]["arch"] == want.arch and card["build"]["options"] == want.options
    assert [h["name"] for h in card["build"]["heads"]] == [h.name for h in want.heads]
    manifest = read_manifest_csv(tmp_path / "run" / "manifest.csv")
    _, val = train_val_split(manifest, 0.25, 42, want_cfg.data.stratify)  # the recipe's stratification reaches the inner split
    assert sorted(pd.read_csv(tmp_path / "run" / "val_predictions.csv")["path"]) == sorted(manifest["path"].iloc[val])
    loaded = load_model(tmp_path / "run").model
    keys = {k.split(".")[0] for k in loaded.state_dict()}
    assert keys == ({"backbone", "heads", "se", "attention"} if recipe == "densenet121-se" else {"backbone", "heads", "neck"})


def test_explain_refuses_a_two_view_model_and_explains_the_attention_model() -> None:
    from mitotype.inference.explain import grad_cams

    images = torch.rand(2, 3, PATCH, PATCH)
    two_views = create_model(_model_cfg("context-stain", context_crop=16)).eval()
    with pytest.raises(MitotypeError, match="several views of a patch through its backbone"):
        grad_cams([two_views], images, [1, 0])
    maps = grad_cams([create_model(_model_cfg("timm-attention")).eval()], images, [1, 0])
    assert maps.shape == (2, PATCH, PATCH)
