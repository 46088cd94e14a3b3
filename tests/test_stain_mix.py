"""UnSA: unsupervised stain estimation finds the stains an image was painted with, and mixing moves
an image's colours to its partner's stains while its structure (the concentrations) stays."""

from __future__ import annotations

import torch

from mitotype.config import AugmentConfig
from mitotype.transforms.augment import BatchAugment
from mitotype.transforms.stain_mix import macenko_stains, optical_density, stain_mix

H1, E1 = torch.tensor([0.65, 0.70, 0.29]), torch.tensor([0.07, 0.99, 0.11])
H2, E2 = torch.tensor([0.45, 0.85, 0.28]), torch.tensor([0.20, 0.90, 0.38])


def painted(h: torch.Tensor, e: torch.Tensor, seed: int, n: int = 32) -> torch.Tensor:
    """(3, n, n) RGB: random haematoxylin and eosin amounts painted with stains h, e (unit vectors)."""
    g = torch.Generator().manual_seed(seed)
    conc = torch.rand(2, n * n, generator=g) * torch.tensor([[1.2], [0.8]])
    stains = torch.stack([h / h.norm(), e / e.norm()], dim=1)
    return torch.exp(-(stains @ conc)).view(3, n, n)


def test_macenko_finds_the_painting_stains_haematoxylin_first() -> None:
    x = torch.stack([painted(H1, E1, 0), painted(H2, E2, 1)])
    stains, ok = macenko_stains(optical_density(x.reshape(2, 3, -1)))
    assert ok.all()
    for i, (h, e) in enumerate(((H1, E1), (H2, E2))):
        assert torch.dot(stains[i, :, 0], h / h.norm()) > 0.99 and torch.dot(stains[i, :, 1], e / e.norm()) > 0.99


def test_swapping_gives_the_partners_colours_and_keeps_the_structure() -> None:
    a, b = painted(H1, E1, 0), painted(H2, E2, 1)
    x = torch.stack([a, b])
    out = stain_mix(x, torch.tensor([1, 0]), torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert torch.equal(out[1], b)  # not chosen: untouched
    want = painted(H2, E2, 0)  # image a's concentrations painted with b's stains
    assert (out[0] - want).abs().max() < 0.03 and (out[0] - a).abs().max() > 0.1


def test_blank_images_keep_their_colours_and_the_option_is_drawn_last() -> None:
    blank = torch.ones(2, 3, 16, 16)
    out = stain_mix(blank, torch.tensor([1, 0]), torch.ones(2), torch.ones(2, dtype=torch.bool))
    assert torch.equal(out, blank)
    x = torch.stack([painted(H1, E1, 0), painted(H2, E2, 1)] * 2)
    base = AugmentConfig(flip=True, rot90=False, hue=0.02)
    mixed = AugmentConfig(flip=True, rot90=False, hue=0.02, stain_mix_p=1.0)
    y0 = BatchAugment(base)(x.clone(), torch.Generator().manual_seed(3))
    y1 = BatchAugment(mixed)(x.clone(), torch.Generator().manual_seed(3))
    assert not torch.allclose(y0, y1)
    g = torch.Generator().manual_seed(3)
    BatchAugment(mixed)(x.clone(), g)
    g0 = torch.Generator().manual_seed(3)
    BatchAugment(base)(x.clone(), g0)
    assert torch.rand(1, generator=g) != torch.rand(1, generator=g0)  # it drew its own numbers after the others
