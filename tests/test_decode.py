"""Issue 2, sections 3 and 8: ``decode_image`` on every bad input, one test each."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

import badimages as bad
from data.canonical import Canonicalizer
from data.dataset import ImageDataset
from data.decode import ImageDecodeError, decode_image
from data.records import Record


def _is_rgb8(arr: np.ndarray) -> bool:
    return arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.flags["C_CONTIGUOUS"]


def test_good_jpeg_roundtrips_to_rgb(tmp_path):
    arr = decode_image(bad.good_jpeg(tmp_path / "ok.jpg"))
    assert _is_rgb8(arr) and arr.shape == (48, 48, 3)
    assert np.abs(arr.astype(int) - bad.natural(48, 48, 0).astype(int)).mean() < 6  # JPEG q92 error


def test_zero_byte_file_is_a_clear_error(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"empty file \(0 bytes\)"):
        decode_image(bad.empty_file(tmp_path / "empty.jpg"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image(tmp_path / "nope.jpg")


def test_truncated_jpeg_is_decoded_partially_with_a_warning(tmp_path, caplog):
    path = bad.truncated_jpeg(tmp_path / "truncated.jpg", keep=0.6)
    with caplog.at_level(logging.WARNING, logger="data.decode"):
        arr = decode_image(path)
    assert _is_rgb8(arr) and arr.shape == (64, 64, 3)
    assert any("truncated" in r.getMessage() for r in caplog.records)
    # The part that is present is the real picture: the top rows match the full image.
    full = bad.good_jpeg(tmp_path / "full.jpg", seed=3, size=64)
    top = decode_image(full)[:8]
    assert np.abs(arr[:8].astype(int) - top.astype(int)).max() <= 2
    # The flag is restored: a later strict decode still refuses truncated files.
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_strict_mode_is_an_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(bad.truncated_jpeg(tmp_path / "truncated.jpg"), allow_truncated=False)


def test_random_bytes_named_jpg_is_a_clear_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(bad.random_bytes(tmp_path / "noise.jpg"))


def test_png_with_alpha_is_composited_on_white(tmp_path):
    arr = decode_image(bad.png_rgba(tmp_path / "alpha.png"))
    assert _is_rgb8(arr) and arr.shape == (8, 8, 3)
    assert tuple(arr[0, 0]) == (255, 0, 0)  # opaque red stays red
    assert tuple(arr[0, 7]) == (255, 255, 255)  # fully transparent green: background, not green
    # 128/255 blue over white: (127, 127, 255) +- 1 rounding
    assert np.abs(arr[7, 0].astype(int) - (127, 127, 255)).max() <= 1


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = decode_image(bad.grayscale_png(tmp_path / "gray.png"))
    expected = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    assert _is_rgb8(arr)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], expected)


def test_cmyk_jpeg_becomes_rgb_with_right_colours(tmp_path):
    arr = decode_image(bad.cmyk_jpeg(tmp_path / "cmyk.jpg"))
    assert _is_rgb8(arr) and arr.shape == (16, 16, 3)
    assert np.abs(arr[2, 2].astype(int) - (255, 0, 0)).max() <= 12  # red, not cyan (no inversion)
    assert np.abs(arr[12, 12].astype(int) - (0, 128, 255)).max() <= 12


def test_16bit_png_is_scaled_to_8bit_not_clipped(tmp_path):
    arr = decode_image(bad.png16(tmp_path / "sixteen.png"))
    assert _is_rgb8(arr) and arr.shape == (4, 64, 3)
    row = arr[0, :, 0].astype(int)
    expected = np.linspace(0, 255, 64)
    assert np.abs(row - expected).max() <= 1  # linear 0..255: scaled
    assert (row == 255).sum() == 1  # clipping at 255 would saturate most of the ramp
    assert np.all(np.diff(row) >= 0)
    assert np.all(arr[..., 0] == arr[..., 2])


def test_dark_16bit_png_stays_dark(tmp_path):
    """A 16-bit value of 200 (of 65535) is almost black, not 200/255 grey."""
    from PIL import Image

    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "dark16.png")
    assert decode_image(tmp_path / "dark16.png").max() <= 1


def test_48bit_rgb_png_is_scaled(tmp_path):
    import cv2

    bgr = np.zeros((4, 4, 3), np.uint16)
    bgr[..., 2], bgr[..., 1] = 65535, 32896  # R full, G half
    cv2.imwrite(str(tmp_path / "rgb48.png"), bgr)
    arr = decode_image(tmp_path / "rgb48.png")
    assert _is_rgb8(arr)
    assert np.abs(arr[0, 0].astype(int) - (255, 128, 0)).max() <= 1


def test_one_pixel_image(tmp_path):
    arr = decode_image(bad.one_pixel(tmp_path / "px.png"))
    assert arr.shape == (1, 1, 3) and tuple(arr[0, 0]) == (10, 200, 30)


def test_declared_20000x20000_hits_the_bomb_guard_fast(tmp_path):
    path = bad.huge_declared_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 200  # the file is tiny; only its header is huge
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="decompression-bomb guard"):
        decode_image(path)
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded


def test_own_pixel_limit_is_enforced_from_the_header(tmp_path):
    """``max_pixels`` below PIL's own limit: the project's guard answers, quoting the size."""
    path = bad.huge_declared_png(tmp_path / "big.png", width=3000, height=2000)
    with pytest.raises(ImageDecodeError, match=r"declares 3000x2000 = 6 MP, above the 5 MP limit"):
        decode_image(path, max_pixels=5_000_000)


def test_exif_orientation_is_applied(tmp_path):
    arr = decode_image(bad.exif_rotated_jpeg(tmp_path / "rot.jpg", orientation=6))
    assert arr.shape == (40, 20, 3)  # stored 40x20 (w x h), displayed 20 wide x 40 high
    # Rotating 90 degrees clockwise takes the stored top-left block to the top-right.
    top_right = arr[1:7, -7:-1].reshape(-1, 3).mean(axis=0)
    top_left = arr[1:7, 1:7].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[1] < 60  # red
    assert top_left.max() < 60  # dark background


def test_exif_orientation_3_is_upside_down(tmp_path):
    arr = decode_image(bad.exif_rotated_jpeg(tmp_path / "rot3.jpg", orientation=3))
    assert arr.shape == (20, 40, 3)
    assert arr[-4, -4, 0] > 200 and arr[3, 3, 0] < 60  # block moved to the bottom-right


def test_palette_png_with_transparency(tmp_path):
    arr = decode_image(bad.palette_png_transparent(tmp_path / "pal.png"))
    assert _is_rgb8(arr) and arr.shape == (6, 6, 3)
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent index: background, not its black
    assert tuple(arr[0, 2]) == (255, 0, 0)
    assert tuple(arr[0, 5]) == (0, 0, 255)


def test_dataset_turns_an_undecodable_file_into_a_flagged_blank_sample(tmp_path):
    """The sample dict survives a bad file: ok=False, the error named, a blank image."""
    records = [Record(str(bad.random_bytes(tmp_path / "x.jpg")), 1), Record(str(bad.one_pixel(tmp_path / "p.png")), 0)]
    ds = ImageDataset(records, Canonicalizer(size=16), train=False)
    broken, tiny = ds[0], ds[1]
    assert broken["meta"]["ok"] is False and "not a decodable image" in broken["meta"]["error"]
    assert broken["image"].shape == (3, 16, 16) and torch.count_nonzero(broken["image"]) == 0
    assert broken["label"] == 1 and broken["meta"]["path"] == records[0].path
    assert tiny["meta"]["ok"] is True and tiny["meta"]["error"] == ""
    assert tiny["image"].shape == (3, 16, 16) and tiny["image"].dtype == torch.float32
    assert 0.0 <= float(tiny["image"].min()) and float(tiny["image"].max()) <= 1.0
    # a 1x1 green-ish pixel stretched to 16x16 stays that colour (through the JPEG re-encode)
    assert abs(float(tiny["image"][1].mean()) - 200 / 255) < 0.05
