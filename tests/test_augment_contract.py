"""The contract of mitotype.transforms.augment, value by value (issue 9: its surviving mutants).

tests/test_transforms.py checks properties (shapes, ranges, invariants); these tests pin what a
property leaves open: the exact parameters each draw gives, each colour stage against an
independent float64 reference (Tellez HED jitter via skimage's stain matrix, YIQ hue rotation),
rotations against torchvision, the config's exact bounds and messages, the 8 dihedral views as
literals, and the buffers the CPU path reuses (no aliasing, dtype changes, no warnings).
Forward's draws are set by hand where a case needs a given value (``with_draws``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mitotype.errors import MitotypeError
from mitotype.transforms.augment import N_DRAWS, AugmentConfig, BatchAugment, affine_grid, dihedral_view

OFF = AugmentConfig.off()
LUMA = np.array([0.299, 0.587, 0.114])
# RGB -> YIQ (NTSC, FCC 1953 coefficients); rows: Y, I, Q
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
# skimage.color.rgb_from_hed (Ruifrok & Johnston), and skimage's log scaling of optical densities
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
LOG_ADJUST = math.log(1e-6)
# columns of the (b, 18) draws
FLIP_X, FLIP_Y, ROT90, ANGLE, CROP_AREA, CROP_X, CROP_Y = range(7)
COLOUR_P, BRIGHT, CONTRAST, SAT, HUE = range(7, 12)
HED_SCALE, HED_BIAS = slice(12, 15), slice(15, 18)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(b: int, seed: int = 0, **cols: object) -> np.ndarray:
    """Uniform draws as forward takes them, with some columns set by hand (name=value)."""
    u = BatchAugment.draw(b, gen(seed))
    for name, value in cols.items():
        u[:, globals()[name]] = value
    return u


def with_draws(cfg: AugmentConfig, u: np.ndarray) -> BatchAugment:
    aug = BatchAugment(cfg)
    aug.draw = lambda b, generator: u  # type: ignore[method-assign]  # forward's draws, chosen here
    return aug


def smooth_batch(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Random colours in [0.2, 0.8], blurred a little (so bilinear resampling errors stay small)."""
    x = torch.rand(b, 3, h, w, generator=gen(seed))
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    return x.mul_(0.6).add_(0.2)


def sym(u: np.ndarray, r: float) -> np.ndarray:
    return (2.0 * u - 1.0) * r


