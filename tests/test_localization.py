"""Localisation metrics (unmask/evaluation/localization.py) against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import default_collate

from detectors.base import Detector, DetectorOutput
from unmask.evaluation.localization import Localization, mask_scores, pixel_auc, render_localization_markdown
from unmask.explain.gradcam import ForgeryMaps
from unmask.scoring.scorer import ScoredBatch, Scores


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


LABELS = [1, 1, 0, 1]


def _samples() -> list[dict]:
    """Four files of one view each, as the scorer's data set gives them."""
    out = []
    for i, label in enumerate(LABELS):
        mask = torch.zeros(1, 8, 8)
        if label == 1:
            mask[:, :4, :4] = 1.0
        meta = {"path": f"{i}.png", "source": "s", "generator": "self_blend" if label else "real", "group": f"{i}.png",
                "ok": True, "error": "", "mask_ok": i != 3, "file": i, "view": -1}  # sample 3 has no ground truth: skipped
        out.append({"image": torch.rand(3, 8, 8), "label": label, "mask": mask, "meta": meta})
    return out


def _feed(detector, batches) -> Localization:
    """What the scorer does: run the detector, ask the explainer for maps, feed the evaluator."""
    loc, maps = Localization(), ForgeryMaps("own", required=False)
    for batch in batches:
        out = detector(batch["image"], batch)
        scored = ScoredBatch(batch, out.prob, maps=maps(detector, batch["image"], batch, out))
        scored.map_source = maps.source
        loc.update(scored)
    return loc


def test_localization_evaluator_end_to_end():
    samples = _samples()
    loc = _feed(_Oracle(), [default_collate(samples[:3]), default_collate(samples[3:])])
    summary = loc.compute(Scores(files=None), threshold=0.5)
    per_image = loc.per_image
    assert list(per_image["path"]) == ["0.png", "1.png", "2.png"]
    assert list(per_image["f1"]) == [1.0, 1.0, 0.0]  # the real gets a false alarm
    # the headline is the forged images' (issue 12); the real is reported apart
    assert summary["n"] == 2 and summary["mask_from"] == "mask"
    assert summary["f1"] == 1.0 and summary["score"] == 2.0
    assert summary["reals"] == {"n": 1, "clean_rate": 0.0, "marked_area": pytest.approx(16 / 64)}
    assert summary["all"]["n"] == 3 and summary["all"]["score"] == pytest.approx(4 / 3)  # the mixed average
    assert summary["by_label"]["real"]["iou"] == 0.0 and summary["by_label"]["fake"]["iou"] == 1.0
    assert summary["pixel_auc"] < 1.0  # the real's false alarm ranks above true negatives
    assert summary["pixel_auc_forged"] == 1.0  # on the forged images the square is exactly right
    md = render_localization_markdown(summary)
    assert "## Localisation" in md and "self_blend" in md and "Forged images (2): score 2.0000" in md and "1.3333" in md


def test_only_the_deciding_view_of_a_file_is_scored():
    """Two views of one file: the one with the higher score decides, and is the one measured."""
    a, b = _samples()[:2]
    b["meta"].update(file=0, view=0, path="0.png")
    batch = default_collate([a, b])
    det = _Oracle()
    out = det(batch["image"], batch)
    maps = ForgeryMaps("own")(det, batch["image"], batch, out)
    maps[1] = 0.0  # the second view predicts nothing
    for probs, f1 in ((torch.tensor([0.9, 0.1]), 1.0), (torch.tensor([0.1, 0.9]), 0.0)):
        loc = Localization()
        loc.update(ScoredBatch(batch, probs, maps=maps))
        loc.compute(Scores(files=None), 0.5)
        assert list(loc.per_image["f1"]) == [f1]


def test_a_detector_without_maps_gives_no_metrics():
    class Plain(Detector):
        def forward_normalized(self, x):
            return DetectorOutput(logit=torch.zeros(x.shape[0]))

    loc = _feed(Plain(), [default_collate(_samples())])
    summary = loc.compute(Scores(files=None), threshold=0.5)
    assert loc.per_image.empty and summary["n"] == 0
    assert "No image" in render_localization_markdown(summary)
