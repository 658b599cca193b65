"""Localisation metrics (unmask/localization.py) against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from detectors.base import Detector, DetectorOutput
from unmask.localization import evaluate_localization, mask_scores, pixel_auc, render_localization_markdown


def test_f1_iou_and_score_by_hand():
    gt = np.zeros((1, 4, 4))
    gt[0, :2, :2] = 1  # 4 forged pixels
    pred = np.zeros((1, 4, 4))
    pred[0, :2, :3] = 0.9  # 6 predicted: TP 4, FP 2, FN 0
    s = mask_scores(pred, gt)
    assert s["f1"][0] == pytest.approx(2 * 4 / (2 * 4 + 2))
    assert s["iou"][0] == pytest.approx(4 / 6)
    assert s["score"][0] == pytest.approx(0.8 + 4 / 6)
    assert s["gt_area"][0] == pytest.approx(4 / 16) and s["pred_area"][0] == pytest.approx(6 / 16)


def test_threshold_is_on_probability():
    gt = np.array([[[1.0, 1.0, 0.0, 0.0]]])
    pred = np.array([[[0.6, 0.4, 0.4, 0.7]]])  # at 0.5: TP 1, FN 1, FP 1
    assert mask_scores(pred, gt)["iou"][0] == pytest.approx(1 / 3)
    assert mask_scores(pred, gt, threshold=0.3)["iou"][0] == pytest.approx(2 / 4)


def test_empty_cases():
    empty = np.zeros((1, 3, 3))
    some = np.zeros((1, 3, 3))
    some[0, 1, 1] = 1.0
    both_empty = mask_scores(empty, empty)
    assert both_empty["f1"][0] == 1.0 and both_empty["iou"][0] == 1.0 and both_empty["score"][0] == 2.0
    false_alarm = mask_scores(some, empty)  # a real marked as forged
    assert false_alarm["f1"][0] == 0.0 and false_alarm["iou"][0] == 0.0
    missed = mask_scores(empty, some)  # a forgery left unmarked
    assert missed["f1"][0] == 0.0 and missed["iou"][0] == 0.0


def test_vectorised_over_images():
    rng = np.random.default_rng(0)
    pred, gt = rng.random((5, 8, 8)), (rng.random((5, 8, 8)) > 0.6).astype(float)
    batch = mask_scores(pred, gt)
    one_by_one = [mask_scores(pred[i : i + 1], gt[i : i + 1])["iou"][0] for i in range(5)]
    assert np.allclose(batch["iou"], one_by_one)
    with pytest.raises(ValueError, match="shape"):
        mask_scores(pred, gt[:, :4])


def test_pixel_auc_matches_sklearn_and_subsamples_reproducibly():
    rng = np.random.default_rng(1)
    gt = (rng.random((4, 16, 16)) > 0.7).astype(float)
    pred = np.clip(gt * 0.3 + rng.random(gt.shape) * 0.8, 0, 1)
    assert pixel_auc(pred, gt, max_pixels=None) == pytest.approx(roc_auc_score(gt.ravel().astype(int), pred.ravel()))
    a, b = pixel_auc(pred, gt, max_pixels=300, seed=3), pixel_auc(pred, gt, max_pixels=300, seed=3)
    assert a == b and abs(a - pixel_auc(pred, gt, max_pixels=None)) < 0.1
    assert math.isnan(pixel_auc(pred, np.zeros_like(gt)))


class _Oracle(Detector):
    """Predicts a fixed square: right on the forged samples, a false alarm on one real."""

    def forward_normalized(self, x):
        mask = torch.full((x.shape[0], 1, *x.shape[-2:]), -10.0)
        mask[:, :, :4, :4] = 10.0
        return DetectorOutput(logit=torch.zeros(x.shape[0]), mask=mask)


class _MaskedSet(torch.utils.data.Dataset):
    def __init__(self):
        self.labels = [1, 1, 0, 1]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        mask = torch.zeros(1, 8, 8)
        if self.labels[i] == 1:
            mask[:, :4, :4] = 1.0
        meta = {"path": f"{i}.png", "source": "s", "generator": "self_blend" if self.labels[i] else "real",
                "ok": True, "mask_ok": i != 3}  # sample 3 has no ground truth: skipped
        return {"image": torch.rand(3, 8, 8), "label": self.labels[i], "mask": mask, "meta": meta}


def test_evaluate_localization_end_to_end():
    per_image, summary = evaluate_localization(_Oracle(), _MaskedSet(), batch_size=3, num_workers=0, device="cpu")
    assert list(per_image["path"]) == ["0.png", "1.png", "2.png"]
    assert list(per_image["f1"]) == [1.0, 1.0, 0.0]  # the real gets a false alarm
    assert summary["n"] == 3 and summary["mask_from"] == "mask"
    assert summary["f1"] == pytest.approx(2 / 3) and summary["score"] == pytest.approx(4 / 3)
    assert summary["by_label"]["real"]["iou"] == 0.0 and summary["by_label"]["fake"]["iou"] == 1.0
    assert summary["pixel_auc"] < 1.0  # the real's false alarm ranks above true negatives
    md = render_localization_markdown(summary)
    assert "## Localisation" in md and "self_blend" in md and "1.3333" in md


def test_a_detector_without_maps_gives_no_metrics():
    class Plain(Detector):
        def forward_normalized(self, x):
            return DetectorOutput(logit=torch.zeros(x.shape[0]))

    per_image, summary = evaluate_localization(Plain(), _MaskedSet(), batch_size=4, num_workers=0, device="cpu")
    assert per_image.empty and summary["n"] == 0
    assert "No image" in render_localization_markdown(summary)
