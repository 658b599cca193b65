"""Heatmaps for every detector: where in the image the "AI-generated" evidence lies.

``explain_maps(detector, image)`` returns one map per image, (B, 1, H, W) in [0, 1] at the
input resolution:

- ``method="own"``: the detector's own map, ``DetectorOutput.forgery_map`` (the one
  definition: ``sigmoid(mask)``, else the heatmap clamped to [0, 1]).
- ``method="gradcam"``: Grad-CAM (Selvaraju et al., ICCV 2017) on a feature-map layer, for
  any detector: ``ReLU(sum_c mean_hw(d logit / d A_c) * A_c)``, upsampled bilinearly and
  min-max scaled per image (a flat map becomes all zeros). The gradient is that of the
  fake logit, so on a real image the map shows the strongest "fake" evidence, if any.
- ``method="auto"``: ``own`` when the detector's output carries a map, else ``gradcam``.

Target layer. Default: the LAST module, in call order during a forward pass, whose output is
a 4-D (B, C, H, W) tensor with H * W > 1. Containers count (their hook fires after their
children), so for ``nn.Sequential`` backbones it is the container whose output is the final
feature map; maps of 1 x 1 (a 32 px image through a stride-32 network) are skipped because
Grad-CAM cannot localise on them. ``target_layer="backbone.blocks.5"`` (a dotted name from
``named_modules()``) picks one by hand; a wrong name is an error listing the candidates.

How gradients reach frozen layers: the activation of the target layer is replaced, during
the forward, by a fresh leaf tensor that requires grad (``detach().requires_grad_()``, then
a clone so in-place ops after it stay legal), and ``torch.autograd.grad`` takes the logit's
gradient with respect to that leaf only. No parameter's ``requires_grad`` or ``.grad`` is
touched, and frozen backbones (UnivFD's encoder, LGrad's classifier) work unchanged. A
forward pre-hook on the target switches grad mode on, because some encoders run under
``@torch.no_grad`` (``UnivFD.encode``); the enclosing ``no_grad`` restores the mode when it
exits. LGrad computes input gradients of its frozen source inside ``forward``: that runs
before the classifier, whose layers are the default target, and is left alone.

Limits: a map is stretched over the whole input, so for detectors that centre-crop
(``univfd`` with ``crop``) it covers the crop's content spread over the full frame; a ViT's
only 4-D layer is its patch embedding (the default target there), a weak explanation;
an embedding served from a feature cache never runs the encoder (an error says so).
Every hook is removed and the training flag restored before returning, also on errors.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.base import Detector, DetectorOutput

log = logging.getLogger(__name__)

METHODS = ("auto", "own", "gradcam")


def minmax_per_image(maps: Tensor) -> Tensor:
    """Each map scaled to [0, 1] by its own min and max; flat (or non-finite) maps -> zeros."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 1e-12, (flat - low) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.view_as(maps)


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _is_feature_map(output) -> bool:
    return torch.is_tensor(output) and output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1


@contextmanager
def _eval_mode(detector: nn.Module) -> Iterator[None]:
    was_training = detector.training
    detector.eval()
    try:
        yield
    finally:
        detector.train(was_training)


@contextmanager
def _hooks(handles: list) -> Iterator[list]:
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _grad_ready(image: Tensor) -> Tensor:
    # An inference-mode tensor (infer.py scores under inference_mode) cannot join a graph.
    return image.detach().clone() if image.is_inference() else image.detach()


def feature_map_layers(detector: Detector, image: Tensor, batch: Mapping | None = None) -> tuple[list[tuple[str, tuple]], DetectorOutput]:
    """One forward pass (eval mode, no grad) recording ``(name, output shape)`` of every
    module whose output is a 4-D feature map with more than one pixel, in call order (a
    module called several times is listed at its last call), and the detector's output."""
    seen: dict[str, tuple] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            if _is_feature_map(output):
                seen.pop(name, None)  # re-insert: the order is that of the last call
                seen[name] = tuple(output.shape)

        return hook

    with _eval_mode(detector), _hooks([]) as handles, torch.inference_mode(False), torch.no_grad():
        for name, module in detector.named_modules():
            if name:  # the detector itself returns a DetectorOutput
                handles.append(module.register_forward_hook(record(name)))
        out = detector(_grad_ready(image), batch)
    return list(seen.items()), out


def _candidates_text(layers: list[tuple[str, tuple]], last: int = 15) -> str:
    shown = layers[-last:]
    more = f" (last {last} of {len(layers)})" if len(layers) > last else ""
    return f"feature-map layers{more}: " + ", ".join(f"{n} {list(s)}" for n, s in shown) if shown else "no module outputs a 4-D feature map"


def default_target_layer(detector: Detector, image: Tensor, batch: Mapping | None = None) -> str:
    """The name of the last module (call order) whose output is a feature map > 1 x 1."""
    layers, _ = feature_map_layers(detector, image, batch)
    if not layers:
        raise ValueError(
            f"{type(detector).__name__} has no module with a 4-D feature map larger than 1 x 1 at input size "
            f"{tuple(image.shape[-2:])}: Grad-CAM cannot localise; give a larger image or explain.layer=<module name>"
        )
    return layers[-1][0]


def _target_module(detector: Detector, name: str, image: Tensor, batch: Mapping | None) -> nn.Module:
    modules = dict(detector.named_modules())
    if name and name in modules:
        return modules[name]
    layers, _ = feature_map_layers(detector, image, batch)
    raise ValueError(f"explain.layer={name!r} is not a module of {type(detector).__name__}; {_candidates_text(layers)}")


