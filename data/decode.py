"""Robust image decoding: any file in, 8-bit RGB out, or a clear ``ImageDecodeError``.

Every detector sees 8-bit RGB whatever the file was (grayscale, CMYK, palette, alpha,
16-bit, EXIF-rotated), so that the file's *format* never reaches a model as a feature.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

log = logging.getLogger(__name__)

# 100 megapixels: well above any face photo, far below a decompression bomb
# (a 20000x20000 PNG declares 400 MP and would need 1.2 GB of RAM to decode).
# It is the one pixel limit: Pillow's own guard (89.5 MP) is set to it while decoding.
DEFAULT_MAX_PIXELS = 100_000_000
# Long side / short side. Resizing the short side to the model's input multiplies the pixels
# by the aspect ratio: a 1,000,000x1 PNG (2 KB) would need 49 GB at 128 px. 100:1 is far beyond
# any photo or panorama and keeps that resize under 100 x a square image (5 MB at 128 px).
DEFAULT_MAX_ASPECT = 100


class ImageDecodeError(ValueError):
    """The file is not an image we can turn into RGB pixels; the message says why."""


def file_kind(mode: int) -> str:
    """What a ``stat`` mode is, in words (for messages about entries that are not files)."""
    for test, word in (
        (stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return word
    return "special file"


def require_nonempty(path: Path, error: type[ImageDecodeError] = ImageDecodeError) -> None:
    """Raise ``error`` for a missing, unreadable, 0-byte or non-regular file (a broken symlink,
    a directory, a FIFO, a device), from ``stat`` alone, before any decoder opens it: opening
    a FIFO blocks until something writes to it."""
    try:
        st = path.stat()
    except OSError as e:
        if path.is_symlink():
            reason = "symlink loop" if e.errno == errno.ELOOP else "dangling symlink"
            raise error(f"{path}: {reason} (-> {os.readlink(path)})") from e
        raise error(f"cannot read {path}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file ({file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise error(f"{path}: empty file (0 bytes)")


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``: a warning above it,
    an error above twice it) set to ``limit`` for the block, then put back, so that a decode
    meets one limit, ``max_pixels``, and nothing leaks to other users of PIL. Per process,
    like ``warnings.catch_warnings``: decoding runs one file at a time per process."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_size(path: Path, w: int, h: int, max_pixels: int, max_aspect: float) -> None:
    """Refuse from the header what would cost too much memory to decode or to resize."""
    if w * h > max_pixels:
        # in MP, except for small limits (thumbnails, tests), which would read "0 MP"
        mp = max_pixels >= 1_000_000
        size = f"{w * h / 1e6:.0f} MP" if mp else f"{w * h} pixels"
        limit = f"{max_pixels / 1e6:.0f} MP" if mp else f"{max_pixels} pixel"
        raise ImageDecodeError(f"{path}: declares {w}x{h} = {size}, above the {limit} limit (decompression-bomb guard)")
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{path}: zero-sized image {w}x{h}")
    ratio = max(w, h) / min(w, h)
    if ratio > max_aspect:
        raise ImageDecodeError(
            f"{path}: declares {w}x{h}, aspect ratio {ratio:,.0f}:1, above the {max_aspect:g}:1 limit "
            "(resizing its short side to the model's input would take that many times a square image's memory)"
        )


def _require_finite(img: Image.Image, path: Path) -> None:
    """A float image with NaN or inf pixels has no defined brightness (rescaling it would turn
    it all black and call it fine): undecodable."""
    arr = np.asarray(img)
    finite = np.isfinite(arr)
    if finite.all():
        return
    n_nan = int(np.isnan(arr).sum())
    counts = [f"{n} {word}" for n, word in ((n_nan, "NaN"), (int((~finite).sum()) - n_nan, "inf")) if n]
    raise ImageDecodeError(f"{path}: float image with {' and '.join(counts)} pixel(s) of {arr.size}")


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
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> np.ndarray:
    """Decode ``path`` to an ``HxWx3`` uint8 RGB array with EXIF orientation applied.

    ``draft_size`` lets the JPEG decoder downscale by a power of two in the DCT domain
    when the image is at least twice that size on its short side (a large speed-up for
    big photos that will be resized anyway). A truncated file is decoded as far as it
    goes (with a warning) when ``allow_truncated``: a partial face is a better answer
    than none. Raises ``ImageDecodeError`` for anything that is not a usable image: among
    them, from the header and before any pixel is allocated, more than ``max_pixels`` (the
    only pixel limit: Pillow's own is set to it) or a long side more than ``max_aspect``
    times the short one; and float images with NaN or inf pixels.
    """
    path = Path(path)
    require_nonempty(path)
    try:
        # Pillow's check at open is the size check below; ours names the size and the limit.
        with warnings.catch_warnings(), _pillow_pixel_limit(None):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                _check_size(path, w, h, max_pixels, max_aspect)
                if draft_size and img.format == "JPEG" and min(w, h) >= 2 * draft_size:
                    img.draft("RGB", (draft_size, draft_size))
                # Frames and tiles met while loading (GIF, TIFF) answer to the same limit.
                with _pillow_pixel_limit(max_pixels):
                    img = _load_pixels(img, path, allow_truncated)
                img = ImageOps.exif_transpose(img)
                if img.mode == "F":
                    _require_finite(img, path)
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
