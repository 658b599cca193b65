"""Detection metrics, all from scikit-learn, with labels selected by mask (never by sort).

``labels``: 1 = fake (the positive class), 0 = real; anything else is ignored.
``scores``: P(fake), higher means more likely fake.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
    roc_curve,
)

REAL_PASS_RATE = 0.90  # the financial spec: 90 % of real faces must pass
THRESHOLD_POLICIES = ("youden", "real_pass", "source_pass")  # see choose_threshold
SOURCE_PASS_RATE = 0.95  # source_pass: the share of each real source's files that must pass
SOURCE_PASS_MIN_REALS = 10  # ... counted for sources with at least this many reals


def _valid(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    keep = np.isin(labels, (0, 1)) & np.isfinite(scores)
    return labels[keep], scores[keep]


def equal_error_rate(labels, scores) -> float:
    """The rate where FPR = FNR on the ROC curve taken as the polyline through its operating
    points (a randomised threshold reaches every point between two of them), found by
    linear interpolation on the segment where FNR - FPR changes sign. The nearest ROC
    vertex alone is off by up to half a step (1 / (2 n_class))."""
    labels, scores = _valid(labels, scores)
    if len(np.unique(labels)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    gap = (1.0 - tpr) - fpr  # FNR - FPR: from 1 at (0, 0) down to -1 at (1, 1), never rising
    i = int(np.flatnonzero(gap > 0)[-1])  # the last point with FNR > FPR; the next has FNR <= FPR
    t = gap[i] / (gap[i] - gap[i + 1])
    return float(fpr[i] + t * (fpr[i + 1] - fpr[i]))


def recall_at_real_pass_rate(labels, scores, pass_rate: float = REAL_PASS_RATE) -> float:
    """Share of fakes caught when the threshold lets ``pass_rate`` of reals through,
    i.e. the best TPR on the ROC curve with FPR <= 1 - pass_rate."""
    labels, scores = _valid(labels, scores)
    if len(np.unique(labels)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(labels, scores)
    ok = fpr <= (1.0 - pass_rate) + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def choose_threshold(labels, scores, policy: str = "youden", sources=None) -> float:
    """Decision threshold from (validation) scores (a file is AI-generated when its score is
    at least the threshold): ``youden`` maximises TPR - FPR, the same as the best balanced
    accuracy; ``real_pass`` lets 90 % of reals pass; ``source_pass`` is youden's, raised where
    needed until every real source (``sources``, one name per score; those with at least
    ``SOURCE_PASS_MIN_REALS`` reals) passes at least ``SOURCE_PASS_RATE``. A detector meets
    real photos of kinds it never saw; a source it already fails in validation is the warning.
    Without ``sources`` (a training epoch's validation) ``source_pass`` is youden's."""
    if policy not in THRESHOLD_POLICIES:
        raise ValueError(f"threshold policy must be one of {THRESHOLD_POLICIES}, got {policy!r}")
    valid_labels, valid_scores = _valid(labels, scores)
    if len(np.unique(valid_labels)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(valid_labels, valid_scores)
    thr = np.clip(thr, 0.0, 1.0)  # the first threshold is +inf
    if policy == "real_pass":
        ok = np.flatnonzero(fpr <= 1.0 - REAL_PASS_RATE + 1e-12)
        return float(thr[ok[np.argmax(tpr[ok])]])
    threshold = float(thr[int(np.argmax(tpr - fpr))])
    if policy == "source_pass" and sources is not None:
        threshold = max(threshold, source_pass_floor(labels, scores, sources))  # sources align with the unfiltered rows
    return threshold


def source_pass_floor(labels, scores, sources, rate: float = SOURCE_PASS_RATE, min_reals: int = SOURCE_PASS_MIN_REALS) -> float:
    """The lowest threshold at which every real source with at least ``min_reals`` reals has
    at least ``rate`` of them pass (score below the threshold); 0 when there is none."""
    labels, scores, sources = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel(), np.asarray(sources).ravel()
    if not (len(labels) == len(scores) == len(sources)):
        raise ValueError(f"labels, scores and sources differ in length: {len(labels)}, {len(scores)}, {len(sources)}")
    floor = 0.0
    for source in np.unique(sources[labels == 0]):
        real = np.sort(scores[(labels == 0) & (sources == source) & np.isfinite(scores)])
        if len(real) < min_reals:
            continue
        k = math.ceil(rate * len(real))  # the k lowest must pass: the threshold sits just above the k-th
        floor = max(floor, float(np.nextafter(real[k - 1], np.inf)))
    return min(floor, 1.0)


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict[str, float]:
    labels, scores = _valid(labels, scores)
    preds = (scores >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    real, fake = labels == 0, labels == 1
    nan = math.nan
    return {
        "n": int(len(labels)),
        "n_real": int(real.sum()),
        "n_fake": int(fake.sum()),
        "threshold": float(threshold),
        "acc": float(accuracy_score(labels, preds)) if len(labels) else nan,
        "balanced_acc": float(balanced_accuracy_score(labels, preds)) if both else nan,
        "real_acc": float((preds[real] == 0).mean()) if real.any() else nan,
        "fake_acc": float((preds[fake] == 1).mean()) if fake.any() else nan,
        "auc": float(roc_auc_score(labels, scores)) if both else nan,
        "ap": float(average_precision_score(labels, scores)) if both else nan,
        "eer": equal_error_rate(labels, scores),
        "recall_at_90_real_pass": recall_at_real_pass_rate(labels, scores),
    }


def breakdown(
    labels, scores, groups: Iterable[str], threshold: float, reals_in_every_group: bool = False
) -> dict[str, dict[str, float]]:
    """Metrics per group. With ``reals_in_every_group`` (used for generators, whose reals
    are all named 'real') each fake group is scored against *all* reals of the split, so
    AUC is defined per generator."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(list(groups), dtype=object)
    out = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        if reals_in_every_group and not (labels[sel] == 0).any():
            sel = sel | (labels == 0)
        out[str(g)] = binary_metrics(labels[sel], scores[sel], threshold)
    return out


def grouped_metrics(labels, scores, sources, generators, threshold: float) -> dict[str, dict]:
    """Overall, per-source and per-generator metrics: the three tables of every report.
    Each generator's fakes are scored against all reals, so AUC is defined per generator."""
    return {
        "overall": binary_metrics(labels, scores, threshold),
        "by_source": breakdown(labels, scores, sources, threshold),
        "by_generator": breakdown(labels, scores, generators, threshold, reals_in_every_group=True),
    }


# ---- thresholds as users give them -----------------------------------------------------
def parse_threshold(spec) -> tuple[str, float | None]:
    """``None``/``stored`` -> the checkpoint's; a number; ``prior:P`` -> share P labelled fake."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "stored", "null", "none")):
        return "stored", None
    if isinstance(spec, bool):  # float(True) would silently become threshold 1.0
        raise ValueError(f"threshold must be empty (stored), a number or prior:P, got {spec!r}")
    if isinstance(spec, str) and spec.strip().lower().startswith("prior:"):
        try:
            share = float(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"threshold=prior:P needs a number P in [0, 1], got {spec!r}") from None
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"threshold=prior:P needs P in [0, 1], got {share}")
        return "prior", share
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be empty (stored), a number or prior:P, got {spec!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(f"threshold must be a probability in [0, 1], got {value}")
    return "fixed", value


def decide(probs: Sequence[float], spec, stored: float) -> tuple[np.ndarray, float]:
    """0/1 decisions for the finite ``probs`` (NaN stays -1 for the caller's fallback) and the
    threshold used. ``prior:P`` labels the top ``round(P * n)`` scores fake, by rank, so ties
    cannot push the share off P."""
    probs = np.asarray(probs, dtype=np.float64)
    finite = np.isfinite(probs)
    labels = np.full(len(probs), -1, dtype=int)
    kind, value = parse_threshold(spec)
    if kind == "prior":
        idx = np.flatnonzero(finite)
        n_fake = int(round(value * len(idx)))
        order = idx[np.argsort(-probs[idx], kind="stable")]
        labels[idx] = 0
        labels[order[:n_fake]] = 1
        threshold = float(probs[order[n_fake - 1]]) if n_fake else math.inf
        return labels, threshold
    threshold = stored if kind == "stored" else float(value)
    labels[finite] = (probs[finite] >= threshold).astype(int)
    return labels, threshold
