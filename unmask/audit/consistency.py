"""Consistency measures of a face with itself and with its surroundings: skin tone (spec
7.1.10), contour blending (7.1.11), foreground/background colour (7.1.12) and spectrum
(7.1.13), and the blending of a tampered region given by a mask (7.1.20).

Colour histograms are OpenCV's (``cv2.calcHist``, compared with the Bhattacharyya distance:
similarity = 1 - distance, 1 for identical distributions); spectra are numpy FFTs.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from unmask.audit.face_quality import NormalisedFace
from unmask.audit.regions import FOREHEAD, JAW_LINE, LEFT_CHEEK, RIGHT_CHEEK, is_mesh, line_mask, region_mask

MIN_PIXELS = 16  # a region with fewer pixels gives NaN
# Spectrum bands in cycles per pixel (DC excluded): low up to 1/16, mid up to 1/4, high above.
BANDS = (("low", 0.0, 1.0 / 16), ("mid", 1.0 / 16, 0.25), ("high", 0.25, math.inf))


def lab(rgb: np.ndarray) -> np.ndarray:
    """8-bit CIELAB (OpenCV's scaling: L 0-255, a and b offset by 128)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)


def chroma_histogram(lab_pixels: np.ndarray) -> np.ndarray:
    """Normalised a*b* histogram (24 x 24 bins over the skin-to-neutral range, smoothed by
    one bin) of (N, 3) Lab pixels: skin tone without the lighting's brightness."""
    ab = np.clip(lab_pixels[:, 1:3].astype(np.float32), 96, 191.99).reshape(-1, 1, 2)
    hist = cv2.calcHist([ab], [0, 1], None, [24, 24], [96, 192, 96, 192])
    hist = cv2.GaussianBlur(hist, (3, 3), 0.8)
    return hist / max(float(hist.sum()), 1e-12)


def colour_histogram(lab_pixels: np.ndarray) -> np.ndarray:
    """Normalised 8 x 8 x 8 Lab histogram of (N, 3) Lab pixels (colour and lighting)."""
    hist = cv2.calcHist([lab_pixels.reshape(-1, 1, 3)], [0, 1, 2], None, [8, 8, 8], [0, 256, 0, 256, 0, 256])
    return hist / max(float(hist.sum()), 1e-12)


def similarity(h1: np.ndarray, h2: np.ndarray) -> float:
    """1 - Bhattacharyya distance of two histograms: 1 identical, 0 disjoint."""
    return float(1.0 - cv2.compareHist(h1.astype(np.float32), h2.astype(np.float32), cv2.HISTCMP_BHATTACHARYYA))


def skin_tone_consistency(norm: NormalisedFace, grey: bool = False) -> dict:
    """Mean chroma-histogram similarity of the forehead with each cheek (7.1.10); NaN for a
    grey image (no chroma to compare) or without FaceMesh landmarks."""
    if grey or not is_mesh(norm.landmarks):
        return {"skin_tone_consistency": math.nan}
    image = lab(norm.rgb)
    regions = [region_mask(norm.gray.shape, norm.landmarks, r) & norm.valid for r in (FOREHEAD, RIGHT_CHEEK, LEFT_CHEEK)]
    if min(int(m.sum()) for m in regions) < MIN_PIXELS:
        return {"skin_tone_consistency": math.nan}
    forehead, right, left = (chroma_histogram(image[m]) for m in regions)
    return {"skin_tone_consistency": 0.5 * (similarity(forehead, right) + similarity(forehead, left))}


def gradient_magnitude(gray: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.magnitude(gx, gy)


def seam(gray: np.ndarray, band: np.ndarray, width: int, valid: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """How much a boundary stands out: mean gradient magnitude on ``band`` over the mean in
    the strips ``2 * width`` pixels wide on both sides of it (1: no stronger than its
    surroundings). Also returns the gradient image."""
    grad = gradient_magnitude(gray)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (4 * width + 1, 4 * width + 1))
    around = cv2.dilate(band.astype(np.uint8), kernel).astype(bool) & ~band
    if valid is not None:
        band, around = band & valid, around & valid
    if band.sum() < MIN_PIXELS or around.sum() < MIN_PIXELS:
        return math.nan, grad
    return float(grad[band].mean() / max(grad[around].mean(), 1e-6)), grad


def contour_blending(norm: NormalisedFace) -> dict:
    """Contour blending (7.1.11) on the jaw line of the normalised face: ``jaw_seam`` (how
    much the jaw line's edge stands out from the skin and background beside it),
    ``contour_blending`` = 100 / max(seam, 1) (100: the contour is no edge stronger than
    its surroundings; a pasted face's hard seam lowers it), ``jaw_continuity`` = 1 - the
    coefficient of variation of the edge strength along the line (1: an even edge)."""
    nan = {"contour_blending": math.nan, "jaw_seam": math.nan, "jaw_continuity": math.nan}
    if not is_mesh(norm.landmarks):
        return nan
    width = max(2, round(norm.gray.shape[0] / 100))
    points = norm.landmarks[list(JAW_LINE)]
    band = line_mask(norm.gray.shape, points, width)
    ratio, grad = seam(norm.gray, band, width, norm.valid)
    if not math.isfinite(ratio):
        return nan
    # Edge strength along the line: the band's mean gradient in windows around each segment's midpoint.
    smooth = cv2.blur(np.where(band, grad, 0), (2 * width + 1, 2 * width + 1))
    weight = cv2.blur(band.astype(np.float32), (2 * width + 1, 2 * width + 1))
    mids = (points[1:] + points[:-1]) / 2
    h, w = norm.gray.shape
    strengths = []
    for x, y in mids:
        i, j = int(np.clip(y, 0, h - 1)), int(np.clip(x, 0, w - 1))
        if norm.valid[i, j] and weight[i, j] > 0:
            strengths.append(smooth[i, j] / weight[i, j])
    strengths = np.asarray(strengths)
    continuity = float(np.clip(1.0 - strengths.std() / max(strengths.mean(), 1e-6), 0, 1)) if len(strengths) >= 3 else math.nan
    return {"contour_blending": 100.0 / max(ratio, 1.0), "jaw_seam": ratio, "jaw_continuity": continuity}


def background_mask(shape: tuple[int, int], extent: np.ndarray, grow: float = 0.2) -> np.ndarray:
    """Everything outside the face's extent grown by ``grow`` of its size on every side."""
    h, w = shape
    x1, y1, x2, y2 = extent
    dx, dy = grow * (x2 - x1), grow * (y2 - y1)
    mask = np.ones(shape, bool)
    mask[max(0, int(y1 - dy)):max(0, int(math.ceil(y2 + dy))), max(0, int(x1 - dx)):max(0, int(math.ceil(x2 + dx)))] = False
    return mask


def foreground_background(rgb: np.ndarray, face: np.ndarray, background: np.ndarray) -> dict:
    """Colour (7.1.12): Lab-histogram similarity of the face and the background.
    Spectrum (7.1.13): the share of the face's and the background's FFT energy in the
    low / mid / high bands; ``spectrum_consistency`` = 1 / (1 + mean |log2| ratio of the
    shares), 1 when the face's spectrum has the background's shape."""
    out = {"fg_bg_colour_consistency": math.nan, "spectrum_consistency": math.nan,
           **{f"face_{name}_band": math.nan for name, _, _ in BANDS}, **{f"background_{name}_band": math.nan for name, _, _ in BANDS}}
    if face.sum() < MIN_PIXELS or background.sum() < max(MIN_PIXELS, 0.02 * face.size):
        return out
    image = lab(rgb)
    out["fg_bg_colour_consistency"] = similarity(colour_histogram(image[face]), colour_histogram(image[background]))
    face_share, background_share = band_shares(image[..., 0].astype(np.float32), [face, background])
    for (name, _, _), f, b in zip(BANDS, face_share, background_share):
        out[f"face_{name}_band"], out[f"background_{name}_band"] = float(f), float(b)
    ratio = np.abs(np.log2((face_share + 1e-9) / (background_share + 1e-9)))
    out["spectrum_consistency"] = float(1.0 / (1.0 + ratio.mean()))
    return out


def band_shares(gray: np.ndarray, regions: list[np.ndarray]) -> list[np.ndarray]:
    """Per region, the share of its (DC-free) energy in each of ``BANDS``: the image is split
    into band-pass images by masking its 2-D FFT, and each band's energy is summed inside
    the region."""
    h, w = gray.shape
    spectrum = np.fft.rfft2(gray - gray.mean())
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    energies = []
    for _, low, high in BANDS:
        keep = (radius > low) & (radius <= high) if low > 0 else (radius > 0) & (radius <= high)
        band = np.fft.irfft2(np.where(keep, spectrum, 0), s=(h, w))
        energies.append([float((band[r] ** 2).mean()) for r in regions])
    energies = np.asarray(energies).T  # regions x bands
    return list(energies / np.maximum(energies.sum(axis=1, keepdims=True), 1e-12))


def mask_blending(rgb: np.ndarray, mask: np.ndarray) -> dict:
    """Tampered-region blending (7.1.20): the region a ground-truth mask marks against a ring
    around it as wide as 10 % of the region's size: colour-histogram similarity, the ratio
    of their noise levels (median absolute Laplacian, inside over outside), the seam of the
    mask's boundary, and ``mask_blending`` = 100 / max(seam, 1)."""
    nan = {"mask_blending": math.nan, "mask_seam": math.nan, "mask_colour_consistency": math.nan, "mask_noise_ratio": math.nan}
    inside = mask.astype(bool)
    area = int(inside.sum())
    if area < MIN_PIXELS or area > inside.size - MIN_PIXELS:
        return nan
    width = max(2, round(0.1 * math.sqrt(area)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    ring = cv2.dilate(inside.astype(np.uint8), kernel).astype(bool) & ~inside
    if ring.sum() < MIN_PIXELS:
        return nan
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    image = lab(rgb)
    lap = np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3))
    edge = cv2.morphologyEx(inside.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    boundary_width = max(1, width // 4)
    band = cv2.dilate(edge.astype(np.uint8), np.ones((2 * boundary_width - 1,) * 2, np.uint8)).astype(bool)
    ratio, _ = seam(gray, band, boundary_width)
    return {
        "mask_blending": 100.0 / max(ratio, 1.0) if math.isfinite(ratio) else math.nan,
        "mask_seam": ratio,
        "mask_colour_consistency": similarity(colour_histogram(image[inside]), colour_histogram(image[ring])),
        "mask_noise_ratio": float(np.median(lap[inside]) / max(float(np.median(lap[ring])), 1e-6)),
    }
