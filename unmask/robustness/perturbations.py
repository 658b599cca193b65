"""Evaluation perturbations: interference applied to test images at a known severity.

Separate from training augmentation (``configs/augment/``): these are deterministic
(fixed parameters, noise seeded per image), so a robustness grid can be re-run and two
detectors see the same damaged images.

Where a perturbation acts (``stage``):

- ``decoded`` (default): on the decoded image as received, before the checkpoint's
  canonical resize, crop and JPEG re-encode. This models "the image arrives degraded";
  severities are in pixels of the received image, so on a large photo that canonical
  resizing shrinks a lot, a blur or noise of a given size is weakened by that resize.
- ``canonical``: on the canonical crop (the detector's working resolution), just before
  the canonical JPEG re-encode; severities are then in pixels of what the model sees.

Either way the canonical re-encode follows, exactly as for a clean image. Adversarial
attacks (``unmask.robustness.attacks``) are not here: they act on the final [0, 1] tensor.

Each factory below maps a severity to an albumentations transform (p = 1). Two cases
are handled here rather than left to the library: Gaussian blur with sigma 0 and box
blur with kernel 1 are the identity (albumentations turns sigma 0 into a NaN kernel and
silently raises kernel 1 to 3), and additive noise is drawn on float pixels and rounded
(albumentations adds float noise to uint8 by truncation, shrinking its std by ~0.4/255).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np

from data.canonical import jpeg_roundtrip


class OnFloatPixels(A.ImageOnlyTransform):
    """Run ``transform`` on float32 pixels in [0, 1] and round back to uint8."""

    def __init__(self, transform: A.BasicTransform, p: float = 1.0) -> None:
        self.transform = transform  # before super().__init__, which already seeds
        super().__init__(p=p)

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        self.transform.set_random_seed(seed)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        out = self.transform(image=img.astype(np.float32) / 255.0)["image"]
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


class PILJpeg(A.ImageOnlyTransform):
    """JPEG at one quality with PIL (4:2:0), the same encoder as the canonical re-encode,
    so "JPEG q" means one thing everywhere in the project."""

    def __init__(self, quality: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality!r}")
        self.quality = int(quality)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return jpeg_roundtrip(np.ascontiguousarray(img), self.quality)


# --- severity -> transform factories (referenced from configs/perturb/*.yaml) -------------


def identity(severity: float = 0) -> A.BasicTransform:
    return A.NoOp(p=1.0)


def box_blur(kernel: int) -> A.BasicTransform:
    """Uniform (box) blur with a ``kernel x kernel`` mean filter (odd sizes; 1 = identity)."""
    kernel = int(kernel)
    if kernel <= 1:
        return identity()
    return A.Blur(blur_limit=(kernel, kernel), p=1.0)


def gaussian_blur(sigma: float) -> A.BasicTransform:
    """Gaussian blur with standard deviation ``sigma`` pixels (0 = identity)."""
    if float(sigma) <= 0:
        return identity()
    return A.GaussianBlur(blur_limit=0, sigma_limit=(float(sigma), float(sigma)), p=1.0)


def uniform_noise(amplitude: float) -> A.BasicTransform:
    """Additive i.i.d. noise, uniform in [-a, a] per pixel and channel, ``a`` in /255."""
    a = float(amplitude) / 255.0
    if a <= 0:
        return identity()
    noise = A.AdditiveNoise(noise_type="uniform", spatial_mode="per_pixel", noise_params={"ranges": [(-a, a)]}, p=1.0)
    return OnFloatPixels(noise)


def gaussian_noise(std: float) -> A.BasicTransform:
    """Additive i.i.d. Gaussian noise with standard deviation ``std`` in /255."""
    s = float(std) / 255.0
    if s <= 0:
        return identity()
    return OnFloatPixels(A.GaussNoise(std_range=(s, s), mean_range=(0.0, 0.0), per_channel=True, p=1.0))


def sharpen(alpha: float) -> A.BasicTransform:
    """Unsharp-style kernel sharpening blended with strength ``alpha`` in [0, 1]."""
    if float(alpha) <= 0:
        return identity()
    return A.Sharpen(alpha=(float(alpha), float(alpha)), lightness=(1.0, 1.0), method="kernel", p=1.0)


def jpeg(quality: int) -> A.BasicTransform:
    """One JPEG encode/decode at ``quality`` (PIL, the project's pinned encoder)."""
    return PILJpeg(int(quality))


def resize(factor: float) -> A.BasicTransform:
    """Down-scale by ``factor`` (area filter) and back up to the same size (bilinear):
    the detail lost by a platform that stores a smaller copy."""
    if float(factor) >= 1.0:
        return identity()
    f = float(factor)
    return A.Downscale(scale_range=(f, f), interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}, p=1.0)


def rotate(degrees: float) -> A.BasicTransform:
    """Rotation by ``degrees`` (counter-clockwise), same size, reflected borders."""
    d = float(degrees)
    return A.Rotate(limit=(d, d), border_mode=cv2.BORDER_REFLECT_101, p=1.0)


def scale(factor: float) -> A.BasicTransform:
    """Zoom about the centre by ``factor`` (>1 enlarges and cuts the border, <1 shrinks
    and reflects it in), same output size."""
    f = float(factor)
    return A.Affine(scale=(f, f), border_mode=cv2.BORDER_REFLECT_101, p=1.0)


def crop(keep: float) -> A.BasicTransform:
    """Central crop keeping the share ``keep`` of each side (the rest is cut, size changes)."""
    k = float(keep)
    if not 0 < k <= 1:
        raise ValueError(f"crop keep must be in (0, 1], got {keep!r}")
    if k >= 1.0:
        return identity()
    return A.CropAndPad(percent=-(1.0 - k) / 2.0, keep_size=False, sample_independently=False, p=1.0)


def hflip(severity: float = 1) -> A.BasicTransform:
    """Mirror left-right (one severity)."""
    return A.HorizontalFlip(p=1.0)


@dataclass
class PixelPerturbation:
    """One cell of the grid that changes pixels: ``family`` at ``severity``."""

    family: str
    severity: float
    transform: A.BasicTransform
    seed: int = 0

    def __call__(self, image: np.ndarray, index: int = 0) -> np.ndarray:
        # Reseeding per image makes noise a function of (seed, image), not of loader order.
        self.transform.set_random_seed(self.seed * 1_000_003 + int(index))
        out = self.transform(image=np.ascontiguousarray(image))["image"]
        return np.ascontiguousarray(out, dtype=np.uint8)