def ref_stain(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Tellez et al.: hed' = hed * scale + bias per image and stain, skimage's rgb2hed / hed2rgb
    unclipped. x: (b, 3, n) float64; scale, bias: (b, 3)."""
    od = np.log(np.maximum(x, 1e-6)) / LOG_ADJUST  # (b, 3, n)
    hed = np.einsum("ij,bjn->bin", np.linalg.inv(RGB_FROM_HED).T, od)
    hed = hed * scale[:, :, None] + bias[:, :, None]
    return np.exp(np.einsum("ij,bjn->bin", RGB_FROM_HED.T, hed) * LOG_ADJUST)


def ref_hue(x: np.ndarray, turn: np.ndarray) -> np.ndarray:
    """Rotate the IQ plane of YIQ by ``turn`` (in turns): I' = I cos - Q sin, Q' = I sin + Q cos."""
    yiq = np.einsum("ij,bjn->bin", YIQ, x)
    c, s = np.cos(2 * np.pi * turn)[:, None], np.sin(2 * np.pi * turn)[:, None]
    i, q = yiq[:, 1] * c - yiq[:, 2] * s, yiq[:, 1] * s + yiq[:, 2] * c
    return np.einsum("ij,bjn->bin", np.linalg.inv(YIQ), np.stack([yiq[:, 0], i, q], axis=1))


def ref_colour(x: np.ndarray, u: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """The colour part in float64, stage by stage as AugmentConfig documents it, on (b, 3, n)."""
    if cfg.hed_sigma or cfg.hed_bias:
        x = ref_stain(x, 1 + sym(u[:, HED_SCALE], cfg.hed_sigma), sym(u[:, HED_BIAS], cfg.hed_bias))
    x = x * (1 + sym(u[:, BRIGHT], cfg.brightness))[:, None, None]
    c = (1 + sym(u[:, CONTRAST], cfg.contrast))[:, None, None]
    mean_grey = np.einsum("c,bcn->b", LUMA, x)[:, None, None] / x.shape[2]
    x = c * x + (1 - c) * mean_grey
    s = (1 + sym(u[:, SAT], cfg.saturation))[:, None, None]
    x = s * x + (1 - s) * np.einsum("c,bcn->bn", LUMA, x)[:, None, :]
    if cfg.hue:
        x = ref_hue(x, sym(u[:, HUE], cfg.hue))
    return x


def augment_ref(x: torch.Tensor, u: np.ndarray, cfg: AugmentConfig) -> torch.Tensor:
    """Reference output: one plain torch grid_sample for the geometry, then ref_colour where the
    sample's colour draw is below p, clamped to [0, 1]."""
    b, c, h, w = x.shape
    if cfg.geometry_on:
        theta, smooth = BatchAugment(cfg).geometry_params(u, h, w)
        grid = F.affine_grid(torch.from_numpy(theta).to(x.dtype), [b, c, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear" if smooth else "nearest", padding_mode="reflection", align_corners=False)
    out = x.double().flatten(2).numpy().copy()
    if cfg.colour_on:
        pick = u[:, COLOUR_P] < cfg.p
        out[pick] = ref_colour(out[pick], u[pick], cfg)
    return torch.from_numpy(out).clamp(0, 1).to(x.dtype).view(b, c, h, w)


# ----------------------------------------------------------------------------- config


BOUNDS = {"rotate_degrees": 180.0, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.5,
          "hed_sigma": 1.0, "hed_bias": 1.0, "p": 1.0}


@pytest.mark.parametrize(("name", "hi"), BOUNDS.items())
def test_each_range_accepts_its_bounds_and_refuses_just_outside_naming_the_field(name, hi):
    for ok in (0, hi):
        assert getattr(AugmentConfig(**{name: ok}), name) == ok
    assert isinstance(getattr(AugmentConfig(**{name: 0}), name), float)
    for bad in (hi + 0.001, -0.001, float("nan")):
        with pytest.raises(MitotypeError) as err:
            AugmentConfig(**{name: bad})
        assert str(err.value) == f"augment.{name} must be in [0, {hi:g}], got {bad:g}"
    for bad in ("0.2", True, None):
        with pytest.raises(MitotypeError) as err:
            AugmentConfig(**{name: bad})
        assert str(err.value) == f"augment.{name} must be a number, got {bad!r}"


def test_flip_rot90_and_crop_scale_checks_say_exactly_what_is_wrong():
    cases = {
        ("flip", "yes"): "augment.flip must be true or false, got 'yes'",
        ("rot90", 1): "augment.rot90 must be true or false, got 1",
        ("crop_scale", (0.5, 0.8, 1.0)): "augment.crop_scale must be a pair [min, max], got (0.5, 0.8, 1.0)",
        ("crop_scale", 0.5): "augment.crop_scale must be a pair [min, max], got 0.5",
        ("crop_scale", "ab"): "augment.crop_scale must be a pair [min, max], got 'ab'",
        ("crop_scale", (1.5, 1.0)): "augment.crop_scale must be in [0, 1], got 1.5",
        ("crop_scale", (0.5, 1.5)): "augment.crop_scale must be in [0, 1], got 1.5",
        ("crop_scale", ("a", 1.0)): "augment.crop_scale must be a number, got 'a'",
        ("crop_scale", (0.5, "b")): "augment.crop_scale must be a number, got 'b'",
        ("crop_scale", (0.9, 0.5)): "augment.crop_scale must satisfy 0 < min <= max <= 1, got (0.9, 0.5)",
        ("crop_scale", (0.0, 1.0)): "augment.crop_scale must satisfy 0 < min <= max <= 1, got (0.0, 1.0)",
    }
    for (name, value), message in cases.items():
        with pytest.raises(MitotypeError) as err:
            AugmentConfig(**{name: value})
        assert str(err.value) == message
    assert AugmentConfig(crop_scale=(0.5, 0.5)).crop_scale == (0.5, 0.5)
    assert AugmentConfig(crop_scale=[1, 1]).crop_scale == (1.0, 1.0)  # type: ignore[arg-type]


def test_batch_augment_defaults_to_flips_and_rot90_and_repr_lists_the_config():
    assert BatchAugment().cfg == AugmentConfig() == AugmentConfig(flip=True, rot90=True)
    cfg = AugmentConfig(rotate_degrees=15, crop_scale=(0.5, 1), hue=0.1, p=0.5)
    assert BatchAugment(cfg).extra_repr() == (
        "flip=True, rot90=True, rotate_degrees=15.0, crop_scale=(0.5, 1.0), brightness=0.0, contrast=0.0, "
        "saturation=0.0, hue=0.1, hed_sigma=0.0, hed_bias=0.0, p=0.5, jpeg_p=0.0, jpeg_quality=(70, 95), "
        "stain_mix_p=0.0, stain_mix_max=1.0"
    )


def test_pickled_and_deep_copied_augment_drops_its_workspace_and_gives_the_same_output():
    cfg = AugmentConfig(rotate_degrees=10, brightness=0.2, hed_sigma=0.1)
    aug, x = BatchAugment(cfg), smooth_batch(4, 16, 16)
    first = aug(x, gen(5))
    assert aug._workspace  # the CPU path keeps scratch buffers
    for twin in (pickle.loads(pickle.dumps(aug)), copy.deepcopy(aug)):
        assert twin._workspace == {} and twin.cfg == cfg
        assert torch.equal(twin(x, gen(5)), first)
    assert aug._workspace  # the original keeps its own


# ----------------------------------------------------------------------------- draws and geometry


def test_draw_is_float64_torch_rand_from_the_generator():
    g, ref = gen(3), gen(3)
    u = BatchAugment.draw(5, g)
    assert u.dtype == np.float64 and u.shape == (5, N_DRAWS)
    np.testing.assert_array_equal(u, torch.rand(5, N_DRAWS, generator=ref, dtype=torch.float64).numpy())
    assert torch.equal(g.get_state(), ref.get_state())


def test_flips_use_exactly_the_draws_below_one_half():
    aug = BatchAugment(AugmentConfig(flip=True, rot90=False))
    u = draws(4, FLIP_X=[0.2, 0.5, 0.7, 0.0], FLIP_Y=[0.5, 0.2, 0.0, 0.7])
    theta, smooth = aug.geometry_params(u, 8, 8)
    sx, sy = [-1, 1, 1, -1], [1, -1, -1, 1]
    expected = np.array([[[a, 0, 0], [0, b, 0]] for a, b in zip(sx, sy)], dtype=float)
    np.testing.assert_array_equal(theta, expected)
    assert smooth is False
    x = torch.rand(4, 3, 6, 6, generator=gen())
    y = with_draws(aug.cfg, u)(x, gen())
    assert torch.equal(y[0], x[0].flip(-1)) and torch.equal(y[1], x[1].flip(-2)) and torch.equal(y[3], x[3].flip(-1))


@pytest.mark.parametrize(("u_rot", "k"), [(0.0, 0), (0.2499, 0), (0.25, 1), (0.5, 2), (0.6, 2), (0.75, 3), (0.9999, 3), (1.0, 3)])
def test_rot90_turns_by_the_quarter_its_draw_falls_in(u_rot, k):
    # counterclockwise as torch.rot90 on (H, W); u = 1.0 (outside rand's [0, 1)) is clipped to 3
    x = torch.rand(1, 3, 7, 7, generator=gen())
    y = with_draws(AugmentConfig(flip=False, rot90=True), draws(1, ROT90=u_rot))(x, gen())
    assert torch.equal(y, torch.rot90(x, k, dims=(-2, -1)))


@pytest.mark.parametrize(("h", "w", "degrees", "u", "angle"), [(32, 32, 40.0, 0.875, 30.0), (24, 40, 40.0, 0.875, 30.0),
                                                               (24, 40, 40.0, 0.0, -40.0), (32, 32, 1.0, 0.875, 0.75)])
def test_rotation_matches_torchvision_rotate_inside_the_image(h, w, degrees, u, angle):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = smooth_batch(2, h, w)
    aug = with_draws(AugmentConfig(flip=False, rot90=False, rotate_degrees=degrees), draws(2, ANGLE=u))
    y = aug(x, gen())
    ref = tvf.rotate(x, angle, interpolation=tvf.InterpolationMode.BILINEAR)  # counterclockwise, about the centre
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    inside = (yy**2 + xx**2).sqrt() < min(h, w) / 2 - 2  # torchvision fills black outside, we reflect
    assert (y - ref)[..., inside].abs().max() < 1e-5
    assert (y - x)[..., inside].abs().max() > 0.01  # it did rotate


def test_rotation_and_crop_parameters_are_exact():
    # rotation by a in pixel space, in normalised coordinates of an h x w image: D^-1 R D, D = diag(w, h) / 2
    h, w, d = 24, 40, 1.0
    aug = BatchAugment(AugmentConfig(flip=False, rot90=False, rotate_degrees=d))
    theta, smooth = aug.geometry_params(draws(2, ANGLE=[0.75, 0.0]), h, w)
    for i, a in enumerate(np.deg2rad([0.5, -1.0])):
        c, s = np.cos(a), np.sin(a)
        np.testing.assert_allclose(theta[i], [[c, -s * h / w, 0], [s * w / h, c, 0]], rtol=0, atol=1e-15)
    assert smooth is True
    assert BatchAugment(AugmentConfig(flip=False, rot90=False, rotate_degrees=0.5)).geometry_params(draws(1), 8, 8)[1]

    # crop: area fraction lo + (hi - lo) u, centre moved by (2u - 1) times the room left on each side
    aug = BatchAugment(AugmentConfig(flip=False, rot90=False, crop_scale=(0.25, 1.0)))
    theta, smooth = aug.geometry_params(draws(2, CROP_AREA=[0.5, 0.0], CROP_X=[0.75, 0.5], CROP_Y=[0.25, 0.0]), 16, 16)
    s0, s1 = math.sqrt(0.625), 0.5
    np.testing.assert_allclose(theta[0], [[s0, 0, 0.5 * (1 - s0)], [0, s0, -0.5 * (1 - s0)]], atol=1e-15)
    np.testing.assert_allclose(theta[1], [[s1, 0, 0], [0, s1, -(1 - s1)]], atol=1e-15)
    assert smooth is True

    # a rotated crop that cannot fit in the image stays centred (no negative room)
    aug = BatchAugment(AugmentConfig(flip=False, rot90=False, rotate_degrees=45, crop_scale=(0.81, 0.81)))
    theta, _ = aug.geometry_params(draws(3, ANGLE=1.0, CROP_X=[0.0, 0.3, 0.9], CROP_Y=[0.9, 0.0, 0.6]), 16, 16)
    c = 0.9 * math.cos(math.pi / 4)
    np.testing.assert_allclose(theta, np.tile([[c, -c, 0], [c, c, 0]], (3, 1, 1)), atol=1e-15)


def test_drawn_parameters_cover_their_configured_ranges():
    u = BatchAugment.draw(4000, gen(21))
    geo = BatchAugment(AugmentConfig(flip=False, rot90=False, rotate_degrees=20, crop_scale=(0.3, 0.8)))
    theta, _ = geo.geometry_params(u, 16, 16)
    area = np.abs(np.linalg.det(theta[:, :, :2]))  # the crop's area fraction
    angle = np.rad2deg(np.arctan2(theta[:, 1, 0], theta[:, 0, 0]))
    col = BatchAugment(AugmentConfig(brightness=0.3)).colour_params(u)
    bf = col["m"][:, 0, 0]
    con = BatchAugment(AugmentConfig(contrast=0.4)).colour_params(u)
    cf = 1 - con["coef"]
    for values, lo, hi in ((area, 0.3, 0.8), (angle, -20, 20), (bf, 0.7, 1.3), (cf, 0.6, 1.4)):
        assert lo - 1e-12 <= values.min() < lo + 0.01 * (hi - lo)
        assert hi - 0.01 * (hi - lo) < values.max() <= hi + 1e-12


# ----------------------------------------------------------------------------- colour


JITTER = {
    "brightness": AugmentConfig(flip=False, rot90=False, brightness=0.4),
    "contrast": AugmentConfig(flip=False, rot90=False, contrast=0.5),
    "saturation": AugmentConfig(flip=False, rot90=False, saturation=0.6),
    "hue": AugmentConfig(flip=False, rot90=False, hue=0.3),
    "brightness+contrast": AugmentConfig(flip=False, rot90=False, brightness=0.4, contrast=0.5),
    "stain": AugmentConfig(flip=False, rot90=False, hed_sigma=0.3, hed_bias=0.05),
    "stain+contrast": AugmentConfig(flip=False, rot90=False, contrast=0.5, hed_sigma=0.3, hed_bias=0.05),
    "stain+all jitter": AugmentConfig(flip=False, rot90=False, brightness=0.2, contrast=0.3, saturation=0.3,
                                      hue=0.1, hed_sigma=0.2, hed_bias=0.05),
    "geometry+jitter": AugmentConfig(rotate_degrees=20, crop_scale=(0.5, 1), brightness=0.2, contrast=0.3,
                                     saturation=0.3, hue=0.1),
    "all on": AugmentConfig(rotate_degrees=20, crop_scale=(0.5, 1), brightness=0.2, contrast=0.3, saturation=0.3,
                            hue=0.1, hed_sigma=0.2, hed_bias=0.05),
    "all on, p=0.5": AugmentConfig(rotate_degrees=20, crop_scale=(0.5, 1), brightness=0.2, contrast=0.3,
                                   saturation=0.3, hue=0.1, hed_sigma=0.2, hed_bias=0.05, p=0.5),
}


@pytest.mark.parametrize("name", JITTER)
def test_colour_stages_match_the_float64_reference(name):
    cfg = JITTER[name]
    x = smooth_batch(8, 12, 12)
    y = BatchAugment(cfg)(x, gen(4))
    ref = augment_ref(x, BatchAugment.draw(8, gen(4)), cfg)
    assert (y - ref).abs().max() < 2e-5
    assert (y - x).abs().max() > 0.05


def test_hue_turns_against_closed_forms():
    # half a turn maps (I, Q) to (-I, -Q): rgb' = 2 luma(rgb) - rgb, grey level kept
    x = torch.tensor([[0.8, 0.3, 0.5], [0.4, 0.6, 0.45]]).view(2, 3, 1, 1)
    y = with_draws(AugmentConfig(flip=False, rot90=False, hue=0.5), draws(2, HUE=0.0))(x, gen())
    luma = torch.einsum("c,bchw->bhw", torch.tensor(LUMA, dtype=torch.float32), x)[:, None]
    assert torch.allclose(y, 2 * luma - x, atol=1e-6)
    # a quarter turn: (I, Q) -> (-Q, I)
    y = with_draws(AugmentConfig(flip=False, rot90=False, hue=0.5), draws(2, HUE=0.75))(x, gen())
    yiq = np.einsum("ij,bj->bi", YIQ, x.double().flatten(1).numpy())
    turned = np.einsum("ij,bj->bi", np.linalg.inv(YIQ), np.stack([yiq[:, 0], -yiq[:, 2], yiq[:, 1]], axis=1))
    np.testing.assert_allclose(y.flatten(1).numpy(), turned.clip(0, 1), atol=1e-6)  # the output is clamped


def test_brightness_alone_multiplies_exactly():
    x = smooth_batch(3, 8, 8)
    u = draws(3, BRIGHT=[0.0, 0.25, 0.9])
    y = with_draws(AugmentConfig(flip=False, rot90=False, brightness=0.5), u)(x, gen())
    factors = torch.tensor([0.5, 0.75, 1.4], dtype=torch.float32).view(3, 1, 1, 1)
    assert torch.equal(y, (x * factors).clamp(0, 1))


@pytest.mark.parametrize("geometry", [False, True])
@pytest.mark.parametrize("picked", [[], [2], [0, 2, 3], [0, 1, 2, 3, 4]])
def test_colour_reaches_exactly_the_samples_drawn_below_p(picked, geometry):
    cfg = dataclasses.replace(JITTER["stain+all jitter"], p=0.5, rotate_degrees=15.0 if geometry else 0.0)
    x = smooth_batch(5, 10, 10)
    u = draws(5, seed=2, COLOUR_P=[0.1 if i in picked else 0.9 for i in range(5)])
    y = with_draws(cfg, u)(x, gen())
    assert (y - augment_ref(x, u, cfg)).abs().max() < 2e-5
    geometry_only = augment_ref(x, u, dataclasses.replace(cfg, p=0.0))
    for i in range(5):
        assert (i in picked) != bool(torch.allclose(y[i], geometry_only[i], atol=1e-6))
    if not picked and not geometry:
        assert y is x  # nothing to do: the input itself, no copy


# ----------------------------------------------------------------------------- buffers and dtypes


@pytest.mark.parametrize("name", ["geometry+jitter", "all on", "brightness+contrast", "stain", "all on, p=0.5"])
def test_an_output_is_not_overwritten_by_the_next_call(name):
    aug = BatchAugment(JITTER[name])
    y = aug(smooth_batch(4, 16, 16, seed=1), gen(1))
    kept = y.clone()
    aug(smooth_batch(4, 16, 16, seed=2), gen(2))
    assert torch.equal(y, kept)


def test_one_instance_serves_float32_and_float64_batches():
    cfg = JITTER["all on"]
    x = smooth_batch(4, 16, 16)
    shared = BatchAugment(cfg)
    for dtype in (torch.float64, torch.float32, torch.float64):
        y = shared(x.to(dtype), gen(3))
        assert y.dtype == dtype
        assert torch.equal(y, BatchAugment(cfg)(x.to(dtype), gen(3)))
        assert (y - augment_ref(x.to(dtype), BatchAugment.draw(4, gen(3)), cfg)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_batches_follow_the_float32_result(dtype):
    cfg = AugmentConfig(rotate_degrees=20, crop_scale=(0.5, 1), brightness=0.2)
    x = smooth_batch(4, 16, 16)
    y = BatchAugment(cfg)(x.to(dtype), gen(6))
    assert y.dtype == dtype
    assert (y.float() - BatchAugment(cfg)(x, gen(6))).abs().max() < 0.02


def test_affine_grid_in_float64_matches_torch_to_rounding():
    theta = torch.randn(3, 2, 3, generator=gen(), dtype=torch.float64)
    for h, w in ((5, 9), (16, 16)):
        ref = F.affine_grid(theta, [3, 1, h, w], align_corners=False)
        got = affine_grid(theta, h, w)
        assert got.dtype == torch.float64 and got.shape == (3, h, w, 2)
        assert (got - ref).abs().max() < 1e-12


def test_augment_and_affine_grid_emit_no_warnings():
    # a warning per training batch would flood the log; torch warns on align_corners left to its
    # default and on resizing a wrongly shaped out= tensor (deprecated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        affine_grid(torch.randn(4, 2, 3, generator=gen()), 7, 5)
        for dtype in (torch.float32, torch.bfloat16):
            BatchAugment(JITTER["all on"])(smooth_batch(3, 8, 8).to(dtype), gen())


# ----------------------------------------------------------------------------- dihedral views

# the docstring's views of [[1, 2, 3], [4, 5, 6]]: k % 4 counterclockwise quarter turns, of the
# horizontally flipped image when k >= 4
VIEWS = [
    [[1, 2, 3], [4, 5, 6]],
    [[3, 6], [2, 5], [1, 4]],
    [[6, 5, 4], [3, 2, 1]],
    [[4, 1], [5, 2], [6, 3]],
    [[3, 2, 1], [6, 5, 4]],
    [[1, 4], [2, 5], [3, 6]],
    [[4, 5, 6], [1, 2, 3]],
    [[6, 3], [5, 2], [4, 1]],
]


def test_dihedral_views_are_the_eight_literal_views_on_any_leading_shape():
    img = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for k, view in enumerate(VIEWS):
        assert torch.equal(dihedral_view(img, k), torch.tensor(view))  # a bare (H, W) image
        batch = torch.stack([img, 10 * img])[:, None].expand(2, 3, 2, 3)  # (B, C, H, W)
        expected = torch.stack([torch.tensor(view), 10 * torch.tensor(view)])[:, None].expand(2, 3, *np.shape(view))
        assert torch.equal(dihedral_view(batch, k), expected)
        assert torch.equal(dihedral_view(img[None], k), torch.tensor(view)[None])  # (C, H, W)


def test_dihedral_view_refuses_a_vector_and_k_outside_0_to_7():
    with pytest.raises(ValueError) as err:
        dihedral_view(torch.zeros(5), 0)
    assert str(err.value) == "dihedral_view: expected (..., H, W), got shape (5,)"
    for k in (-1, 8):
        with pytest.raises(ValueError) as err:
            dihedral_view(torch.zeros(2, 2), k)
        assert str(err.value) == f"dihedral_view: k must be 0..7, got {k}"
