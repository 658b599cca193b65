"""Issue 17, data side: hostile inputs end as one flagged file, never as a lost run.

Extreme aspect ratios (item 5), float images with NaN/inf (6), odd folder entries (7),
one pixel limit instead of two (13) and misspelt manifest splits (16). Every file is
built here, small on disk: the hostile part is what it declares, not its size.
"""
from __future__ import annotations

import csv
import logging
import os
import resource
import socket
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import badimages as bad
from conftest import compose
from data.canonical import Canonicalizer, resize_image
from data.dataset import ImageDataset, ViewsDataset
from data.decode import DEFAULT_MAX_ASPECT, ImageDecodeError, decode_image
from data.records import UNLABELLED, ManifestSource, Record, UnlabelledFolderSource
from data.splits import assign_splits
from unmask.tasks.infer import run_inference

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _png_1bit(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit grayscale PNG written row by row with zlib: a 40,000,000 x 1
    image is a few KB on disk and 5 MB of raw rows (PIL would build the pixels first)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bad._png_chunk(b"IHDR", ihdr) + bad._png_chunk(b"IDAT", idat) + bad._png_chunk(b"IEND", b""))
    return path


def _float_tiff(path: Path, special: float) -> Path:
    """A PIL mode "F" TIFF: a ramp with one NaN or inf pixel."""
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    a[3, 3] = special
    Image.fromarray(a, mode="F").save(path)
    return path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def _infer(ckpt, folder: Path, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Run inference; return {name: label} of the result and {name: reason} of the sidecar."""
    cfg = compose("infer", [f"ckpt={ckpt}", f"input={folder}", f"output_dir={out}", "scoring.num_workers=0", "scoring.batch_size=8"])
    result = run_inference(cfg)
    with open(result, newline="", encoding="utf-8") as f:
        labels = dict(csv.reader(f))
    sidecar = result.with_suffix(".undecodable.txt")
    reasons = dict(line.split("\t", 1) for line in sidecar.read_text(encoding="utf-8").splitlines()) if sidecar.exists() else {}
    return labels, reasons


# ------------------------------------------------------------------ 5. extreme aspect ratios


@pytest.mark.parametrize("width, height", [(1_000_000, 1), (1, 1_000_000), (40_000_000, 1)])
def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path, width, height):
    path = _png_1bit(tmp_path / "thin.png", width, height)
    assert path.stat().st_size < 20_000
    start, rss = time.perf_counter(), _peak_rss_mb()
    with pytest.raises(ImageDecodeError, match=rf"{width}x{height}.*aspect ratio .* above the {DEFAULT_MAX_ASPECT}:1 limit"):
        decode_image(path)
    assert time.perf_counter() - start < 1.0  # nothing was decoded
    assert _peak_rss_mb() - rss < 100


def test_aspect_ratio_at_the_limit_still_decodes(tmp_path):
    arr = decode_image(_png_1bit(tmp_path / "wide.png", DEFAULT_MAX_ASPECT * 2, 2))
    assert arr.shape == (2, DEFAULT_MAX_ASPECT * 2, 3)


def test_resize_refuses_an_output_larger_than_the_decode_limit():
    """An array from elsewhere (a hook, a video frame) cannot make the short-side resize
    allocate more than decode_image would ever accept (here 128 x 1,280,000 = 164 MP)."""
    with pytest.raises(ImageDecodeError, match=r"10000x1 to 1280000x128 .* above the 100 MP limit"):
        resize_image(np.zeros((1, 10_000, 3), np.uint8), 128)


def test_a_resize_error_is_a_per_file_failure(tmp_path, monkeypatch, caplog):
    """cv2.error (or a MemoryError) while resizing one file flags that file, like an
    undecodable one; the data set goes on."""
    import data.canonical

    def broken(*args, **kwargs):
        raise cv2.error("OpenCV(5.0.0) resize: Insufficient memory")

    records = [Record(str(bad.good_png(tmp_path / "a.png")), 0)]
    monkeypatch.setattr(data.canonical.cv2, "resize", broken)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        sample = ImageDataset(records, Canonicalizer(size=16, reencode=False))[0]
        (view,) = ViewsDataset(records, Canonicalizer(size=16, reencode=False))[0]
    for s in (sample, view):
        assert s["meta"]["ok"] is False and "cannot resize" in s["meta"]["error"] and "Insufficient memory" in s["meta"]["error"]
    assert any("a.png" in r.getMessage() for r in caplog.records)


def test_training_data_set_skips_extreme_aspect_ratios_with_a_warning(tmp_path, caplog):
    records = [
        Record(str(bad.good_png(tmp_path / "good.png")), 0),
        Record(str(_png_1bit(tmp_path / "thin.png", 1_000_000, 1)), 1),
        Record(str(_png_1bit(tmp_path / "thinner.png", 40_000_000, 1)), 1),
    ]
    rss = _peak_rss_mb()
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        ds = ImageDataset(records, Canonicalizer(size=128), train=True)
        samples = [ds[i] for i in range(3)]
    assert _peak_rss_mb() - rss < 200  # 1,000,000 x 1 at size 128 would need 49 GB
    assert [s["meta"]["ok"] for s in samples] == [True, False, False]
    assert all("aspect ratio" in s["meta"]["error"] for s in samples[1:])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "thin.png" in warned and "thinner.png" in warned


def test_inference_gives_extreme_aspect_ratios_the_fallback_row(tiny_ckpt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad.good_png(folder / "good.png")
    _png_1bit(folder / "thin.png", 1_000_000, 1)
    _png_1bit(folder / "thinner.png", 40_000_000, 1)
    rss = _peak_rss_mb()
    labels, reasons = _infer(tiny_ckpt, folder, tmp_path / "out")
    assert _peak_rss_mb() - rss < 500
    assert sorted(labels) == ["good.png", "thin.png", "thinner.png"]
    assert labels["thin.png"] == labels["thinner.png"] == "0"  # fallback_label
    assert sorted(reasons) == ["thin.png", "thinner.png"] and all("aspect ratio" in r for r in reasons.values())


# ------------------------------------------------------------------ 6. float images with NaN / inf


@pytest.mark.parametrize("special, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_float_image_with_nan_or_inf_is_undecodable(tmp_path, special, word):
    path = _float_tiff(tmp_path / "f.tif", special)
    with Image.open(path) as img:
        assert img.mode == "F"
    with pytest.raises(ImageDecodeError, match=rf"float image with 1 {word}"):
        decode_image(path)


def test_finite_float_image_still_decodes(tmp_path):
    arr = decode_image(_float_tiff(tmp_path / "f.tif", 0.5))
    assert arr.shape == (8, 8, 3) and arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255


def test_inference_flags_nan_float_images(tiny_ckpt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad.good_png(folder / "good.png")
    _float_tiff(folder / "nan.tif", np.nan)
    _float_tiff(folder / "inf.tif", np.inf)
    labels, reasons = _infer(tiny_ckpt, folder, tmp_path / "out")
    assert sorted(labels) == ["good.png", "inf.tif", "nan.tif"]
    assert sorted(reasons) == ["inf.tif", "nan.tif"]
    assert "NaN" in reasons["nan.tif"] and "inf" in reasons["inf.tif"]


# ------------------------------------------------------------------ 7. every folder entry


def _hostile_folder(tmp_path: Path) -> Path:
    """Regular files plus every kind of entry that is not one."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    bad.good_png(root / "good.png")
    bad.good_png(root / "sub" / "x.png", seed=1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    bad.good_png(outside / "y.png", seed=2)
    os.symlink(outside / "y.png", root / "file_link.png")  # symlink to a regular file: a row
    os.symlink(outside, root / "linked_dir")  # symlink to a directory outside: followed once
    os.symlink(outside, root / "relinked")  # the same directory again: logged, not listed twice
    os.symlink(root / "sub", root / "alias_of_sub")  # a directory already listed under its own name
    os.symlink(root, root / "sub" / "up")  # a directory loop
    os.symlink(tmp_path / "nowhere.png", root / "dangling.png")
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    os.mkfifo(root / "fifo.jpg")
    os.symlink(os.devnull, root / "device.jpg")  # a character device
    sock_path = root / "sock"
    if len(str(sock_path)) < 100:  # AF_UNIX path length limit
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sock_path))
        s.close()
    return root


