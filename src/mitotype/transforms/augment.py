"""Batched training-time augmentation on the training device.

Everything here works on a whole ``(B, 3, H, W)`` batch at once: per-sample random parameters are
drawn as ``(B,)`` tensors from an explicit CPU :class:`torch.Generator` (so a run is reproducible
and, with the generator's state in the checkpoint, resumable), then moved to the batch's device.

Pipeline (each stage skipped when switched off):

1. Geometry: random flips, multiples of 90 degrees, a small rotation and a random resized crop are
   composed into one 2x3 affine matrix per sample and applied with a single
   ``affine_grid`` + ``grid_sample`` call (reflection padding, so no black borders). Flips and 90
   degree turns alone use nearest sampling, which makes them exact pixel permutations.
2. Colour, for each sample with probability ``p``: HED stain jitter (Tellez et al. 2018), folded
   into one 3x3 map on ``log(rgb)``; then brightness, contrast, saturation and hue, folded into one
   3x3 affine map on RGB (no clamping between these four). Output is clamped to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from mitotype.errors import MitotypeError
from mitotype.transforms.stain import hed_jitter_matrices

__all__ = ["AugmentConfig", "BatchAugment", "affine_grid", "dihedral_views"]

_F64 = torch.float64
_EPS = 1e-6
_LOG2E = 1.0 / math.log(2.0)
# Luma weights (ITU-R 601), used for the grey image of contrast and saturation.
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=_F64)
# RGB -> YIQ (NTSC). Its first row is _LUMA, so a rotation in the IQ plane (hue) keeps grey level.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=_F64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
# cos / sin of k * 90 degrees, exact.
_COS90 = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=_F64)
_SIN90 = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=_F64)


def _number(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MitotypeError(f"augment.{name} must be a number, got {value!r}")
    value = float(value)
    if not lo <= value <= hi:  # also rejects NaN
        raise MitotypeError(f"augment.{name} must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


@dataclass
class AugmentConfig:
    """What :class:`BatchAugment` does. The defaults are flips and 90 degree turns only."""

    flip: bool = True  # random horizontal + vertical flips
    rot90: bool = True  # random multiples of 90 degrees (needs H == W)
    rotate_degrees: float = 0.0  # extra rotation, uniform in [-d, d], reflection padding
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random resized crop, area fraction; (1, 1) = off
    brightness: float = 0.0  # factor in [1-b, 1+b]
    contrast: float = 0.0  # factor in [1-c, 1+c] around the image's mean grey
    saturation: float = 0.0  # factor in [1-s, 1+s], blend with greyscale
    hue: float = 0.0  # shift in [-h, h] turns (rotation in YIQ space), h <= 0.5
    hed_sigma: float = 0.0  # HED jitter: hed * (1 + U(-sigma, sigma)) ...
    hed_bias: float = 0.0  # ... + U(-bias, bias), per image and stain channel (rgb2hed units)
    p: float = 1.0  # probability that a sample gets the colour / stain part at all

    def __post_init__(self) -> None:
        for name in ("flip", "rot90"):
            if not isinstance(getattr(self, name), bool):
                raise MitotypeError(f"augment.{name} must be true or false, got {getattr(self, name)!r}")
        self.rotate_degrees = _number("rotate_degrees", self.rotate_degrees, 0.0, 180.0)
        for name in ("brightness", "contrast", "saturation"):
            setattr(self, name, _number(name, getattr(self, name), 0.0, 1.0))
        self.hue = _number("hue", self.hue, 0.0, 0.5)
        self.hed_sigma = _number("hed_sigma", self.hed_sigma, 0.0, 1.0)
        self.hed_bias = _number("hed_bias", self.hed_bias, 0.0, 1.0)
        self.p = _number("p", self.p, 0.0, 1.0)
        cs = self.crop_scale
        if isinstance(cs, (str, bytes)) or not hasattr(cs, "__len__") or len(cs) != 2:
            raise MitotypeError(f"augment.crop_scale must be a pair [min, max], got {cs!r}")
        lo = _number("crop_scale", cs[0], 0.0, 1.0)
        hi = _number("crop_scale", cs[1], 0.0, 1.0)
        if not 0.0 < lo <= hi:
            raise MitotypeError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {cs!r}")
        self.crop_scale = (lo, hi)

    @classmethod
    def off(cls) -> AugmentConfig:
        """A config that changes nothing (for evaluation)."""
        return cls(flip=False, rot90=False)

    @property
    def crop_on(self) -> bool:
        return self.crop_scale[0] < 1.0

    @property
    def geometry_on(self) -> bool:
        return self.flip or self.rot90 or self.rotate_degrees > 0 or self.crop_on

    @property
    def stain_on(self) -> bool:
        return self.hed_sigma > 0 or self.hed_bias > 0

    @property
    def jitter_on(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0

    @property
    def colour_on(self) -> bool:
        return self.p > 0 and (self.stain_on or self.jitter_on)

    @property
    def is_identity(self) -> bool:
        return not (self.geometry_on or self.colour_on)


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=g.device, dtype=_F64)


class BatchAugment(torch.nn.Module):
    """Random augmentation of a ``(B, 3, H, W)`` float batch in [0, 1], on the batch's device.

    ``forward(x, generator)`` returns a new tensor of the same shape and dtype, clamped to
    [0, 1]; ``x`` is never modified. With a config that does nothing it returns ``x`` itself.
    All randomness comes from ``generator`` (a CPU :class:`torch.Generator`): the same generator
    state and config give the same output.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else AugmentConfig()
        # Scratch memory for intermediates (never returned), reused between calls on CPU, where a
        # fresh 10 MB tensor costs thousands of page faults. Makes an instance not thread-safe.
        self._workspace: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_workspace"] = {}
        return state

    def _scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """A reusable uninitialised buffer on CPU; ``None`` (allocate normally) elsewhere."""
        if like.device.type != "cpu":
            return None
        n = math.prod(shape)
        buf = self._workspace.get(name)
        if buf is None or buf.dtype != like.dtype or buf.numel() < n:
            buf = torch.empty(n, dtype=like.dtype)
            self._workspace[name] = buf
        return buf[:n].view(shape)

    def extra_repr(self) -> str:
        on = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)}
        return ", ".join(f"{k}={v}" for k, v in on.items())

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"BatchAugment: expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"BatchAugment: expected a floating-point batch, got {x.dtype}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"BatchAugment: generator must be a torch.Generator, got {type(generator).__name__}")
        cfg = self.cfg
        b, c, h, w = x.shape
        if cfg.rot90 and h != w:
            raise MitotypeError(
                f"augment.rot90 needs square patches, got {h}x{w}; set augment.rot90 to false"
            )
        if b == 0 or cfg.is_identity:
            return x
        # Work on (b, 3, h*w) pixel lists: the colour ops are per pixel.
        flat, owned = x.reshape(b, c, h * w), False
        if cfg.geometry_on:
            theta, smooth = self.sample_geometry(b, h, w, generator)
            flat = self._warp(x, theta.to(device=x.device, dtype=x.dtype), smooth)
            owned = True
        if cfg.colour_on:
            flat, owned = self._colour(flat, generator, owned)
        if not owned:  # nothing was changed (no geometry; the colour mask picked no sample)
            return x
        return flat.clamp_(0.0, 1.0).view(b, c, h, w)

    # ----------------------------------------------------------------------------- geometry
    def sample_geometry(self, b: int, h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, bool]:
        """Draw one affine map per sample: ``theta`` ``(b, 2, 3)`` float64 on the generator's device,
        mapping output to input normalised coordinates (``F.affine_grid`` convention,
        ``align_corners=False``), and whether it needs bilinear sampling (else nearest is exact).
        """
        cfg = self.cfg
        dev = g.device
        # a: linear part of the map from output to input normalised coordinates, per sample.
        a = torch.eye(2, dtype=_F64, device=dev).repeat(b, 1, 1)
        if cfg.flip:
            sign = 1.0 - 2.0 * torch.randint(0, 2, (b, 2), generator=g, device=dev).to(_F64)
            a = a * sign[:, None, :]  # diag(sign)
        if cfg.rot90:
            k = torch.randint(0, 4, (b,), generator=g, device=dev)
            a = _rotation(_COS90.to(dev)[k], _SIN90.to(dev)[k], 1.0) @ a
        if cfg.rotate_degrees > 0:
            ang = _uniform(g, (b,), -cfg.rotate_degrees, cfg.rotate_degrees) * (math.pi / 180.0)
            # a rotation in pixel space, seen in normalised coordinates of an h x w image
            a = _rotation(torch.cos(ang), torch.sin(ang), h / w) @ a
        t = torch.zeros(b, 2, dtype=_F64, device=dev)
        if cfg.crop_on:
            side = _uniform(g, (b,), cfg.crop_scale[0], cfg.crop_scale[1]).sqrt_()
            a = a * side[:, None, None]
            # random centre, keeping the (possibly rotated) crop inside the image where it fits
            reach = (1.0 - a.abs().sum(dim=2)).clamp_min_(0.0)  # (b, 2): x, y
            t = (2.0 * _uniform(g, (b, 2), 0.0, 1.0) - 1.0) * reach
        theta = torch.cat([a, t.unsqueeze(2)], dim=2)
        return theta, cfg.rotate_degrees > 0 or cfg.crop_on

    def _warp(self, x: torch.Tensor, theta: torch.Tensor, smooth: bool) -> torch.Tensor:
        """One grid_sample for the whole batch; returns ``(b, 3, h*w)``."""
        b, c, h, w = x.shape
        x = x.contiguous()  # so that the output is contiguous too
        grid = affine_grid(theta, h, w, out=self._scratch("grid", (b, h, 2, w), x))
        out = F.grid_sample(
            x, grid, mode="bilinear" if smooth else "nearest", padding_mode="reflection", align_corners=False
        )
        return out.view(b, c, h * w)

    # ----------------------------------------------------------------------------- colour
    def _colour(self, x: torch.Tensor, g: torch.Generator, owned: bool) -> tuple[torch.Tensor, bool]:
        """Colour / stain part on ``(b, 3, n)`` pixels, for each sample with probability p.

        Returns the new pixels (unclamped) and whether they are a tensor of our own.
        """
        cfg = self.cfg
        b = x.shape[0]
        mask = torch.rand(b, generator=g, device=g.device, dtype=_F64) < cfg.p if cfg.p < 1 else None
        stain = None
        if cfg.stain_on:
            scale = 1.0 + _uniform(g, (b, 3), -cfg.hed_sigma, cfg.hed_sigma)
            bias = _uniform(g, (b, 3), -cfg.hed_bias, cfg.hed_bias)
            stain = (scale, bias)
        jitter = self._draw_jitter(g, b) if cfg.jitter_on else None
        if mask is None or bool(mask.all()):
            return self._apply_colour(x, stain, jitter, owned), True
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x, owned
        stain = None if stain is None else tuple(s[idx] for s in stain)
        jitter = None if jitter is None else tuple(j[idx] for j in jitter)
        idx_dev = idx.to(x.device)
        sub = self._apply_colour(x.index_select(0, idx_dev), stain, jitter, True)
        return (x.index_copy_(0, idx_dev, sub) if owned else x.index_copy(0, idx_dev, sub)), True

    def _draw_jitter(self, g: torch.Generator, b: int) -> tuple[torch.Tensor, ...]:
        """Brightness, contrast, saturation and hue as one affine RGB map per image.

        Returns ``(m, v, coef)`` on the generator's device: the image becomes
        ``m @ rgb + coef * mean_grey * v`` (contrast blends towards the mean grey of the image).
        """
        cfg = self.cfg

        def factor(s: float) -> torch.Tensor:
            if s > 0:
                return _uniform(g, (b,), 1.0 - s, 1.0 + s)
            return torch.ones(b, dtype=_F64, device=g.device)

        bf, cf, sf = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
        dev = g.device
        eye = torch.eye(3, dtype=_F64, device=dev)
        grey = torch.ones(3, 1, dtype=_F64, device=dev) @ _LUMA.to(dev)[None, :]  # rows = luma
        hs = sf[:, None, None] * eye + (1.0 - sf)[:, None, None] * grey  # saturation
        if cfg.hue > 0:
            turn = _uniform(g, (b,), -cfg.hue, cfg.hue) * (2.0 * math.pi)
            c, s = torch.cos(turn), torch.sin(turn)
            rot = eye.repeat(b, 1, 1)
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
            hs = _YIQ_TO_RGB.to(dev) @ rot @ _RGB_TO_YIQ.to(dev) @ hs
        m = (cf * bf)[:, None, None] * hs
        v = hs.sum(dim=2)  # hs @ (1, 1, 1)
        coef = (1.0 - cf) * bf
        return m, v, coef

    def _apply_colour(self, x: torch.Tensor, stain, jitter, owned: bool) -> torch.Tensor:
        """HED jitter, then brightness / contrast / saturation / hue on ``(b, 3, n)`` pixels.

        The HED part is ``exp(A @ log(rgb) + c)``. When the colour jitter follows, the per-channel
        gain ``exp(c)`` is folded into the jitter's matrix, so with both on this is just
        log -> bmm -> exp -> bmm, with no clamping in between (as if the stain step could
        briefly exceed white). The result is not clamped; the caller does that.
        """
        dev, dt = x.device, x.dtype
        flat = x
        spare = None  # a full-size buffer we own and no longer need, reused as output
        gain = None
        if stain is not None:
            a, log_gain = hed_jitter_matrices(*stain)
            a2 = a * _LOG2E  # exp(u) == exp2(u * log2(e)); exp2 is the cheaper kernel on CPU
            z = x.clamp_min_(_EPS) if owned else x.clamp_min(_EPS)
            z.log_()
            if jitter is None:
                log2_rgb = torch.baddbmm(
                    (log_gain * _LOG2E).to(dev, dt), a2.to(dev, dt), z, out=self._scratch("stain", tuple(z.shape), z)
                )
                return torch.exp2(log2_rgb, out=z)
            flat = torch.bmm(a2.to(dev, dt), z, out=self._scratch("stain", tuple(z.shape), z))
            flat.exp2_()  # the stained image is gain * flat
            spare = z
            gain = log_gain.squeeze(2).exp()  # (b, 3), float64, generator's device
        m, v, coef = jitter
        if gain is not None:
            m = m * gain[:, None, :]  # m @ diag(gain)
        m = m.to(dev, dt)
        if self.cfg.contrast > 0:
            means = flat.mean(dim=2)  # (b, 3)
            if gain is not None:
                means = means * gain.to(dev, dt)
            shift = (coef.to(dev, dt) * (means @ _LUMA.to(dev, dt)))[:, None] * v.to(dev, dt)
            return torch.baddbmm(shift[:, :, None], m, flat, out=spare)
        return torch.bmm(m, flat, out=spare)


