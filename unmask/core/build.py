"""The detector a run config describes: ``detector``, then each wrapper group in one fixed
order. One place for train.py and for checkpoint loading, so a checkpoint is rebuilt exactly
as it was trained."""
from __future__ import annotations

from collections.abc import Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig

from detectors.base import Detector
from unmask.core.config import is_empty

# Wrapper groups, innermost first: OSN-noise robust training acts on the pixels the detector
# sees, the attribution head reads the features it returns. Each group's node is a
# ``_target_`` taking the detector to wrap as ``detector``; ``<group>=none`` leaves it out.
WRAPPERS = ("osn", "attribution")


def build_detector(cfg: DictConfig | Mapping) -> Detector:
    """``cfg``: a composed config or the resolved dict stored in a checkpoint (older ones nest
    OSN inside ``detector`` and have no wrapper groups: they build the same modules)."""
    detector = instantiate(cfg["detector"])
    _check(detector, "detector")
    for group in WRAPPERS:
        node = cfg.get(group)
        if is_empty(node):
            continue
        detector = instantiate(node, detector=detector)
        _check(detector, group)
    return detector


def _check(detector, group: str) -> None:
    if not isinstance(detector, Detector):
        raise TypeError(f"{group}._target_ must build a detectors.base.Detector, got {type(detector).__name__}")
