"""JPEG re-compression in the batch augmentation (augment.jpeg_p, augment.jpeg_quality)."""

from __future__ import annotations

import pytest
import torch

from mitotype.config import AugmentConfig
from mitotype.errors import MitotypeError
from mitotype.transforms import augment as aug
from mitotype.transforms.augment import BatchAugment, jpeg_round_trip


def _x(b: int = 6) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_each_chosen_sample_is_what_a_jpeg_round_trip_at_its_quality_gives() -> None:
    x = _x()
    y = BatchAugment(AugmentConfig(flip=False, rot90=False, jpeg_p=1.0, jpeg_quality=(40, 40)))(x, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        u8 = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        want = torch.from_numpy(jpeg_round_trip(u8, 40)).permute(2, 0, 1).float() / 255
        assert torch.equal(y[i], want)
    assert (y - x).abs().mean() > 0.01


def test_qualities_are_drawn_in_the_range_and_only_chosen_samples_change(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = aug.jpeg_round_trip
    monkeypatch.setattr(aug, "jpeg_round_trip", lambda rgb, quality: (seen.append(quality), real(rgb, quality))[1])
    x = _x(64)
    y = BatchAugment(AugmentConfig(flip=False, rot90=False, jpeg_p=0.5, jpeg_quality=(60, 62)))(x, torch.Generator().manual_seed(3))
    changed = [i for i in range(len(x)) if not torch.equal(y[i], x[i])]
    assert 15 < len(seen) == len(changed) < 50  # about half the samples, each encoded once
    assert set(seen) == {60, 61, 62}


def test_configs_without_it_keep_their_random_stream() -> None:
    base = dict(rotate_degrees=10.0, brightness=0.1, hed_sigma=0.05)
    off = BatchAugment(AugmentConfig(**base))(_x(), torch.Generator().manual_seed(7))
    almost = BatchAugment(AugmentConfig(**base, jpeg_p=1e-12))(_x(), torch.Generator().manual_seed(7))
    assert torch.equal(off, almost)  # the same geometry and colours: JPEG draws come after them


@pytest.mark.parametrize("kwargs, message", [
    (dict(jpeg_p=1.5), "augment.jpeg_p must be in [0, 1], got 1.5"),
    (dict(jpeg_quality=(0, 50)), "augment.jpeg_quality must be in [1, 100], got 0"),
    (dict(jpeg_quality=(90, 80)), "augment.jpeg_quality must be whole numbers 1 <= min <= max <= 100, got (90, 80)"),
    (dict(jpeg_quality=(70.5, 80)), "augment.jpeg_quality must be whole numbers"),
    (dict(jpeg_quality=75), "augment.jpeg_quality must be a pair [min, max], got 75"),
])
def test_bad_jpeg_settings_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(MitotypeError) as err:
        AugmentConfig(**kwargs)
    assert str(err.value).startswith(message)
