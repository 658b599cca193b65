"""Rebuild a trained detector, its threshold and its preprocessing from a checkpoint alone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate

from data.canonical import Canonicalizer
from data.faces.pipeline import FacePipeline
from detectors.backbones import skip_pretrained
from detectors.base import Detector
from unmask.detector_factory import build_detector


@dataclass
class LoadedDetector:
    detector: Detector
    threshold: float
    canonical: Canonicalizer
    config: dict
    path: str
    faces: FacePipeline | None = None  # the face stage it was trained with (configs/faces), if any


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedDetector:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass ckpt=outputs/train/<run>/checkpoints/best.ckpt")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "unmask" not in ckpt:
        raise ValueError(f"{path} is not an unmask checkpoint (no run config inside)")
    config = ckpt["unmask"]["run_config"]
    with skip_pretrained():  # the state dict below carries the trained weights
        detector = build_detector(config)  # wrapped by the attribution head when the run had one
    state = ckpt["state_dict"]
    detector.load_state_dict({k[len("detector.") :]: v for k, v in state.items() if k.startswith("detector.")})
    detector.eval()
    threshold = float(state["threshold"]) if "threshold" in state else float(ckpt["unmask"].get("threshold", 0.5))
    canonical = instantiate(config["canonical"])
    faces = config.get("faces") or None
    faces = instantiate(relocate_machine_paths(faces, beside=path.parent)) if faces else None
    return LoadedDetector(detector, threshold, canonical, config, str(path), faces)


def relocate_machine_paths(node: dict, beside: Path | None = None) -> dict:
    """The stored config names files of the machine that trained (face weights under its
    ``shared/``, its cache folder). On another machine: a weight file that is not there is
    looked up by name beside the checkpoint (``beside``: how a submission ships them), then in
    this machine's ``shared/weights``; caches go to this project's."""
    import copy
    import os

    from unmask.config import PROJECT_ROOT

    shared = Path(os.environ.get("UNMASK_SHARED", PROJECT_ROOT.parent / "shared")) / "weights"
    cache = Path(os.environ.get("UNMASK_CACHE", PROJECT_ROOT / ".cache")) / "faces"

    def visit(value, key=""):
        if isinstance(value, dict):
            return {k: visit(v, k) for k, v in value.items()}
        if key == "cache_dir" and value and not Path(value).parent.is_dir():
            return str(cache)
        if isinstance(value, str) and Path(value).suffix in {".pth", ".pt", ".npy", ".onnx"} and not Path(value).exists():
            for folder in ([beside] if beside else []) + [shared]:
                if (folder / Path(value).name).exists():
                    return str(folder / Path(value).name)
            return value  # still missing: the analyser names the file
        return value

    return visit(copy.deepcopy(node))
