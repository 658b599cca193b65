"""Canonicalisation: unit behaviour, and the issue's key property: a classifier that sees
only file-format traces separates the classes without it and falls to chance with it."""
from __future__ import annotations

import io
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from scipy.fft import dctn
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import unmask.core.config
from data.canonical import Canonicalizer, resize_image
from data.dataset import ImageDataset
from data.records import Record
from data.synthetic import natural_image


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (natural 1/f statistics) of any shape."""
    big = natural_image(np.random.default_rng(seed), max(h, w))
    return np.ascontiguousarray(big[:h, :w])


def _pil_jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _run(canon: Canonicalizer, arr: np.ndarray, train: bool) -> np.ndarray:
    """The data set's pixel path (dataset.ImageDataset.load_pixels without file or augment)."""
    return canon.encode(canon.finish(canon.resize_stage(arr), train), train)


# ---------------------------------------------------------------- unit behaviour


@pytest.mark.parametrize("policy", ["short_side", "square", "none"])
@pytest.mark.parametrize("shape", [(40, 50), (200, 120), (32, 32), (12, 20)])
@pytest.mark.parametrize("train", [True, False])
def test_output_is_always_size_by_size(policy, shape, train):
    canon = Canonicalizer(size=32, resize=policy, grayscale_p=0.5)
    out = _run(canon, _image(*shape), train)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_short_side_keeps_the_aspect_ratio():
    assert resize_image(_image(100, 200), 50, "short_side").shape == (50, 100, 3)
    assert resize_image(_image(200, 100), 50, "square").shape == (50, 50, 3)
    assert resize_image(_image(30, 70), 50, "none").shape == (30, 70, 3)


def test_evaluation_is_deterministic():
    canon = Canonicalizer(size=32, grayscale_p=1.0, scale_jitter=0.3)
    img = _image(50, 70)
    random.seed(1)
    a = _run(canon, img, train=False)
    random.seed(2)
    b = _run(canon, img, train=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[..., 0], a[..., 1])  # grayscale is a training augmentation only


def test_training_is_random_but_seeded():
    canon = Canonicalizer(size=32, scale_jitter=0.15)
    img = _image(48, 48)
    random.seed(0)
    a = [_run(canon, img, train=True) for _ in range(3)]
    random.seed(0)
    b = [_run(canon, img, train=True) for _ in range(3)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1]) or not np.array_equal(a[1], a[2])


def test_eval_reencode_equals_a_pil_jpeg_roundtrip():
    img = _image(32, 32)
    canon = Canonicalizer(size=32, eval_jpeg_quality=70)
    out = _run(canon, img, train=False)
    np.testing.assert_array_equal(out, _pil_jpeg(img, 70))
    assert not np.array_equal(out, img)  # and it did change the pixels


def test_train_reencode_uses_a_quality_in_the_range():
    img = _image(32, 32)
    canon = Canonicalizer(size=32, scale_jitter=0.0, train_jpeg_quality=(55, 55), train_reencode_before_jitter=False)
    np.testing.assert_array_equal(_run(canon, img, train=True), _pil_jpeg(img, 55))
    twice = Canonicalizer(size=32, scale_jitter=0.0, train_jpeg_quality=(55, 55), train_reencode_before_jitter=True)
    np.testing.assert_array_equal(_run(twice, img, train=True), _pil_jpeg(_pil_jpeg(img, 55), 55))


def test_reencode_false_changes_geometry_only():
    canon = Canonicalizer(size=32, reencode=False, grayscale_p=1.0)
    square = _image(32, 32)
    np.testing.assert_array_equal(_run(canon, square, train=False), square)
    # a larger image: exactly the area-resized, centre-cropped pixels
    wide = _image(64, 96)
    expected = cv2.resize(wide, (48, 32), interpolation=cv2.INTER_AREA)[:, 8:40]
    np.testing.assert_array_equal(_run(canon, wide, train=False), expected)
    # training without jitter: a crop of the resized image, no re-encode, no grayscale
    no_jitter = Canonicalizer(size=32, reencode=False, scale_jitter=0.0, grayscale_p=1.0)
    out = _run(no_jitter, wide, train=True)
    resized = cv2.resize(wide, (48, 32), interpolation=cv2.INTER_AREA)
    assert any(np.array_equal(out, resized[:, x : x + 32]) for x in range(17))


def test_grayscale_p_one_gives_equal_channels_in_training():
    canon = Canonicalizer(size=32, grayscale_p=1.0)
    for seed in range(3):
        random.seed(seed)
        out = _run(canon, _image(40, 40, seed), train=True)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 1], out[..., 2])


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"resize": "zigzag"}, "canonical.resize"),
        ({"train_jpeg_quality": (0, 300)}, "canonical.train_jpeg_quality"),
        ({"train_jpeg_quality": (90, 60)}, "canonical.train_jpeg_quality"),
        ({"eval_jpeg_quality": 0}, "canonical.eval_jpeg_quality"),
        ({"grayscale_p": -0.1}, "canonical.grayscale_p"),
        ({"size": 4}, "data.image_size"),
    ],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Canonicalizer(**kwargs)


# ------------------------------------------- format-only classes fall to chance

