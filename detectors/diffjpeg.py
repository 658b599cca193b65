"""A differentiable JPEG codec (encode + decode in one pass), after Shin & Song (2017)
as used by the OSN paper: RGB -> YCbCr, 4:2:0 chroma subsampling, 8x8 DCT, division by
the quality-scaled quantisation tables, rounding, and back.

The forward pass follows libjpeg (what PIL calls): the same Annex K base tables scaled
by ``jpeg_set_quality`` (5000 // q below 50, else 200 - 2q, in integer arithmetic; tables
clamped to [1, 255]), full-range BT.601 YCbCr, box-averaged chroma and triangle ("fancy")
up-sampling, which is bilinear with half-pixel centres. Rounding is
``round(x) + (x - round(x))**3``: the value of a hard rounding, a non-zero gradient
almost everywhere, so the codec can sit inside a network that is trained through it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), row-major.
LUMA_TABLE = [
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
CHROMA_TABLE = [
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
]  # fmt: skip

RGB_TO_YCBCR = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
YCBCR_TO_RGB = [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]


def differentiable_round(x: Tensor) -> Tensor:
    r = torch.round(x)
    return r + (x - r) ** 3


def quality_scale(quality: Tensor) -> Tensor:
    """libjpeg's percentage scaling of the base tables (``jpeg_quality_scaling``), in its
    integer arithmetic: the quality rounded to an integer in [1, 100], then ``5000 // q``
    below 50 (integer division: 5000 / 30 is 166, not 166.7) and ``200 - 2q`` from 50 up."""
    q = quality.float().round().clamp(1, 100)
    return torch.where(q < 50, torch.div(5000.0, q, rounding_mode="floor"), 200.0 - 2.0 * q)


def dct_matrix(n: int = 8) -> Tensor:
    """Orthonormal DCT-II matrix: row u is c(u) cos((2x + 1) u pi / 2n)."""
    x = torch.arange(n, dtype=torch.float64)
    u = x[:, None]
    m = torch.cos((2 * x[None, :] + 1) * u * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


def _blocks(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)


def _unblocks(x: Tensor) -> Tensor:
    b, c, hb, wb, _, _ = x.shape
    return x.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hb * 8, wb * 8)


class DiffJPEG(nn.Module):
    """``forward(image, quality)``: image Bx3xHxW in [0, 1] (any H, W: edges are padded
    by replication to a multiple of 16 and cropped back), quality a number or a (B,)
    tensor of per-image qualities. Returns the decoded image in [0, 1]."""

    def __init__(self, differentiable: bool = True, subsample_chroma: bool = True, round_output: bool = True) -> None:
        super().__init__()
        self.differentiable = differentiable
        self.subsample_chroma = subsample_chroma
        self.round_output = round_output
        # Non-persistent: constants of the codec, not weights of a model.
        self.register_buffer("luma_table", torch.tensor(LUMA_TABLE, dtype=torch.float32).view(8, 8), persistent=False)
        self.register_buffer("chroma_table", torch.tensor(CHROMA_TABLE, dtype=torch.float32).view(8, 8), persistent=False)
        self.register_buffer("dct", dct_matrix(8), persistent=False)
        self.register_buffer("to_ycbcr", torch.tensor(RGB_TO_YCBCR, dtype=torch.float32), persistent=False)
        self.register_buffer("to_rgb", torch.tensor(YCBCR_TO_RGB, dtype=torch.float32), persistent=False)

    def _round(self, x: Tensor) -> Tensor:
        return differentiable_round(x) if self.differentiable else torch.round(x)

    def tables(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        """Integer quantisation tables, (B, 8, 8) each, row-major, exactly as libjpeg builds
        them (``(base * scale + 50) // 100`` clamped to [1, 255]: what PIL writes;
        ``tests/test_fidelity_b.py`` compares every quality 10-100 with PIL's tables)."""
        scale = quality_scale(quality).view(-1, 1, 1)
        luma = torch.floor((self.luma_table * scale + 50.0) / 100.0).clamp(1, 255)
        chroma = torch.floor((self.chroma_table * scale + 50.0) / 100.0).clamp(1, 255)
        return luma, chroma

    def _quantise(self, plane: Tensor, table: Tensor) -> Tensor:
        """8x8 DCT, quantise with ``table`` (B,8,8), dequantise, inverse DCT."""
        blocks = _blocks(plane - 128.0)
        coef = self.dct @ blocks @ self.dct.T
        t = table[:, None, None, None]
        coef = self._round(coef / t) * t
        return _unblocks(self.dct.T @ coef @ self.dct) + 128.0

    def forward(self, image: Tensor, quality: float | Tensor) -> Tensor:
        # float32 throughout: under fp16 autocast, rounding DCT coefficients of magnitude
        # ~1000 would be rounding noise
        with torch.autocast(device_type=image.device.type, enabled=False):
            return self._codec(image, quality)

    def _codec(self, image: Tensor, quality: float | Tensor) -> Tensor:
        b, _, h, w = image.shape
        quality = torch.as_tensor(quality, device=image.device, dtype=torch.float32).reshape(-1).expand(b)
        ph, pw = (-h) % 16, (-w) % 16
        x = F.pad(image.float(), (0, pw, 0, ph), mode="replicate") if ph or pw else image.float()
        ycc = torch.einsum("ij,bjhw->bihw", self.to_ycbcr, x * 255.0)
        y, cbcr = ycc[:, :1], ycc[:, 1:] + 128.0
        luma_t, chroma_t = self.tables(quality)
        y = self._quantise(y, luma_t)
        if self.subsample_chroma:
            small = self._quantise(F.avg_pool2d(cbcr, 2), chroma_t)
            cbcr = F.interpolate(small, scale_factor=2.0, mode="bilinear", align_corners=False)
        else:
            cbcr = self._quantise(cbcr, chroma_t)
        rgb = torch.einsum("ij,bjhw->bihw", self.to_rgb, torch.cat([y, cbcr - 128.0], dim=1))
        rgb = rgb.clamp(0.0, 255.0)
        if self.round_output:  # a decoder hands out 8-bit pixels
            rgb = self._round(rgb)
        return (rgb / 255.0)[:, :, :h, :w].to(image.dtype)
