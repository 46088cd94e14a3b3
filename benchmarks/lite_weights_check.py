"""Sanity check of the offline ImageNet weights: top-1 class of skimage's chelsea (a cat) for lite0/1/2.

Each model is built through ``mitotype.models.registry.create_model`` with
``model.pretrained=imagenet-liteN``, so the weights are mapped and the input normalised exactly as
in training; only the two-class head is swapped for the packages' 1,000-class ImageNet classifier.
The photo (300 x 451) is resized to the variant's native input size (224 / 240 / 260 px, timm's
default) with anti-aliasing, as tests/test_lite_weights.py does, and passed as float RGB in [0, 1].
ImageNet classes 281-285 are the domestic cats; "cat mass" is their summed probability.

    .venv/bin/python benchmarks/lite_weights_check.py [--variants lite0 lite1 lite2]
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch import nn

from mitotype.config import load_config
from mitotype.models.lite_weights import LITE_VARIANTS, lite_state_dict
from mitotype.models.registry import create_model

CAT_CLASSES = list(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def classify(variant: str, image) -> dict:
    """Top-1 ImageNet class of ``image`` (H, W, 3 float in [0, 1]) through the registry's model of ``variant``."""
    from skimage.transform import resize

    backbone = LITE_VARIANTS[f"imagenet-{variant}"]
    size = timm.get_pretrained_cfg(backbone).input_size[-1]
    cfg = load_config(None, [f"model.backbone={backbone}", f"model.pretrained=imagenet-{variant}", f"model.input_size={size}"])
    model = create_model(cfg.model).eval()
    head = next(iter(model.heads))
    state = lite_state_dict(f"imagenet-{variant}")
    imagenet = nn.Linear(state["classifier.weight"].shape[1], state["classifier.weight"].shape[0])
    imagenet.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
    model.heads[head] = imagenet
    x = torch.from_numpy(resize(image, (size, size), anti_aliasing=True)).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model({"image": x})[head].softmax(dim=1)[0]
    top = int(probs.argmax())
    return {"variant": variant, "size": size, "top": top, "name": timm.data.ImageNetInfo().index_to_description(top),
            "p": float(probs[top]), "cat_mass": float(probs[CAT_CLASSES].sum()), "norm": model.normalization()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["lite0", "lite1", "lite2"], choices=["lite0", "lite1", "lite2"])
    args = ap.parse_args(argv)
    import skimage.data

    image = skimage.data.chelsea()
    rows = [classify(v, image) for v in args.variants]
    print(f"skimage.data.chelsea() ({image.shape[0]} x {image.shape[1]}) through create_model(model.pretrained=imagenet-liteN)")
    print()
    print("| variant | input px | normalisation mean / std | top-1 class | p(top-1) | cat mass (281–285) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        norm = f"{r['norm'].mean[0]:g} / {r['norm'].std[0]:g}"
        print(f"| {r['variant']} | {r['size']} | {norm} | {r['top']} {r['name']} | {r['p']:.3f} | {r['cat_mass']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
