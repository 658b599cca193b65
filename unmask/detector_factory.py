"""The detector a run config describes: ``detector``, wrapped by ``attribution`` when set.

One place for train.py (``unmask.training.build_module``) and checkpoint loading
(``unmask.checkpoint.load_detector``), so a checkpoint is rebuilt exactly as it was trained.
"""
from __future__ import annotations

from typing import Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig

from detectors.base import Detector


def build_detector(cfg: DictConfig | Mapping) -> Detector:
    """``cfg``: a composed config or the resolved dict stored in a checkpoint. A config
    without an ``attribution`` key (older checkpoints) or with ``attribution: null`` /
    ``{}`` gives the bare detector."""
    detector = instantiate(cfg["detector"])
    attribution = cfg.get("attribution")
    if not attribution:  # None or an empty node (configs/attribution/none.yaml)
        return detector
    if not isinstance(detector, Detector):
        raise TypeError(f"detector._target_ must build a detectors.base.Detector, got {type(detector).__name__}")
    return instantiate(attribution, detector=detector)
