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
attacks (``unmask.attacks``) are not here: they act on the final [0, 1] tensor.

Each factory below maps a severity to an albumentations transform (p = 1). Two cases
are handled here rather than left to the library: Gaussian blur with sigma 0 and box
blur with kernel 1 are the identity (albumentations turns sigma 0 into a NaN kernel and
silently raises kernel 1 to 3), and additive noise is drawn on float pixels and rounded
(albumentations adds float noise to uint8 by truncation, shrinking its std by ~0.4/255).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import albumentations as A
import cv2
import numpy as np

from data.canonical import jpeg_roundtrip
from data.dataset import ImageDataset
from data.decode import ImageDecodeError, decode_image
from data.records import Record

log = logging.getLogger(__name__)

STAGES = ("decoded", "canonical")


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


# --- the grid -------------------------------------------------------------------------------


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


@dataclass
class PerturbationFamily:
    make: Callable[[float], Any]  # severity -> albumentations transform, or an attack
    severities: Sequence[float]
    unit: str = ""


@dataclass
class GridCell:
    family: str
    severity: float
    unit: str
    op: Any  # PixelPerturbation, or an attack with ``perturb(detector, image, label)``

    @property
    def is_attack(self) -> bool:
        return not isinstance(self.op, PixelPerturbation)


@dataclass
class PerturbationGrid:
    """``families``: name -> {make, severities, unit} (``configs/perturb/*.yaml``).
    ``subset``: evaluate on a class-balanced sample of this many images (null: all)."""

    families: dict[str, Any] = field(default_factory=dict)
    stage: str = "decoded"
    seed: int = 0
    subset: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"perturb.stage must be one of {STAGES}, got {self.stage!r}")
        fams = {}
        for name, spec in (self.families or {}).items():
            fam = spec if isinstance(spec, PerturbationFamily) else PerturbationFamily(**dict(spec))
            if not callable(fam.make):
                raise ValueError(f"perturb.families.{name}.make must be a callable (a _partial_ _target_)")
            if not list(fam.severities):
                raise ValueError(f"perturb.families.{name}.severities is empty")
            fams[str(name)] = fam
        self.families = fams

    def cells(self) -> Iterator[GridCell]:
        for name, fam in self.families.items():
            for severity in fam.severities:
                op = fam.make(severity)
                if isinstance(op, A.BasicTransform):
                    op = PixelPerturbation(name, float(severity), op, self.seed)
                yield GridCell(name, float(severity), fam.unit, op)

    def __len__(self) -> int:
        return sum(len(list(f.severities)) for f in self.families.values())


class PerturbedDataset(ImageDataset):
    """The evaluation data set with one pixel perturbation inserted at ``stage``.

    ``pixel_cache`` (shared by every cell of a grid) keeps the expensive deterministic
    part: the full-resolution decode for ``decoded`` (no JPEG draft decoding, which would
    already shrink the image before the interference), or the canonical resize for
    ``canonical``. With ``perturbation=None`` it is the clean baseline of the same pipeline.
    """

    def __init__(
        self,
        records: list[Record],
        canonical,
        perturbation: PixelPerturbation | None = None,
        stage: str = "decoded",
        pixel_cache: dict | None = None,
        **kwargs,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        kwargs.setdefault("draft_decode", stage != "decoded")
        super().__init__(records, canonical, augment=None, train=False, cache_images=False, **kwargs)
        self.perturbation = perturbation
        self.stage = stage
        self.pixel_cache = {} if pixel_cache is None else pixel_cache

    def _cached(self, index: int, make: Callable[[], np.ndarray]) -> np.ndarray:
        hit = self.pixel_cache.get(index)
        if hit is None:
            try:
                hit = make()
            except ImageDecodeError as e:
                log.warning("skipping undecodable image: %s", e)
                hit = str(e)
            self.pixel_cache[index] = hit
        if isinstance(hit, str):
            raise ImageDecodeError(hit)
        return hit

    def whole_pixels(self, index: int) -> np.ndarray:
        if self.stage == "canonical":
            return self._cached(index, lambda: super(PerturbedDataset, self).whole_pixels(index))
        raw = self._cached(index, lambda: decode_image(self.records[index].path, self.max_pixels))
        if self.perturbation is not None:
            raw = self.perturbation(raw, index)
        return self.canonical.resize_stage(raw)

    def load_pixels(self, index: int) -> tuple[np.ndarray, str]:
        arr, error = self.resized_or_blank(index)
        arr = self.canonical.finish(arr, train=False)
        if self.stage == "canonical" and self.perturbation is not None and not error:
            arr = self.perturbation(arr, index)
            if arr.shape[:2] != (self.canonical.size, self.canonical.size):  # crop changes size
                arr = self.canonical.finish(self.canonical.resize_stage(arr), train=False)
        return self.canonical.encode(arr, train=False), error

    def __getitem__(self, index: int) -> dict:
        return self.plain_sample(index, *self.load_pixels(index))

    def warm(self) -> None:
        """Fill the shared cache in this process (before DataLoader workers fork)."""
        for i in range(len(self)):
            try:
                if self.stage == "canonical":
                    self.whole_pixels(i)
                else:
                    self._cached(i, lambda: decode_image(self.records[i].path, self.max_pixels))
            except ImageDecodeError:
                pass
