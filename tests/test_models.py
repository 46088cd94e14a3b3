from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import fake_hub

from mitotype.config import ModelConfig, load_config
from mitotype.errors import MitotypeError
from mitotype.models.artifact import load_model, save_model
from mitotype.models.pretrained import create_backbone
from mitotype.models.state_dict import read_state_dict
from mitotype.models.registry import create_model, list_models


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"backbone": "test_efficientnet", "pretrained": "none", "input_size": 32, **kw})


def test_model_returns_named_logits_and_p_atypical() -> None:
    model = create_model(tiny_cfg()).eval()
    outputs = model({"image": torch.rand(3, 3, 32, 32)})
    assert set(outputs) == {"label"} and outputs["label"].shape == (3, 2)
    p = model.p_atypical(outputs)
    assert torch.allclose(p, outputs["label"].softmax(dim=1)[:, 1])  # atypical is index 1
    assert "timm" in list_models()


def test_model_resizes_patches_to_its_input_size() -> None:
    model = create_model(tiny_cfg(input_size=48)).eval()
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, args: seen.update(shape=args[0].shape))
    model({"image": torch.rand(2, 3, 32, 32)})
    assert seen["shape"][-2:] == (48, 48)


def test_freeze_groups_stops_gradients_in_the_stem() -> None:
    model = create_model(tiny_cfg(freeze_groups=1))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.conv_stem") or n.startswith("backbone.bn1") for n in frozen)


def test_unknown_backbone_arch_and_source() -> None:
    with pytest.raises(MitotypeError, match="not a timm model name"):
        create_model(tiny_cfg(backbone="no_such_net"))
    with pytest.raises(MitotypeError, match="not a registered model"):
        create_model(ModelConfig(arch="nope"))
    with pytest.raises(MitotypeError, match="is not one of"):
        create_model(tiny_cfg(pretrained="imagenet-lite9"))
    with pytest.raises(MitotypeError, match="fit backbone tf_efficientnet_lite0"):
        create_model(tiny_cfg(pretrained="imagenet-lite0"))


def test_file_source_loads_safetensors_and_weights_only_torch(tmp_path: Path) -> None:
    reference = timm.create_model("test_efficientnet", num_classes=0)
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        backbone, _ = create_backbone("test_efficientnet", f"file:{tmp_path / name}")
        assert torch.equal(backbone.conv_stem.weight, reference.conv_stem.weight)


def test_file_source_refuses_pickled_code_and_wrong_shapes(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(MitotypeError, match="not a readable weights file"):
        read_state_dict(tmp_path / "evil.pth")
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(MitotypeError, match="missing or of another shape"):
        create_backbone("test_efficientnet", f"file:{tmp_path / 'other.safetensors'}")
    with pytest.raises(MitotypeError, match="no such file"):
        create_backbone("test_efficientnet", f"file:{tmp_path / 'absent.pt'}")


def test_hub_source_fails_offline_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MitotypeError, match="could not fetch weights for 'resnet18'.*file:PATH"):
        create_backbone("resnet18", "hub")


def test_hub_source_uses_timm_download_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online, 'hub' is timm's own pretrained loading; here a local file stands in for the hub."""
    reference = fake_hub(monkeypatch, tmp_path)
    backbone, norm = create_backbone("test_efficientnet", "hub")
    assert torch.equal(backbone.conv_stem.weight, reference.conv_stem.weight)
    assert len(norm.mean) == 3


