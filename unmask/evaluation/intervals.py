"""Bootstrap 95 % confidence intervals of accuracy and AUC, for every row of the report.

A percentile bootstrap with a fixed number of resamples and a fixed seed (the same report for
the same predictions). Accuracy resamples the group's files with replacement; AUC resamples
within each class (the reals from the reals, the fakes from the fakes), so every resample has
both classes and an AUC. Resamples are weight vectors (how often each file was drawn), so the
figures of all resamples are a few matrix operations, not a loop over resamples: the AUC of a
weighted sample is the weighted share of (fake, real) pairs ordered right, ties counting half.

The groups are the report's: overall, per source, per generator (that generator's fakes
against all reals of the split, as ``core.metrics.breakdown`` scores them). A group of fewer
than ``SMALL_N`` files is flagged in the report; its interval says how little it shows. A
group whose files are all classified right (or all wrong) gets Wilson's score interval for its
accuracy instead: no resample could differ, and [1, 1] for 2 files of 2 would claim certainty.
"""
from __future__ import annotations

import math

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
SMALL_N = 30  # groups smaller than this are flagged in the report
CHUNK = 250  # resamples per block (memory: CHUNK x files)


def _weights(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) draw counts: ``n`` draws with replacement from ``n`` files, per resample."""
    if n == 0:
        return np.zeros((size, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)


def wilson_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a share ``k / n``: what a group gets whose files are all
    right (or all wrong), where every bootstrap resample is the same ([1, 1] for 2 of 2)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2.0))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_intervals(labels, scores, threshold: float, n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, float]:
    """``acc_ci_low/high`` and ``auc_ci_low/high`` of these labelled scores (NaN where the
    figure is undefined: no files, or one class for AUC)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(scores) & np.isin(labels, (0, 1))
    labels, scores = labels[keep], scores[keep]
    nan = {"acc_ci_low": math.nan, "acc_ci_high": math.nan, "auc_ci_low": math.nan, "auc_ci_high": math.nan}
    if len(labels) == 0:
        return nan
    rng = np.random.default_rng(seed)
    n = len(labels)
    correct = ((scores >= threshold).astype(int) == labels).astype(np.float64)
    fake, real = scores[labels == 1], scores[labels == 0]
    n_fake, n_real = len(fake), len(real)
    # AUC parts: for each fake, how many reals score below it (and equal), in sorted-real order.
    order = np.sort(real)
    below = np.searchsorted(order, fake, side="left")
    upto = np.searchsorted(order, fake, side="right")
    real_rank = np.argsort(real, kind="stable")
    accs, aucs = [], []
    for start in range(0, n_resamples, CHUNK):
        size = min(CHUNK, n_resamples - start)
        accs.append(_weights(rng, n, size) @ correct / n)
        if n_fake and n_real:
            w_fake, w_real = _weights(rng, n_fake, size), _weights(rng, n_real, size)
            cum = np.concatenate([np.zeros((size, 1)), np.cumsum(w_real[:, real_rank], axis=1)], axis=1)
            pairs = (cum[:, below] + cum[:, upto]) / 2.0  # reals below each fake, ties half
            aucs.append((w_fake * pairs).sum(axis=1) / (n_fake * n_real))
    tail = (1.0 - level) / 2.0 * 100.0
    out = dict(nan)
    acc = np.concatenate(accs)
    right = int(correct.sum())
    if right in (0, n):  # every file right (or wrong): no resample differs, so the binomial interval
        out["acc_ci_low"], out["acc_ci_high"] = wilson_interval(right, n, level)
    else:
        out["acc_ci_low"], out["acc_ci_high"] = (float(v) for v in np.percentile(acc, [tail, 100.0 - tail]))
    if aucs:
        auc = np.concatenate(aucs)
        out["auc_ci_low"], out["auc_ci_high"] = (float(v) for v in np.percentile(auc, [tail, 100.0 - tail]))
    return out


def grouped_intervals(labels, scores, sources, generators, threshold: float, **kwargs) -> dict[str, dict]:
    """``bootstrap_intervals`` for the report's groups: ``{"overall": {...}, "by_source":
    {name: {...}}, "by_generator": {name: {...}}}``."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, dict] = {"overall": bootstrap_intervals(labels, scores, threshold, **kwargs), "by_source": {}, "by_generator": {}}
    for key, groups, reals_everywhere in (("by_source", sources, False), ("by_generator", generators, True)):
        groups = np.asarray(list(groups), dtype=object)
        for g in sorted(set(groups.tolist())):
            sel = groups == g
            if reals_everywhere and not (labels[sel] == 0).any():
                sel = sel | (labels == 0)
            out[key][str(g)] = bootstrap_intervals(labels[sel], scores[sel], threshold, **kwargs)
    return out