@pytest.mark.timeout(60)
def test_every_folder_entry_gets_a_record_or_a_logged_reason(tmp_path, caplog):
    root = _hostile_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="data.records"):
        recs = UnlabelledFolderSource(str(root)).records()
    names = [Path(r.path).relative_to(root).as_posix() for r in recs]
    assert names == ["dangling.png", "file_link.png", "good.png", "linked_dir/y.png", "loop_a", "loop_b", "sub/x.png"]
    assert all(r.label == UNLABELLED for r in recs)
    log = "\n".join(r.getMessage() for r in caplog.records)
    for entry, reason in [
        ("fifo.jpg", "FIFO"),
        ("device.jpg", "character device"),
        ("relinked", "already listed"),
        ("alias_of_sub", "already listed"),
        ("up", "loop"),
    ] + ([("sock", "socket")] if (root / "sock").exists() else []):
        assert any(entry in line and reason in line for line in log.splitlines()), (entry, reason, log)


@pytest.mark.timeout(60)
def test_decoder_names_broken_links_and_never_opens_a_fifo(tmp_path):
    root = _hostile_folder(tmp_path)
    with pytest.raises(ImageDecodeError, match="dangling symlink"):
        decode_image(root / "dangling.png")
    with pytest.raises(ImageDecodeError, match="symlink loop"):
        decode_image(root / "loop_a")
    with pytest.raises(ImageDecodeError, match=r"not a regular file \(FIFO\)"):
        decode_image(root / "fifo.jpg")  # opening it would block until a writer came
    with pytest.raises(ImageDecodeError, match=r"not a regular file \(character device\)"):
        decode_image(root / "device.jpg")


