"""Whole-image measures: quality against a reference or without one (spec 7.1.6), and
resolution (7.1.7) with an estimate of the resolution the pixels really carry.

SSIM and PSNR come from scikit-image, the noise level from its wavelet estimator
(``skimage.restoration.estimate_sigma``), sharpness from OpenCV's Laplacian; the JPEG
quality is read from the file's quantisation tables (Pillow) and matched to the IJG tables.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# The IJG / JPEG Annex K luminance table (natural order), which libjpeg scales by quality.
IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64)
# Resolution classes (7.1.7) by the short side the pixels carry; the bands are this project's.
RESOLUTION_CLASSES = ((128, "tiny (<128 px)"), (256, "low (128-255 px)"), (512, "medium (256-511 px)"),
                      (1024, "high (512-1023 px)"), (math.inf, "very high (>=1024 px)"))
# Candidate up-scaling factors, and how little energy may lie above 1/k of the band limit
# (relative to the octave just below it) for an image to count as up-scaled by k.
UPSCALE_FACTORS = (8.0, 6.0, 4.0, 3.0, 2.0, 1.5)
UPSCALE_TOLERANCE = 0.15


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """Luma in grey levels 0-255 (float32)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)


def cap_size(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image with its long side at most ``max_side`` (area filter) and the factor applied."""
    h, w = rgb.shape[:2]
    r = min(1.0, max_side / max(h, w))
    if r == 1.0:
        return rgb, 1.0
    return cv2.resize(rgb, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA), r


def sharpness(gray: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Variance of the Laplacian (grey levels squared), over ``mask`` when given."""
    lap = cv2.Laplacian(gray, cv2.CV_32F, ksize=3)
    values = lap[mask] if mask is not None else lap
    return float(values.var()) if values.size >= 4 else math.nan


def noise_sigma(gray: np.ndarray) -> float:
    """Standard deviation of Gaussian noise, in grey levels (wavelet median estimator)."""
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(gray.astype(np.float64)))


def jpeg_quality(path: str | Path) -> float:
    """The IJG quality (1-100) whose scaled luminance table is closest to the file's; NaN
    for a file that is not a JPEG or has no luminance table."""
    try:
        with Image.open(path) as img:
            tables = getattr(img, "quantization", None) if img.format == "JPEG" else None
    except Exception:  # noqa: BLE001 - the decode step reports unreadable files
        return math.nan
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return math.nan
    table = np.asarray(tables[0], np.float64)
    best, best_err = math.nan, math.inf
    for q in range(1, 101):
        scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
        ijg = np.clip(np.floor((IJG_LUMINANCE * scale + 50.0) / 100.0), 1, 255)
        err = float(np.abs(ijg - table).sum())
        if err < best_err:
            best, best_err = float(q), err
    return best


def reference_scores(rgb: np.ndarray, reference: np.ndarray) -> dict:
    """SSIM and PSNR (dB, at most 100) of ``rgb`` against ``reference`` (brought to ``rgb``'s
    size when they differ), on 8-bit RGB."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if reference.shape != rgb.shape:
        h, w = rgb.shape[:2]
        shrink = reference.shape[0] * reference.shape[1] > h * w
        reference = cv2.resize(reference, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    side = min(rgb.shape[:2])
    win = 7 if side >= 7 else max(side - (1 - side % 2), 1)  # an odd window that fits
    ssim = structural_similarity(reference, rgb, channel_axis=2, data_range=255, win_size=win)
    identical = np.array_equal(reference, rgb)  # PSNR is infinite: reported as 100 dB
    psnr = 100.0 if identical else min(float(peak_signal_noise_ratio(reference, rgb, data_range=255)), 100.0)
    return {"ssim": float(ssim), "psnr": psnr}


def _detail_above(gray: np.ndarray, scale: float) -> float:
    """Mean squared detail above ``scale`` x the band limit: what a round trip down to that
    scale and back loses."""
    h, w = gray.shape
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    up = cv2.resize(cv2.resize(gray, (sw, sh), interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_CUBIC)
    b = 2  # the resize borders are not detail
    return float(np.mean((gray - up)[b:-b, b:-b] ** 2)) if h > 2 * b and w > 2 * b else math.nan


def upscale_factor(gray: np.ndarray, tolerance: float = UPSCALE_TOLERANCE) -> float:
    """How much the image was enlarged, judged from its spectrum: the largest k of
    ``UPSCALE_FACTORS`` such that the detail above 1/k of the band limit is under
    ``tolerance`` x the detail in the octave below it (a photo at its own resolution has
    about as much detail in neighbouring octaves); 1 when none."""
    short = min(gray.shape)
    for k in UPSCALE_FACTORS:
        if short / (2 * k) < 8:  # too small to look an octave below 1/k
            continue
        above, below = _detail_above(gray, 1 / k), _detail_above(gray, 1 / (2 * k))
        if below - above > 1e-6 and above < tolerance * (below - above):
            return k
    return 1.0


def resolution_class(short_side: float) -> str:
    if not math.isfinite(short_side):
        return ""
    return next(name for limit, name in RESOLUTION_CLASSES if short_side < limit)


def image_measures(rgb: np.ndarray, gray_capped: np.ndarray, path: str | Path, reference: np.ndarray | None) -> dict:
    """Resolution and image quality of one decoded image (``gray_capped``: its luma at the
    audit's working size)."""
    h, w = rgb.shape[:2]
    k = upscale_factor(to_gray(cap_size(rgb, 2048)[0]))
    effective = min(h, w) / k
    row = {
        "width": w, "height": h, "megapixels": w * h / 1e6,
        "upscale_factor": k, "effective_short_side": effective,
        "resolution_class": resolution_class(effective), "nominal_resolution_class": resolution_class(min(h, w)),
        "sharpness": sharpness(gray_capped), "noise_sigma": noise_sigma(gray_capped), "jpeg_quality": jpeg_quality(path),
    }
    if reference is not None:
        row.update(reference_scores(rgb, reference))
    return row