def grad_cam(detector: Detector, image: Tensor, batch: Mapping | None = None, target_layer: str | None = None) -> Tensor:
    """Grad-CAM maps (B, 1, H, W) in [0, 1] of the fake logit on ``target_layer``
    (default: ``default_target_layer``)."""
    name = target_layer or default_target_layer(detector, image, batch)
    module = _target_module(detector, name, image, batch)
    captured: dict[str, Tensor] = {}

    def grad_on(module, args) -> None:
        torch.set_grad_enabled(True)  # escapes an encoder's @torch.no_grad until it exits

    def capture(module, args, output):
        if not torch.is_tensor(output) or output.dim() != 4:
            shape = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
            raise ValueError(f"explain.layer={name!r} outputs {shape}, not a (B, C, H, W) feature map")
        leaf = output.detach().float().requires_grad_(True)
        captured["activation"] = leaf  # a module called twice: its last call wins
        return leaf.clone().to(output.dtype)  # a non-leaf: later in-place ops stay legal

    with _eval_mode(detector), _hooks([module.register_forward_pre_hook(grad_on), module.register_forward_hook(capture)]):
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(image.device.type, enabled=False):
            out = detector(_grad_ready(image), batch)
            activation = captured.get("activation")
            if activation is None:
                raise RuntimeError(
                    f"explain.layer={name!r} was not called during the forward of {type(detector).__name__} "
                    "(embeddings served from a feature cache? a branch not taken?)"
                )
            logit = out.logit.float()
            (grad,) = torch.autograd.grad(logit.sum(), activation, allow_unused=True) if logit.requires_grad else (None,)
            if grad is None:
                raise RuntimeError(f"the fake logit of {type(detector).__name__} does not depend on explain.layer={name!r}")
    weights = grad.mean(dim=(2, 3), keepdim=True)  # per-channel importance (global-average gradient)
    cam = F.relu((weights * activation.detach()).sum(1, keepdim=True))
    return minmax_per_image(_resize(cam, tuple(image.shape[-2:])))


def explain_maps(
    detector: Detector,
    image: Tensor,
    batch: Mapping | None = None,
    method: str = "auto",
    target_layer: str | None = None,
) -> Tensor:
    """(B, 1, H, W) maps in [0, 1] at the resolution of ``image`` (B, 3, H, W, RGB in [0, 1]),
    on ``image``'s device. ``method``: auto | own | gradcam (see the module doc)."""
    if method not in METHODS:
        raise ValueError(f"explain.method must be one of {METHODS}, got {method!r}")
    size = tuple(image.shape[-2:])
    if method == "gradcam":
        return grad_cam(detector, image, batch, target_layer)
    with _eval_mode(detector), torch.inference_mode(False), torch.no_grad():
        maps = detector(_grad_ready(image), batch).forgery_map(size)
    if maps is not None:
        return maps
    if method == "own":
        raise ValueError(f"explain.method=own: {type(detector).__name__}'s output has neither a mask nor a heatmap; use auto or gradcam")
    return grad_cam(detector, image, batch, target_layer)


def resolve_method(detector: Detector, image: Tensor, batch: Mapping | None = None, method: str = "auto", target_layer: str | None = None) -> tuple[str, str | None]:
    """``(own | gradcam, target layer name or None)`` decided once on a sample batch, so a
    run over many batches does the discovery forward pass only once."""
    if method not in METHODS:
        raise ValueError(f"explain.method must be one of {METHODS}, got {method!r}")
    if method != "gradcam":
        with _eval_mode(detector), torch.inference_mode(False), torch.no_grad():
            out = detector(_grad_ready(image), batch)
        if out.mask is not None or out.heatmap is not None:
            return "own", None
        if method == "own":
            raise ValueError(f"explain.method=own: {type(detector).__name__}'s output has neither a mask nor a heatmap; use auto or gradcam")
    if target_layer:
        _target_module(detector, target_layer, image, batch)  # a wrong name fails here, listing candidates
        return "gradcam", target_layer
    return "gradcam", default_target_layer(detector, image, batch)


class ForgeryMaps:
    """The scorer's explainer: per batch, the forgery map of every view by ``method`` (auto |
    own | gradcam). The method (and Grad-CAM's layer) is decided on the first batch, so a
    run does the discovery pass once; ``source`` then says what the maps are."""

    def __init__(self, method: str = "auto", layer: str | None = None, required: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"explain.method must be one of {METHODS}, got {method!r}")
        self.method, self.layer, self.required = method, layer or None, required
        self.resolved: tuple[str, str | None] | None = None
        self.source: str | None = None

    def describe(self) -> str:
        if self.resolved is None:
            return "no image decoded"
        return f"the detector's own {self.source}" if self.resolved[0] == "own" else f"Grad-CAM on layer {self.resolved[1]}"

    def __call__(self, detector: Detector, image: Tensor, batch: Mapping | None = None, output: DetectorOutput | None = None) -> Tensor | None:
        """(B, 1, H, W) maps on ``image``'s device; None when ``required=False`` and the
        detector has no map of the asked kind."""
        size = tuple(image.shape[-2:])
        if self.resolved is None:
            try:
                self.resolved = resolve_method(detector, image, batch, self.method, self.layer)
            except ValueError:
                if self.required:
                    raise
                self.resolved = ("none", None)  # method=own on a detector without a map: no maps
            log.info("explanations: %s%s", self.resolved[0], f" on layer {self.resolved[1]}" if self.resolved[1] else "")
        method, layer = self.resolved
        if method == "none":
            return None
        if method == "gradcam":
            self.source = "gradcam"
            return grad_cam(detector, image, batch, layer)
        if output is None:  # a runtime without the eager output (ONNX): one eager forward for the maps
            with _eval_mode(detector), torch.inference_mode(False), torch.no_grad():
                output = detector(_grad_ready(image), batch)
        self.source = "mask" if output.mask is not None else "heatmap"
        return output.forgery_map(size).to(image.device)
