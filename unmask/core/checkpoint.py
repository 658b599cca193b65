"""The checkpoint format: a trained detector, its threshold and its preprocessing, rebuilt
from the file alone.

A checkpoint is Lightning's dict plus one ``unmask`` section::

    checkpoint["state_dict"]            # the LightningModule's tensors; the detector's under "detector."
    checkpoint["unmask"] = {
        "format": 2,
        "run_config": {...},            # the resolved training config: detector, wrappers, canonical, faces...
        "threshold": 0.42,              # the decision threshold: its one place
        "threshold_from": "...",        # how it was chosen (validation, by the scorer)
    }

Format 1 (before the package was split by concern) kept the threshold as a state-dict buffer
too, nested OSN inside ``detector`` and named classes at their old module paths; it loads
unchanged (``TARGET_ALIASES``).

A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)`` (tensors,
numbers, strings, containers; no pickled objects), only from a local file, and its stored
config may only build the classes ``unmask.core.trusted_targets`` allows.

A *slim* checkpoint (``python -m unmask.slim CKPT OUT``, ``unmask.core.slim``) is a
``.safetensors`` file: the detector's tensors (fp32, or fp16 with ``--fp16``) and, as
safetensors metadata (JSON strings), the run config, the threshold and how it was chosen; no
optimizer state, nothing pickled. ``read_checkpoint`` dispatches on the suffix and returns the
same dict shape for both.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate

from data.canonical import Canonicalizer
from data.faces.pipeline import FacePipeline
from data.io import atomic_path
from detectors.backbones import skip_pretrained
from detectors.base import Detector
from unmask.core.build import WRAPPERS, build_detector
from unmask.core.trusted_targets import check_targets

FORMAT = 2

# Classes that moved: a stored config naming the old path builds the class at the new one.
TARGET_ALIASES = {
    "unmask.attribution.AttributedDetector": "detectors.wrappers.attribution.AttributedDetector",
    "detectors.osn.OSNRobust": "detectors.wrappers.osn.OSNRobust",
    "unmask.aggregate.ScoreAggregator": "unmask.scoring.combine.ScoreAggregator",
    "unmask.attacks.FGSM": "unmask.robustness.attacks.FGSM",
    "unmask.attacks.PGD": "unmask.robustness.attacks.PGD",
    "unmask.osn_pretrain.SyntheticPlatform": "unmask.tasks.osn_pretrain.SyntheticPlatform",
}
# Whole modules that moved (every name in them).
MODULE_ALIASES = {"data.perturb.": "unmask.robustness.perturbations."}


def alias_targets(node):
    """A copy of a stored config with every moved ``_target_`` renamed to where it lives now."""
    if isinstance(node, dict):
        out = {k: alias_targets(v) for k, v in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            target = TARGET_ALIASES.get(target, target)
            for old, new in MODULE_ALIASES.items():
                if target.startswith(old):
                    target = new + target[len(old) :]
            out["_target_"] = target
        return out
    if isinstance(node, list):
        return [alias_targets(v) for v in node]
    return node


@dataclass
class LoadedDetector:
    detector: Detector
    threshold: float
    canonical: Canonicalizer
    config: dict
    path: str
    faces: FacePipeline | None = None  # the face stage it was trained with (configs/faces), if any
    threshold_from: str = ""


class CheckpointError(ValueError):
    """A file that is not a readable unmask checkpoint; the message names it and says why."""


EXPECTED = "a .ckpt written by train.py (checkpoints/best.ckpt or last.ckpt)"
SLIM_SUFFIX = ".safetensors"
EXPECTED_SLIM = "a .safetensors written by `python -m unmask.slim CKPT OUT`"
SLIM_KEYS = ("run_config", "threshold", "threshold_from")  # metadata entries, each a JSON string


def read_slim(path: Path) -> dict:
    """A ``.safetensors`` slim checkpoint as the dict ``read_checkpoint`` returns: its tensors
    under ``state_dict``, its metadata (JSON strings) as the ``unmask`` section. Nothing is
    unpickled; a corrupt or foreign file is a ``CheckpointError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError... for a bad file
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {reason}); expected {EXPECTED_SLIM}") from None
    if "unmask_format" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without unmask metadata (run config, threshold); expected {EXPECTED_SLIM}")
    section = {}
    for key in SLIM_KEYS:
        try:
            section[key] = json.loads(meta[key])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: its metadata entry {key!r} is missing or not JSON ({e}); expected {EXPECTED_SLIM}") from None
    try:
        section["format"] = int(meta["unmask_format"])
    except ValueError:
        raise CheckpointError(f"{path}: its unmask_format {meta['unmask_format']!r} is not a number; expected {EXPECTED_SLIM}") from None
    return {"state_dict": state, "unmask": section}


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict at ``path``, loaded as data (``weights_only``; a ``.safetensors``
    slim file through ``read_slim``): a file that needs unpickling code, a remote URL, or
    anything that is not an unmask checkpoint is refused."""
    if "://" in str(path):
        raise CheckpointError(f"{path}: checkpoints are read from local files only (download it first, and only if you trust it)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass ckpt=outputs/train/<run>/checkpoints/best.ckpt")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); expected {EXPECTED_SLIM if path.suffix == SLIM_SUFFIX else EXPECTED}")
    if path.suffix.lower() == SLIM_SUFFIX:
        return _checked(read_slim(path), path, EXPECTED_SLIM)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False; only the unpickler's own reason is useful here.
        # A global of a blocked module (os.system) comes without the "WeightsUnpickler error:" prefix.
        lines = [line.strip() for line in str(e).split("WeightsUnpickler error:")[-1].splitlines()]
        lines = [line for line in lines if line and not line.startswith(("Weights only load failed", "Check the documentation"))]
        reason = next((line for line in lines if "unsupported global" in line.lower()), lines[0] if lines else "unpickling failed")[:300]
        if "unsupported global" not in reason.lower():
            raise CheckpointError(f"{path}: not a readable checkpoint ({reason}); expected {EXPECTED}") from None
        # A pickled object (a class, a function): from other software, or crafted to run code.
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain values, which loading would have "
            f"to run as code ({reason}); expected {EXPECTED}"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ValueError... for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); expected {EXPECTED}") from None
    return _checked(ckpt, path, EXPECTED)


def _checked(ckpt, path: Path, expected: str) -> dict:
    """``ckpt`` when it has the shape of an unmask checkpoint (a state dict and a run config)."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("unmask"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not an unmask checkpoint (no run config and state dict inside); expected {expected}")
    if not isinstance(ckpt["unmask"].get("run_config"), dict):
        raise CheckpointError(f"{path}: its unmask section has no run_config; expected {expected}")
    return ckpt


