"""Canonicalisation: bring every image to the same geometry and the same encoding.

Real-world face sets leak their class through the file (PNG reals vs JPEG fakes, JPEG
quality tables, grayscale-only sources, resolution by source). Canonicalising every image
the same way, whatever its class, takes those shortcuts away:

1. a common resize policy (short side to ``size``, area filter down / bilinear up),
2. a crop to ``size x size`` (random, after a small random rescale, in training, so old
   8x8 JPEG grids do not stay aligned; centred in evaluation); in training every image is
   JPEG re-encoded once before that rescale too, so that every image, whatever its class,
   carries a moved old block grid,
3. a JPEG re-encode of *every* image with PIL (random quality in training, fixed in
   evaluation), so the container and its quantisation tables say nothing about the label,
4. optional grayscale on both classes (training only).

Detectors that read pixel-level traces need training and evaluation to treat an image alike
(``configs/canonical/npr.yaml``): ``resize_size`` resizes to one size and crops another
(the NPR paper's resize 256, crop 224), ``crop_align=2`` keeps every crop offset even, so a
2x up-sampler's 2x2 pixel grid keeps its phase in training (random crop) and evaluation
(centre crop) alike; with no scale jitter, no extra re-encode before the crop and one fixed
JPEG quality in both, an up-sampling trace reaches training exactly as it reaches evaluation.
The defaults (``resize_size=null``, ``crop_align=1``) are the steps above, unchanged.
"""
from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError

RESIZE_POLICIES = ("short_side", "square", "none")


