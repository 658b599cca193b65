"""Re-choose a face-stage checkpoint's threshold on validation, scored the way infer.py scores.

Training validates one sample per file (the top face). infer.py and evaluate.py score the
whole image and every face and combine them (``faces.image_combine``, max by default): the
combined score of a file is at least its top face's, so the threshold chosen during training
would flag more reals than it did on validation. After fitting, the selected checkpoint's
threshold is chosen again on the *validation* split with the combined scores (the test split
is never looked at) and written back into the checkpoint.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from data.records import Record
from unmask.checkpoint import load_detector
from unmask.image_scoring import score_image_records
from unmask.io import atomic_write_bytes
from unmask.metrics import choose_threshold

log = logging.getLogger(__name__)


def recalibrate_threshold(ckpt: str | Path, val_records: list[Record], policy: str, **score_kwargs) -> float | None:
    """The new threshold (also stored in ``ckpt``), or None when the checkpoint has no face stage
    or validation lacks a class."""
    loaded = load_detector(ckpt)
    if loaded.faces is None:
        return None
    df, _ = score_image_records(loaded, val_records, **score_kwargs)
    scored = df[df["ok"] & df["label"].isin([0, 1])]
    if scored["label"].nunique() < 2:
        return None
    threshold = float(choose_threshold(scored["label"].to_numpy(), scored["prob"].to_numpy(), policy))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["state_dict"]["threshold"] = torch.tensor(threshold)
    state["unmask"]["threshold"] = threshold
    state["unmask"]["threshold_from"] = f"validation, {len(scored)} files scored with the face stage ({loaded.faces.image_combine} of faces and whole image)"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(ckpt, buffer.getvalue())
    log.info("threshold %.4f -> %.4f: chosen again on validation with per-file face scoring", loaded.threshold, threshold)
    return threshold