def stored_threshold(ckpt: dict, path: str | Path = "checkpoint") -> float:
    """The decision threshold of a checkpoint of any format; a threshold that is not a number
    in [0, 1] is refused (a NaN would label every file real)."""
    section = ckpt["unmask"]
    if section.get("format", 1) >= 2 or "threshold" not in ckpt.get("state_dict", {}):
        value = section.get("threshold", 0.5)
    else:
        value = ckpt["state_dict"]["threshold"]  # format 1: the buffer was the primary copy
    try:
        threshold = float(value)
    except (TypeError, ValueError, RuntimeError):
        threshold = math.nan
    if not (0.0 <= threshold <= 1.0):  # NaN fails every comparison
        raise CheckpointError(f"{path}: stored threshold {value!r} is not a probability in [0, 1]; re-calibrate or pass scoring.threshold=")
    return threshold


def load_detector(path: str | Path) -> LoadedDetector:
    """Rebuild the detector (with its wrappers), the canonicaliser and the face stage of a
    checkpoint, with its trained weights and threshold, in eval mode on the CPU."""
    ckpt = read_checkpoint(path)  # before Path(): it would fold "http://" into "http:/"
    path = Path(path)
    config = alias_targets(ckpt["unmask"]["run_config"])
    threshold = stored_threshold(ckpt, path)
    for group in ("detector", *WRAPPERS, "canonical", "faces"):  # the parts loading builds
        check_targets(config.get(group), str(path), group)
    if not isinstance(config.get("detector"), dict) or not isinstance(config.get("canonical"), dict):
        raise CheckpointError(f"{path}: its run_config has no detector or canonical section; expected {EXPECTED}")
    with skip_pretrained():  # the state dict below carries the trained weights
        detector = build_detector(config)
    state = ckpt["state_dict"]
    try:
        detector.load_state_dict({k[len("detector.") :]: v for k, v in state.items() if k.startswith("detector.")})
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"{path}: its weights do not fit the detector its config describes: {str(e)[:600]}") from None
    detector.eval()
    canonical = instantiate(config["canonical"])
    faces = config.get("faces") or None
    faces = instantiate(relocate_machine_paths(faces, beside=path.parent)) if faces else None
    return LoadedDetector(detector, threshold, canonical, config, str(path), faces, str(ckpt["unmask"].get("threshold_from", "")))


def store_threshold(path: str | Path, threshold: float, how: str) -> None:
    """Write ``threshold`` (and how it was chosen) into the checkpoint at ``path``, atomically."""
    ckpt = read_checkpoint(path)
    ckpt["state_dict"].pop("threshold", None)  # format 1's second copy
    ckpt["unmask"].update(format=FORMAT, threshold=float(threshold), threshold_from=how)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def relocate_machine_paths(node: dict, beside: Path | None = None) -> dict:
    """The stored config names files of the machine that trained (face weights under its
    ``shared/``, its cache folder). On another machine: a weight file that is not there is
    looked up by name beside the checkpoint (``beside``: how a submission ships them), then in
    this machine's ``shared/weights``; caches go to this project's."""
    from unmask.core.config import PROJECT_ROOT, shared_dir

    shared = shared_dir() / "weights"
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
