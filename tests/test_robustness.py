"""Issue 4: evaluation perturbations, attacks, D_r / D_g and the robustness grid."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data.canonical import Canonicalizer, jpeg_roundtrip
from data.dataset import ViewsDataset
from data.records import Record
from data.synthetic import natural_image
from detectors.base import Detector, DetectorOutput
from unmask.robustness.attacks import FGSM, PGD, AttackedDetector
from unmask.robustness.grid import PerturbationGrid, balanced_sample, degradation_rate, generalization_rate, relative_drop
from unmask.robustness.perturbations import (
    PixelPerturbation,
    box_blur,
    crop,
    gaussian_blur,
    gaussian_noise,
    hflip,
    jpeg,
    resize,
    rotate,
    scale,
    sharpen,
    uniform_noise,
)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return natural_image(np.random.default_rng(3), 64)


def apply(transform, image, index=0, seed=0):
    return PixelPerturbation("t", 0.0, transform, seed)(image, index)


# --- pixel perturbations ------------------------------------------------------------------


@pytest.mark.parametrize("q", [30, 75, 95])
def test_jpeg_equals_pil_reencode(photo, q):
    assert np.array_equal(apply(jpeg(q), photo), jpeg_roundtrip(photo, q))


def test_gaussian_blur_sigma_zero_is_identity_and_sigma_matches_opencv(photo):
    assert np.array_equal(apply(gaussian_blur(0), photo), photo)
    blurred = apply(gaussian_blur(2), photo)
    ref = cv2.GaussianBlur(photo, (0, 0), 2)
    assert np.abs(blurred.astype(int) - ref).max() <= 1
    assert np.abs(blurred.astype(int) - photo).mean() > 1.0  # it did blur


def test_box_blur_is_a_mean_filter(photo):
    assert np.array_equal(apply(box_blur(1), photo), photo)
    assert np.array_equal(apply(box_blur(5), photo), cv2.blur(photo, (5, 5)))


@pytest.mark.parametrize("std", [5.0, 20.0])
def test_gaussian_noise_has_the_stated_std(std):
    gray = np.full((256, 256, 3), 128, np.uint8)
    diff = apply(gaussian_noise(std), gray).astype(float) - 128
    assert abs(diff.std() - std) / std < 0.03
    assert abs(diff.mean()) < 0.2


def test_uniform_noise_is_bounded_with_the_uniform_std():
    gray = np.full((256, 256, 3), 128, np.uint8)
    diff = apply(uniform_noise(12), gray).astype(float) - 128
    assert np.abs(diff).max() <= 12
    assert abs(diff.std() - 12 / math.sqrt(3)) / (12 / math.sqrt(3)) < 0.03


def test_noise_is_seeded_per_image(photo):
    op = PixelPerturbation("n", 10, gaussian_noise(10), seed=7)
    assert np.array_equal(op(photo, 5), op(photo, 5))
    assert not np.array_equal(op(photo, 5), op(photo, 6))


def test_sharpen_raises_high_frequency_energy(photo):
    lap = lambda a: cv2.Laplacian(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var()  # noqa: E731
    assert np.array_equal(apply(sharpen(0), photo), photo)
    assert lap(apply(sharpen(0.5), photo)) > 1.5 * lap(photo)


def test_flip_rotation_resize_scale_crop_geometry(photo):
    assert np.array_equal(apply(hflip(), photo), photo[:, ::-1])
    assert np.array_equal(apply(rotate(90), photo), np.rot90(photo, 1))  # counter-clockwise
    rot = apply(rotate(15), photo)
    assert rot.shape == photo.shape and not np.array_equal(rot, photo)
    half = cv2.resize(cv2.resize(photo, (32, 32), interpolation=cv2.INTER_AREA), (64, 64), interpolation=cv2.INTER_LINEAR)
    assert np.abs(apply(resize(0.5), photo).astype(int) - half).max() <= 1
    assert np.array_equal(apply(resize(1.0), photo), photo)
    zoom = apply(scale(2.0), photo)  # centre 32x32 enlarged to 64x64
    ref = cv2.resize(photo[16:48, 16:48], (64, 64), interpolation=cv2.INTER_LINEAR)
    assert zoom.shape == photo.shape and np.abs(zoom[8:56, 8:56].astype(int) - ref[8:56, 8:56]).mean() < 2.0
    assert np.array_equal(apply(crop(0.5), photo), photo[16:48, 16:48])


def test_perturbation_at_decoded_stage_precedes_canonicalisation(tmp_path, photo):
    path = tmp_path / "a.png"
    Image.fromarray(photo).save(path)
    records = [Record(str(path), 1)]
    canon = Canonicalizer(size=64, reencode=False)  # lossless, so a flip must commute exactly
    clean = ViewsDataset(records, canon, raw_cache={})[0][0]["image"]
    flipped = ViewsDataset(records, canon, decoded_hook=PixelPerturbation("hflip", 1, hflip()))[0][0]["image"]
    assert torch.equal(flipped, clean.flip(-1))
    q = 40
    canon_jpeg = Canonicalizer(size=32, eval_jpeg_quality=None)  # resize to 32, no re-encode
    small = ViewsDataset(records, canon_jpeg, decoded_hook=PixelPerturbation("jpeg", q, jpeg(q)))[0][0]["image"]
    expect = cv2.resize(jpeg_roundtrip(photo, q), (32, 32), interpolation=cv2.INTER_AREA)
    assert torch.equal(small, torch.from_numpy(expect).permute(2, 0, 1).float() / 255)


def test_grid_builds_every_cell_and_rejects_bad_stage():
    grid = PerturbationGrid({"jpeg": {"make": jpeg, "severities": [90, 50]}, "fgsm": {"make": FGSM, "severities": [2]}})
    cells = list(grid.cells())
    assert [(c.family, c.severity, c.is_attack) for c in cells] == [("jpeg", 90, False), ("jpeg", 50, False), ("fgsm", 2, True)]
    with pytest.raises(ValueError, match="stage"):
        PerturbationGrid({}, stage="later")


def test_balanced_sample_keeps_both_classes():
    recs = [Record(f"r{i}", 0) for i in range(30)] + [Record(f"f{i}", 1) for i in range(5)]
    picked = balanced_sample(recs, 10, seed=0)
    assert len(picked) == 10 and sum(r.label for r in picked) == 5


# --- formulas -------------------------------------------------------------------------------


def test_degradation_and_generalization_rates_on_known_numbers():
    assert degradation_rate(0.80, 0.90) == pytest.approx(0.1 / 0.9)
    assert generalization_rate(0.45, 0.90) == pytest.approx(0.5)
    assert relative_drop(0.99, 0.90) == pytest.approx(0.1)  # |.|: a gain counts too
    assert relative_drop(0.9, 0.9) == 0.0
    assert math.isnan(relative_drop(0.5, 0.0)) and math.isnan(relative_drop(float("nan"), 0.9))


# --- attacks --------------------------------------------------------------------------------


class TinyDetector(Detector):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 1)

    def forward_normalized(self, x):
        f = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        return DetectorOutput(logit=self.fc(f).squeeze(1))


def _bce(det, x, y):
    return F.binary_cross_entropy_with_logits(det(x).logit, y.float()).item()


@pytest.mark.parametrize("attack", [FGSM(4), PGD(4, steps=5)])
def test_attacks_stay_in_the_eps_ball_and_raise_the_loss(attack):
    det = TinyDetector().eval()
    x = torch.rand(6, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    adv = attack.perturb(det, x, y)
    assert (adv - x).abs().max() <= 4 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert _bce(det, adv, y) > _bce(det, x, y)


def test_attacked_detector_works_under_inference_mode():
    det = TinyDetector().eval()
    x = torch.rand(4, 3, 32, 32)
    batch = {"label": torch.tensor([0, 1, 0, 1])}
    with torch.inference_mode():
        clean = det(x).prob
        attacked = AttackedDetector(det, FGSM(8))(x, batch).prob
    y = batch["label"].float()
    assert F.binary_cross_entropy(attacked, y) > F.binary_cross_entropy(clean, y)


# --- the grid through evaluate.py --------------------------------------------------------------


def test_evaluate_with_perturb_writes_the_degradation_report(tiny_run, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose
    from unmask.core.schemas import ScoringConfig
    from unmask.tasks.evaluate import evaluate_records

    cfg = compose("evaluate", ["perturb=spec", f"ckpt={tiny_run['ckpt']}", f"paths.cache_dir={tiny_run['cache_dir']}", f"paths.output_dir={tmp_path}",
                               "data.source.n_per_class=16", "data.source.size=32", "data.image_size=32", "data.num_workers=0"])
    grid = instantiate(cfg.perturb, _convert_="all")
    assert len(grid) >= 40  # the spec grid: 13 families
    keep = {"jpeg": [50], "hflip": [1], "fgsm": [2]}
    grid.families = {k: v for k, v in grid.families.items() if k in keep}
    for k, sev in keep.items():
        grid.families[k].severities = sev
    data = instantiate(cfg.data)
    data.setup()
    report = evaluate_records(str(tiny_run["ckpt"]), data.records["test"], tmp_path, ScoringConfig(num_workers=0, progress=False), perturb=grid)
    rows = report["robustness"]
    assert [r["family"] for r in rows] == ["clean", "jpeg", "hflip", "fgsm"]
    base = rows[0]["acc"]
    assert rows[0]["d_r"] == 0.0
    for r in rows[1:]:
        assert r["d_r"] == pytest.approx(abs(r["acc"] - base) / base)
    text = (tmp_path / "report.md").read_text()
    assert "## By generator" in text and "## Robustness" in text and "| fgsm | 2 |" in text
    assert (tmp_path / "robustness.png").stat().st_size > 0 and (tmp_path / "robustness.csv").is_file()


def test_logo_table_scores_both_models_on_reals_plus_the_held_out_fakes(tiny_run):
    from hydra.utils import instantiate

    from tests.conftest import compose
    from unmask.core.schemas import ScoringConfig
    from unmask.robustness.generalization import logo_table, render_logo_markdown

    cfg = compose("train", ["data.source.n_per_class=16", "data.source.size=32", "data.image_size=32", "data.num_workers=0",
                            f"paths.cache_dir={tiny_run['cache_dir']}", f"paths.output_dir={tiny_run['dir']}"])
    dm = instantiate(cfg.data, augment=None)
    dm.setup()
    test = dm.records["test"]
    # the same checkpoint as "base" and "held-out": D_g must be exactly 0
    scoring = ScoringConfig(num_workers=0, progress=False)
    table = logo_table(tiny_run["ckpt"], {"transposed_conv": tiny_run["ckpt"]}, test, scoring)
    row = table.iloc[0]
    assert row["n_real"] == sum(r.label == 0 for r in test) and row["n_fake"] == sum(r.label == 1 for r in test)
    assert row["acc_base"] == row["acc_heldout"] and row["d_g_two_model"] == 0.0
    assert row["n_fake_seen"] == 0 and math.isnan(row["d_g_spec"])  # one fake generator: nothing seen to compare with
    assert "| transposed_conv |" in render_logo_markdown(table)
    with pytest.raises(ValueError, match="no test fakes"):
        logo_table(tiny_run["ckpt"], {"stylegan2": tiny_run["ckpt"]}, test, scoring)
