"""Robust image decoding: any file in, 8-bit RGB out, or a clear ``ImageDecodeError``.

Every detector sees 8-bit RGB whatever the file was (grayscale, CMYK, palette, alpha,
16-bit, EXIF-rotated), so that the file's *format* never reaches a model as a feature.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

log = logging.getLogger(__name__)

# 100 megapixels: well above any face photo, far below a decompression bomb
# (a 20000x20000 PNG declares 400 MP and would need 1.2 GB of RAM to decode).
DEFAULT_MAX_PIXELS = 100_000_000


class ImageDecodeError(ValueError):
    """The file is not an image we can turn into RGB pixels; the message says why."""


def require_nonempty(path: Path, error: type[ImageDecodeError] = ImageDecodeError) -> None:
    """Raise ``error`` for a missing, unreadable or 0-byte file, before any decoder sees it."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from e
    if size == 0:
        raise error(f"{path}: empty file (0 bytes)")


def _to_rgb(img: Image.Image, background: int = 255) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without letting mode leak into pixel statistics."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer: rescale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray((arr * 255 + 0.5).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on a fixed background: transparent pixels carry arbitrary colours.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(canvas, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


def decode_image(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_truncated: bool = True,
    draft_size: int | None = None,
) -> np.ndarray:
    """Decode ``path`` to an ``HxWx3`` uint8 RGB array with EXIF orientation applied.

    ``draft_size`` lets the JPEG decoder downscale by a power of two in the DCT domain
    when the image is at least twice that size on its short side (a large speed-up for
    big photos that will be resized anyway). A truncated file is decoded as far as it
    goes (with a warning) when ``allow_truncated``: a partial face is a better answer
    than none. Raises ``ImageDecodeError`` for anything that is not a usable image.
    """
    path = Path(path)
    require_nonempty(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        f"{path}: declares {w}x{h} = {w * h / 1e6:.0f} MP, above the "
                        f"{max_pixels / 1e6:.0f} MP limit (decompression-bomb guard)"
                    )
                if w < 1 or h < 1:
                    raise ImageDecodeError(f"{path}: zero-sized image {w}x{h}")
                if draft_size and img.format == "JPEG" and min(w, h) >= 2 * draft_size:
                    img.draft("RGB", (draft_size, draft_size))
                img = _load_pixels(img, path, allow_truncated)
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                arr = np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{path}: decompression-bomb guard: {e}") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise ImageDecodeError(f"{path}: not a decodable image ({type(e).__name__}: {e})") from e
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"{path}: decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _load_pixels(img: Image.Image, path: Path, allow_truncated: bool) -> Image.Image:
    try:
        img.load()
        return img
    except OSError as e:
        if not allow_truncated or "truncated" not in str(e).lower():
            raise
    # Re-open: a failed load leaves the decoder in an undefined state.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(path) as again:
            again.load()
            log.warning("%s: truncated file, decoded the part that is present", path)
            return again.copy()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
