"""The sample dict: the one contract between data sets and detectors.

Every data set (images, video frames, the views of a scored file) yields::

    {"image": float tensor 3xHxW in [0, 1] (RGB),
     "label": 0 real | 1 fake | -1 unknown,
     "meta": {"path", "source", "generator", "group", "ok", "error", ...}}

plus, with a face stage, ``"landmarks"`` (L, 2) x, y in pixels of ``image`` and
``meta["face_found"]``, ``meta["face_index"]`` (-1: the whole image); plus, with masks,
``"mask"`` (1, H, W) in [0, 1] and ``meta["mask_ok"]``; plus, for scoring,
``meta["file"]`` (the record's index) and ``meta["view"]`` (its view: -1 whole image, k face k).

``meta.ok`` is False when the file could not be decoded: the sample then carries a blank
image. Whether a sample (or a row of scores) counts is decided here, once: ``usable``.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from data.records import Record

LABELS = (0, 1)  # real, fake; anything else (-1) is unlabelled


def to_tensor(pixels: np.ndarray) -> Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float in [0, 1]."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def make_sample(pixels: np.ndarray, record: Record, error: str = "", label: int | None = None, generator: str | None = None, **meta) -> dict:
    """The sample dict of ``record`` from finished uint8 pixels. ``label`` and ``generator``
    default to the record's (a forgery synthesiser changes both); ``meta`` adds keys."""
    return {
        "image": to_tensor(pixels),
        "label": record.label if label is None else label,
        "meta": {
            "path": record.path,
            "source": record.source,
            "generator": record.generator if generator is None else generator,
            "group": record.group,
            "ok": not error,
            "error": error,
            **meta,
        },
    }


def _meta(batch: Mapping) -> Mapping:
    meta = batch.get("meta")
    return meta if isinstance(meta, Mapping) else {}


def usable(batch: Mapping, device: torch.device | str | None = None) -> Tensor:
    """Per sample of a collated batch: decoded (``meta.ok``) and labelled 0 or 1. What losses,
    validation metrics and attribution targets count."""
    labels = torch.as_tensor(batch["label"], device=device).view(-1)
    keep = (labels == 0) | (labels == 1)
    ok = _meta(batch).get("ok")
    if ok is not None:
        keep = keep & torch.as_tensor(ok, device=keep.device, dtype=torch.bool).view(-1)
    return keep


def mask_usable(batch: Mapping, device: torch.device | str | None = None) -> Tensor:
    """Per sample: decoded and carrying a ground-truth mask (``meta.mask_ok``); what pixel
    losses and localisation metrics count. All False when the batch has no masks."""
    meta = _meta(batch)
    n = torch.as_tensor(batch["label"]).numel()
    if batch.get("mask") is None or meta.get("mask_ok") is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    keep = torch.as_tensor(meta["mask_ok"], device=device, dtype=torch.bool).view(-1)
    if meta.get("ok") is not None:
        keep = keep & torch.as_tensor(meta["ok"], device=keep.device, dtype=torch.bool).view(-1)
    return keep


def usable_rows(frame):
    """The same rule for a table of scores (a pandas DataFrame with ``ok`` and ``label``
    columns): a boolean Series of the rows that metrics and thresholds count."""
    return frame["ok"].astype(bool) & frame["label"].isin(LABELS)
