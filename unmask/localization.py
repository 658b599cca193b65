"""Localisation metrics: how well a predicted forgery mask matches the ground truth.

Per image, the predicted probability map is binarised at ``threshold`` (0.5 by default)
and the ground truth at 0.5; then

- F1 (Dice) = 2 TP / (2 TP + FP + FN), IoU (Jaccard) = TP / (TP + FP + FN),
- the challenge score = mean F1 + mean IoU over images (range 0..2),
- pixel AUC: ROC AUC (scikit-learn) over a fixed-seed subsample of pixels of all images.

Convention for empty masks (ours; no challenge rule was found to cite): when both the
ground truth and the prediction are empty (a real image correctly left unmarked) F1 = IoU = 1;
when the ground truth is empty but something is predicted, TP = 0 so both are 0; the same
holds for a forged image with an empty prediction. Reals therefore count, and a detector
that marks pixels on reals is penalised.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

from detectors.base import Detector
from unmask.runtime import pick_device

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


def summarise(per_image: pd.DataFrame, auc: float, threshold: float, mask_from: str) -> dict:
    def block(df: pd.DataFrame) -> dict:
        return {"n": int(len(df)), "f1": float(df["f1"].mean()), "iou": float(df["iou"].mean()),
                "score": float(df["f1"].mean() + df["iou"].mean())} if len(df) else {"n": 0}

    return {
        "threshold": float(threshold),
        "mask_from": mask_from,
        "pixel_auc": auc,
        **block(per_image),
        "by_label": {("fake" if k == 1 else "real" if k == 0 else str(k)): block(g) for k, g in per_image.groupby("label")},
        "by_generator": {str(k): block(g) for k, g in per_image.groupby("generator")},
    }


def _probability_map(out, size: tuple[int, int]) -> tuple[torch.Tensor, str] | None:
    """The detector's per-pixel forgery probability at image size, and where it came from."""
    if out.mask is not None:
        prob = torch.sigmoid(out.mask.float())
        source = "mask"
    elif out.heatmap is not None:  # an attention/CAM map: a ranking more than a probability
        prob = out.heatmap.float().clamp(0.0, 1.0)
        source = "heatmap"
    else:
        return None
    if prob.shape[-2:] != size:
        prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
    return prob, source


def evaluate_localization(
    detector: Detector,
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    threshold: float = 0.5,
    pixels_per_image: int = PIXELS_PER_IMAGE,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Score predicted masks against the samples' ``"mask"`` where ``meta["mask_ok"]``.

    Runs its own eager loop: the inference runtimes return image probabilities only.
    Returns one row per scored image and the summary (``mask_from``: "mask" for a
    localising detector, "heatmap" when only an upsampled heatmap was available, in which
    case thresholded scores mean little and pixel AUC is the figure to read)."""
    dev = pick_device(device)
    detector = detector.to(dev).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    rng = np.random.default_rng(seed)
    rows: list[pd.DataFrame] = []
    sample_p: list[np.ndarray] = []
    sample_g: list[np.ndarray] = []
    mask_from = "none"
    with torch.inference_mode():
        for batch in loader:
            if "mask" not in batch:
                continue
            meta = batch["meta"]
            keep = torch.as_tensor(meta.get("mask_ok", [True] * len(batch["label"])), dtype=torch.bool).view(-1)
            keep &= torch.as_tensor(meta["ok"], dtype=torch.bool).view(-1)
            if not keep.any():
                continue
            out = detector(batch["image"].to(dev), batch)
            got = _probability_map(out, tuple(batch["image"].shape[-2:]))
            if got is None:
                log.warning("the detector returns neither a mask nor a heatmap: no localisation metrics")
                return pd.DataFrame(), {"n": 0, "mask_from": "none"}
            prob, mask_from = got
            idx = keep.nonzero().view(-1)
            p = prob.cpu()[idx].squeeze(1).numpy()
            g = torch.as_tensor(batch["mask"])[idx].float().view(len(idx), *p.shape[1:]).numpy()
            scores = mask_scores(p, g, threshold)
            rows.append(pd.DataFrame({
                "path": [meta["path"][i] for i in idx.tolist()],
                "label": torch.as_tensor(batch["label"])[idx].tolist(),
                "source": [meta["source"][i] for i in idx.tolist()],
                "generator": [meta["generator"][i] for i in idx.tolist()],
                **scores,
            }))
            flat_p, flat_g = p.reshape(len(idx), -1), g.reshape(len(idx), -1)
            k = min(pixels_per_image, flat_p.shape[1])
            pick = np.stack([rng.choice(flat_p.shape[1], size=k, replace=False) for _ in range(len(idx))])
            sample_p.append(np.take_along_axis(flat_p, pick, 1).ravel())
            sample_g.append(np.take_along_axis(flat_g, pick, 1).ravel())
    if not rows:
        return pd.DataFrame(), {"n": 0, "mask_from": mask_from}
    per_image = pd.concat(rows, ignore_index=True)
    per_image["mask_from"] = mask_from
    auc = pixel_auc(np.concatenate(sample_p), np.concatenate(sample_g), max_pixels=None)
    return per_image, summarise(per_image, auc, threshold, mask_from)


def render_localization_markdown(summary: dict) -> str:
    if not summary.get("n"):
        return "## Localisation\n\nNo image with a ground-truth mask was scored.\n"

    def fmt(x) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    lines = [
        "## Localisation",
        "",
        f"Predicted {summary['mask_from']} binarised at {summary['threshold']:.2f}; per-image F1 and IoU, averaged. "
        "Score = F1 + IoU (0..2). An image with an empty ground truth and an empty prediction counts F1 = IoU = 1. "
        "Pixel AUC over a fixed-seed pixel subsample.",
        "",
        f"Overall ({summary['n']} images): score {fmt(summary['score'])}, F1 {fmt(summary['f1'])}, "
        f"IoU {fmt(summary['iou'])}, pixel AUC {fmt(summary['pixel_auc'])}",
        "",
        "| group | n | score | F1 | IoU |",
        "|---|---|---|---|---|",
    ]
    for title, key in (("label", "by_label"), ("generator", "by_generator")):
        for name, b in summary.get(key, {}).items():
            if b.get("n"):
                lines.append(f"| {title}: {name} | {b['n']} | {fmt(b['score'])} | {fmt(b['f1'])} | {fmt(b['iou'])} |")
    return "\n".join(lines) + "\n"


def write_localization(
    loaded, records, out_dir, batch_size: int = 64, num_workers: int = 2, device: str = "auto", draft_decode: bool = True
) -> tuple[dict, str] | None:
    """evaluate.py's localisation section: when the records carry ground-truth masks (a
    manifest ``mask`` column), score the checkpoint's masks on them, write
    localization.csv and return ``(summary, markdown)``; None when there is nothing to score."""
    from pathlib import Path

    from data.dataset import ImageDataset
    from unmask.io import atomic_write_text

    dataset = ImageDataset(records, loaded.canonical, train=False, draft_decode=draft_decode, faces=getattr(loaded, "faces", None))
    if not records or not getattr(dataset, "has_masks", False):
        return None
    per_image, summary = evaluate_localization(loaded.detector, dataset, batch_size, num_workers, device)
    atomic_write_text(Path(out_dir) / "localization.csv", per_image.to_csv(index=False))
    return summary, render_localization_markdown(summary)