SIZE = 96  # 12x12 JPEG blocks per image
N = 80  # images per class in each of the fitting and held-out halves
_LUMA = np.array([0.299, 0.587, 0.114])
_ZIGZAG = [(0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]
_PERIODS = np.arange(2, 17)


def quantisation_comb(arr: np.ndarray) -> np.ndarray:
    """What a JPEG forensic tool reads from pixels: in aligned 8x8 blocks, how strongly each
    low DCT coefficient clusters on multiples of a step (the quantisation table)."""
    y = arr.astype(np.float64) @ _LUMA - 128.0
    h, w = (s // 8 * 8 for s in y.shape)
    blocks = y[:h, :w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
    coef = dctn(blocks, axes=(2, 3), norm="ortho")
    return np.concatenate(
        [np.cos(2 * np.pi * coef[:, :, u, v].ravel()[:, None] / _PERIODS).mean(0) for u, v in _ZIGZAG]
    )


def blockiness_spectrum(arr: np.ndarray) -> np.ndarray:
    """Shift-invariant block-grid detector: the power spectrum of the mean absolute
    neighbour difference along rows and columns (a block grid of period p is a peak at 1/p,
    wherever the grid sits and even after a mild rescale)."""
    y = arr.astype(np.float64) @ _LUMA
    spectrum = 0.0
    for profile in (np.abs(np.diff(y, axis=1)).mean(0), np.abs(np.diff(y, axis=0)).mean(1)):
        power = np.abs(np.fft.rfft(profile - profile.mean(), n=SIZE)) ** 2
        spectrum = spectrum + power / (power.sum() + 1e-9)
    return spectrum[1:]


def format_features(arr: np.ndarray) -> np.ndarray:
    return np.concatenate([quantisation_comb(arr), blockiness_spectrum(arr)])


def _write_format_only_set(root: Path, case: str) -> list[Record]:
    """Every image a different smooth natural-statistics picture (faces are smooth at this
    scale); the class lives only in how the file is stored."""
    rng = np.random.default_rng(0)
    flat_table = [5] * 64
    records = []
    for i in range(2 * N):
        for label in (0, 1):
            img = Image.fromarray(cv2.GaussianBlur(natural_image(rng, SIZE), (0, 0), 1.5))
            stem = root / f"{case}_{i:03d}_{label}"
            if case == "container":  # PNG reals, low-quality JPEG fakes (ffhq128/tpdne128 in faces-dev)
                path = stem.with_suffix(".png" if label == 0 else ".jpg")
                img.save(path, **({} if label == 0 else {"quality": 75}))
            else:  # both JPEG of similar strength; only the quantisation tables differ
                path = stem.with_suffix(".jpg")
                img.save(path, **({"quality": 85} if label == 0 else {"qtables": [flat_table, flat_table]}))
            records.append(Record(str(path), label, split="train" if i < N else "test"))
    return records


def _format_classifier_accuracy(records: list[Record], canonical: Canonicalizer, train: bool) -> float:
    """Fit a logistic regression on the format features of the first half of the pixels the
    data set yields, score it on the held-out half."""
    random.seed(0)  # the canonicaliser's random quality / crop
    ds = ImageDataset(records, canonical, train=train)
    x = np.stack([format_features(ds.load_pixels(i)[0]) for i in range(len(ds))])
    y = np.array([r.label for r in records])
    fit = np.array([r.split == "train" for r in records])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(x[fit], y[fit])
    return float(clf.score(x[~fit], y[~fit]))


def _canonical_from_config(option: str) -> Canonicalizer:
    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"canonical={option}", f"data.image_size={SIZE}", "paths.output_dir=."])
    return instantiate(cfg.canonical)


CHANCE_TOLERANCE = 0.65  # 160 held-out images: 0.65 is > 3.5 standard errors above 0.5


@pytest.fixture(scope="module")
def canonicals() -> dict[str, Canonicalizer]:
    return {"off": _canonical_from_config("off"), "default": _canonical_from_config("default")}


@pytest.mark.parametrize("case", ["container", "tables"])
def test_format_only_classes_fall_to_chance(case, canonicals, tmp_path):
    records = _write_format_only_set(tmp_path, case)
    # canonical=off: the decoded pixels (resize/centre crop only) give the format away
    raw = _format_classifier_accuracy(records, canonicals["off"], train=False)
    # canonical on: what a detector is trained on carries no format information
    canonical = _format_classifier_accuracy(records, canonicals["default"], train=True)
    print(f"{case}: format-only classifier accuracy off={raw:.3f} canonical={canonical:.3f}")
    assert raw >= 0.9, f"the {case} set should be separable from format traces alone (got {raw:.3f})"
    assert canonical < CHANCE_TOLERANCE, f"canonicalised {case} set still separable: {canonical:.3f}"
    if case == "container":
        # Geometry jitter alone (canonical=off in training) does not hide a low-quality JPEG
        # history, and neither does a re-encode only after the rescale: the old block grid
        # survives both; the re-encode before the rescale is what takes it away.
        jitter_only = _format_classifier_accuracy(records, canonicals["off"], train=True)
        after_only = Canonicalizer(**{**vars(canonicals["default"]), "train_reencode_before_jitter": False})
        reencode_after_only = _format_classifier_accuracy(records, after_only, train=True)
        print(f"{case}: off in training={jitter_only:.3f}, re-encode after rescale only={reencode_after_only:.3f}")
        assert jitter_only >= 0.85
        assert reencode_after_only > canonical
