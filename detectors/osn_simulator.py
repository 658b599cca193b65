"""The OSN noise simulator g of Wu et al. (CVPR 2022): a U-Net whose output is a small
residual on its input, ``g(x) = s * tanh(unet(x)) + (1 - s) * x`` with s = 0.02, in the
[-1, 1] pixel domain. Pretrained on (original, platform-processed) pairs
(``pretrain_osn.py``) and frozen while a detector trains on its output.

The authors' U-Net has 64/128/256/512/1024 channels and 4 max-pools; ``base_channels``
scales all of them (8 is ~60x cheaper, for CPU budgets).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.backbones import MissingWeightsError, pretrained_skipped

log = logging.getLogger(__name__)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class _Up(nn.Module):
    """Nearest x2, conv3x3 + BN + ReLU, concatenate the skip, double conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.fuse = _double_conv(2 * cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.reduce(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.fuse(torch.cat([skip, x], dim=1))


class NoiseSimulator(nn.Module):
    def __init__(
        self,
        base_channels: int = 64,
        depth: int = 4,
        residual_scale: float = 0.02,
        weights: str | None = None,
        random_init: bool = False,
    ) -> None:
        super().__init__()
        if int(base_channels) < 1 or int(depth) < 1 or not 0 < float(residual_scale) < 1:
            raise ValueError(f"bad simulator shape: base_channels={base_channels}, depth={depth}, residual_scale={residual_scale}")
        self.base_channels, self.depth, self.residual_scale = int(base_channels), int(depth), float(residual_scale)
        ch = [self.base_channels * 2**i for i in range(self.depth + 1)]
        self.inc = _double_conv(3, ch[0])
        self.down = nn.ModuleList(_double_conv(ch[i], ch[i + 1]) for i in range(self.depth))
        self.up = nn.ModuleList(_Up(ch[i + 1], ch[i]) for i in reversed(range(self.depth)))
        self.out = nn.Conv2d(ch[0], 3, 1)
        if pretrained_skipped():  # a checkpoint's state dict brings the weights
            return
        if weights:
            self.load_weights(weights)
        elif not random_init:
            raise MissingWeightsError(
                "the OSN noise simulator needs pretrained weights: run `python pretrain_osn.py` and pass "
                "osn.simulator.weights=PATH/simulator.pt, or osn.simulator=null to train with "
                "DiffJPEG + resize only (random_init=true only for tests)"
            )

    def config(self) -> dict:
        return {"base_channels": self.base_channels, "depth": self.depth, "residual_scale": self.residual_scale}

    def load_weights(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"simulator weights {path} do not exist (run pretrain_osn.py first)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("config") != self.config():
            raise MissingWeightsError(f"{path} was trained as {blob.get('config')}, but this simulator is {self.config()}")
        self.load_state_dict(blob["state_dict"])
        log.info("OSN simulator weights from %s", path)

    def state_blob(self) -> dict:
        return {"config": self.config(), "state_dict": self.state_dict()}

    def forward(self, x: Tensor) -> Tensor:
        """``x`` in [-1, 1], any size (reflect-padded to a multiple of 2**depth inside)."""
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        z = F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x
        skips = [self.inc(z)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up in self.up:
            y = up(y, skips.pop())
        out = self.out(y)[..., :h, :w]
        s = self.residual_scale
        return s * torch.tanh(out) + (1.0 - s) * x
