"""Foundation models (``fm`` arch, fm-probe / fm-lora): the table, LoRA, saved folds that name their backbone,
the feature cache, and offline hub names; with a tiny randomly initialised timm ViT saved as a weights file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import PATCH, run_cli, write_class_folders
from PIL import Image
from safetensors.torch import load_file, save_file

from mitotype.config import load_config
from mitotype.data.images import decode_patch
from mitotype.errors import MitotypeError
from mitotype.models import foundation
from mitotype.models.artifact import load_model, save_model
from mitotype.models.foundation import (
    FOUNDATION_MODELS,
    IMAGENET,
    PooledViT,
    resolve_kwargs,
)
from mitotype.models.registry import create_model
from mitotype.training import features

VIT = "vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": PATCH, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
LORA_KEYS = 2 * 4 * 2  # 2 blocks x (qkv, proj, fc1, fc2) x (lora_A, lora_B)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT's random weights as a file: the 'pretrained source' a saved fold names and reloads."""
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(VIT, num_classes=0, **VIT_KWARGS).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("data") / "amibr", n_atypical=8, n_normal=16, n_slides=6)


def fm(vit_file: Path, mode: str, *extra: str) -> list[str]:
    overrides = [
        "model.arch=fm", f"model.backbone={VIT}", f"model.pretrained=file:{vit_file}", f"model.kwargs={json.dumps(VIT_KWARGS)}",
        f"model.input_size={PATCH}", "model.center_crop=0", f"data.patch_size={PATCH}", f"model.options={{mode: {mode}}}",
        "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-2", "train.warmup_epochs=0", "train.device=cpu",
        "augment.flip=false", "augment.rot90=false", "augment.rotate_degrees=0", "augment.hed_sigma=0", "augment.hed_bias=0",
        "augment.brightness=0", "augment.contrast=0", "augment.saturation=0", "augment.hue=0",
    ]
    return [a for o in [*overrides, *extra] for a in ("--set", o)]


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err[-2000:]
    return code, out, err


