"""Batched scoring of a data set: the shared hot path of infer.py and evaluate.py."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import ImageDataset
from detectors.base import Detector

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict(
    detector: Detector,
    dataset: ImageDataset,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    amp: bool = True,
    progress: bool = True,
) -> tuple[pd.DataFrame, float]:
    """Score every sample; returns one row per sample (path, prob, label, ok, source,
    generator, group) and the wall seconds from first decode to last score."""
    dev = pick_device(device)
    detector = detector.to(dev).eval().to(memory_format=torch.channels_last)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.float16) if amp and dev.type == "cuda" else nullcontext()
    rows: list[dict] = []
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for batch in tqdm(loader, desc="scoring", unit="batch", disable=not progress, leave=False):
            image = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            prob = detector(image, batch).prob.float().cpu().tolist()
            meta = batch["meta"]
            for i, p in enumerate(prob):
                ok = bool(meta["ok"][i])
                rows.append(
                    {
                        "path": meta["path"][i],
                        "prob": p if ok else float("nan"),
                        "label": int(batch["label"][i]),
                        "ok": ok,
                        "error": meta["error"][i],
                        "source": meta["source"][i],
                        "generator": meta["generator"][i],
                        "group": meta["group"][i],
                    }
                )
    seconds = time.perf_counter() - start
    return pd.DataFrame(rows), seconds
