"""Colour deconvolution of H&E images into haematoxylin / eosin / DAB optical densities.

The stain matrix is Ruifrok & Johnston's, exactly as in :mod:`skimage.color` (``rgb_from_hed``
and its inverse ``hed_from_rgb``), and so is the scaling: :func:`rgb_to_hed` matches
``skimage.color.rgb2hed`` and :func:`hed_to_rgb` matches ``skimage.color.hed2rgb``, but work on
batched ``(..., 3, H, W)`` tensors on any device.

In that convention a pixel's stain vector is ``log(max(rgb, 1e-6)) / log(1e-6) @ hed_from_rgb``,
i.e. optical density divided by ``-log(1e-6)`` (so values are small, typically 0..0.3 for H&E).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "HED_FROM_RGB",
    "LOG_ADJUST",
    "RGB_FROM_HED",
    "hed_jitter",
    "hed_jitter_matrices",
    "hed_to_rgb",
    "rgb_to_hed",
]

#: Rows are the RGB absorption vectors of haematoxylin, eosin and DAB (skimage ``rgb_from_hed``).
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
#: Inverse of :data:`RGB_FROM_HED` (skimage ``hed_from_rgb``).
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
#: ``log(1e-6)``: skimage's scaling of optical densities (negative).
LOG_ADJUST = math.log(1e-6)
_EPS = 1e-6


@functools.lru_cache(maxsize=16)
def _matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_hed, to_log_rgb) as left-multiplying matrices on the channel axis."""
    to_hed = (HED_FROM_RGB.T / LOG_ADJUST).to(device=device, dtype=dtype)
    to_log_rgb = (RGB_FROM_HED.T * LOG_ADJUST).to(device=device, dtype=dtype)
    return to_hed, to_log_rgb


def _check(x: torch.Tensor, name: str) -> None:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"{name}: expected a (..., 3, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def rgb_to_hed(x: torch.Tensor, *, clip_negative: bool = True) -> torch.Tensor:
    """RGB in [0, 1] ``(..., 3, H, W)`` -> H, E, DAB stain densities (same shape).

    Matches ``skimage.color.rgb2hed`` (which clips negative stain values to 0). Pass
    ``clip_negative=False`` to keep them, which makes :func:`hed_to_rgb` an exact inverse.
    """
    _check(x, "rgb_to_hed")
    to_hed, _ = _matrices(x.device, x.dtype)
    hed = torch.einsum("ij,...jhw->...ihw", to_hed, x.clamp_min(_EPS).log())
    if clip_negative:
        hed.clamp_min_(0.0)
    return hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (as ``skimage.color.hed2rgb``), clamped to [0, 1]."""
    _check(hed, "hed_to_rgb")
    _, to_log_rgb = _matrices(hed.device, hed.dtype)
    rgb = torch.einsum("ij,...jhw->...ihw", to_log_rgb, hed).exp_()
    return rgb.clamp_(0.0, 1.0)


def hed_jitter_matrices(scale: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image HED jitter folded into one affine map on ``log(rgb)``.

    ``hed' = hed * scale + bias`` (``scale``, ``bias``: ``(B, 3)``, H/E/D order, in the units of
    :func:`rgb_to_hed`) is, without clipping negative stain values,
    ``log(rgb') = A @ log(rgb) + c`` with ``A = R^T diag(scale) H^T`` and ``c = log(1e-6) R^T bias``.
    Returns ``A`` ``(B, 3, 3)`` and ``c`` ``(B, 3, 1)``, in float64 on ``scale``'s device.
    """
    h = HED_FROM_RGB.to(scale.device)
    r = RGB_FROM_HED.to(scale.device)
    scale = scale.to(torch.float64)
    bias = bias.to(device=scale.device, dtype=torch.float64)
    a = torch.einsum("ki,bk,jk->bij", r, scale, h)  # R^T diag(s) H^T
    c = LOG_ADJUST * (bias @ r)  # (B,3): row b is R^T bias_b
    return a, c.unsqueeze(-1)


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Tellez et al. (2018) stain jitter with given per-image parameters.

    ``x``: ``(B, 3, H, W)`` RGB in [0, 1]; ``scale``, ``bias``: ``(B, 3)``. Each image's stain
    densities become ``hed * scale + bias``; returns RGB clamped to [0, 1]. With ``scale = 1``
    and ``bias = 0`` this returns ``x`` up to float rounding (negative densities are kept).
    """
    _check(x, "hed_jitter")
    if x.dim() != 4:
        raise ValueError(f"hed_jitter: expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    b = x.shape[0]
    if scale.shape != (b, 3) or bias.shape != (b, 3):
        raise ValueError(
            f"hed_jitter: scale and bias must have shape ({b}, 3), got "
            f"{tuple(scale.shape)} and {tuple(bias.shape)}"
        )
    a, c = hed_jitter_matrices(scale, bias)
    a = a.to(device=x.device, dtype=x.dtype)
    c = c.to(device=x.device, dtype=x.dtype)
    z = x.clamp_min(_EPS).log_().flatten(2)
    out = torch.baddbmm(c, a, z).exp_().clamp_(0.0, 1.0)
    return out.view_as(x)