def pixel_predictions(model_dir: Path, paths: list[str]) -> np.ndarray:
    loaded = load_model(model_dir)
    x = torch.from_numpy(np.stack([decode_patch(p, PATCH) for p in paths])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return loaded.model.p_atypical(loaded.model({"image": x})).numpy()


def test_table_gives_each_model_its_published_constructor_kwargs_and_preprocessing() -> None:
    t = FOUNDATION_MODELS
    assert t["virchow2"].timm_name == "hf-hub:paige-ai/Virchow2" and t["virchow2"].pool == "cls+mean"
    assert t["virchow2"].kwargs == {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
    assert t["uni"].timm_name == "hf-hub:MahmoodLab/UNI" and t["uni"].kwargs == {"init_values": 1e-5, "dynamic_img_size": True}
    assert t["uni2-h"].timm_name == "hf-hub:MahmoodLab/UNI2-h" and t["uni2-h"].kwargs == {
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8,
        "dynamic_img_size": True}
    assert t["h-optimus-0"].timm_name == "hf-hub:bioptimus/H-optimus-0"
    assert t["h-optimus-0"].kwargs == {"init_values": 1e-5, "dynamic_img_size": False}
    assert t["h-optimus-0"].norm.mean == (0.707223, 0.578729, 0.703617) and t["h-optimus-0"].norm.std == (0.211883, 0.230117, 0.177517)
    assert t["gigapath"].timm_name == "hf-hub:prov-gigapath/prov-gigapath" and t["gigapath"].kwargs == {}
    for name in ("virchow2", "uni", "uni2-h", "gigapath"):
        assert t[name].norm == IMAGENET and t[name].input_size == 224
    dinov3 = [s for s in t.values() if s.name.startswith("dinov3-")]
    assert {s.timm_name for s in dinov3} >= {"vit_huge_plus_patch16_dinov3.lvd1689m", "vit_small_patch16_dinov3.lvd1689m"}
    assert all(timm.is_model(s.timm_name) for s in dinov3)
    resolved = resolve_kwargs(t["uni2-h"].kwargs)
    assert resolved["mlp_layer"] is timm.layers.SwiGLUPacked and resolved["act_layer"] is torch.nn.SiLU and resolved["depth"] == 24


def test_builder_passes_the_table_entry_to_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """virchow2 -> its hub name, SwiGLUPacked/SiLU classes, ImageNet statistics, class token ++ mean of patch tokens."""
    seen = {}

    def fake_backbone(name, source, **kwargs):
        seen.update(name=name, source=source, kwargs=kwargs)
        return timm.create_model(VIT, num_classes=0, **VIT_KWARGS), None

    monkeypatch.setattr(foundation, "create_backbone", fake_backbone)
    cfg = load_config(None, ["model.arch=fm", "model.backbone=virchow2", "model.pretrained=hub", "model.input_size=224"])
    model = create_model(cfg.model)
    assert seen == {"name": "hf-hub:paige-ai/Virchow2", "source": "hub", "kwargs": {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}}
    norm = model.normalization()
    assert norm.mean == pytest.approx(IMAGENET.mean) and norm.std == pytest.approx(IMAGENET.std)
    assert model.heads["label"].in_features == 2 * 32
    cfg = load_config(None, ["model.arch=fm", "model.backbone=h-optimus-0", "model.input_size=128"])
    with pytest.raises(MitotypeError, match="h-optimus-0 takes 224 px"):
        create_model(cfg.model)


def test_cls_mean_pooling_is_class_token_then_mean_of_patch_tokens() -> None:
    vit = timm.create_model(VIT, num_classes=0, reg_tokens=2, **VIT_KWARGS).eval()
    x = torch.rand(3, 3, PATCH, PATCH)
    tokens = vit.forward_features(x)  # (3, 1 + 2 registers + 16 patches, 32)
    expected = torch.cat([tokens[:, 0], tokens[:, 3:].mean(dim=1)], dim=1)
    assert torch.equal(PooledViT(vit, "cls+mean")(x), expected)
    assert torch.equal(PooledViT(vit, "cls")(x), tokens[:, 0])


def test_lora_trains_only_adapters_and_head_and_a_fold_saves_only_them(monkeypatch, capsys, tmp_path: Path, vit_file: Path, data: Path) -> None:
    cfg = load_config(None, fm(vit_file, "lora")[1::2])
    model = create_model(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == LORA_KEYS + 2 and {n for n in trainable if ".lora_" not in n} == {"heads.label.weight", "heads.label.bias"}
    assert all(".blocks." in n for n in trainable if ".lora_" in n)  # not the patch embedding's proj

    out = tmp_path / "run"
    cli(monkeypatch, capsys, "train", "--data", data, "--out", out, *fm(vit_file, "lora", "data.val_fraction=0.25"))
    saved = load_file(str(out / "model.safetensors"))
    assert len(saved) == LORA_KEYS + 2 and sorted(saved) == sorted(trainable)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # the adapters trained (B starts at zero)
    card = json.loads((out / "model.json").read_text())
    assert card["build"]["arch"] == "fm" and card["build"]["backbone"] == VIT and card["build"]["pretrained"] == f"file:{vit_file}"
    val = pd.read_csv(out / "val_predictions.csv")
    assert np.allclose(pixel_predictions(out, val["path"].tolist()), val["p_atypical"].to_numpy(), atol=1e-6)

    card["build"]["kwargs"]["mlp_layer"] = "os.system"  # a card naming a class outside the allow-list
    (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(MitotypeError, match=r"model.json: model.kwargs.mlp_layer: 'os.system' is not an allowed layer class"):
        load_model(out)


def test_lora_cross_validation_saves_small_folds(monkeypatch, capsys, tmp_path: Path, vit_file: Path, data: Path) -> None:
    cli(monkeypatch, capsys, "cv", "--data", data, "--folds", 2, "--out", tmp_path / "cv", *fm(vit_file, "lora"))
    for fold in (0, 1):
        assert len(load_file(str(tmp_path / "cv" / f"fold_{fold}" / "model.safetensors"))) == LORA_KEYS + 2
        assert len(torch.load(tmp_path / "cv" / f"fold_{fold}" / "checkpoints" / "last.pt", weights_only=True)["model"]) == LORA_KEYS + 2
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    fold0 = oof[oof["fold"] == 0]
    assert np.allclose(pixel_predictions(tmp_path / "cv" / "fold_0", fold0["path"].tolist()), fold0["p_atypical"].to_numpy(), atol=1e-6)


def test_probe_features_are_cached_once_reused_across_folds_and_invalidated_by_a_changed_image(
    monkeypatch, capsys, tmp_path: Path, vit_file: Path
) -> None:
    data = write_class_folders(tmp_path / "amibr", n_atypical=8, n_normal=16, n_slides=6)
    n = 24
    calls, images = [], []
    real_compute, real_forward = features.compute_features, PooledViT.forward
    monkeypatch.setattr(features, "compute_features", lambda *a, **k: calls.append(1) or real_compute(*a, **k))
    monkeypatch.setattr(PooledViT, "forward", lambda self, x: images.append(len(x)) or real_forward(self, x))
    cache = tmp_path / "cache"
    args = fm(vit_file, "probe", f"data.cache_dir={cache}", "train.epochs=2")

    cli(monkeypatch, capsys, "cv", "--data", data, "--folds", 2, "--out", tmp_path / "cv1", *args)
    assert len(calls) == 1 and len(list(cache.glob("features-*.npy"))) == 1
    assert sum(images) == n + n  # the cache once, then the held-out rows of each fold on pixels; no training step ran it
    assert load_file(str(tmp_path / "cv1" / "fold_0" / "model.safetensors")).keys() == {"heads.label.weight", "heads.label.bias"}
    cached = np.load(next(cache.glob("features-*.npy")))
    assert cached.shape == (n, 32)

    cli(monkeypatch, capsys, "cv", "--data", data, "--folds", 2, "--out", tmp_path / "cv2", *args)
    assert len(calls) == 1  # same images, same backbone: reused by another run too

    img = data / "Normal" / "N_000.png"
    pixels = np.asarray(Image.open(img)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(img)
    cli(monkeypatch, capsys, "cv", "--data", data, "--folds", 2, "--out", tmp_path / "cv3", *args)
    assert len(calls) == 2 and len(list(cache.glob("features-*.npy"))) == 2


def test_probe_train_heads_on_cached_features_match_the_pixel_model(monkeypatch, capsys, tmp_path: Path, vit_file: Path, data: Path) -> None:
    """Validation runs on cached features inside the loop; the saved model, on pixels, gives the same numbers."""
    out = tmp_path / "run"
    cli(monkeypatch, capsys, "train", "--data", data, "--out", out, *fm(vit_file, "probe", "data.val_fraction=0.25"))
    assert len(list((out / "features").glob("features-*.npy"))) == 1
    val = pd.read_csv(out / "val_predictions.csv")
    assert np.allclose(pixel_predictions(out, val["path"].tolist()), val["p_atypical"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("recipe", ["fm-probe", "fm-lora"])
def test_recipe_trains_one_epoch_with_a_tiny_local_backbone(monkeypatch, capsys, tmp_path: Path, vit_file: Path, data: Path, recipe: str) -> None:
    swap = [f"model.backbone={VIT}", f"model.pretrained=file:{vit_file}", f"model.kwargs={json.dumps(VIT_KWARGS)}", f"model.input_size={PATCH}",
            f"data.patch_size={PATCH}", "train.epochs=1", "train.device=cpu"]
    cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "run", "--recipe", recipe, *[a for o in swap for a in ("--set", o)])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recipe"] == recipe and summary["epochs"] == 1
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    heads = {"heads.label.weight", "heads.label.bias"}
    assert set(saved) == heads if recipe == "fm-probe" else len(saved) == LORA_KEYS + 2 and heads < set(saved)
    assert saved["heads.label.weight"].shape == ((2, 32) if recipe == "fm-probe" else (1, 32))  # probe: 2 classes; lora: one logit (bce)
    assert len(list((tmp_path / "run" / "features").glob("*.npy"))) == (1 if recipe == "fm-probe" else 0)


def test_random_backbone_without_a_source_travels_whole(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.arch=fm", f"model.backbone={VIT}", f"model.kwargs={json.dumps(VIT_KWARGS)}", f"model.input_size={PATCH}",
                             f"data.patch_size={PATCH}", "model.options={mode: lora}"])
    model = create_model(cfg.model).eval()
    save_model(model, cfg, tmp_path / "m", threshold=0.5, trained_on={}, metrics={})
    assert len(load_file(str(tmp_path / "m" / "model.safetensors"))) == len(model.state_dict())
    x = {"image": torch.rand(2, 3, PATCH, PATCH)}
    loaded = load_model(tmp_path / "m").model
    with torch.no_grad():
        # load_model puts the weights channels-last (the layout inference runs in): on some CPUs that
        # picks another convolution kernel for the patch embedding, which differs in the last bits
        # (2.4e-7 seen on AVX-512). In the same layout the reloaded model computes exactly as the saved one.
        assert torch.allclose(model(x)["label"], loaded(x)["label"], rtol=0, atol=1e-5)
        assert torch.equal(model.to(memory_format=torch.channels_last)(x)["label"], loaded(x)["label"])


def test_card_without_a_weight_source_still_loads(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.backbone=test_efficientnet", f"model.input_size={PATCH}", f"data.patch_size={PATCH}"])
    save_model(create_model(cfg.model), cfg, tmp_path / "m", threshold=0.5, trained_on={}, metrics={})
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    del card["build"]["pretrained"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(card))
    assert load_model(tmp_path / "m").card["build"]["pretrained"] == "none"


def test_hub_foundation_model_offline_fails_in_one_line(monkeypatch, capsys, tmp_path: Path, data: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "run", "--recipe", "fm-lora",
                           "--set", f"data.patch_size={PATCH}", "--set", "train.epochs=1")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert err.startswith("error: model.pretrained=hub: could not fetch weights for 'hf-hub:paige-ai/Virchow2'") and "file:PATH" in err


def test_bad_fm_options_are_one_line_errors(vit_file: Path) -> None:
    base = ["model.arch=fm", f"model.backbone={VIT}", f"model.kwargs={json.dumps(VIT_KWARGS)}", f"model.input_size={PATCH}"]
    for options, message in (("{mode: finetune}", "options.mode: 'finetune' is not one of probe, lora"),
                             ("{mode: lora, r: 0}", "options.r: expected a positive integer"),
                             ("{mode: lora, target_modules: [nothing]}", r"options.target_modules: \['nothing'\] match no layer"),
                             ("{mode: probe, rank: 8}", "options.rank: not an option of arch 'fm'")):
        with pytest.raises(MitotypeError, match=message):
            create_model(load_config(None, [*base, f"model.options={options}"]).model)
