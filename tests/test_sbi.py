"""Self-blended forgeries (data/sbi.py): the mask is the binary blended region, never empty;
with the transforms on the source, every changed pixel is inside it (issue 12 replaced the
soft blend-weight mask; tests/test_fidelity_a.py holds the paper's recipe)."""
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


def _check_region(image, out, mask, min_area):
    """A binary, non-empty mask; the blend changed pixels inside it, none outside it (with
    the transforms on the source, the target outside the region is the image itself)."""
    changed = (out != image).any(axis=2)
    assert mask.dtype == np.float32 and mask.shape == image.shape[:2]
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}, "the ground truth is binary"
    assert mask.mean() >= min_area
    assert not changed[mask == 0].any(), "a pixel changed outside the mask"
    assert changed[mask == 1].any(), "nothing changed inside the mask"


@pytest.mark.parametrize("with_landmarks", [False, True])
def test_mask_is_the_blended_region(with_landmarks):
    blend = SelfBlend(p=1.0, transform_target_p=0.0)
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
            _check_region(image, out, mask, blend.min_mask_area)
        else:
            assert np.array_equal(out, image) and not mask.any()
    assert forged >= 35


def test_hull_region_follows_the_landmarks():
    """With every deformation off, the ground truth is the landmarks' hull itself."""
    blend = SelfBlend(p=1.0, hull_morph=0.0, mask_work_size=None, elastic_alpha=0.0, mask_erode_kernel=(0, 0),
                      mask_edge_kernel=(0, 0), blend_ratios=(1.0,), scale_jitter=0.0, translate_jitter=0.0, transform_target_p=0.0)
    rng = np.random.default_rng(3)
    image = _face(rng, 64)
    lm = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], np.float32)  # a square hull
    out, label, mask, _ = blend(image, 0, lm, rng)
    assert label == 1
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 30, 10, 30)
    _check_region(image, out, mask, blend.min_mask_area)


def test_splice_with_a_donor():
    blend = SelfBlend(p=1.0, splice_p=1.0)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        image = _face(rng)
        donor_image = 255 - image
        out, label, mask, gen = blend(image, 0, _landmarks(), rng, donor=lambda r, d=donor_image: d)
        assert label == 1 and gen == "splice"
        _check_region(image, out, mask, blend.min_mask_area)


def test_a_blend_that_changes_nothing_is_no_forgery():
    """A donor equal to the target moves no pixel: the real is left alone (label 0, empty
    mask), never returned as a forgery with a mask it does not show."""
    blend = SelfBlend(p=1.0, splice_p=1.0, scale_jitter=0.0, translate_jitter=0.0)  # no misalignment either
    image = _face(np.random.default_rng(0))
    out, label, mask, gen = blend(image, 0, None, np.random.default_rng(0), donor=lambda r: image.copy())
    assert label == 0 and gen is None and np.array_equal(out, image) and not mask.any()


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


@pytest.mark.parametrize("kwargs,key", [({"p": 1.5}, "p"), ({"blend_ratios": (0.5, 1.5)}, "blend_ratios"), ({"blend_ratios": ()}, "blend_ratios"),
                                        ({"mask_edge_kernel": (9,)}, "mask_edge_kernel"), ({"transform_target_p": -0.1}, "transform_target_p")])
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
