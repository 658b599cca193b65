"""Issue 2, section 7: ``unmask.core.metrics`` against hand-computed values and scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, roc_auc_score

from unmask.core.metrics import (
    binary_metrics,
    breakdown,
    choose_threshold,
    equal_error_rate,
    recall_at_real_pass_rate,
)

# Hand example: reals 0.1, 0.4; fakes 0.35, 0.8 (labels 1 = fake).
# AUC: fake>real pairs (0.35>0.1, 0.8>0.1, 0.8>0.4) = 3 of 4 = 0.75.
# AP: ranked 0.8 F, 0.4 R, 0.35 F, 0.1 R -> precision 1 at recall 0.5, 2/3 at recall 1 -> 5/6.
# At threshold 0.5: predictions 0, 0, 0, 1 -> acc 3/4, real acc 1, fake acc 1/2, balanced 3/4.
HAND_LABELS = [0, 0, 1, 1]
HAND_SCORES = [0.1, 0.4, 0.35, 0.8]


def test_binary_metrics_by_hand():
    m = binary_metrics(HAND_LABELS, HAND_SCORES, threshold=0.5)
    assert (m["n"], m["n_real"], m["n_fake"]) == (4, 2, 2)
    assert m["auc"] == pytest.approx(0.75)
    assert m["ap"] == pytest.approx(5 / 6)
    assert m["acc"] == pytest.approx(0.75)
    assert m["real_acc"] == pytest.approx(1.0)
    assert m["fake_acc"] == pytest.approx(0.5)
    assert m["balanced_acc"] == pytest.approx(0.75)
    assert m["threshold"] == 0.5


def test_threshold_is_inclusive():
    """score >= threshold is fake: a score equal to the threshold counts as fake."""
    m = binary_metrics([0, 1], [0.2, 0.35], threshold=0.35)
    assert m["fake_acc"] == 1.0 and m["acc"] == 1.0


def _random_case(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    return labels, scores


def test_binary_metrics_equal_sklearn():
    labels, scores = _random_case()
    m = binary_metrics(labels, scores, threshold=0.5)
    preds = (scores >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert m["acc"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, preds), abs=1e-12)
    assert m["real_acc"] == pytest.approx(np.mean(preds[labels == 0] == 0))
    assert m["fake_acc"] == pytest.approx(np.mean(preds[labels == 1] == 1))


def test_shuffled_order_gives_identical_results():
    labels, scores = _random_case(seed=1)
    order = np.random.default_rng(7).permutation(len(labels))
    a = binary_metrics(labels, scores, 0.45)
    b = binary_metrics(labels[order], scores[order], 0.45)
    assert a == b
    # and labels sorted by class (the usual way a hand-rolled metric goes wrong) too
    s = np.argsort(labels, kind="stable")
    assert binary_metrics(labels[s], scores[s], 0.45) == a
    assert choose_threshold(labels[order], scores[order]) == choose_threshold(labels, scores)


def test_ignored_entries_do_not_count():
    """Labels other than 0/1 (unlabelled -1) and non-finite scores (undecodable) are left out."""
    m = binary_metrics(HAND_LABELS + [-1, 1, 0], HAND_SCORES + [0.9, float("nan"), float("inf")], 0.5)
    assert m == binary_metrics(HAND_LABELS, HAND_SCORES, 0.5)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        binary_metrics([0, 1, 1], [0.2, 0.3], 0.5)


@pytest.mark.parametrize("cls", [0, 1])
def test_single_class_gives_nan_where_undefined(cls):
    m = binary_metrics([cls] * 4, [0.1, 0.4, 0.6, 0.9], threshold=0.5)
    for key in ("auc", "ap", "eer", "recall_at_90_real_pass", "balanced_acc"):
        assert math.isnan(m[key]), key
    assert m["acc"] == pytest.approx(0.5)
    assert math.isnan(m["fake_acc" if cls == 0 else "real_acc"])
    assert m["real_acc" if cls == 0 else "fake_acc"] == pytest.approx(0.5)


def test_empty_input():
    m = binary_metrics([], [], 0.5)
    assert m["n"] == 0 and math.isnan(m["acc"]) and math.isnan(m["auc"])


def test_eer_by_hand():
    # reals 0.1 0.2 0.3 0.55; fakes 0.5 0.6 0.7 0.8. At threshold 0.55 one real of four is
    # flagged (FPR 0.25) and one fake of four missed (FNR 0.25): EER = 0.25.
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.55, 0.5, 0.6, 0.7, 0.8]
    assert equal_error_rate(labels, scores) == pytest.approx(0.25)
    assert equal_error_rate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separable
    assert equal_error_rate([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 1.0  # inverted


# Ten reals 0.0 .. 0.9 and five fakes. With 90 % of reals passing, one real (0.9) may be
# flagged: any threshold in (0.8, 0.95] catches only the fake at 0.95, recall 1/5 = 0.2.
# Youden: at threshold 0.75 two reals (0.8, 0.9) are flagged and all fakes caught: J = 0.8,
# the best of the curve.
PASS_REALS = [i / 10 for i in range(10)]
PASS_FAKES = [0.75, 0.76, 0.77, 0.78, 0.95]
PASS_LABELS = [0] * 10 + [1] * 5
PASS_SCORES = PASS_REALS + PASS_FAKES


def test_recall_at_90_real_pass_by_hand():
    assert recall_at_real_pass_rate(PASS_LABELS, PASS_SCORES) == pytest.approx(0.2)
    # move the lowest fake above every real but the top one: now caught too
    assert recall_at_real_pass_rate(PASS_LABELS, PASS_REALS + [0.85, 0.76, 0.77, 0.78, 0.95]) == pytest.approx(0.4)
    # all reals may pass at rate 0 -> any threshold: every fake caught
    assert recall_at_real_pass_rate(PASS_LABELS, PASS_SCORES, pass_rate=0.0) == 1.0
    assert binary_metrics(PASS_LABELS, PASS_SCORES, 0.5)["recall_at_90_real_pass"] == pytest.approx(0.2)


def test_choose_threshold_youden_and_real_pass():
    youden = choose_threshold(PASS_LABELS, PASS_SCORES, "youden")
    assert youden == pytest.approx(0.75)
    m = binary_metrics(PASS_LABELS, PASS_SCORES, youden)
    assert m["balanced_acc"] == pytest.approx((0.8 + 1.0) / 2)

    real_pass = choose_threshold(PASS_LABELS, PASS_SCORES, "real_pass")
    assert 0.8 < real_pass <= 0.95
    reals, fakes = np.array(PASS_REALS), np.array(PASS_FAKES)
    assert np.mean(reals < real_pass) >= 0.9  # 90 % of reals pass
    assert np.mean(fakes >= real_pass) == pytest.approx(0.2)  # the recall reported above


def test_source_pass_raises_youden_until_every_real_source_passes():
    rng = np.random.default_rng(0)
    portraits = rng.uniform(0.0, 0.3, 40)  # a real source the model finds easy
    snapshots = np.r_[rng.uniform(0.0, 0.3, 30), rng.uniform(0.5, 0.7, 10)]  # a real source it partly calls AI
    fakes = rng.uniform(0.4, 1.0, 60)
    labels = np.r_[np.zeros(80, int), np.ones(60, int)]
    scores = np.r_[portraits, snapshots, fakes]
    sources = np.array(["portraits"] * 40 + ["snapshots"] * 40 + ["sd"] * 60)
    youden = choose_threshold(labels, scores, "youden")
    assert choose_threshold(labels, scores, "source_pass") == youden  # without sources: youden's
    t = choose_threshold(labels, scores, "source_pass", sources)
    assert t > youden
    for source in ("portraits", "snapshots"):
        assert np.mean(scores[sources == source] < t) >= 0.95
    below = np.nextafter(t, -np.inf)  # the lowest such threshold: one step lower, snapshots fail
    assert np.mean(scores[sources == "snapshots"] < below) < 0.95
    # a source with fewer than 10 reals does not move it; one already passing leaves youden's
    few = sources.copy()
    few[40:] = [f"s{i}" for i in range(40)] + ["sd"] * 60
    assert choose_threshold(labels, scores, "source_pass", few) == choose_threshold(labels, scores, "youden")
    with pytest.raises(ValueError, match="differ in length"):
        choose_threshold(labels, scores, "source_pass", sources[:-1])


def test_choose_threshold_edge_cases():
    assert choose_threshold([1, 1], [0.3, 0.9]) == 0.5  # one class: neutral default
    t = choose_threshold([0, 1], [0.2, 0.7])
    assert 0.2 < t <= 0.7 and 0.0 <= t <= 1.0  # never the +inf of roc_curve
    with pytest.raises(ValueError, match="youden.*real_pass.*source_pass"):
        choose_threshold([0, 1], [0.2, 0.7], "median")


def test_breakdown_per_generator_scores_fakes_against_all_reals():
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.2, 0.3, 0.6, 0.8, 0.1, 0.7, 0.4])
    gens = ["b", "real", "a", "real", "b", "real", "a", "a"]
    out = breakdown(labels, scores, gens, threshold=0.5, reals_in_every_group=True)
    assert list(out) == ["a", "b", "real"]
    reals = labels == 0
    for g in ("a", "b"):
        sel = (np.array(gens) == g) | reals
        assert out[g]["n"] == sel.sum() and out[g]["n_real"] == 3
        assert out[g]["auc"] == pytest.approx(roc_auc_score(labels[sel], scores[sel]))
    # by hand: b's fakes 0.9, 0.8 beat every real (0.2, 0.6, 0.1) -> AUC 1; a's 0.3, 0.7, 0.4
    # beat 2, 3, 2 of the 3 reals -> 7/9
    assert out["b"]["auc"] == 1.0 and out["a"]["auc"] == pytest.approx(7 / 9)
    assert out["real"]["n"] == 3 and math.isnan(out["real"]["auc"])
    assert out["real"]["real_acc"] == pytest.approx(2 / 3)


def test_breakdown_plain_groups_keep_their_own_members():
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.2, 0.3, 0.6]
    out = breakdown(labels, scores, ["s2", "s1", "s1", "s2"], threshold=0.5)
    assert out["s1"]["auc"] == 1.0 and out["s2"]["auc"] == 1.0 and out["s1"]["n"] == 2
    fakes_only = breakdown([1, 1], [0.6, 0.4], ["g", "g"], threshold=0.5)
    assert math.isnan(fakes_only["g"]["auc"]) and fakes_only["g"]["fake_acc"] == 0.5
