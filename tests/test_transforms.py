"""Tests for mitotype.transforms: batched augmentation and HED stain conversion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mitotype.errors import MitotypeError
from mitotype.transforms import (
    AugmentConfig,
    BatchAugment,
    dihedral_views,
    hed_jitter,
    hed_to_rgb,
    rgb_to_hed,
)
from mitotype.transforms.augment import affine_grid

ALL_ON = AugmentConfig(
    flip=True,
    rot90=True,
    rotate_degrees=15.0,
    crop_scale=(0.6, 1.0),
    brightness=0.2,
    contrast=0.2,
    saturation=0.2,
    hue=0.05,
    hed_sigma=0.05,
    hed_bias=0.02,
    p=1.0,
)
COLOUR_ONLY = dataclasses.replace(
    ALL_ON, flip=False, rot90=False, rotate_degrees=0.0, crop_scale=(1.0, 1.0)
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 8, size: int = 32, seed: int = 123) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=gen(seed))


def he_like(b: int = 4, size: int = 32, seed: int = 7) -> torch.Tensor:
    """Plausible H&E colours: pink / purple / near-white mixtures, all stain densities >= 0."""
    g = gen(seed)
    hed = torch.rand(b, 3, size, size, generator=g) * torch.tensor([0.08, 0.06, 0.005])[:, None, None]
    return hed_to_rgb(hed)


# ----------------------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(MitotypeError, match="brightness"):
        AugmentConfig(brightness=1.5)
    with pytest.raises(MitotypeError, match="hue"):
        AugmentConfig(hue=0.6)
    with pytest.raises(MitotypeError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.9, 0.5))
    with pytest.raises(MitotypeError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(MitotypeError, match="p"):
        AugmentConfig(p=float("nan"))
    with pytest.raises(MitotypeError, match="flip"):
        AugmentConfig(flip="yes")  # type: ignore[arg-type]
    assert AugmentConfig(crop_scale=[0.5, 1]).crop_scale == (0.5, 1.0)  # type: ignore[arg-type]
    assert AugmentConfig.off().is_identity
    assert not AugmentConfig().is_identity


# ----------------------------------------------------------------------------- basic contract


@pytest.mark.parametrize(
    "cfg",
    [
        ALL_ON,
        COLOUR_ONLY,
        AugmentConfig(),
        dataclasses.replace(ALL_ON, p=0.5),
        dataclasses.replace(ALL_ON, hed_sigma=0.0, hed_bias=0.0),  # geometry + colour jitter
        dataclasses.replace(ALL_ON, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0),  # + stain
    ],
)
def test_shape_dtype_range_and_input_untouched(cfg):
    x = batch()
    x_before = x.clone()
    y = BatchAugment(cfg)(x, gen())
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert torch.equal(x, x_before)  # never modified in place
    assert not torch.equal(y, x)


def test_batch_of_one():
    x = batch(b=1, size=24)
    y = BatchAugment(ALL_ON)(x, gen())
    assert y.shape == (1, 3, 24, 24)
    assert 0.0 <= y.min() and y.max() <= 1.0


def test_identity_when_everything_off():
    x = batch()
    off = AugmentConfig(
        flip=False, rot90=False, rotate_degrees=0.0, crop_scale=(1.0, 1.0),
        brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, hed_sigma=0.0, hed_bias=0.0,
    )
    assert torch.equal(BatchAugment(off)(x, gen()), x)
    # colour ops with p = 0 are off too
    assert torch.equal(BatchAugment(dataclasses.replace(COLOUR_ONLY, p=0.0))(x, gen()), x)


def test_determinism_and_resume():
    x = batch()
    aug = BatchAugment(ALL_ON)
    a = aug(x, gen(1))
    b = aug(x, gen(1))
    c = aug(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)

    g = gen(3)
    aug(x, g)
    state = g.get_state()  # as saved in a checkpoint
    nxt = aug(x, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(aug(x, g2), nxt)
    assert not torch.equal(nxt, aug(x, gen(3)))  # the generator advances between calls


def test_generator_use_does_not_depend_on_config():
    # every config draws the same number of values, so switching colour ops on or off keeps the
    # geometry of a seeded run (and the generator position) unchanged
    x = batch(b=6, size=16).mul_(0.4).add_(0.2)  # brightness stays clear of clipping
    g1, g2 = gen(8), gen(8)
    geo = BatchAugment(AugmentConfig(flip=True, rot90=True))(x, g1)
    both = BatchAugment(AugmentConfig(flip=True, rot90=True, brightness=0.3))(x, g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    ratio = (both / geo).flatten(1)  # one brightness factor per image, same pixel positions
    assert (ratio.max(dim=1).values - ratio.min(dim=1).values < 1e-5).all()


def test_bad_input():
    aug = BatchAugment(ALL_ON)
    with pytest.raises(ValueError, match=r"expected a \(B, 3, H, W\) batch, got shape \(3, 8, 8\)"):
        aug(torch.rand(3, 8, 8), gen())
    with pytest.raises(ValueError, match=r"expected a \(B, 3, H, W\) batch, got shape \(2, 1, 8, 8\)"):
        aug(torch.rand(2, 1, 8, 8), gen())
    with pytest.raises(MitotypeError, match="rot90"):
        aug(torch.rand(2, 3, 8, 12), gen())
    # flips and rotations without rot90 work on non-square patches
    cfg = dataclasses.replace(ALL_ON, rot90=False)
    assert BatchAugment(cfg)(torch.rand(2, 3, 8, 12), gen()).shape == (2, 3, 8, 12)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [16, 33])
def test_flips_and_rot90_are_exact_dihedral_permutations(size):
    x = batch(b=48, size=size)
    y = BatchAugment(AugmentConfig(flip=True, rot90=True))(x, gen(5))
    # only permute pixels: per image and channel the sorted values are identical
    xs = x.flatten(2).sort(dim=2).values
    ys = y.flatten(2).sort(dim=2).values
    assert torch.equal(xs, ys)
    # and each image is exactly one of its 8 dihedral views; over 48 images all 8 occur
    views = torch.stack(dihedral_views(x), dim=1)  # (B, 8, 3, H, W)
    hits = (views == y[:, None]).flatten(2).all(dim=2)  # (B, 8)
    assert hits.any(dim=1).all()
    assert hits.any(dim=0).all()


def test_flip_only_keeps_rows_or_columns():
    x = batch(b=16, size=12)
    y = BatchAugment(AugmentConfig(flip=True, rot90=False))(x, gen(0))
    for i in range(x.shape[0]):
        assert any(torch.equal(y[i], v) for v in (x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1, -2)))


def test_rotation_and_crop_have_no_black_borders():
    # reflection padding: a constant image stays constant under any rotation / crop
    x = torch.full((16, 3, 32, 32), 0.7)
    cfg = AugmentConfig(flip=True, rot90=True, rotate_degrees=45.0, crop_scale=(0.3, 1.0))
    y = BatchAugment(cfg)(x, gen())
    assert torch.allclose(y, x, atol=1e-6)


def test_crop_zooms_in():
    # horizontal ramp 0..1; a crop of a quarter of the area spans half of the ramp
    size = 64
    ramp = torch.linspace(0, 1, size).expand(4, 3, size, size).contiguous()
    cfg = AugmentConfig(flip=False, rot90=False, crop_scale=(0.25, 0.25))
    y = BatchAugment(cfg)(ramp, gen())
    span = y[:, 0, :, -1] - y[:, 0, :, 0]
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.03)
    # rows are unchanged along the ramp direction (no rotation): every row is the same
    assert torch.allclose(y, y[:, :, :1, :].expand_as(y), atol=1e-6)


def test_small_rotation_changes_geometry_moderately():
    x = batch(b=8, size=32)
    y = BatchAugment(AugmentConfig(flip=False, rot90=False, rotate_degrees=10.0))(x, gen())
    assert not torch.allclose(y, x)
    # a small rotation about the centre keeps the overall content
    assert torch.allclose(y.mean(), x.mean(), atol=0.02)


def test_affine_grid_matches_torch():
    theta = torch.randn(4, 2, 3, generator=gen())
    for h, w in ((16, 16), (7, 11)):
        ref = F.affine_grid(theta, [4, 3, h, w], align_corners=False)
        assert torch.allclose(affine_grid(theta, h, w), ref, atol=1e-6)


@pytest.mark.parametrize("size", [16, 33])
def test_geometry_equals_one_plain_grid_sample(size):
    x = batch(b=6, size=size)
    cfg = AugmentConfig(flip=True, rot90=True, rotate_degrees=20.0, crop_scale=(0.5, 0.9))
    aug = BatchAugment(cfg)
    g = gen(9)
    state = g.get_state()
    y = aug(x, g)
    g.set_state(state)
    theta, smooth = aug.geometry_params(aug.draw(6, g), size, size)
    assert smooth and theta.shape == (6, 2, 3)
    grid = F.affine_grid(torch.from_numpy(theta).float(), [6, 3, size, size], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    assert torch.allclose(y, ref, atol=1e-5)


def test_dihedral_views():
    x = torch.rand(2, 3, 9, 9, generator=gen())
    views = dihedral_views(x)
    assert len(views) == 8
    assert views[0] is x or torch.equal(views[0], x)
    for i in range(8):
        assert views[i].shape == x.shape
        assert torch.equal(views[i].flatten(2).sort(dim=2).values, x.flatten(2).sort(dim=2).values)
        for j in range(i):
            assert not torch.equal(views[i], views[j])


# ----------------------------------------------------------------------------- stain


def test_rgb_to_hed_matches_skimage():
    skcolor = pytest.importorskip("skimage.color")
    img = np.random.default_rng(0).random((20, 24, 3))
    ref = skcolor.rgb2hed(img)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    hed = rgb_to_hed(x)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(hed, ref, atol=1e-4)
    back = hed_to_rgb(torch.from_numpy(ref).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, skcolor.hed2rgb(ref), atol=1e-4)


def test_hed_round_trip():
    x = batch(b=2, size=16).clamp_min(1e-3)
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x, clip_negative=False)), x, atol=1e-4)
    he = he_like()
    assert torch.allclose(hed_to_rgb(rgb_to_hed(he)), he, atol=1e-4)


def test_hed_jitter_function():
    x = he_like()
    ones, zeros = torch.ones(4, 3), torch.zeros(4, 3)
    assert torch.allclose(hed_jitter(x, ones, zeros), x, atol=1e-5)
    # more haematoxylin -> darker in every channel of a pixel with some haematoxylin
    more_h = torch.tensor([[1.5, 1.0, 1.0]]).expand(4, 3)
    y = hed_jitter(x, more_h, zeros)
    assert torch.allclose(rgb_to_hed(y)[:, 0], 1.5 * rgb_to_hed(x)[:, 0], atol=1e-3)
    assert (y <= x + 1e-6).all()


def test_batch_hed_jitter_is_tellez_affine_in_hed_space():
    # per image and stain channel: hed' = hed * s + b with s in [1 - sigma, 1 + sigma], |b| <= bias
    sigma, bias = 0.2, 0.01
    hed = 0.02 + torch.rand(6, 3, 16, 16, generator=gen(5)) * torch.tensor([0.08, 0.06, 0.03])[:, None, None]
    x = hed_to_rgb(hed)  # stained everywhere: the jitter neither whitens nor blackens any pixel
    cfg = AugmentConfig(flip=False, rot90=False, hed_sigma=sigma, hed_bias=bias)
    y = BatchAugment(cfg)(x, gen(2))
    assert (y < 1).all() and (y > 0).all()  # no clipping, so the relation is exact
    h_in = rgb_to_hed(x, clip_negative=False).double().flatten(2)  # (6, 3, n)
    h_out = rgb_to_hed(y, clip_negative=False).double().flatten(2)
    design = torch.stack([h_in, torch.ones_like(h_in)], dim=-1)  # (6, 3, n, 2)
    fit = torch.linalg.lstsq(design, h_out.unsqueeze(-1)).solution[..., 0]  # (6, 3, 2)
    resid = design @ fit.unsqueeze(-1) - h_out.unsqueeze(-1)
    assert resid.abs().max() < 1e-4
    s, b = fit[..., 0], fit[..., 1]
    assert ((s - 1).abs() <= sigma + 1e-3).all() and (b.abs() <= bias + 1e-4).all()
    assert (s - 1).abs().max() > sigma / 4  # it did jitter


def test_hed_jitter_changes_colour_not_geometry():
    # a 3-colour label image: with per-pixel colour ops, pixels that had the same colour still
    # share one colour afterwards, i.e. no pixel moved
    g = gen(11)
    labels = torch.randint(0, 3, (6, 1, 20, 20), generator=g)
    palette = torch.tensor([[0.9, 0.6, 0.75], [0.45, 0.25, 0.6], [0.95, 0.93, 0.95]])  # pink, purple, white
    x = palette[labels[:, 0]].permute(0, 3, 1, 2).contiguous()
    cfg = AugmentConfig(flip=False, rot90=False, hed_sigma=0.2, hed_bias=0.02)
    y = BatchAugment(cfg)(x, gen())
    assert (y - x).abs().max() > 0.02  # colour changed
    for i in range(x.shape[0]):
        for k in range(3):
            pix = y[i].permute(1, 2, 0)[labels[i, 0] == k]  # (n, 3)
            assert torch.allclose(pix, pix[:1].expand_as(pix), atol=1e-6)


# ----------------------------------------------------------------------------- colour jitter


def _grey(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("c,bchw->bhw", torch.tensor([0.299, 0.587, 0.114]), x)


def test_brightness_scales_each_image():
    x = batch().mul_(0.5).add_(0.25)  # stay away from clipping
    cfg = AugmentConfig(flip=False, rot90=False, brightness=0.3)
    y = BatchAugment(cfg)(x, gen())
    ratio = y / x
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5)
    assert ((per_image[:, 0] - 1).abs() <= 0.3 + 1e-5).all()


def test_contrast_keeps_mean_grey_and_hue_saturation_keep_luma():
    x = batch().mul_(0.3).add_(0.35)
    cfg = AugmentConfig(flip=False, rot90=False, contrast=0.4)
    y = BatchAugment(cfg)(x, gen())
    assert torch.allclose(_grey(y).mean(dim=(1, 2)), _grey(x).mean(dim=(1, 2)), atol=1e-5)
    assert not torch.allclose(y, x)
    cfg = AugmentConfig(flip=False, rot90=False, saturation=0.5, hue=0.2)
    y = BatchAugment(cfg)(x, gen())
    unclipped = ((y > 0) & (y < 1)).all(dim=1)
    assert unclipped.float().mean() > 0.95
    assert torch.allclose(_grey(y)[unclipped], _grey(x)[unclipped], atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-2)


def test_colour_probability_mask():
    x = batch(b=64, size=8)
    cfg = dataclasses.replace(COLOUR_ONLY, p=0.5)
    y = BatchAugment(cfg)(x, gen())
    same = (y == x).flatten(1).all(dim=1)
    assert 10 < int(same.sum()) < 54  # roughly half untouched, exactly
    assert not torch.allclose(y[~same], x[~same])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = batch(b=8, size=32)
    aug = BatchAugment(ALL_ON)
    y_cpu = aug(x, gen(4))
    y_gpu = aug(x.cuda(), gen(4))
    assert y_gpu.device.type == "cuda"
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-4)
