"""Self-blended forgeries (data/sbi.py): the mask is exactly the changed pixels."""
from __future__ import annotations

import numpy as np
import pytest

from data.sbi import SelfBlend


def _face(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A smooth, textured image (a blend must be able to change it)."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], axis=-1).astype(np.float64)
    return np.clip(base + rng.normal(0, 12, base.shape) + 40, 0, 255).astype(np.uint8)


def _landmarks(size: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    return np.stack([size / 2 + 12 * np.cos(t), size / 2 + 15 * np.sin(t)], axis=1).astype(np.float32)


def _check_exact(image, out, mask):
    changed = (out != image).any(axis=2)
    assert mask.dtype == np.float32 and mask.shape == image.shape[:2]
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert np.array_equal(mask > 0, changed), "mask must be > 0 exactly where pixels changed"


@pytest.mark.parametrize("with_landmarks", [False, True])
def test_mask_covers_exactly_the_changed_pixels(with_landmarks):
    blend = SelfBlend(p=1.0)
    forged = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        image = _face(rng)
        lm = _landmarks() if with_landmarks else None
        out, label, mask, gen = blend(image, 0, lm, rng)
        if label == 1:
            forged += 1
            assert gen == "self_blend"
            assert out.dtype == np.uint8 and out.shape == image.shape
            _check_exact(image, out, mask)
            assert (mask > 0).mean() >= blend.min_mask_area
        else:
            assert np.array_equal(out, image) and not mask.any()
    assert forged >= 35


def test_hull_region_follows_the_landmarks():
    blend = SelfBlend(p=1.0, hull_morph=0.0, mask_blur=(0.0, 0.0), blend_ratio=(1.0, 1.0))
    rng = np.random.default_rng(3)
    image = _face(rng, 64)
    lm = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], np.float32)  # a square hull
    out, label, mask, _ = blend(image, 0, lm, rng)
    assert label == 1
    ys, xs = np.nonzero(mask)
    assert ys.min() >= 10 and ys.max() <= 30 and xs.min() >= 10 and xs.max() <= 30
    _check_exact(image, out, mask)


def test_splice_with_a_donor():
    blend = SelfBlend(p=1.0, splice_p=1.0)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        image = _face(rng)
        donor_image = 255 - image
        out, label, mask, gen = blend(image, 0, _landmarks(), rng, donor=lambda r, d=donor_image: d)
        assert label == 1 and gen == "splice"
        _check_exact(image, out, mask)


def test_source_equal_to_target_changes_nothing():
    """A pixel the blend cannot move (same source and target value) is not in the mask."""
    blend = SelfBlend(p=1.0, splice_p=1.0, blend_ratio=(1.0, 1.0))
    rng = np.random.default_rng(0)
    image = _face(rng)
    donor_image = image.copy()
    donor_image[:, 24:] = 0  # left half identical to the target
    out, label, mask, _ = blend(image, 0, None, rng, donor=lambda r: donor_image)
    assert label == 1
    same = (image[:, 24:] == 0).all(axis=2)
    assert not mask[:, :24].any() and not mask[:, 24:][same].any()
    _check_exact(image, out, mask)


def test_untouched_reals_have_a_zero_mask_and_fakes_pass_through():
    rng = np.random.default_rng(0)
    image = _face(rng)
    out, label, mask, gen = SelfBlend(p=0.0)(image, 0, None, rng)
    assert label == 0 and gen is None and np.array_equal(out, image)
    assert mask.shape == (48, 48) and mask.dtype == np.float32 and not mask.any()
    out, label, mask, gen = SelfBlend(p=1.0)(image, 1, _landmarks(), rng)
    assert label == 1 and mask is None and gen is None and out is image


def test_deterministic_given_the_rng():
    image = _face(np.random.default_rng(0))
    blend = SelfBlend(p=0.7, splice_p=0.5)
    donor = lambda r: _face(r)  # noqa: E731 - the donor draws from the same rng
    a = [blend(image, 0, None, np.random.default_rng(s), donor) for s in range(8)]
    b = [blend(image, 0, None, np.random.default_rng(s), donor) for s in range(8)]
    for (ia, la, ma, ga), (ib, lb, mb, gb) in zip(a, b):
        assert np.array_equal(ia, ib) and la == lb and ga == gb and np.array_equal(ma, mb)
    assert len({(x[1], x[3]) for x in a}) > 1  # the rng does decide something


@pytest.mark.parametrize("kwargs,key", [({"p": 1.5}, "p"), ({"blend_ratio": (0.8, 0.2)}, "blend_ratio"), ({"mask_blur": (0.1,)}, "mask_blur")])
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"augment.forgery.{key}"):
        SelfBlend(**kwargs)


def test_sbi_config_composes_with_light_pixels():
    from hydra.utils import instantiate

    from conftest import compose

    cfg = compose("train", ["augment=sbi", "paths.output_dir=/tmp/unused"])
    light = compose("train", ["augment=light", "paths.output_dir=/tmp/unused"])
    assert cfg.augment.pixels == light.augment
    aug = instantiate(cfg.augment)
    assert isinstance(aug.forgery, SelfBlend) and aug.forgery.p == 0.5
