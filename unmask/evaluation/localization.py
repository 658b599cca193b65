"""Localisation metrics: how well a predicted forgery mask matches the ground truth.

The predicted map is the detector's own forgery map (``DetectorOutput.forgery_map``),
computed by the scorer for the view that decides each file (``scoring.combine``): the
whole image without a face stage. Per image, it is binarised at ``threshold`` (0.5 by default)
and the ground truth at 0.5; then

- F1 (Dice) = 2 TP / (2 TP + FP + FN), IoU (Jaccard) = TP / (TP + FP + FN),
- the challenge score = mean F1 + mean IoU over images (range 0..2),
- pixel AUC: ROC AUC (scikit-learn) over a fixed-seed subsample of pixels of all images.

**The headline counts forged images only** (label 1 with a ground-truth mask): mean F1, IoU
and their sum over them. Reals are reported beside it, never mixed in: the share of reals
left unmarked (``reals.clean_rate``) and their mean marked area. Per image, when both the
ground truth and the prediction are empty (a real correctly left unmarked) F1 = IoU = 1, and
when the ground truth is empty but something is predicted both are 0; averaged into the
headline, such 1s would let a detector that marks nothing score well wherever reals are
many (``all`` keeps that mixed average, for comparison only). Pixel AUC pools the pixels of
every image with a ground truth (the reals' pixels are negatives); ``pixel_auc_forged`` pools
the forged images' only.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from data.io import atomic_write_text
from data.sample import mask_usable
from unmask.evaluation.base import Evaluator
from unmask.reports.safe import frame_csv
from unmask.reports.tables import fmt, markdown_table
from unmask.scoring.scorer import ScoredBatch, Scores

log = logging.getLogger(__name__)

PIXELS_PER_IMAGE = 1024  # pixel-AUC subsample per image (fixed seed): bounded memory on big splits


def mask_scores(pred_prob, gt, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per-image F1, IoU and their sum for (N, ...) probability maps and ground truths."""
    pred = np.asarray(pred_prob, dtype=np.float64)
    truth = np.asarray(gt, dtype=np.float64)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    n = pred.shape[0] if pred.ndim > 0 else 1
    p = (pred >= threshold).reshape(n, -1)
    g = (truth >= 0.5).reshape(n, -1)
    tp = (p & g).sum(1).astype(np.float64)
    fp = (p & ~g).sum(1).astype(np.float64)
    fn = (~p & g).sum(1).astype(np.float64)
    empty = (tp + fp + fn) == 0  # both empty: a perfect answer by convention
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(empty, 1.0, 2 * tp / (2 * tp + fp + fn))
        iou = np.where(empty, 1.0, tp / (tp + fp + fn))
    return {"f1": f1, "iou": iou, "score": f1 + iou, "gt_area": g.mean(1), "pred_area": p.mean(1)}


def pixel_auc(pred_prob, gt, max_pixels: int | None = 200_000, seed: int = 0) -> float:
    """ROC AUC of pixel probabilities against binarised ground truth, over a fixed-seed
    subsample of at most ``max_pixels`` pixels; NaN when only one class is present."""
    scores = np.asarray(pred_prob, dtype=np.float64).ravel()
    labels = (np.asarray(gt, dtype=np.float64).ravel() >= 0.5).astype(int)
    if max_pixels is not None and scores.size > max_pixels:
        pick = np.random.default_rng(seed).choice(scores.size, size=max_pixels, replace=False)
        scores, labels = scores[pick], labels[pick]
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def summarise(per_image: pd.DataFrame, auc: float, threshold: float, mask_from: str, auc_forged: float = math.nan) -> dict:
    """The localisation summary: the headline (``n``, ``f1``, ``iou``, ``score``) over forged
    images only; ``reals`` (share left unmarked, mean marked area); ``all`` (forged and reals
    mixed, the convention before issue 12); per label and per generator."""
    def block(df: pd.DataFrame) -> dict:
        return {"n": int(len(df)), "f1": float(df["f1"].mean()), "iou": float(df["iou"].mean()),
                "score": float(df["f1"].mean() + df["iou"].mean())} if len(df) else {"n": 0}

    forged = per_image[per_image["label"] == 1]
    reals = per_image[per_image["label"] == 0]
    real_block = {"n": int(len(reals))}
    if len(reals):
        marked = reals["pred_area"] if "pred_area" in reals else 1.0 - reals["f1"]
        real_block.update(clean_rate=float((marked == 0).mean()), marked_area=float(marked.mean()))
    return {
        "threshold": float(threshold),
        "mask_from": mask_from,
        "pixel_auc": auc,
        "pixel_auc_forged": auc_forged,
        **block(forged),
        "reals": real_block,
        "all": block(per_image),
        "by_label": {("fake" if k == 1 else "real" if k == 0 else str(k)): block(g) for k, g in per_image.groupby("label")},
        "by_generator": {str(k): block(g) for k, g in per_image.groupby("generator")},
    }


