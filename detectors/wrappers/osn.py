"""OSN-robust training (Wu, Zhou, Tian, Liu, CVPR 2022) for any detector, by config.

In training mode ``OSNRobust`` maps each batch, in the [-1, 1] domain, through

1. predictable noise: a random down/up resize, the frozen residual noise simulator g
   (``detectors.osn_simulator``) and a differentiable JPEG at a quality drawn per image
   from ``jpeg_quality`` (71-95 by default);
2. unseen noise: an adversarial xi built from a memory of past sign-gradient maps (up to
   ``xi_combine`` random entries, summed in steps of eps and clamped to [-eps, eps], eps =
   4/255 in the [-1, 1] domain), added and clamped to [-1, 1];

then hands the result (back in [0, 1]) to the wrapped detector, whose ``DetectorOutput``
and loss terms are returned unchanged: the loss is still the image-level BCE. xi is a leaf
tensor with ``requires_grad``; the training backward that updates the detector also fills
its gradient, and ``after_backward`` (called by ``DetectionModule``) stores the sign of it
as a new memory entry, the ascent direction for later steps. Unlike the authors' code the
memory is bounded (``xi_capacity`` entries, oldest dropped) and g is frozen.

xi needs the gradient of the loss with respect to the detector's input. A detector that
declares ``input_gradients = False`` (``lgrad``: gradient maps of a detached input;
``univfd``/``univfd_knn``: a frozen encoder under ``no_grad``) is refused at construction
unless ``xi_eps=0`` (predictable noise only; a checkpoint written before this rule still
loads and scores, with a warning), and a detector that leaves xi without a gradient is
stopped at the first training step with a message, instead of training silently with
xi = 0.

In eval mode (validation, evaluation, inference) images pass straight through.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.backbones import pretrained_skipped
from detectors.base import Detector, DetectorOutput, DetectorWrapper
from detectors.diffjpeg import DiffJPEG

log = logging.getLogger(__name__)


class SignGradientMemory:
    """A bounded memory of sign-gradient maps and the xi built from them."""

    def __init__(self, eps: float = 4 / 255, capacity: int = 64, combine: int = 5) -> None:
        if eps < 0 or capacity < 1 or combine < 1:
            raise ValueError(f"xi memory needs eps >= 0, capacity >= 1, combine >= 1; got {eps}, {capacity}, {combine}")
        self.eps, self.combine = float(eps), int(combine)
        self.maps: deque[Tensor] = deque(maxlen=int(capacity))

    def __len__(self) -> int:
        return len(self.maps)

    def push(self, grad: Tensor) -> None:
        self.maps.append(grad.detach().sign().to(torch.int8))  # 1 byte per value

    def sample(self, like: Tensor) -> Tensor:
        """xi shaped like ``like``. Stored maps of another image size are skipped; a map
        from a larger batch is cut to this one (the authors slice ``[0:size]``)."""
        fits = [m for m in self.maps if m.shape[1:] == like.shape[1:] and m.shape[0] >= like.shape[0]]
        if not fits or self.eps == 0:
            return torch.zeros_like(like)
        picks = random.sample(fits, min(self.combine, len(fits)))
        b = like.shape[0]
        xi = picks[0][:b].to(like).clamp(-self.eps, self.eps)
        for m in picks[1:]:
            xi = (xi + self.eps * m[:b].to(like)).clamp(-self.eps, self.eps)
        return xi


class OSNRobust(DetectorWrapper):
    def __init__(
        self,
        detector: Detector,
        simulator: nn.Module | None = None,
        jpeg_quality: Sequence[int] | None = (71, 95),
        resize_scale: Sequence[float] | None = (0.5, 1.0),
        xi_eps: float = 4 / 255,
        xi_capacity: int = 64,
        xi_combine: int = 5,
    ) -> None:
        super().__init__()
        if not isinstance(detector, Detector):
            raise TypeError(f"OSNRobust wraps a Detector, got {type(detector).__name__}")
        if xi_eps > 0 and not detector.input_gradients and pretrained_skipped():
            # restoring a checkpoint written before this check: it scores like its inner
            # detector; training it further stops at the first step (after_backward)
            log.warning("osn=robust around %s: no gradient reaches its input, xi stays 0 (set osn.xi_eps=0)", type(detector).__name__)
        elif xi_eps > 0 and not detector.input_gradients:
            raise ValueError(
                f"osn=robust: {type(detector).__name__} passes no gradient to its input image (input_gradients=False), so "
                f"the adversarial xi would stay 0. Set osn.xi_eps=0 to train with the predictable noise only "
                f"(resize, simulator, JPEG), or wrap a detector whose loss reaches its input"
            )
        self.detector = detector
        self.simulator = simulator
        if simulator is not None:
            simulator.requires_grad_(False).eval()  # pretrained and frozen (the authors' code trains it by mistake)
        self.jpeg = DiffJPEG(differentiable=True) if jpeg_quality else None
        self.jpeg_quality = tuple(int(q) for q in jpeg_quality) if jpeg_quality else None
        self.resize_scale = tuple(float(s) for s in resize_scale) if resize_scale else None
        if self.jpeg_quality and not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[-1] <= 100:
            raise ValueError(f"jpeg_quality must be [low, high] within [1, 100], got {jpeg_quality}")
        if self.resize_scale and not 0 < self.resize_scale[0] <= self.resize_scale[-1] <= 1:
            raise ValueError(f"resize_scale must be [low, high] within (0, 1], got {resize_scale}")
        self.memory = SignGradientMemory(xi_eps, xi_capacity, xi_combine)
        self._xi: Tensor | None = None

    def train(self, mode: bool = True) -> OSNRobust:
        super().train(mode)
        if self.simulator is not None:
            self.simulator.eval()  # frozen: BatchNorm keeps its pretrained statistics
        return self

    def simulate(self, x: Tensor) -> Tensor:
        """Predictable OSN noise on ``x`` in [-1, 1]: resize, simulator, JPEG."""
        x = x.contiguous()
        if self.resize_scale:
            h, w = x.shape[-2:]
            s = random.uniform(*self.resize_scale)
            if s < 1.0:
                small = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")
                x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        if self.simulator is not None:
            x = self.simulator(x)
        if self.jpeg is not None:
            lo, hi = self.jpeg_quality[0], self.jpeg_quality[-1]
            q = torch.randint(lo, hi + 1, (x.shape[0],), device=x.device)
            x = self.jpeg((x + 1) / 2, q) * 2 - 1
        return x.clamp(-1.0, 1.0)

    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        if not self.training:
            return self.detector(image, batch)
        with torch.no_grad():  # g is frozen and xi sits after it: no gradient needed through g
            x = self.simulate(image * 2 - 1)
        self._xi = None
        if self.memory.eps > 0 and torch.is_grad_enabled():
            xi = self.memory.sample(x).requires_grad_(True)
            self._xi = xi
            x = (x + xi).clamp(-1.0, 1.0)
        return self.detector((x + 1) / 2, batch)

    @property
    def inner(self) -> Detector:
        return self.detector  # the attribute name is part of old checkpoints' state-dict keys

    def after_backward(self) -> None:
        if self._xi is not None:
            if self._xi.grad is None:
                self._xi = None
                raise RuntimeError(
                    f"osn=robust: the training backward left xi without a gradient: {type(self.detector).__name__} "
                    f"passes no gradient to its input. Declare input_gradients = False on it (detectors/base.py) "
                    f"and train with osn.xi_eps=0"
                )
            self.memory.push(self._xi.grad)
        self._xi = None
        self.detector.after_backward()
