"""Batched scoring of a data set: the shared hot path of infer.py and evaluate.py."""
from __future__ import annotations

import logging
import time

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detectors.base import Detector
from unmask.attribution import attribution_columns
from unmask.runtime import TorchRuntime

log = logging.getLogger(__name__)

# The meta keys every sample carries; any other key (a video frame's video_id, timestamp...)
# becomes an extra column of the predictions.
BASE_META = ("path", "ok", "error", "source", "generator", "group")


def _value(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def predict(
    detector: Detector,
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    amp: bool = True,
    progress: bool = True,
    runtime=None,
    compile: bool = False,
) -> tuple[pd.DataFrame, float]:
    """Score every sample; returns one row per sample (path, prob, label, ok, source,
    generator, group, plus any extra meta keys of the samples) and the wall seconds from
    first decode to last score.

    Decoding and resizing run in ``num_workers`` DataLoader workers, overlapped with the
    model. ``runtime``: a scorer from ``unmask.runtime`` (e.g. ``OnnxRuntime``) used instead
    of the eager detector; ``compile``: ``torch.compile`` the detector (eager runtime only).
    """
    scorer = runtime if runtime is not None else TorchRuntime(detector, device=device, amp=amp, compile=compile)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=scorer.device.type == "cuda"
    )
    rows: list[dict] = []
    start = time.perf_counter()
    for batch in tqdm(loader, desc="scoring", unit="batch", disable=not progress, leave=False):
        prob = scorer(batch["image"], batch).tolist()
        meta = batch["meta"]
        # forgery type columns (type, type_prob, p_<class>) when the detector has an attribution head
        types = attribution_columns(getattr(scorer, "last_extras", {}), getattr(detector, "class_names", None), meta["ok"])
        extra = [k for k in meta if k not in BASE_META]
        for i, p in enumerate(prob):
            ok = bool(meta["ok"][i])
            row = {
                "path": meta["path"][i],
                "prob": p if ok else float("nan"),
                "label": int(batch["label"][i]),
                "ok": ok,
                "error": meta["error"][i],
                "source": meta["source"][i],
                "generator": meta["generator"][i],
                "group": meta["group"][i],
            }
            for k in extra:
                row[k] = _value(meta[k][i])
            if types:
                row.update(types[i])
            rows.append(row)
    seconds = time.perf_counter() - start
    return pd.DataFrame(rows), seconds
