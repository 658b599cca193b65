"""A localising detector: a UNet-like decoder on a timm encoder, with an image-level head.

- Encoder: any timm model with ``forward_intermediates`` (EfficientNet, ResNet,
  MobileNet...), weights via ``detectors.backbones.create_backbone`` (offline ImageNet,
  local file, hub, or ``none``); its classifier head is pruned away.
- Decoder: from the deepest feature map up, each step upsamples to the next shallower
  feature map, concatenates it (skip connection) and applies two 3x3 conv-BN-ReLU; a 1x1
  conv gives per-pixel logits, bilinearly upsampled to the input size (``out.mask``).
- Image logit: a linear head on the globally pooled deepest features. With
  ``mask_topk > 0`` a learnable multiple (initialised to 0) of the mean of the top
  ``mask_topk`` fraction of mask logits is added, so a confident local forgery can raise
  the image score; with 0 (the default) the two heads only share the encoder.

Training: image BCE (the base class) plus, on samples whose ``meta["mask_ok"]`` is True, a
pixel BCE and a soft Dice loss, each weighted by ``pixel_weight``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.sample import mask_usable
from detectors.backbones import create_backbone, normalization
from detectors.base import Detector, DetectorOutput


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _UpBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv_bn_relu(cin + skip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


def soft_dice_loss(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-sample 1 - Dice, averaged; ``smooth`` makes an empty target (a real) ask for an
    empty prediction instead of dividing by zero."""
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (prob.sum(dims) + target.sum(dims) + smooth)).mean()


class SegDetector(Detector):
    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str | None = "imagenet",
        weights: str | None = None,
        decoder_channels: Sequence[int] = (128, 64, 32, 16),
        dropout: float = 0.2,
        pixel_weight: float = 1.0,
        mask_topk: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if pixel_weight < 0:
            raise ValueError(f"detector.pixel_weight must be >= 0, got {pixel_weight!r}")
        if not 0.0 <= mask_topk <= 1.0:
            raise ValueError(f"detector.mask_topk must be in [0, 1], got {mask_topk!r}")
        encoder = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.set_normalization(*normalization(encoder, mean, std))
        if not hasattr(encoder, "forward_intermediates"):
            raise ValueError(f"detector.backbone {backbone!r} has no forward_intermediates in timm; pick a CNN such as tf_efficientnet_lite0")
        self.n_levels = len(encoder.feature_info)
        # Weights are loaded first (by layer order, on the whole model), then the unused
        # classifier stage is dropped so every parameter gets a gradient (DDP-friendly).
        encoder.prune_intermediate_layers(self.n_levels, prune_norm=True, prune_head=True)
        self.encoder = encoder
        chans = [int(info["num_chs"]) for info in encoder.feature_info]
        dec = list(decoder_channels)
        if len(dec) != self.n_levels - 1:
            raise ValueError(f"detector.decoder_channels needs {self.n_levels - 1} entries for {backbone!r}, got {len(dec)}")
        blocks, cin = [], chans[-1]
        for skip, cout in zip(reversed(chans[:-1]), dec):
            blocks.append(_UpBlock(cin, skip, int(cout)))
            cin = int(cout)
        self.decoder = nn.ModuleList(blocks)
        self.mask_head = nn.Conv2d(cin, 1, 1)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = int(chans[-1])
        self.head = nn.Linear(self.feature_dim, 1)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)
        nn.init.constant_(self.mask_head.bias, -2.0)  # most pixels are real: start near p = 0.12
        self.pixel_weight = float(pixel_weight)
        self.mask_topk = float(mask_topk)
        self.topk_scale = nn.Parameter(torch.zeros(())) if self.mask_topk > 0 else None

    def forward_normalized(self, x: Tensor) -> DetectorOutput:
        feats = self.encoder.forward_intermediates(x, indices=self.n_levels, intermediates_only=True)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1])):
            y = block(y, skip)
        mask = F.interpolate(self.mask_head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        pooled = feats[-1].mean(dim=(2, 3))
        logit = self.head(self.dropout(pooled)).squeeze(1)
        if self.topk_scale is not None:
            flat = mask.flatten(1)
            k = max(1, int(round(self.mask_topk * flat.shape[1])))
            logit = logit + self.topk_scale * flat.topk(k, dim=1).values.mean(dim=1)
        return DetectorOutput(logit=logit, mask=mask, heatmap=torch.sigmoid(mask), features=pooled)

    def loss_terms(self, out: DetectorOutput, batch: Mapping) -> dict[str, Tensor]:
        terms = super().loss_terms(out, batch)
        zero = out.mask.sum() * 0.0  # keeps the graph connected when no sample has a mask
        device = out.mask.device
        valid = mask_usable(batch, device)
        if not valid.any():
            return {**terms, "pixel_bce": zero, "pixel_dice": zero}
        logits = out.mask[valid].float()
        target = torch.as_tensor(batch["mask"], device=device)[valid].float()
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = soft_dice_loss(torch.sigmoid(logits), target)
        return {**terms, "pixel_bce": self.pixel_weight * bce, "pixel_dice": self.pixel_weight * dice}
