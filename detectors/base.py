"""The one detector interface: what every detector promises, and what it returns.

A detector takes the batch's images (float RGB in [0, 1], Bx3xHxW, see ``data.sample``),
normalises them itself and returns a ``DetectorOutput``. The training module, the scorer,
the evaluators and the exporters read only that, so none of them special-cases a detector.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.sample import usable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectorOutput:
    logit: Tensor  # (B,) one logit per image; sigmoid(logit) = P(AI-generated / forged)
    heatmap: Tensor | None = None  # (B, 1, h, w) in [0, 1]: forgery evidence on the probability scale
    mask: Tensor | None = None  # (B, 1, H, W) per-pixel forgery logits, if it localises
    features: Tensor | None = None  # (B, D) embedding, for probes, k-NN and attribution
    class_logits: Tensor | None = None  # (B, C) forgery-type logits, when an attribution head is on
    losses: dict[str, Tensor] = field(default_factory=dict)  # extra loss terms it adds

    @property
    def prob(self) -> Tensor:
        return torch.sigmoid(self.logit.float())

    def forgery_map(self, size: tuple[int, int]) -> Tensor | None:
        """The detector's own per-pixel forgery map at ``size``, (B, 1, H, W) in [0, 1], or None.

        The one definition used by localisation metrics and explanations: ``sigmoid(mask)``
        (a probability, so binarising at 0.5 keeps its meaning), else the ``heatmap``
        resized bilinearly and clamped to [0, 1] (never rescaled per image: a real image
        whose every region scores low must stay low)."""
        if self.mask is not None:
            prob = torch.sigmoid(self.mask.detach().float())
        elif self.heatmap is not None:
            prob = self.heatmap.detach().float()
        else:
            return None
        if tuple(prob.shape[-2:]) != tuple(size):
            prob = F.interpolate(prob, size=tuple(size), mode="bilinear", align_corners=False)
        return prob.clamp(0.0, 1.0)


class Detector(nn.Module):
    """Base class: every obligation of a detector, in one place.

    1. ``forward(image, batch=None) -> DetectorOutput``. ``image``: RGB in [0, 1]; the
       detector normalises it itself (``pixel_mean`` / ``pixel_std``). Subclasses implement
       ``forward_normalized`` on normalised pixels, or override ``forward`` when they read
       more of the batch. A detector on a timm backbone takes the backbone's own mean/std
       (``pretrained_cfg``, see ``backbones.normalization``) unless the config sets them.
    2. ``requires``: the sample keys beyond ``image`` that ``forward`` reads (``rgnet``:
       ``("landmarks",)``). Runtimes that are handed the image alone (ONNX, torch.compile)
       refuse such a detector with a message instead of scoring it wrongly.
    3. ``export_note``: None when ``image -> logit`` can be exported as a static graph;
       otherwise why not (``lgrad`` differentiates its source inside ``forward``).
    4. ``loss_terms(out, batch) -> {name: scalar}``: image BCE on usable samples
       (``data.sample.usable``) plus whatever ``out.losses`` adds; the training loss is their sum.
    5. ``after_backward()``: a hook after each training backward (input-gradient memories).
    6. ``class_names``: the forgery types of ``out.class_logits`` when it has them (None: no
       attribution head); ``feature_dim``: the width of ``out.features`` (None: no features).
    7. ``input_gradients``: whether the training loss back-propagates to the input image
       (True by default). A detector whose logit does not depend differentiably on its
       input (a frozen encoder under ``no_grad``, gradient maps computed from a detached
       copy) must declare False: wrappers that perturb the input adversarially
       (``OSNRobust``'s xi) read the input's gradient and refuse such a detector instead of
       silently training with xi = 0.
    Frozen parts (an encoder, a gradient source) set ``requires_grad=False`` and stay in eval
    mode whatever ``train()`` asks; every trainable parameter must receive a gradient.
    """

    requires: tuple[str, ...] = ()
    export_note: str | None = None
    class_names: tuple[str, ...] | None = None
    feature_dim: int | None = None  # width D of ``out.features`` (None: it has none)
    input_gradients: bool = True  # the loss back-propagates to the input image (see 7.)

    def __init__(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        # Non-persistent: preprocessing constants belong to the code/config, not the weights.
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Replace the input normalisation (e.g. with the backbone's own, once it is built)."""
        self.pixel_mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.pixel_std.copy_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

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
        """Image-level BCE on usable samples plus whatever the detector added."""
        valid = usable(batch, out.logit.device)
        if valid.any():
            labels = torch.as_tensor(batch["label"], device=out.logit.device).view(-1)
            bce = F.binary_cross_entropy_with_logits(out.logit[valid].float(), labels[valid].float())
        else:  # keep the graph connected so DDP and AMP see a (zero) gradient
            bce = out.logit.sum() * 0.0
        return {"bce": bce, **out.losses}


class DetectorWrapper(Detector):
    """A detector around another one (``detectors/wrappers/``): it inherits what the inner
    detector requires, whether it exports, whether gradients reach its input, and its
    forgery types unless it adds its own."""

    inner: Detector

    @property
    def requires(self) -> tuple[str, ...]:
        return self.inner.requires

    @property
    def export_note(self) -> str | None:
        return self.inner.export_note

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.inner.class_names

    @property
    def feature_dim(self) -> int | None:
        return self.inner.feature_dim

    @property
    def input_gradients(self) -> bool:
        return self.inner.input_gradients

    def after_backward(self) -> None:
        self.inner.after_backward()

    def loss_terms(self, out: DetectorOutput, batch: Mapping) -> dict[str, Tensor]:
        return self.inner.loss_terms(out, batch)
