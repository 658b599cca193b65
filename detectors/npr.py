"""NPR (Tan et al., CVPR 2024): neighbouring-pixel residuals into a truncated ResNet-50.

Up-samplers copy or interpolate each 2x2 neighbourhood from one source pixel, so the
residual ``x - up(down(x))`` (nearest, factor 2) exposes their local correlation. As in
the authors' network the residual is scaled by 2/3, the stem is a stride-2 3x3 conv,
only ``layer1`` and ``layer2`` are kept, and everything trains from scratch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from detectors.base import IMAGENET_MEAN, IMAGENET_STD, Detector, DetectorOutput


def npr_residual(x: Tensor) -> Tensor:
    """``x - up(down(x, 1/2))`` with nearest sampling; odd sizes lose their last row/column."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    down = F.interpolate(x, scale_factor=0.5, mode="nearest")
    return x - F.interpolate(down, scale_factor=2.0, mode="nearest")


class NPR(Detector):
    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        residual_scale: float = 2.0 / 3.0,
    ) -> None:
        super().__init__(mean or IMAGENET_MEAN, std or IMAGENET_STD)
        self.residual_scale = residual_scale
        resnet = torchvision.models.resnet50(weights=None)  # from scratch, as the paper
        stem_conv = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        nn.init.kaiming_normal_(stem_conv.weight, mode="fan_out", nonlinearity="relu")
        self.features = nn.Sequential(stem_conv, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512
        self.fc = nn.Linear(self.feature_dim, 1)

    def forward_normalized(self, x: Tensor) -> DetectorOutput:
        fmap = self.features(npr_residual(x) * self.residual_scale)
        features = self.pool(fmap).flatten(1)
        return DetectorOutput(logit=self.fc(features).squeeze(1), features=features)
