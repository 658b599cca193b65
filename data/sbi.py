"""Self-blended forgeries: fakes with a known mask, made from reals only.

After self-blended images (Shiohara & Yamasaki, CVPR 2022; the recipe of the authors' code,
``mapooon/SelfBlendedImages``: ``src/utils/sbi.py``, ``src/utils/blend.py``), our own code: a
real image is blended with a slightly altered copy of itself inside a face-shaped region. The
result carries the traces every face swap leaves (a blending boundary, colour and sharpness
mismatch, a small misalignment) without any generator's fingerprint.

Per forgery, as the paper does it:

1. **Source or target.** The colour and frequency transforms are applied to the *source* (the
   copy pasted in) or, with probability ``transform_target_p`` (SBI: 0.5), to the *target*
   (the image pasted into, so its background carries them too).
2. **Misalignment.** The source and its region get one small random scale and shift.
3. **Region.** The convex hull of the face landmarks (randomly dilated or eroded), else a
   random blob, then deformed as SBI's ``get_blend_mask`` deforms it: at a random working
   size (anisotropic, ``mask_work_size``), an elastic wobble, an erosion (a blur kept only
   where it reaches its peak, ``mask_erode_kernel``) and a soft edge (a second blur,
   ``mask_edge_kernel`` / ``mask_edge_sigma``), normalised to peak 1.
4. **Blend.** ``out = w * source + (1 - w) * target`` with ``w`` = that soft region times a
   ratio drawn from ``blend_ratios`` (SBI: 0.25, 0.5, 0.75, 1, 1, 1).

**Ground truth.** The mask is binary: 1 on the region actually blended (the soft region above
``gt_threshold``, by default every pixel with any source weight), never the blend weight
itself. A weight of 0.25 is still a forged pixel. A forgery whose region is empty, or smaller
than ``min_mask_area``, or that changed no pixel inside its region, is drawn again (up to
``max_tries`` times, then the real is left alone): a blended image never comes with an empty mask.

``SelfBlend`` works on the canonical uint8 crop (after canonicalisation, before the pixel
augmentation), so the mask is aligned with the image the detector sees.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

Donor = Callable[[np.random.Generator], np.ndarray]
ForgeryResult = tuple[np.ndarray, int, "np.ndarray | None", "str | None"]


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    lo, hi = bounds
    return float(rng.uniform(lo, hi))


def _check_range(name: str, bounds: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    if bounds is None or len(bounds) != 2 or not lo <= float(bounds[0]) <= float(bounds[1]) <= hi:
        raise ValueError(f"augment.forgery.{name} must be [low, high] with {lo} <= low <= high <= {hi}, got {bounds!r}")
    return float(bounds[0]), float(bounds[1])


def _odd_kernel(rng: np.random.Generator, bounds: Sequence[float]) -> int:
    """An odd kernel size drawn from [low, high] (SBI: 5, 7, ..., 25); 0 or 1: off."""
    lo, hi = int(bounds[0]), int(bounds[1])
    if hi <= 1:
        return 0
    choices = [k for k in range(max(lo, 1), hi + 1) if k % 2 == 1]
    return int(choices[int(rng.integers(len(choices)))]) if choices else 0


@dataclass
class SelfBlend:
    """Turn a real image into a blended forgery with probability ``p`` (module docstring).

    ``blend_ratios``: the ratios the soft region is scaled by, one drawn uniformly per
    forgery (repeat a value to weight it). ``transform_target_p``: probability that the colour
    and frequency transforms hit the target instead of the source. ``colour_jitter``:
    per-channel gain and offset amplitude (fractions). ``blur_sigma`` / ``sharpen_amount``:
    the transformed image is either blurred or unsharp-masked (equally likely).
    ``scale_jitter`` / ``translate_jitter``: misalignment of the source and its region
    (fractions of the image size). ``hull_morph``: the landmark hull is dilated (p 0.7) or
    eroded by up to this fraction of its own size. ``mask_work_size``: the region is deformed
    at a working size drawn per side from this range (null: the image's size).
    ``elastic_alpha`` / ``elastic_sigma``: elastic displacement amplitude and smoothness, in
    working pixels (0: off). ``mask_erode_kernel``: odd Gaussian kernel sizes of the erosion
    ([0, 0]: off). ``mask_edge_kernel`` / ``mask_edge_sigma``: kernel sizes and sigma of the
    soft edge ([0, 0]: a hard edge). ``gt_threshold``: the ground truth is the soft region
    above this (0: any source weight). ``splice_p``: with a ``donor``, the source is another
    real image instead (a splice). ``min_mask_area``: a forgery's ground truth covers at least
    this fraction of the pixels.
    """

    p: float = 0.5
    landmarks_hull: bool = True
    blend_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    transform_target_p: float = 0.5
    colour_jitter: float = 0.08
    blur_sigma: Sequence[float] = (0.4, 1.5)
    sharpen_amount: Sequence[float] = (0.3, 1.0)
    scale_jitter: float = 0.03
    translate_jitter: float = 0.03
    hull_morph: float = 0.1
    mask_work_size: Sequence[int] | None = (192, 256)
    elastic_alpha: float = 50.0
    elastic_sigma: float = 7.0
    mask_erode_kernel: Sequence[int] = (5, 25)
    mask_edge_kernel: Sequence[int] = (5, 25)
    mask_edge_sigma: Sequence[float] = (5.0, 45.0)
    gt_threshold: float = 0.0
    splice_p: float = 0.0
    min_mask_area: float = 0.01
    max_tries: int = 4

    def __post_init__(self) -> None:
        for name in ("p", "transform_target_p", "splice_p", "min_mask_area", "colour_jitter", "scale_jitter",
                     "translate_jitter", "hull_morph"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.forgery.{name} must be in [0, 1], got {value!r}")
        ratios = [float(r) for r in (self.blend_ratios or [])]
        if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"augment.forgery.blend_ratios must be a non-empty list of ratios in (0, 1], got {self.blend_ratios!r}")
        self.blend_ratios = tuple(ratios)
        self.blur_sigma = _check_range("blur_sigma", self.blur_sigma, 0.0, 10.0)
        self.sharpen_amount = _check_range("sharpen_amount", self.sharpen_amount, 0.0, 5.0)
        if self.mask_work_size is not None:
            lo, hi = _check_range("mask_work_size", self.mask_work_size, 8, 4096)
            self.mask_work_size = (int(lo), int(hi))
        self.mask_erode_kernel = _check_range("mask_erode_kernel", self.mask_erode_kernel, 0, 255)
        self.mask_edge_kernel = _check_range("mask_edge_kernel", self.mask_edge_kernel, 0, 255)
        self.mask_edge_sigma = _check_range("mask_edge_sigma", self.mask_edge_sigma, 0.0, 1000.0)
        if float(self.elastic_alpha) < 0 or float(self.elastic_sigma) < 0:
            raise ValueError(f"augment.forgery.elastic_alpha and elastic_sigma must be >= 0, got {self.elastic_alpha!r}, {self.elastic_sigma!r}")
        if not 0.0 <= float(self.gt_threshold) < 1.0:
            raise ValueError(f"augment.forgery.gt_threshold must be in [0, 1), got {self.gt_threshold!r}")
        if int(self.max_tries) < 1:
            raise ValueError(f"augment.forgery.max_tries must be >= 1, got {self.max_tries!r}")

    # --- the transforms: colour and frequency, on the source or the target ---------------
    def _transformed(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image.astype(np.float32)
        # colour: per-channel gain and offset (a colour mismatch like a swapped face's)
        gain = 1.0 + rng.uniform(-self.colour_jitter, self.colour_jitter, size=3)
        offset = rng.uniform(-self.colour_jitter, self.colour_jitter, size=3) * 255.0
        out = out * gain.astype(np.float32) + offset.astype(np.float32)
        # frequency: blur or sharpen (a resolution mismatch like a re-rendered face's)
        sigma = _uniform(rng, self.blur_sigma)
        if sigma > 0:
            blurred = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
            if rng.random() < 0.5:
                out = blurred
            else:
                out = out + _uniform(rng, self.sharpen_amount) * (out - blurred)
        return np.clip(out, 0.0, 255.0)

    def _misalignment(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A small scale and shift (2x3), applied to the source and to its region alike."""
        h, w = shape
        s = 1.0 + rng.uniform(-self.scale_jitter, self.scale_jitter)
        tx, ty = rng.uniform(-self.translate_jitter, self.translate_jitter, size=2) * (w, h)
        return np.array([[s, 0.0, (1 - s) * w / 2 + tx], [0.0, s, (1 - s) * h / 2 + ty]], np.float32)

    def _spliced_source(self, image: np.ndarray, donor: Donor, rng: np.random.Generator) -> np.ndarray:
        other = np.asarray(donor(rng))
        h, w = image.shape[:2]
        if other.shape[:2] != (h, w):
            other = cv2.resize(other, (w, h), interpolation=cv2.INTER_AREA)
        return other.astype(np.float32)

    # --- the region: where it gets pasted ---------------------------------------------------
    def _hull_region(self, shape: tuple[int, int], landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        hard = np.zeros(shape, np.uint8)
        pts = np.round(np.asarray(landmarks, np.float64)).astype(np.int32).reshape(-1, 2)
        hull = cv2.convexHull(pts)
        cv2.fillConvexPoly(hard, hull, 1)
        x, y, bw, bh = cv2.boundingRect(hull)
        radius = int(round(abs(rng.uniform(-self.hull_morph, self.hull_morph)) * max(bw, bh)))
        if radius >= 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            # dilate more often than erode: few landmarks (mtcnn's 5) span a small hull
            hard = cv2.dilate(hard, kernel) if rng.random() < 0.7 else cv2.erode(hard, kernel)
        return hard.astype(np.float32)

    def _blob_region(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A random ellipse with a wobbly (low-frequency noise) boundary."""
        h, w = shape
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ay, ax = rng.uniform(0.15, 0.4) * h, rng.uniform(0.15, 0.4) * w
        theta = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        radius = (u / ax) ** 2 + (v / ay) ** 2
        coarse = rng.normal(0.0, 1.0, size=(4, 4)).astype(np.float32)
        wobble = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        return (radius + 0.25 * wobble < 1.0).astype(np.float32)

    def _region(self, shape: tuple[int, int], landmarks: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        if self.landmarks_hull and landmarks is not None and len(landmarks) >= 3:
            return self._hull_region(shape, landmarks, rng)
        return self._blob_region(shape, rng)

    def _elastic(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Smooth random displacement of the region (albumentations' ElasticTransform idea)."""
        if self.elastic_alpha <= 0 or self.elastic_sigma <= 0:
            return mask
        h, w = mask.shape
        field = [cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), self.elastic_sigma) * self.elastic_alpha
                 for _ in range(2)]
        xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        return cv2.remap(mask, xx + field[0], yy + field[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def _soft_region(self, hard: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The deformed region with a soft edge, peak 1 (all zeros when nothing is left)."""
        h, w = hard.shape
        mask = hard.astype(np.float32)
        if self.mask_work_size is not None:  # SBI deforms at a random, anisotropic working size
            lo, hi = self.mask_work_size
            work_h, work_w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            mask = cv2.resize(mask, (work_w, work_h), interpolation=cv2.INTER_LINEAR)
        mask = self._elastic(mask, rng)
        k = _odd_kernel(rng, self.mask_erode_kernel)
        if k > 1 and mask.max() > 0:  # erosion: a blur kept only where it reaches its peak
            blurred = cv2.GaussianBlur(mask, (k, k), 0)
            mask = (blurred >= blurred.max() * (1 - 1e-4)).astype(np.float32)
        k = _odd_kernel(rng, self.mask_edge_kernel)
        if k > 1 and mask.max() > 0:  # the soft edge
            mask = cv2.GaussianBlur(mask, (k, k), _uniform(rng, self.mask_edge_sigma))
        if mask.shape != (h, w):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)
        mask = np.clip(mask, 0.0, None)
        peak = float(mask.max())
        return mask / peak if peak > 0 else mask

    # --- the forgery ------------------------------------------------------------------
    def __call__(
        self,
        image: np.ndarray,
        label: int,
        landmarks: np.ndarray | None,
        rng: np.random.Generator,
        donor: Donor | None = None,
    ) -> ForgeryResult:
        """``(image, label, mask, generator)``. Reals that are forged: label 1, a binary mask
        (1 on the blended region, never empty), generator ``self_blend`` or ``splice``. Reals
        left alone: the image untouched, an all-zero mask, generator None. Fakes and unknown
        labels are returned untouched with no mask (their forged region is unknown)."""
        if int(label) != 0:
            return image, int(label), None, None
        h, w = image.shape[:2]
        untouched = (image, 0, np.zeros((h, w), np.float32), None)
        if rng.random() >= self.p:
            return untouched
        splice = donor is not None and rng.random() < self.splice_p
        target = image.astype(np.float32)
        if splice:
            source = self._spliced_source(image, donor, rng)
        elif rng.random() < self.transform_target_p:
            source, target = target, self._transformed(image, rng)
        else:
            source = self._transformed(image, rng)
        shift = self._misalignment((h, w), rng)
        source = cv2.warpAffine(source, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        target_pixels = np.clip(np.rint(target), 0, 255).astype(np.uint8)
        for _ in range(int(self.max_tries)):
            hard = cv2.warpAffine(self._region((h, w), landmarks, rng), shift, (w, h), flags=cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            soft = self._soft_region(hard, rng)
            truth = soft > self.gt_threshold
            if truth.mean() < max(self.min_mask_area, 1e-12):
                continue
            weight = soft * self.blend_ratios[int(rng.integers(len(self.blend_ratios)))]
            blended = weight[..., None] * source + (1.0 - weight[..., None]) * target
            out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
            if not (out != target_pixels).any(axis=2)[truth].any():
                continue  # the blend moved no pixel (a source equal to the target): no forgery
            return out, 1, truth.astype(np.float32), "splice" if splice else "self_blend"
        return untouched
