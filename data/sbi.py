"""Self-blended forgeries: fakes with a known mask, made from reals only.

In the spirit of self-blended images (Shiohara & Yamasaki, CVPR 2022): a real image is
blended with a slightly altered copy of itself (colour, frequency and geometry jitter)
inside a face-shaped region. The result carries the traces every face swap leaves (a
blending boundary, colour and sharpness mismatch, a small misalignment) without any
generator's fingerprint, so a detector trained on it learns those traces, and the blend
weight is a pixel-exact ground-truth mask for localisation.

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
    if len(bounds) != 2 or not lo <= float(bounds[0]) <= float(bounds[1]) <= hi:
        raise ValueError(f"augment.forgery.{name} must be [low, high] with {lo} <= low <= high <= {hi}, got {list(bounds)!r}")
    return float(bounds[0]), float(bounds[1])


@dataclass
class SelfBlend:
    """Turn a real image into a blended forgery with probability ``p``.

    ``blend_ratio``: the soft mask is scaled by a ratio drawn from this range (1 = the
    source fully replaces the target at the mask's centre). ``colour_jitter``: per-channel
    gain and offset amplitude (fractions). ``blur_sigma`` / ``sharpen_amount``: the source
    is either blurred or unsharp-masked (one of the two, equally likely).
    ``scale_jitter`` / ``translate_jitter``: small affine misalignment of the source
    (fractions of the image size). ``hull_morph``: the landmark hull is dilated (or eroded)
    by up to this fraction of its own size. ``mask_blur``: Gaussian sigma of the soft
    mask's edge, as a fraction of the image size. ``splice_p``: with a ``donor``, the
    source is another real image instead (a splice). ``min_mask_area``: a forgery must
    change at least this fraction of the pixels, else a new region is drawn (up to
    ``max_tries`` times, then the real is left as it is).
    """

    p: float = 0.5
    landmarks_hull: bool = True
    blend_ratio: Sequence[float] = (0.25, 1.0)
    colour_jitter: float = 0.08
    blur_sigma: Sequence[float] = (0.4, 1.5)
    sharpen_amount: Sequence[float] = (0.3, 1.0)
    scale_jitter: float = 0.03
    translate_jitter: float = 0.03
    hull_morph: float = 0.1
    mask_blur: Sequence[float] = (0.01, 0.05)
    splice_p: float = 0.0
    min_mask_area: float = 0.01
    max_tries: int = 4

    def __post_init__(self) -> None:
        for name in ("p", "splice_p", "min_mask_area", "colour_jitter", "scale_jitter", "translate_jitter", "hull_morph"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.forgery.{name} must be in [0, 1], got {value!r}")
        self.blend_ratio = _check_range("blend_ratio", self.blend_ratio, 0.0, 1.0)
        self.blur_sigma = _check_range("blur_sigma", self.blur_sigma, 0.0, 10.0)
        self.sharpen_amount = _check_range("sharpen_amount", self.sharpen_amount, 0.0, 5.0)
        self.mask_blur = _check_range("mask_blur", self.mask_blur, 0.0, 0.5)
        if self.blend_ratio[1] <= 0.0:
            raise ValueError("augment.forgery.blend_ratio must allow a ratio above 0")
        if int(self.max_tries) < 1:
            raise ValueError(f"augment.forgery.max_tries must be >= 1, got {self.max_tries!r}")

    # --- the source: what gets pasted -------------------------------------------------
    def _jittered_source(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        src = image.astype(np.float32)
        # colour: per-channel gain and offset (a colour mismatch like a swapped face's)
        gain = 1.0 + rng.uniform(-self.colour_jitter, self.colour_jitter, size=3)
        offset = rng.uniform(-self.colour_jitter, self.colour_jitter, size=3) * 255.0
        src = src * gain.astype(np.float32) + offset.astype(np.float32)
        # frequency: blur or sharpen (a resolution mismatch like a re-rendered face's)
        sigma = _uniform(rng, self.blur_sigma)
        if sigma > 0:
            blurred = cv2.GaussianBlur(src, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
            if rng.random() < 0.5:
                src = blurred
            else:
                amount = _uniform(rng, self.sharpen_amount)
                src = src + amount * (src - blurred)
        # geometry: a small scale and shift (the misalignment of a pasted face)
        s = 1.0 + rng.uniform(-self.scale_jitter, self.scale_jitter)
        tx, ty = rng.uniform(-self.translate_jitter, self.translate_jitter, size=2) * (w, h)
        m = np.array([[s, 0.0, (1 - s) * w / 2 + tx], [0.0, s, (1 - s) * h / 2 + ty]], np.float32)
        src = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        return np.clip(src, 0.0, 255.0)

    def _spliced_source(self, image: np.ndarray, donor: Donor, rng: np.random.Generator) -> np.ndarray:
        other = np.asarray(donor(rng))
        h, w = image.shape[:2]
        if other.shape[:2] != (h, w):
            other = cv2.resize(other, (w, h), interpolation=cv2.INTER_AREA)
        return other.astype(np.float32)

    # --- the region: where it gets pasted -------------------------------------------------
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

    # --- the forgery ------------------------------------------------------------------
    def _forge(self, image: np.ndarray, source: np.ndarray, hard: np.ndarray, rng: np.random.Generator):
        h, w = image.shape[:2]
        sigma = _uniform(rng, self.mask_blur) * max(h, w)
        soft = cv2.GaussianBlur(hard, (0, 0), sigmaX=sigma) if sigma > 0 else hard
        weight = np.clip(soft, 0.0, 1.0) * _uniform(rng, self.blend_ratio)
        blended = weight[..., None] * source + (1.0 - weight[..., None]) * image.astype(np.float32)
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        # The ground truth is the blend weight where a pixel actually changed: a weight too
        # small to move a pixel by one level, or a source equal to the target, is no forgery.
        changed = (out != image).any(axis=2)
        return out, (weight * changed).astype(np.float32)

    def __call__(
        self,
        image: np.ndarray,
        label: int,
        landmarks: np.ndarray | None,
        rng: np.random.Generator,
        donor: Donor | None = None,
    ) -> ForgeryResult:
        """``(image, label, mask, generator)``. Reals that are forged: label 1, mask = blend
        weight on the changed pixels (0 elsewhere), generator ``self_blend`` or ``splice``.
        Reals left alone: an all-zero mask, generator None. Fakes and unknown labels are
        returned untouched with no mask (their forged region is unknown)."""
        if int(label) != 0:
            return image, int(label), None, None
        h, w = image.shape[:2]
        untouched = (image, 0, np.zeros((h, w), np.float32), None)
        if rng.random() >= self.p:
            return untouched
        splice = donor is not None and rng.random() < self.splice_p
        source = self._spliced_source(image, donor, rng) if splice else self._jittered_source(image, rng)
        for _ in range(int(self.max_tries)):
            hard = self._region((h, w), landmarks, rng)
            out, mask = self._forge(image, source, hard, rng)
            if (mask > 0).mean() >= max(self.min_mask_area, 1e-12):
                return out, 1, mask, "splice" if splice else "self_blend"
        return untouched