def scale_affine(sx: float, sy: float) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def translate_affine(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _check_output(w: int, h: int, new_w: int, new_h: int) -> None:
    """A resize never makes more pixels than ``decode_image`` accepts in a file. Decoding
    already refuses extreme aspect ratios; this also covers arrays from elsewhere (hooks,
    video frames), which a short-side resize would blow up by their aspect ratio."""
    if new_w * new_h > DEFAULT_MAX_PIXELS:
        raise ImageDecodeError(
            f"resizing {w}x{h} to {new_w}x{new_h} would make {new_w * new_h / 1e6:.0f} MP, "
            f"above the {DEFAULT_MAX_PIXELS / 1e6:.0f} MP limit"
        )


def resize_image_affine(arr: np.ndarray, size: int, policy: str = "short_side") -> tuple[np.ndarray, np.ndarray]:
    """``resize_image`` and the 3x3 map of its geometry (continuous coordinates: the image
    spans [0, W] x [0, H]), so landmarks and masks can follow the pixels. Raises
    ``ImageDecodeError`` when the output would exceed ``DEFAULT_MAX_PIXELS``."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    h, w = arr.shape[:2]
    if policy == "none":
        return arr, np.eye(3)
    if policy == "square":
        new_w, new_h = size, size
    else:
        scale = size / min(h, w)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) == (w, h):
        return arr, np.eye(3)
    _check_output(w, h, new_w, new_h)
    # Pinned filters: area when shrinking (no aliasing), bilinear when enlarging.
    interp = cv2.INTER_AREA if new_w * new_h < w * h else cv2.INTER_LINEAR
    return cv2.resize(arr, (new_w, new_h), interpolation=interp), scale_affine(new_w / w, new_h / h)


def resize_image(arr: np.ndarray, size: int, policy: str = "short_side") -> np.ndarray:
    """Deterministic resize (cacheable). ``short_side``: keep aspect, short side = size."""
    return resize_image_affine(arr, size, policy)[0]


def _pil_roundtrip(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _torchvision_roundtrip(arr: np.ndarray, quality: int) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    chw = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
    decoded = decode_jpeg(encode_jpeg(chw, quality=int(quality)), mode=ImageReadMode.RGB).numpy()
    # HxWx3 and contiguous, as PIL gives it (cv2 steps after this want contiguous arrays); by
    # numpy: a torch copy may wake intra-op threads, slow on a loaded machine (workers=0)
    return np.ascontiguousarray(decoded.transpose(1, 2, 0))


_ROUNDTRIP = None  # the implementation this process uses, chosen on first use


def _roundtrip_impl():
    """torchvision's libjpeg(-turbo) calls when they give PIL's bytes-for-bytes pixels on a
    probe (they do with the pinned builds: same library, same defaults, 4:2:0, islow DCT), at
    about half PIL's cost per 128 px image; PIL otherwise. ``tests/test_fast_default.py``
    compares the two on every quality."""
    global _ROUNDTRIP
    if _ROUNDTRIP is None:
        _ROUNDTRIP = _pil_roundtrip
        try:
            probe = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
            probe[8:16] = 128  # flat and noisy blocks
            if all(np.array_equal(_torchvision_roundtrip(probe, q), _pil_roundtrip(probe, q)) for q in (50, 92)):
                _ROUNDTRIP = _torchvision_roundtrip
        except Exception:  # noqa: BLE001 (no usable torchvision: PIL does it)
            pass
    return _ROUNDTRIP


def jpeg_roundtrip(arr: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode at ``quality`` with PIL's settings (4:2:0, the PIL default); the
    pixels are PIL's exactly (see ``_roundtrip_impl``)."""
    return _roundtrip_impl()(arr, quality)


def _crop(arr: np.ndarray, size: int, random_position: bool, align: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` crop, random or centred; ``align`` > 1: offsets are multiples of it."""
    h, w = arr.shape[:2]
    affine = np.eye(3)
    if h < size or w < size:  # only after policy "none" on a small image
        new_w, new_h = max(w, size), max(h, size)
        _check_output(w, h, new_w, new_h)
        arr = cv2.resize(arr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        affine = scale_affine(new_w / w, new_h / h)
        h, w = arr.shape[:2]
    if align > 1:
        if random_position:
            top, left = random.randint(0, (h - size) // align) * align, random.randint(0, (w - size) // align) * align
        else:
            top, left = (h - size) // 2 // align * align, (w - size) // 2 // align * align
    elif random_position:
        top, left = random.randint(0, h - size), random.randint(0, w - size)
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return arr[top : top + size, left : left + size], translate_affine(-left, -top) @ affine


@dataclass
class Canonicalizer:
    """Configured by ``data.canonical``; see the module docstring for the steps."""

    reencode: bool = True
    size: int = 128
    resize: str = "short_side"
    scale_jitter: float = 0.15
    train_jpeg_quality: Sequence[int] = (65, 100)
    eval_jpeg_quality: int | None = 92
    grayscale_p: float = 0.0
    # Training: also re-encode (random quality) *before* the random rescale and crop. A class
    # stored only as low-quality JPEG keeps its old 8x8 block grid through a re-encode done
    # after resizing (the blocks just move to a new period); giving every image such a grid
    # first makes "has an old JPEG grid" say nothing about the label (tests/test_canonical.py).
    train_reencode_before_jitter: bool = True
    # The resize stage's size (short side or square); null: ``size``. Larger than ``size``, the
    # crop then takes ``size`` out of it (NPR's paper recipe: resize 256, crop 224).
    resize_size: int | None = None
    # Crop offsets are multiples of this, in training and evaluation (2: a 2x up-sampler's
    # pixel grid keeps its phase; 1: any offset).
    crop_align: int = 1

    def __post_init__(self) -> None:
        # Messages name the Hydra keys a user sets (``canonical.*``; size follows data.image_size).
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"canonical.resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if not (isinstance(self.size, int) and self.size >= 8):
            raise ValueError(f"canonical.size (data.image_size) must be an integer >= 8, got {self.size!r}")
        if self.train_jpeg_quality:
            if len(self.train_jpeg_quality) != 2:
                raise ValueError(f"canonical.train_jpeg_quality must be [low, high], got {list(self.train_jpeg_quality)!r}")
            lo, hi = self.train_jpeg_quality
            if not (1 <= int(lo) <= int(hi) <= 100):
                raise ValueError(
                    f"canonical.train_jpeg_quality must be [low, high] with 1 <= low <= high <= 100, got [{lo}, {hi}]"
                )
        if self.eval_jpeg_quality is not None and not 1 <= int(self.eval_jpeg_quality) <= 100:
            raise ValueError(f"canonical.eval_jpeg_quality must be in [1, 100] or null, got {self.eval_jpeg_quality!r}")
        if not 0.0 <= self.grayscale_p <= 1.0:
            raise ValueError(f"canonical.grayscale_p must be in [0, 1], got {self.grayscale_p!r}")
        if not 0.0 <= self.scale_jitter <= 1.0:
            raise ValueError(f"canonical.scale_jitter must be in [0, 1], got {self.scale_jitter!r}")
        if self.resize_size is not None and not (isinstance(self.resize_size, int) and self.resize_size >= self.size):
            raise ValueError(f"canonical.resize_size must be null or an integer >= canonical.size ({self.size}), got {self.resize_size!r}")
        if not (isinstance(self.crop_align, int) and self.crop_align >= 1):
            raise ValueError(f"canonical.crop_align must be an integer >= 1, got {self.crop_align!r}")

    @property
    def resize_target(self) -> int:
        """The size the resize stage brings images to (``resize_size``, else ``size``)."""
        return self.resize_size or self.size

    def resize_stage(self, arr: np.ndarray) -> np.ndarray:
        """The deterministic part, done once per image and cached by the data set."""
        return resize_image(arr, self.resize_target, self.resize)

    def resize_stage_affine(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``resize_stage`` plus the 3x3 map from input to output coordinates."""
        return resize_image_affine(arr, self.resize_target, self.resize)

    def finish(self, arr: np.ndarray, train: bool) -> np.ndarray:
        """The crop; always returns ``size x size`` so that batches stack."""
        return self.finish_affine(arr, train)[0]

    def finish_affine(self, arr: np.ndarray, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """``finish`` plus the 3x3 map of its rescale and crop (landmarks, masks follow it)."""
        if train and self.reencode and self.train_reencode_before_jitter and self.train_jpeg_quality:
            lo, hi = self.train_jpeg_quality
            arr = jpeg_roundtrip(arr, random.randint(int(lo), int(hi)))
        affine = np.eye(3)
        if train and self.scale_jitter > 0 and self.resize != "none":
            s = 1.0 + random.uniform(0.0, self.scale_jitter)
            h, w = arr.shape[:2]
            new_w, new_h = round(w * s), round(h * s)
            arr = cv2.resize(arr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            affine = scale_affine(new_w / w, new_h / h)
        arr, crop = _crop(arr, self.size, random_position=train, align=self.crop_align)
        return arr, crop @ affine

    def encode(self, arr: np.ndarray, train: bool) -> np.ndarray:
        """The last pixel step: one JPEG re-encode for every image, then grayscale.
        ``reencode=false`` turns both off (geometry stays: batches need one size)."""
        if not self.reencode:
            return arr
        if train and self.train_jpeg_quality:
            lo, hi = self.train_jpeg_quality
            arr = jpeg_roundtrip(arr, random.randint(int(lo), int(hi)))
        elif not train and self.eval_jpeg_quality:
            arr = jpeg_roundtrip(arr, int(self.eval_jpeg_quality))
        if train and self.grayscale_p > 0 and random.random() < self.grayscale_p:
            gray = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
            arr = np.repeat(gray[:, :, None], 3, axis=2)
        return arr
