"""Batched training-time augmentation on the training device.

Everything here works on a whole ``(B, 3, H, W)`` batch at once. Per-sample random parameters are
drawn in one ``(B, 18)`` uniform tensor from an explicit CPU :class:`torch.Generator` (so a run is
reproducible and, with the generator's state in the checkpoint, resumable; the same number of
draws whatever the config), turned into a few per-sample matrices on the CPU, and moved to the
batch's device in one transfer.

Pipeline (each stage skipped when switched off):

1. Geometry: random flips, multiples of 90 degrees, a small rotation and a random resized crop are
   composed into one 2x3 affine matrix per sample and applied with a single
   ``affine_grid`` + ``grid_sample`` call (reflection padding, so no black borders). Flips and 90
   degree turns alone use nearest sampling, which makes them exact pixel permutations.
2. Colour, for each sample with probability ``p``: HED stain jitter (Tellez et al. 2018), one
   3x3 map on ``log(rgb)``; then brightness, contrast, saturation and hue, one 3x3 affine map on
   RGB. No clamping between these steps; the output is clamped to [0, 1].

Cost for a (64, 3, 128, 128) float32 batch on the 2-core development VM (best / typical): flips and
90 degree turns 5 / 7 ms; everything on 17 / 20-25 ms, of which the geometry stage (11-15 ms) costs
the same as one bare bilinear ``F.grid_sample`` call, and the stain jitter's log / exp most of the
rest. On a GPU all of it is negligible.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F

from mitotype.config import AugmentConfig, _number  # noqa: F401 (AugmentConfig: re-exported)
from mitotype.errors import MitotypeError
from mitotype.transforms.stain import hed_jitter_matrices
from mitotype.transforms.stain_mix import stain_mix

__all__ = ["POINT_TARGET", "AugmentConfig", "BatchAugment", "affine_grid", "augment_with_targets", "dihedral_views", "move_points"]

_EPS = 1e-6
_LOG2E = 1.0 / math.log(2.0)
# Luma weights (ITU-R 601), used for the grey image of contrast and saturation.
_LUMA = np.array([0.299, 0.587, 0.114])
# RGB -> YIQ (NTSC). Its first row is _LUMA, so a rotation in the IQ plane (hue) keeps grey level.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# cos / sin of k * 90 degrees, exact.
_COS90 = np.array([1.0, 0.0, -1.0, 0.0])
_SIN90 = np.array([0.0, 1.0, 0.0, -1.0])

# Columns of the per-sample uniform draws.
_FLIP_X, _FLIP_Y, _ROT90, _ANGLE, _CROP_AREA, _CROP_X, _CROP_Y = range(7)
_COLOUR_P, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(7, 12)
_HED_SCALE = slice(12, 15)
_HED_BIAS = slice(15, 18)
N_DRAWS = 18
POINT_TARGET = "points"  # a target of pixel positions (B, K, 2) that moves with the image (a heat-map detector's figures)


def _sym(u: np.ndarray, r: float) -> np.ndarray:
    """Map uniforms in [0, 1) to [-r, r)."""
    return (2.0 * u - 1.0) * r


class BatchAugment(torch.nn.Module):
    """Random augmentation of a ``(B, 3, H, W)`` float batch in [0, 1], on the batch's device.

    ``forward(x, generator)`` returns a new tensor of the same shape and dtype, clamped to
    [0, 1]; ``x`` is never modified. With a config that does nothing it returns ``x`` itself.
    All randomness comes from ``generator`` (a CPU :class:`torch.Generator`; each call draws
    ``B * N_DRAWS`` uniforms from it): the same generator state and config give the same output.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else AugmentConfig()
        # Scratch memory for intermediates (never returned), reused between calls on CPU, where
        # fresh pages for a 10 MB tensor cost milliseconds. Makes an instance not thread-safe.
        self._workspace: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_workspace"] = {}
        return state

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.cfg, f.name)}" for f in fields(self.cfg))

    # ----------------------------------------------------------------------------- parameters
    @staticmethod
    def draw(b: int, generator: torch.Generator) -> np.ndarray:
        """The ``(b, N_DRAWS)`` uniforms in [0, 1) that one call uses, as float64 numpy."""
        u = torch.rand(b, N_DRAWS, generator=generator, device=generator.device, dtype=torch.float64)
        return u.cpu().numpy()

    def geometry_params(self, u: np.ndarray, h: int, w: int) -> tuple[np.ndarray, bool]:
        """One affine map per sample from the draws ``u``: ``theta`` ``(b, 2, 3)`` mapping output to
        input normalised coordinates (``F.affine_grid`` convention, ``align_corners=False``), and
        whether it needs bilinear sampling (else nearest sampling is exact).
        """
        cfg = self.cfg
        b = u.shape[0]
        a = np.tile(np.eye(2), (b, 1, 1))  # linear part, output -> input
        if cfg.flip:
            a[:, :, 0] *= np.where(u[:, _FLIP_X] < 0.5, -1.0, 1.0)[:, None]  # a @ diag(sx, sy)
            a[:, :, 1] *= np.where(u[:, _FLIP_Y] < 0.5, -1.0, 1.0)[:, None]
        if cfg.rot90:
            k = np.minimum((u[:, _ROT90] * 4).astype(np.int64), 3)
            a = _rotation(_COS90[k], _SIN90[k], 1.0) @ a
        if cfg.rotate_degrees > 0:
            ang = np.deg2rad(_sym(u[:, _ANGLE], cfg.rotate_degrees))
            # a rotation in pixel space, seen in normalised coordinates of an h x w image
            a = _rotation(np.cos(ang), np.sin(ang), h / w) @ a
        t = np.zeros((b, 2))
        if cfg.crop_on:
            lo, hi = cfg.crop_scale
            a *= np.sqrt(lo + (hi - lo) * u[:, _CROP_AREA])[:, None, None]
            # random centre, keeping the (possibly rotated) crop inside the image where it fits
            reach = np.clip(1.0 - np.abs(a).sum(axis=2), 0.0, None)  # (b, 2): x, y
            t = _sym(u[:, _CROP_X:_CROP_Y + 1], 1.0) * reach
        theta = np.concatenate([a, t[:, :, None]], axis=2)
        return theta, cfg.rotate_degrees > 0 or cfg.crop_on

    def colour_params(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """Per-sample colour maps from the draws ``u`` (float64 numpy, leading dim b).

        ``stain_a`` ``(b, 3, 3)`` and ``stain_c`` ``(b, 3)``: HED jitter as
        ``log(rgb') = stain_a @ log(rgb) + stain_c``. ``m`` ``(b, 3, 3)``, ``v`` ``(b, 3)``,
        ``coef`` ``(b,)``: brightness, contrast, saturation and hue as
        ``rgb' = m @ rgb + coef * mean_grey(rgb) * v``. Keys are absent when the part is off.
        """
        cfg = self.cfg
        b = u.shape[0]
        out: dict[str, np.ndarray] = {}
        if cfg.stain_on:
            scale = 1.0 + _sym(u[:, _HED_SCALE], cfg.hed_sigma)
            bias = _sym(u[:, _HED_BIAS], cfg.hed_bias)
            a, c = hed_jitter_matrices(torch.from_numpy(scale), torch.from_numpy(bias))
            out["stain_a"], out["stain_c"] = a.numpy(), c[:, :, 0].numpy()
        if cfg.jitter_on:
            ones = np.ones(b)
            bf = 1.0 + _sym(u[:, _BRIGHTNESS], cfg.brightness) if cfg.brightness > 0 else ones
            cf = 1.0 + _sym(u[:, _CONTRAST], cfg.contrast) if cfg.contrast > 0 else ones
            sf = 1.0 + _sym(u[:, _SATURATION], cfg.saturation) if cfg.saturation > 0 else ones
            grey = np.outer(np.ones(3), _LUMA)  # every row is the luma weights
            hs = sf[:, None, None] * np.eye(3) + (1.0 - sf)[:, None, None] * grey  # saturation
            if cfg.hue > 0:
                turn = _sym(u[:, _HUE], cfg.hue) * (2.0 * math.pi)
                rot = np.tile(np.eye(3), (b, 1, 1))
                rot[:, 1, 1] = rot[:, 2, 2] = np.cos(turn)
                rot[:, 2, 1] = np.sin(turn)
                rot[:, 1, 2] = -rot[:, 2, 1]
                hs = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ @ hs
            # brightness b, then contrast c around the (brightened) mean grey, then hs:
            # hs @ (c * b * rgb + (1 - c) * b * mean_grey(rgb) * 1)
            out["m"] = (cf * bf)[:, None, None] * hs
            out["v"] = hs.sum(axis=2)
            out["coef"] = (1.0 - cf) * bf
        return out

    # ----------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.with_points(x, generator)[0]

    @torch.no_grad()
    def with_points(self, x: torch.Tensor, generator: torch.Generator, points: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`, and ``points`` ((B, K, 2) x, y in pixels of ``x``, pixel centres at whole
        numbers; NaN rows are padding) moved by the same geometry, so a point target stays on its
        figure through flips, turns, rotations and crops. The random stream is the same as forward's."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"BatchAugment: expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"BatchAugment: expected a floating-point batch, got {x.dtype}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"BatchAugment: generator must be a torch.Generator, got {type(generator).__name__}")
        cfg = self.cfg
        b, c, h, w = x.shape
        if cfg.rot90 and h != w:
            raise MitotypeError(f"augment.rot90 needs square patches, got {h}x{w}; set augment.rot90 to false")
        if b == 0 or cfg.is_identity:
            return x, points
        u = self.draw(b, generator)
        # Work on (b, 3, h*w) pixel lists: the colour ops are per pixel.
        flat, owned = x.reshape(b, c, h * w), False
        if cfg.geometry_on:
            theta, smooth = self.geometry_params(u, h, w)
            flat, owned = self._warp(x, _to(x, theta)[0], smooth), True
            points = None if points is None else move_points(points, theta, h, w)
        if cfg.colour_on:
            flat, owned = self._colour(flat, u, owned)
        out = flat.clamp_(0.0, 1.0).view(b, c, h, w) if owned else x  # not owned: nothing changed so far
        out = self._jpeg(out, generator) if cfg.jpeg_on else out
        return (self._stain_mix(out, generator) if cfg.stain_mix_on else out), points

    def _stain_mix(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """UnSA (:mod:`mitotype.transforms.stain_mix`): each chosen image's stains move toward a
        random other image's; drawn last, so configs without it keep their random stream."""
        b = x.shape[0]
        chosen = torch.rand(b, generator=generator) < self.cfg.stain_mix_p
        amount = torch.rand(b, generator=generator) * self.cfg.stain_mix_max
        partner = torch.randperm(b, generator=generator)
        if not chosen.any() or b < 2:
            return x
        dev = x.device
        return stain_mix(x, partner.to(dev), amount.to(dev), chosen.to(dev))

    def _jpeg(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """JPEG re-compression of the chosen samples at their drawn quality, through uint8 like a real
        slide tile; drawn after the other parts, so configs without it keep their random stream."""
        lo, hi = self.cfg.jpeg_quality
        chosen = torch.rand(x.shape[0], generator=generator) < self.cfg.jpeg_p
        quality = lo + (torch.rand(x.shape[0], generator=generator) * (hi - lo + 1)).long().clamp_(max=hi - lo)
        if not chosen.any():
            return x
        out = x.clone()
        for i in torch.flatten(torch.nonzero(chosen)).tolist():
            u8 = (x[i].detach().cpu() * 255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
            out[i] = torch.from_numpy(jpeg_round_trip(u8, int(quality[i]))).permute(2, 0, 1).to(x.device, x.dtype) / 255
        return out

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

    def _warp(self, x: torch.Tensor, theta: torch.Tensor, smooth: bool) -> torch.Tensor:
        """One grid_sample for the whole batch; returns ``(b, 3, h*w)``."""
        b, c, h, w = x.shape
        x = x.contiguous()  # so that the output is contiguous too
        if x.dtype in (torch.float32, torch.float64):
            grid = affine_grid(theta, h, w, out=self._scratch("grid", (b, h, w), _complex(x)))
        else:  # half precision: plain torch
            grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        mode = "bilinear" if smooth else "nearest"
        out = F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)
        return out.view(b, c, h * w)

    def _colour(self, x: torch.Tensor, u: np.ndarray, owned: bool) -> tuple[torch.Tensor, bool]:
        """Colour / stain part on ``(b, 3, n)`` pixels, for each sample with probability p.

        Returns the new pixels (unclamped) and whether they are a tensor of our own.
        """
        b = x.shape[0]
        if self.cfg.p >= 1:
            return self._apply_colour(x, self.colour_params(u), owned), True
        idx = np.flatnonzero(u[:, _COLOUR_P] < self.cfg.p)
        if idx.size == 0:
            return x, owned
        if idx.size == b:
            return self._apply_colour(x, self.colour_params(u), owned), True
        idx_dev = torch.from_numpy(idx).to(x.device)
        sub = self._apply_colour(x.index_select(0, idx_dev), self.colour_params(u[idx]), True)
        return (x.index_copy_(0, idx_dev, sub) if owned else x.index_copy(0, idx_dev, sub)), True

    def _apply_colour(self, x: torch.Tensor, par: dict[str, np.ndarray], owned: bool) -> torch.Tensor:
        """HED jitter, then brightness / contrast / saturation / hue on ``(b, 3, n)`` pixels.

        The HED part is ``exp(A @ log(rgb) + c)`` (as exp2 of scaled terms: the cheaper kernel).
        When the colour jitter follows, the per-channel gain ``exp(c)`` is folded into its matrix,
        so with both on this is log -> bmm -> exp2 -> bmm, with no clamping in between (as if the
        stain step could briefly exceed white). The result is not clamped; the caller does that.
        """
        stain, jitter = "stain_a" in par, "m" in par
        if stain:
            z = x.clamp_min_(_EPS) if owned else x.clamp_min(_EPS)
            z.log_()
            scratch = self._scratch("stain", tuple(z.shape), z)
            if not jitter:
                a2, c2 = _to(x, par["stain_a"] * _LOG2E, par["stain_c"][:, :, None] * _LOG2E)
                return torch.exp2(torch.baddbmm(c2, a2, z, out=scratch), out=z)
            gain = np.exp(par["stain_c"])  # (b, 3)
            mean_gain = gain * _LUMA  # mean grey of gain * img is img.mean @ (gain * luma)
            a2, m, v, coef, mean_w = _to(
                x, par["stain_a"] * _LOG2E, par["m"] * gain[:, None, :], par["v"], par["coef"], mean_gain
            )
            flat = torch.bmm(a2, z, out=scratch).exp2_()  # the stained image is gain * flat
            spare: torch.Tensor | None = z  # a full-size buffer of ours, free again: the output goes there
        else:
            m, v, coef, mean_w = _to(x, par["m"], par["v"], par["coef"], np.broadcast_to(_LUMA, (x.shape[0], 3)))
            # bmm cannot work in place; on CPU go through scratch rather than a fresh tensor
            flat, spare = x, self._scratch("stain", tuple(x.shape), x) if owned else None
        if self.cfg.contrast > 0:
            mean_grey = (flat.mean(dim=2) * mean_w).sum(dim=1)  # (b,)
            shift = (coef * mean_grey)[:, None, None] * v[:, :, None]
            out = torch.baddbmm(shift, m, flat, out=spare)
        else:
            out = torch.bmm(m, flat, out=spare)
        return x.copy_(out) if not stain and spare is not None else out


def augment_with_targets(augment: BatchAugment, generator: torch.Generator, x: torch.Tensor, *,
                         targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training step's transform: ``x`` augmented, and a :data:`POINT_TARGET` in ``targets``
    replaced by its points moved with the image (class targets need nothing)."""
    x, moved = augment.with_points(x, generator, targets.get(POINT_TARGET))
    if moved is not None:
        targets[POINT_TARGET] = moved
    return x


def move_points(points: torch.Tensor, theta: np.ndarray, h: int, w: int) -> torch.Tensor:
    """Pixel positions (B, K, 2) of an image carried to where ``theta`` (output -> input, normalised,
    ``align_corners=False``) puts them in the output: the inverse map, ``A^-1 (p - t)``."""
    size = np.array([w, h], dtype=np.float64)
    p = (2.0 * points.detach().cpu().double().numpy() + 1.0) / size - 1.0  # (B, K, 2) normalised
    inverse = np.linalg.inv(theta[:, :, :2])
    moved = np.einsum("bij,bkj->bki", inverse, p - theta[:, None, :, 2])
    return torch.from_numpy(((moved + 1.0) * size - 1.0) / 2.0).to(points.device, points.dtype)


def _complex(like: torch.Tensor) -> torch.Tensor:
    """A 0-element complex tensor matching ``like``'s precision and device (for _scratch)."""
    dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
    return torch.empty(0, dtype=dtype, device=like.device)


def _to(like: torch.Tensor, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Move float64 numpy arrays (same leading dim) to ``like``'s device and dtype in one copy."""
    b = arrays[0].shape[0]
    packed = np.concatenate([np.reshape(a, (b, -1)) for a in arrays], axis=1)
    t = torch.from_numpy(packed).to(device=like.device, dtype=like.dtype)
    out, i = [], 0
    for a in arrays:
        n = math.prod(a.shape[1:])
        out.append(t[:, i : i + n].reshape(a.shape))
        i += n
    return out


def affine_grid(theta: torch.Tensor, h: int, w: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)``, several times faster on CPU.

    Each (x, y) grid point is built as one complex number, the sum of a column term and a row
    term, so the broadcast add runs with a long contiguous inner loop, and the result viewed as
    real is the contiguous ``(B, h, w, 2)`` grid. ``theta``: float32 or float64. ``out``, if
    given, is a complex buffer of shape ``(B, h, w)`` (complex64 for float32 ``theta``) to fill.
    """
    b = theta.shape[0]
    xs = torch.linspace(-1.0 + 1.0 / w, 1.0 - 1.0 / w, w, device=theta.device, dtype=theta.dtype)
    ys = torch.linspace(-1.0 + 1.0 / h, 1.0 - 1.0 / h, h, device=theta.device, dtype=theta.dtype)
    col = torch.complex(theta[:, 0, 0, None] * xs, theta[:, 1, 0, None] * xs)  # (B, w)
    row = torch.complex(
        theta[:, 0, 1, None] * ys + theta[:, 0, 2, None], theta[:, 1, 1, None] * ys + theta[:, 1, 2, None]
    )  # (B, h)
    if out is None:
        out = torch.empty(b, h, w, device=theta.device, dtype=col.dtype)
    torch.add(col[:, None, :], row[:, :, None], out=out)
    return torch.view_as_real(out)


def _rotation(cos: np.ndarray, sin: np.ndarray, aspect: float) -> np.ndarray:
    """(B, 2, 2) rotations by the given angles in pixel space, expressed in normalised (x, y)
    coordinates of an image with ``aspect = H / W``."""
    r = np.empty((cos.shape[0], 2, 2))
    r[:, 0, 0] = cos
    r[:, 0, 1] = -sin * aspect
    r[:, 1, 0] = sin / aspect
    r[:, 1, 1] = cos
    return r


def dihedral_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0..7) of the 8 flips / rotations of a batch: rotation by ``k % 4`` x 90 degrees,
    of the horizontally flipped batch when ``k >= 4``. Works on the last two axes; for non-square
    images the odd rotations come back with H and W swapped."""
    if x.dim() < 2:
        raise ValueError(f"dihedral_view: expected (..., H, W), got shape {tuple(x.shape)}")
    if not 0 <= k < 8:
        raise ValueError(f"dihedral_view: k must be 0..7, got {k}")
    base = x.flip(-1) if k >= 4 else x
    return torch.rot90(base, k % 4, dims=(-2, -1)) if k % 4 else base


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips / rotations of a batch (identity first), for test-time augmentation."""
    return [dihedral_view(x, k) for k in range(8)]


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """An (H, W, 3) uint8 image encoded as JPEG at ``quality`` (Pillow's defaults: 4:2:0 chroma) and decoded."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
