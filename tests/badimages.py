"""Builders for the bad inputs of issue 2, section 8, written into a tmp folder.

Shared by test_decode.py (one test per file) and test_infer.py (all of them in one
folder). Every image is made here with PIL/numpy; none is committed.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def natural(h: int = 48, w: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth colour image (gradients + noise) that survives JPEG well."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([yy, xx, 1 - (yy + xx) / 2], axis=-1) * 200 + 20
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def good_jpeg(path: Path, seed: int = 0, size: int = 48) -> Path:
    Image.fromarray(natural(size, size, seed)).save(path, quality=92)
    return path


def good_png(path: Path, seed: int = 0, size: int = 48) -> Path:
    Image.fromarray(natural(size, size, seed)).save(path)
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated_jpeg(path: Path, keep: float = 0.6) -> Path:
    full = path.with_name("full_" + path.name)
    good_jpeg(full, seed=3, size=64)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def random_bytes(path: Path, n: int = 2048, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def png_rgba(path: Path) -> Path:
    """Left half opaque red, right half fully transparent green, bottom-left half-transparent blue."""
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 255)
    a[:, 4:] = (0, 255, 0, 0)
    a[4:, :4] = (0, 0, 255, 128)
    Image.fromarray(a, "RGBA").save(path)
    return path


def grayscale_png(path: Path) -> Path:
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(g, "L").save(path)
    return path


def cmyk_jpeg(path: Path) -> Path:
    """Top half pure red, bottom half (0, 128, 255) azure, stored as CMYK."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8] = (255, 0, 0)
    rgb[8:] = (0, 128, 255)
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    return path


def png16(path: Path) -> Path:
    """16-bit grayscale ramp 0..65535 (left to right)."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(path)
    return path


def one_pixel(path: Path) -> Path:
    Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_declared_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid PNG header declaring ``width x height`` RGB with a few bytes of IDAT:
    under 100 bytes on disk, 1.2 GB if anything tried to allocate the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def exif_rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """Stored 40 wide x 20 high, dark, with a red 8x8 block at the stored top-left.
    Orientation 6 means "rotate 90 degrees clockwise to display": shown 20 wide x 40 high
    with the block at the top-right."""
    a = np.full((20, 40, 3), 30, np.uint8)
    a[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    return path


def palette_png_transparent(path: Path) -> Path:
    """Palette image: index 0 transparent (palette colour black), 1 red, 2 blue."""
    idx = np.zeros((6, 6), np.uint8)
    idx[:, 2:4] = 1
    idx[:, 4:] = 2
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.save(path, transparency=0)
    return path


# Every bad input of section 8 that is a single file: name -> builder.
BAD_FILES = {
    "empty.jpg": empty_file,
    "truncated.jpg": truncated_jpeg,
    "random_bytes.jpg": random_bytes,
    "alpha.png": png_rgba,
    "gray.png": grayscale_png,
    "cmyk.jpg": cmyk_jpeg,
    "sixteen_bit.png": png16,
    "one_pixel.png": one_pixel,
    "bomb.png": huge_declared_png,
    "exif_rotated.jpg": exif_rotated_jpeg,
    "palette.png": palette_png_transparent,
}
# Of those, the ones that cannot give pixels (fallback label expected in inference).
UNDECODABLE = {"empty.jpg", "random_bytes.jpg", "bomb.png"}