def render_localization_markdown(summary: dict) -> str:
    everything = summary.get("all", summary)
    if not everything.get("n"):
        return "## Localisation\n\nNo image with a ground-truth mask was scored.\n"

    reals = summary.get("reals", {})
    forged = (f"Forged images ({summary['n']}): score {fmt(summary['score'])}, F1 {fmt(summary['f1'])}, "
              f"IoU {fmt(summary['iou'])}, pixel AUC {fmt(summary.get('pixel_auc_forged'))}"
              if summary.get("n") else "Forged images: none with a ground-truth mask")
    lines = [
        "## Localisation",
        "",
        f"Predicted {summary['mask_from']} binarised at {summary['threshold']:.2f}; per-image F1 and IoU, averaged "
        "over forged images only. Score = F1 + IoU (0..2). Reals are reported apart: the share left unmarked "
        "(an empty ground truth and an empty prediction) and their mean marked area. "
        "Pixel AUC over a fixed-seed pixel subsample (all images: reals' pixels are negatives).",
        "",
        forged,
        "",
        (f"Reals ({reals['n']}): {fmt(reals.get('clean_rate'))} left unmarked, mean marked area {fmt(reals.get('marked_area'))}"
         if reals.get("n") else "Reals: none with a ground truth"),
        "",
        f"All images ({everything['n']}, reals counting F1 = IoU = 1 when left unmarked): score {fmt(everything['score'])}, "
        f"pixel AUC {fmt(summary['pixel_auc'])}",
        "",
        markdown_table(
            ["group", "n", "score", "F1", "IoU"],
            (
                [f"{title}: {name}", b["n"], b["score"], b["f1"], b["iou"]]
                for title, key in (("label", "by_label"), ("generator", "by_generator"))
                for name, b in summary.get(key, {}).items()
                if b.get("n")
            ),
        ),
    ]
    return "\n".join(lines) + "\n"


class Localization(Evaluator):
    """F1, IoU and pixel AUC of the forgery map of each file's deciding view, on files whose
    sample carries a ground-truth mask (``data.sample.mask_usable``). Needs the scorer's
    maps: evaluate.py passes the detector's own-map explainer when the split has masks."""

    name = "localization"

    def __init__(self, mask_threshold: float = 0.5, pixels_per_image: int = PIXELS_PER_IMAGE, seed: int = 0) -> None:
        # maps are binarised at ``mask_threshold``; the decision threshold plays no part here
        self.mask_threshold, self.pixels_per_image = float(mask_threshold), int(pixels_per_image)
        self.rng = np.random.default_rng(seed)
        self.rows: list[pd.DataFrame] = []
        self.sample_p: list[np.ndarray] = []
        self.sample_g: list[np.ndarray] = []
        self.sample_forged: list[np.ndarray] = []  # per subsampled pixel: is its image forged
        self.mask_from = "none"
        self.per_image = pd.DataFrame()

    def update(self, scored: ScoredBatch) -> None:
        batch = scored.batch
        if scored.kind != "images" or scored.maps is None or "mask" not in batch:
            return
        meta = batch["meta"]
        has_mask = mask_usable(batch)
        chosen = [view for view in scored.deciding_views() if has_mask[view]]
        if not chosen:
            return
        idx = torch.tensor(chosen)
        p = scored.maps[idx, 0].numpy()
        g = torch.as_tensor(batch["mask"])[idx].float().view(len(idx), *p.shape[1:]).numpy()
        self.mask_from = scored.map_source or "mask"
        self.rows.append(pd.DataFrame({
            "path": [meta["path"][i] for i in chosen],
            "label": torch.as_tensor(batch["label"])[idx].tolist(),
            "source": [meta["source"][i] for i in chosen],
            "generator": [meta["generator"][i] for i in chosen],
            **mask_scores(p, g, self.mask_threshold),
        }))
        flat_p, flat_g = p.reshape(len(idx), -1), g.reshape(len(idx), -1)
        k = min(self.pixels_per_image, flat_p.shape[1])
        pick = np.stack([self.rng.choice(flat_p.shape[1], size=k, replace=False) for _ in range(len(idx))])
        self.sample_p.append(np.take_along_axis(flat_p, pick, 1).ravel())
        self.sample_g.append(np.take_along_axis(flat_g, pick, 1).ravel())
        self.sample_forged.append(np.repeat(torch.as_tensor(batch["label"])[idx].numpy() == 1, k))

    def compute(self, scores: Scores, threshold: float) -> dict | None:
        if not self.rows:
            return {"n": 0, "mask_from": self.mask_from}
        self.per_image = pd.concat(self.rows, ignore_index=True)
        p, g, forged = np.concatenate(self.sample_p), np.concatenate(self.sample_g), np.concatenate(self.sample_forged)
        auc = pixel_auc(p, g, max_pixels=None)
        auc_forged = pixel_auc(p[forged], g[forged], max_pixels=None) if forged.any() else math.nan
        return summarise(self.per_image, auc, self.mask_threshold, self.mask_from, auc_forged)

    def markdown(self, result: dict) -> str:
        return render_localization_markdown(result)

    def write(self, result: dict, scores: Scores, out_dir: Path) -> None:
        atomic_write_text(Path(out_dir) / "localization.csv", frame_csv(self.per_image))
