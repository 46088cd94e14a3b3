"""Small layers the literature's recipes add to a timm backbone: channel attention, spatial
self-attention and a shared neck before the heads.

Each block keeps the shape of what it is given, so it can sit on any CNN feature map (or, for the
neck, any pooled feature vector) without knowing the architecture around it.
"""

from __future__ import annotations

from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from mitotype.errors import MitotypeError


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): reweight the channels of a ``(B, C, H, W)`` map.

    A mitotic figure fills a few positions of the final feature map; global average pooling dilutes
    it with the background. SE learns, from the pooled map, which channels matter for this patch and
    scales them before pooling, a cheap form of attention (2 C^2 / r parameters).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"SqueezeExcite: channels ({channels}) and reduction ({reduction}) must be >= 1")
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018), the recipes' "SE1D" self-attention.

    Every position of a ``(B, C, H, W)`` map attends to every other: ``z = x + W(softmax(theta(x)^T
    phi(x) / sqrt(d)) g(x))``, with 1x1 convolutions theta, phi, g to ``d = C / 2`` channels. A
    convolution sees a neighbourhood; whether a figure is atypical (a lagging chromosome, a tripolar
    spindle) depends on parts of it far apart, which attention relates in one layer. The 1/sqrt(d)
    temperature (as in the Transformer) keeps the softmax from saturating at large C.

    ``W`` starts at zero, so the block starts as the identity and a pretrained backbone's features
    pass through unchanged until the attention has learnt something worth adding.
    """

    def __init__(self, channels: int, inter_channels: int | None = None):
        super().__init__()
        inter = inter_channels or max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(channels, inter, kernel_size=1)
        self.g = nn.Conv2d(channels, inter, kernel_size=1)
        self.out = nn.Conv2d(inter, channels, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        assert self.out.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (conv(x).flatten(2).transpose(1, 2) for conv in (self.theta, self.phi, self.g))  # (B, HW, d)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return x + self.out(y.transpose(1, 2).reshape(b, -1, h, w))


class Neck(nn.Sequential):
    """A shared layer between the pooled features and the heads: Linear -> ReLU (the model's
    dropout follows). Several heads (one per expert, one for hardness) then read one learnt
    representation of the patch instead of each fitting the raw backbone features."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features), nn.ReLU(inplace=True))
        self.out_features = out_features


@overload
def positive_int_option(options: dict[str, Any], name: str, default: int) -> int: ...
@overload
def positive_int_option(options: dict[str, Any], name: str, default: None) -> int | None: ...
def positive_int_option(options: dict[str, Any], name: str, default: int | None) -> int | None:
    """``model.options[name]`` as an int >= 1 (``default`` when absent); one-line error otherwise.
    None (absent or null) is returned only for an option without a default."""
    value = options.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MitotypeError(f"config model.options.{name}: {value!r} must be an integer >= 1")
    return value


def build_neck(options: dict[str, Any], in_features: int) -> Neck | None:
    """The neck ``model.options.neck_dim`` asks for (None without it: heads read the pooled features)."""
    dim = positive_int_option(options, "neck_dim", None)
    return Neck(in_features, dim) if dim else None
