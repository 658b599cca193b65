"""Rebuild a trained detector, its threshold and its preprocessing from a checkpoint alone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate

from data.canonical import Canonicalizer
from detectors.backbones import skip_pretrained
from detectors.base import Detector


@dataclass
class LoadedDetector:
    detector: Detector
    threshold: float
    canonical: Canonicalizer
    config: dict
    path: str


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedDetector:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass ckpt=outputs/train/<run>/checkpoints/best.ckpt")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "unmask" not in ckpt:
        raise ValueError(f"{path} is not an unmask checkpoint (no run config inside)")
    config = ckpt["unmask"]["run_config"]
    with skip_pretrained():  # the state dict below carries the trained weights
        detector = instantiate(config["detector"])
    state = ckpt["state_dict"]
    detector.load_state_dict({k[len("detector.") :]: v for k, v in state.items() if k.startswith("detector.")})
    detector.eval()
    threshold = float(state["threshold"]) if "threshold" in state else float(ckpt["unmask"].get("threshold", 0.5))
    canonical = instantiate(config["canonical"])
    return LoadedDetector(detector, threshold, canonical, config, str(path))
