"""Unsupervised stain augmentation (UnSA, after MitDet, arXiv 2307.05889): stains swapped between images.

Each image's own haematoxylin and eosin vectors are estimated without labels (Macenko et al.,
ISBI 2009: the plane of the two largest optical-density directions of the tissue pixels, and the
extreme angles in it), the image is split into stain concentrations and a residual, and it is put
back together with stain vectors moved toward another image's of the batch. The figures keep their
shape and density; only the colour the scanner and lab gave them changes, which a held-out scanner
changes too. Batched on the device: one 3 x 3 eigen-decomposition and two quantiles per image.
"""

from __future__ import annotations

import torch

MIN_OD = 0.15  # a pixel is tissue when its summed optical density reaches this (Macenko's beta)
ANGLE_PERCENTILE = 0.01  # robust extremes of the stain angles (Macenko's alpha, 1%)
MIN_PIXELS = 32  # fewer tissue pixels: the image keeps its colours


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, N) optical density of RGB values in [0, 1] (8-bit floor: 1/255)."""
    return -torch.log(x.clamp(min=1.0 / 255.0))


def macenko_stains(od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of ``od`` (B, 3, N): unit stain vectors (B, 3, 2), haematoxylin first, and whether
    the image had enough tissue for the estimate (B,)."""
    mask = od.sum(dim=1) >= MIN_OD  # (B, N)
    ok = mask.sum(dim=1) >= MIN_PIXELS
    w = mask.to(od.dtype).unsqueeze(1)
    cov = (od * w) @ od.transpose(1, 2) / w.sum(dim=2, keepdim=True).clamp(min=1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    plane = vecs[:, :, 1:].flip(-1)  # (B, 3, 2): the two largest directions
    plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)  # point into positive OD
    proj = plane.transpose(1, 2) @ od  # (B, 2, N)
    phi = torch.atan2(proj[:, 1], proj[:, 0]).masked_fill(~mask, float("nan"))
    lo = torch.nanquantile(phi, ANGLE_PERCENTILE, dim=1)
    hi = torch.nanquantile(phi, 1 - ANGLE_PERCENTILE, dim=1)
    stains = torch.stack([_direction(plane, lo), _direction(plane, hi)], dim=2)  # (B, 3, 2)
    h_first = stains[:, 0, 0] >= stains[:, 0, 1]  # haematoxylin absorbs red more than eosin does
    stains = torch.where(h_first[:, None, None], stains, stains.flip(-1))
    return torch.nan_to_num(stains), ok


def _direction(plane: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    v = plane[:, :, 0] * torch.cos(angle)[:, None] + plane[:, :, 1] * torch.sin(angle)[:, None]
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-6)


def stain_mix(x: torch.Tensor, partner: torch.Tensor, amount: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``x`` (B, 3, H, W) in [0, 1] with each chosen image's stain vectors moved ``amount`` (B,) of the
    way to those of image ``partner[i]``; concentrations and the unexplained residual are kept."""
    b, c, h, w = x.shape
    od = optical_density(x.reshape(b, c, h * w))
    stains, ok = macenko_stains(od)
    conc = torch.linalg.pinv(stains) @ od  # (B, 2, N)
    residual = od - stains @ conc
    a = amount.to(x.dtype)[:, None, None]
    target = stains * (1 - a) + stains[partner] * a
    target = target / target.norm(dim=1, keepdim=True).clamp(min=1e-6)
    apply = (chosen & ok & ok[partner])[:, None, None]
    new_od = torch.where(apply, target @ conc + residual, od)
    return torch.exp(-new_od).clamp(0.0, 1.0).view(b, c, h, w)
