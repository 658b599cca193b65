"""The one detector interface.

A detector takes the batch's images (float RGB in [0, 1], Bx3xHxW), normalises them
itself and returns a ``DetectorOutput``. Loops, evaluators and exporters read only that,
so none of them ever special-cases a detector.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectorOutput:
    logit: Tensor  # (B,) one logit per image; sigmoid(logit) = P(AI-generated / forged)
    heatmap: Tensor | None = None  # (B, 1, h, w) where the detector looks, if it has a map
    mask: Tensor | None = None  # (B, 1, H, W) per-pixel forgery logits, if it localises
    features: Tensor | None = None  # (B, D) embedding, for probes, k-NN and attribution
    class_logits: Tensor | None = None  # (B, C) forgery-type logits, when an attribution head is on
    losses: dict[str, Tensor] = field(default_factory=dict)  # extra loss terms it adds

    @property
    def prob(self) -> Tensor:
        return torch.sigmoid(self.logit.float())


class Detector(nn.Module):
    """Base class. Subclasses implement ``forward_normalized`` (on normalised pixels) or
    override ``forward`` when they need the rest of the batch (landmarks, masks)."""

    def __init__(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        # Non-persistent: preprocessing constants belong to the code/config, not the weights.
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, image: Tensor) -> Tensor:
        return (image - self.pixel_mean.to(image.dtype)) / self.pixel_std.to(image.dtype)

    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        return self.forward_normalized(self.normalize(image))

    def forward_normalized(self, x: Tensor) -> DetectorOutput:
        raise NotImplementedError

    def after_backward(self) -> None:
        """Called by ``DetectionModule`` after each training backward, before the optimiser
        step; detectors that read gradients of their own inputs (e.g. ``OSNRobust``'s
        adversarial memory) hook in here. No-op by default."""

    def loss_terms(self, out: DetectorOutput, batch: Mapping) -> dict[str, Tensor]:
        """Image-level BCE on decodable samples plus whatever the detector added."""
        labels = torch.as_tensor(batch["label"], device=out.logit.device)
        valid = labels >= 0
        ok = batch.get("meta", {}).get("ok") if isinstance(batch.get("meta"), Mapping) else None
        if ok is not None:
            valid = valid & torch.as_tensor(ok, device=valid.device, dtype=torch.bool)
        if valid.any():
            bce = F.binary_cross_entropy_with_logits(out.logit[valid].float(), labels[valid].float())
        else:  # keep the graph connected so DDP and AMP see a (zero) gradient
            bce = out.logit.sum() * 0.0
        return {"bce": bce, **out.losses}