def test_artifact_roundtrip_keeps_predictions_and_card(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.input_size=32", "data.patch_size=32"])
    model = create_model(cfg.model).eval()
    save_model(model, cfg, tmp_path / "m", threshold=0.37, trained_on={"n": 5}, metrics={})
    loaded = load_model(tmp_path / "m")
    x = {"image": torch.rand(4, 3, 32, 32)}
    with torch.no_grad():
        assert torch.allclose(model.p_atypical(model(x)), loaded.model.p_atypical(loaded.model(x)), atol=1e-6)
    assert loaded.threshold == pytest.approx(0.37) and loaded.patch_size == 32
    assert loaded.card["class_names"] == ["normal", "atypical"]
    (tmp_path / "m" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(MitotypeError, match="weights do not fit|model.safetensors"):
        load_model(tmp_path / "m")
    with pytest.raises(MitotypeError, match="no model here"):
        load_model(tmp_path)


def test_p_atypical_reduces_the_named_heads_positive_classes() -> None:
    from mitotype.config import HeadConfig

    heads = [HeadConfig("label"), HeadConfig("phase", target="phase", num_classes=4, positive=[2, 3]), HeadConfig("aux", target="aux")]
    model = create_model(tiny_cfg(heads=heads, reduce_heads=["label", "phase"]))
    outputs = {"label": torch.tensor([[0.0, 2.0], [3.0, -1.0]]), "phase": torch.tensor([[0.1, 0.2, 1.5, -0.3], [2.0, 0.0, -1.0, 0.5]]),
               "aux": torch.tensor([[9.0, -9.0], [-9.0, 9.0]])}
    label = outputs["label"].softmax(dim=1)[:, 1]
    phase = outputs["phase"].softmax(dim=1)[:, 2:].sum(dim=1)
    assert torch.allclose(model.p_atypical(outputs), (label + phase) / 2, atol=1e-7)  # aux is not reduced
    assert set(model({"image": torch.rand(2, 3, 32, 32)})) == {"label", "phase", "aux"}
    assert model.heads["phase"].out_features == 4


def test_forward_is_resize_then_normalise_then_backbone_then_heads() -> None:
    from mitotype.models.pretrained import Normalization

    torch.manual_seed(0)
    model = create_model(tiny_cfg(input_size=40, drop_rate=0.5)).eval()
    model.set_normalization(Normalization((0.1, 0.2, 0.3), (0.5, 0.25, 2.0)))
    assert model.normalization().mean == pytest.approx((0.1, 0.2, 0.3)) and model.normalization().std == (0.5, 0.25, 2.0)
    x = torch.rand(2, 3, 32, 32)
    resized = torch.nn.functional.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False)
    normed = (resized - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.heads["label"](model.backbone(normed))
        assert torch.allclose(model({"image": x})["label"], want, atol=1e-6)
        same = torch.rand(2, 3, 40, 40)  # already at the input size: no resampling
        want = model.heads["label"](model.backbone((same - model.mean) / model.std))
        assert torch.allclose(model({"image": same})["label"], want, atol=1e-6)
    assert model.state_dict().keys().isdisjoint({"mean", "std"})  # statistics live in the card, not the weights


def test_registry_refuses_a_second_builder_under_one_name() -> None:
    from mitotype.models.registry import register_model

    assert list_models() == sorted(list_models()) and "timm" in list_models()
    with pytest.raises(ValueError, match="model builder 'timm' registered twice"):
        register_model("timm")(lambda cfg, pretrained=True: None)


def test_model_defaults_crop_and_resize_each_side() -> None:
    from mitotype.config import HeadConfig
    from mitotype.models.pretrained import Normalization
    from mitotype.models.registry import MitotypeModel

    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    plain = MitotypeModel(backbone, [HeadConfig("label"), HeadConfig("other", target="other")], norm, 32).eval()
    assert plain.dropout.p == 0.0 and plain.center_crop == 0 and plain.reduce_heads == ["label"]
    with torch.no_grad():
        def direct(model, x):  # what forward should compute on an already prepared image
            return model.heads["label"](model.backbone((x - model.mean) / model.std))

        tall = torch.rand(1, 3, 40, 32)  # one side off: still resized to 32 x 32
        want = direct(plain, torch.nn.functional.interpolate(tall, size=(32, 32), mode="bilinear", align_corners=False))
        assert torch.allclose(plain({"image": tall})["label"], want, atol=1e-6)
        wide = torch.rand(1, 3, 32, 40)
        want = direct(plain, torch.nn.functional.interpolate(wide, size=(32, 32), mode="bilinear", align_corners=False))
        assert torch.allclose(plain({"image": wide})["label"], want, atol=1e-6)
        cropped = MitotypeModel(backbone, [HeadConfig("label")], norm, 16, center_crop=16).eval()
        x = torch.rand(1, 3, 30, 37)  # top (30 - 16) // 2 = 7, left (37 - 16) // 2 = 10
        assert torch.allclose(cropped({"image": x})["label"], direct(cropped, x[..., 7:23, 10:26]), atol=1e-6)


def test_registry_builds_what_was_registered_and_names_the_known_ones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mitotype.models.registry as registry

    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    calls = []
    registry.register_model("probe")(lambda cfg, pretrained=True: calls.append(pretrained) or "built")
    assert create_model(ModelConfig(arch="probe")) == "built" and create_model(ModelConfig(arch="probe"), pretrained=False) == "built"
    assert calls == [True, False]
    with pytest.raises(MitotypeError) as info:
        create_model(ModelConfig(arch="nope"))
    known = ", ".join(sorted(registry._BUILDERS))
    assert "probe, timm" in known and str(info.value) == f"model.arch: 'nope' is not a registered model (known: {known})"
    absent = tiny_cfg(pretrained=f"file:{tmp_path / 'absent.pt'}")
    assert create_model(absent, pretrained=False) is not None  # starting weights skipped: a checkpoint follows
    with pytest.raises(MitotypeError, match="no such file"):
        create_model(absent)


def test_freeze_groups_freezes_exactly_the_leading_coarse_groups() -> None:
    from timm.models import group_parameters

    from mitotype.models.registry import freeze_leading_groups

    freeze_leading_groups(torch.nn.Linear(2, 2), 0)  # nothing to freeze: no group_matcher needed
    with pytest.raises(MitotypeError) as info:
        freeze_leading_groups(torch.nn.Linear(2, 2), 1)
    assert str(info.value) == "model.freeze_groups: Linear has no timm group_matcher; use 0"
    model = create_model(tiny_cfg(freeze_groups=2))
    groups = group_parameters(model.backbone, model.backbone.group_matcher(coarse=True))
    want = {f"backbone.{n}" for gid, names in groups.items() if gid < 2 for n in names}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == want


def test_drop_path_rate_reaches_the_backbone() -> None:
    """model.drop_path_rate is passed to timm: its blocks drop paths at rates rising to it (and none without it)."""
    from mitotype.config import load_config
    from mitotype.models.registry import create_model

    base = ["model.backbone=test_efficientnet", "model.pretrained=none", "model.input_size=32", "data.patch_size=32"]

    def rates(*extra: str) -> list[float]:
        model = create_model(load_config(None, [*base, *extra]).model)
        return sorted({round(float(m.drop_prob), 3) for m in model.modules() if type(m).__name__ == "DropPath"})

    assert rates("model.drop_path_rate=0.2") == [0.04, 0.08, 0.12, 0.16]
    assert rates() == []
