"""CNNSpot-style detector (Wang et al., CVPR 2020): an ImageNet CNN with a binary head."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detectors.backbones import create_backbone, normalization
from detectors.base import Detector, DetectorOutput


class CNNSpot(Detector):
    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str | None = "imagenet",
        weights: str | None = None,
        dropout: float = 0.2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.set_normalization(*normalization(self.backbone, mean, std))
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = int(self.backbone.num_features)
        self.head = nn.Linear(self.feature_dim, 1)
        nn.init.normal_(self.head.weight, 0.0, 0.02)  # as CNNDetection / UnivFD heads
        nn.init.zeros_(self.head.bias)

    def forward_normalized(self, x: Tensor) -> DetectorOutput:
        features = self.backbone(x)
        return DetectorOutput(logit=self.head(self.dropout(features)).squeeze(1), features=features)