def affine_grid(theta: torch.Tensor, h: int, w: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)``, several times faster on CPU.

    Built by broadcasting a row term and a column term (inner loop over W) instead of a batched
    matmul of the full base grid; returned as a non-contiguous ``(B, h, w, 2)`` view, which
    ``grid_sample`` accepts. ``out``, if given, is a ``(B, h, 2, w)`` buffer to fill.
    """
    b = theta.shape[0]
    xs = torch.linspace(-1.0 + 1.0 / w, 1.0 - 1.0 / w, w, device=theta.device, dtype=theta.dtype)
    ys = torch.linspace(-1.0 + 1.0 / h, 1.0 - 1.0 / h, h, device=theta.device, dtype=theta.dtype)
    col = theta[:, :, 0, None] * xs  # (B, 2, w)
    row = theta[:, :, 1, None] * ys + theta[:, :, 2, None]  # (B, 2, h)
    if out is None:
        out = torch.empty(b, h, 2, w, device=theta.device, dtype=theta.dtype)
    torch.add(col[:, None, :, :], row.transpose(1, 2)[:, :, :, None], out=out)  # (B, h, 2, w)
    return out.transpose(2, 3)


def _rotation(cos: torch.Tensor, sin: torch.Tensor, aspect: float) -> torch.Tensor:
    """(B, 2, 2) rotations by the given angles in pixel space, expressed in normalised (x, y)
    coordinates of an image with ``aspect = H / W``."""
    r = torch.empty(cos.shape[0], 2, 2, dtype=cos.dtype, device=cos.device)
    r[:, 0, 0] = cos
    r[:, 0, 1] = -sin * aspect
    r[:, 1, 0] = sin / aspect
    r[:, 1, 1] = cos
    return r


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips / rotations of a batch (identity first), for test-time augmentation.

    Order: rotations by 0, 90, 180, 270 degrees, then the same four of the horizontally
    flipped batch. Works on the last two axes; for non-square images the odd rotations come
    back with H and W swapped.
    """
    if x.dim() < 2:
        raise ValueError(f"dihedral_views: expected (..., H, W), got shape {tuple(x.shape)}")
    flipped = x.flip(-1)
    views = [x]
    views += [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    views += [flipped]
    views += [torch.rot90(flipped, k, dims=(-2, -1)) for k in (1, 2, 3)]
    return views