def test_unreadable_directory_is_a_logged_warning(tmp_path, monkeypatch, caplog):
    """PermissionError while listing a folder: the folder is named in a warning (the test
    injects the error, so it runs as root too, where chmod 000 does not stop a read)."""
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    bad.good_png(root / "good.png")
    bad.good_png(root / "locked" / "hidden_from_us.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="data.records"):
        recs = UnlabelledFolderSource(str(root)).records()
    assert [Path(r.path).name for r in recs] == ["good.png"]
    assert any("locked" in r.getMessage() and "Permission denied" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 folder anyway")
def test_chmod_000_directory_is_a_logged_warning(tmp_path, caplog):
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    bad.good_png(root / "good.png")
    bad.good_png(root / "locked" / "x.png")
    (root / "locked").chmod(0)
    try:
        with caplog.at_level(logging.WARNING, logger="data.records"):
            recs = UnlabelledFolderSource(str(root)).records()
    finally:
        (root / "locked").chmod(0o755)
    assert [Path(r.path).name for r in recs] == ["good.png"]
    assert any("locked" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(300)
def test_inference_over_a_hostile_folder(tiny_ckpt, tmp_path):
    root = _hostile_folder(tmp_path)
    labels, reasons = _infer(tiny_ckpt, root, tmp_path / "out")
    assert sorted(labels) == ["dangling.png", "file_link.png", "good.png", "linked_dir/y.png", "loop_a", "loop_b", "sub/x.png"]
    assert sorted(reasons) == ["dangling.png", "loop_a", "loop_b"]
    assert "dangling symlink" in reasons["dangling.png"] and "symlink loop" in reasons["loop_a"]


# ------------------------------------------------------------------ 13. one pixel limit


def test_project_pixel_limit_replaces_pillows(tmp_path, monkeypatch):
    """Pillow's own guard (MAX_IMAGE_PIXELS, lowered here to 1000) does not apply: only
    ``max_pixels`` does, above Pillow's warning level and above its error level (2x)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_image(bad.good_png(tmp_path / "a.png", size=40), max_pixels=2000).shape == (40, 40, 3)  # 1600 px
    assert decode_image(bad.good_png(tmp_path / "b.png", size=60), max_pixels=4000).shape == (60, 60, 3)  # 3600 > 2x1000
    with pytest.raises(ImageDecodeError, match=r"declares 50x50 = 2500 pixels, above the 2000 pixel limit"):
        decode_image(bad.good_png(tmp_path / "c.png", size=50), max_pixels=2000)
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back: nothing leaks outside decode_image


def test_95_megapixels_pass_the_default_limit(tmp_path):
    """95 MP is above Pillow's 89.5 MP but below the documented 100 MP: the size check passes
    (the file is a header with no pixel data, so strict decoding stops at the data)."""
    path = bad.huge_declared_png(tmp_path / "p95.png", width=10_000, height=9_500)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path, allow_truncated=False)
    assert "decompression-bomb" not in str(info.value) and "limit" not in str(info.value)


def test_101_megapixels_are_refused_with_the_project_message(tmp_path):
    path = bad.huge_declared_png(tmp_path / "p101.png", width=10_100, height=10_000)
    with pytest.raises(ImageDecodeError, match=r"declares 10100x10000 = 101 MP, above the 100 MP limit"):
        decode_image(path)


# ------------------------------------------------------------------ 16. manifest splits


def _manifest_folder(tmp_path: Path, splits: list[str]) -> Path:
    lines = ["relpath,label,split"]
    for i, split in enumerate(splits):
        (tmp_path / f"{i}.png").write_bytes(b"x")
        lines.append(f"{i}.png,{'real' if i % 2 else 'fake'},{split}")
    path = tmp_path / "MANIFEST.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_misspelt_split_is_an_error_naming_the_rows(tmp_path):
    manifest = _manifest_folder(tmp_path, ["train", "tset", "val", "tset", "test", "Trian"])
    with pytest.raises(ValueError, match=r"unknown split value in 3 row\(s\)") as info:
        ManifestSource(str(manifest)).records()
    message = str(info.value)
    assert "line 3 (1.png): 'tset'" in message and "line 5 (3.png): 'tset'" in message and "line 7 (5.png): 'Trian'" in message
    assert "train, val or test" in message


def test_partly_filled_split_column_is_an_error_naming_the_rows(tmp_path):
    manifest = _manifest_folder(tmp_path, ["train", "", "test", "val"] + [""] * 6)
    with pytest.raises(ValueError, match=r"7 row\(s\) have no split") as info:
        ManifestSource(str(manifest)).records()
    assert "line 3 (1.png)" in str(info.value) and "and 2 more" in str(info.value)


def test_split_column_spellings_and_all_empty(tmp_path):
    recs = ManifestSource(str(_manifest_folder(tmp_path, ["Train", " test ", "VAL"]))).records()
    assert [r.split for r in recs] == ["train", "test", "val"]
    # every cell empty: the manifest declares no split, so the seeded split assigns one
    (tmp_path / "empty").mkdir()
    recs = ManifestSource(str(_manifest_folder(tmp_path / "empty", [""] * 4))).records()
    assert all(r.split is None for r in recs)
    assert all(r.split in ("train", "val", "test") for r in assign_splits(recs))


def test_assign_splits_refuses_unknown_split_values():
    recs = [Record("/a.png", 0, split="train"), Record("/b.png", 1, split="tset")]
    with pytest.raises(ValueError, match=r"unknown split 'tset' .*/b.png"):
        assign_splits(recs)


# ---- the same bounds for video frames ----------------------------------------------------------
def test_a_video_of_extreme_aspect_ratio_is_one_failed_row(tmp_path):
    from test_video import write_video

    from data.video import VideoDecodeError, VideoFrameDataset, read_frames

    thin = write_video(tmp_path / "thin.mp4", [np.zeros((8, 1024, 3), np.uint8)] * 3)  # 128:1
    with pytest.raises(VideoDecodeError, match="aspect-ratio limit"):
        read_frames(thin, None)
    samples = list(VideoFrameDataset([Record(str(thin))], Canonicalizer(size=32)))
    assert len(samples) == 1 and not samples[0]["meta"]["ok"] and "aspect" in samples[0]["meta"]["error"]


def test_a_frame_that_cannot_be_resized_fails_alone(tmp_path, monkeypatch):
    import cv2
    from test_video import counter_frames, write_video

    from data.video import VideoFrameDataset

    video = write_video(tmp_path / "v.mp4", counter_frames(4))
    canonical = Canonicalizer(size=32)

    def broken(pixels):
        raise cv2.error("simulated allocation failure")

    monkeypatch.setattr(canonical, "resize_stage", broken)
    samples = list(VideoFrameDataset([Record(str(video))], canonical))
    assert samples and all(not s["meta"]["ok"] and "cannot resize" in s["meta"]["error"] for s in samples)
