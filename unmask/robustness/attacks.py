"""White-box L-inf attacks against the detector under test (FGSM, PGD).

They act on the detector's input, the [0, 1] image tensor after canonical preprocessing
(detectors normalise inside ``forward``), so ``eps`` in /255 is in pixel units. The loss
raised is the image-level BCE against the true label: fakes are pushed towards "real" and
reals towards "fake". Prediction runs under ``torch.inference_mode``; the attack leaves
it for its own gradient steps (``AttackedDetector``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.base import DetectorOutput


def _loss(detector: nn.Module, image: Tensor, label: Tensor, batch: Mapping | None) -> Tensor:
    logit = detector(image, batch).logit.float()
    valid = (label == 0) | (label == 1)
    if not valid.any():
        return logit.sum() * 0.0
    # summed, not averaged: every image's gradient keeps its own scale
    return F.binary_cross_entropy_with_logits(logit[valid], label[valid].float(), reduction="sum")


class FGSM:
    """One signed-gradient step of size ``eps`` (Goodfellow et al., 2015)."""

    def __init__(self, eps: float) -> None:
        if float(eps) < 0:
            raise ValueError(f"attack eps must be >= 0 (in /255), got {eps!r}")
        self.eps = float(eps) / 255.0

    def perturb(self, detector: nn.Module, image: Tensor, label: Tensor, batch: Mapping | None = None) -> Tensor:
        if self.eps == 0:
            return image.detach()
        x = image.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_loss(detector, x, label, batch), x)
        return (image + self.eps * grad.sign()).clamp(0.0, 1.0).detach()


class PGD:
    """Projected gradient ascent (Madry et al., 2018): ``steps`` signed steps of
    ``step_size`` (default 2.5 * eps / steps), each projected back into the eps-ball
    around the clean image and into [0, 1]; optionally from a random start in the ball."""

    def __init__(self, eps: float, steps: int = 10, step_size: float | None = None, random_start: bool = True, seed: int = 0) -> None:
        if float(eps) < 0 or int(steps) < 1:
            raise ValueError(f"PGD needs eps >= 0 and steps >= 1, got eps={eps!r}, steps={steps!r}")
        self.eps = float(eps) / 255.0
        self.steps = int(steps)
        self.step_size = (float(step_size) / 255.0) if step_size is not None else 2.5 * self.eps / self.steps
        self.random_start = bool(random_start)
        self.seed = int(seed)

    def perturb(self, detector: nn.Module, image: Tensor, label: Tensor, batch: Mapping | None = None) -> Tensor:
        clean = image.detach()
        if self.eps == 0:
            return clean
        x = clean
        if self.random_start:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            noise = (torch.rand(clean.shape, generator=gen) * 2 - 1).to(clean) * self.eps
            x = (clean + noise).clamp(0.0, 1.0)
        for _ in range(self.steps):
            x = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(_loss(detector, x, label, batch), x)
            x = x.detach() + self.step_size * grad.sign()
            x = torch.minimum(torch.maximum(x, clean - self.eps), clean + self.eps).clamp(0.0, 1.0)
        return x.detach()


class AttackedDetector(nn.Module):
    """A detector whose every forward first attacks its input (for ``predict``)."""

    def __init__(self, detector: nn.Module, attack) -> None:
        super().__init__()
        self.detector = detector
        self.attack = attack

    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        label = torch.as_tensor((batch or {}).get("label", torch.full(image.shape[:1], -1)), device=image.device)
        with torch.inference_mode(False), torch.enable_grad():
            # Cloning outside inference mode turns an inference tensor into a normal one.
            adv = self.attack.perturb(self.detector, image.clone(), label.clone(), batch)
        return self.detector(adv, batch)
