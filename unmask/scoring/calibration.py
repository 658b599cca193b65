"""The one threshold rule: a checkpoint's decision threshold is chosen on the *validation*
split, scored by the same scorer infer.py uses (face stage, video aggregation, runtime), and
stored in the checkpoint's one place for it. The test split is never looked at.

Training validates one sample per file each epoch (the top face with a face stage), which is
good enough to select a checkpoint but not to set the threshold: infer.py scores the whole
image and every face and combines them, so a file's score can exceed its top face's.
"""
from __future__ import annotations

import logging
from pathlib import Path

from data.records import Record
from unmask.core.checkpoint import load_detector, store_threshold
from unmask.core.metrics import choose_threshold
from unmask.core.schemas import ScoringConfig
from unmask.scoring.combine import VideoOptions
from unmask.scoring.scorer import Scorer

log = logging.getLogger(__name__)


def describe_scoring(loaded) -> str:
    if loaded.faces is None:
        return "whole images"
    f = loaded.faces
    return f"faces ({f.face_combine}) and the whole image, combined by {f.image_combine}" if f.whole_image else f"faces ({f.face_combine})"


def calibrate_threshold(
    ckpt: str | Path, val_records: list[Record], options: ScoringConfig | None = None, video: VideoOptions | None = None
) -> float | None:
    """Choose the threshold of ``ckpt`` on ``val_records`` and store it there; returns it, or
    None when validation lacks a class (the checkpoint keeps its threshold)."""
    options = options or ScoringConfig()
    loaded = load_detector(ckpt)
    rows = Scorer(loaded, options, video).score(val_records).usable()
    if rows["label"].nunique() < 2 if len(rows) else True:
        log.warning("validation has fewer than two classes: the threshold of %s is left at %.4f", ckpt, loaded.threshold)
        return None
    sources = rows["source"].to_numpy() if "source" in rows else None
    threshold = float(choose_threshold(rows["label"].to_numpy(), rows["prob"].to_numpy(), options.threshold_policy, sources))
    how = f"validation split, {len(rows)} files scored as infer.py scores them ({describe_scoring(loaded)}), policy {options.threshold_policy}"
    store_threshold(ckpt, threshold, how)
    log.info("threshold %.4f -> %.4f, chosen on %s", loaded.threshold, threshold, how)
    return threshold
