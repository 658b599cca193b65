"""The OSN noise simulator g of Wu et al. (CVPR 2022): a U-Net whose output is a small
residual on its input, ``g(x) = s * tanh(unet(x)) + (1 - s) * x`` with s = 0.02, in the
[-1, 1] pixel domain. Pretrained on (original, platform-processed) pairs
(``pretrain_osn.py``) and frozen while a detector trains on its output.

The authors' U-Net (``ImageForensicsOSN``, ``osn.py``: ``U_Net``) has 64/128/256/512/1024
channels and 4 max-pools; ``base_channels`` scales all of them (8 is ~60x cheaper, for CPU
budgets). The modules carry the authors' names, so their state dict is this one's, key for
key and shape for shape (convolutions with bias): ``Conv1..Conv{depth+1}`` (``.conv``:
conv3x3, BN, ReLU, conv3x3, BN, ReLU), ``Up{depth+1}..Up2`` (``.up``: nearest x2, conv3x3,
BN, ReLU), ``Up_conv{depth+1}..Up_conv2`` and the 1x1 ``Conv``. ``weights`` takes

- their published ``OSN_UNet_weights.pth`` (a bare state dict, also with a ``module.`` or
  ``osn_net.`` prefix; their ``diff_jpeg.*`` tables are dropped: ``OSNRobust`` applies its
  own DiffJPEG at a quality drawn per image), which needs ``base_channels=64, depth=4``;
- this project's ``simulator.pt`` (``{"config", "state_dict"}``, from ``pretrain_osn.py``),
  also one written before the authors' names were adopted (``inc``/``down``/``up``/``out``,
  convolutions without bias: loaded with zero biases, the same network).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.backbones import MissingWeightsError, pretrained_skipped

log = logging.getLogger(__name__)

AUTHORS_RESIDUAL_SCALE = 0.02  # osn.py: 0.02 * tanh(out) + 0.98 * x


class _ConvBlock(nn.Module):
    """The authors' ``conv_block``: (conv3x3 with bias, BN, ReLU) twice, under ``.conv``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _UpConv(nn.Module):
    """The authors' ``up_conv``: nearest x2, conv3x3 with bias, BN, ReLU, under ``.up``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.up(x)


_FORMER = re.compile(r"(inc|down\.(\d+)|up\.(\d+)\.(reduce|fuse)|out)\.(.+)")


def _former_to_authors(key: str, depth: int) -> str | None:
    """A key of this project's former simulator layout (``inc``, ``down.i``,
    ``up.j.reduce``/``fuse``, ``out``) under the authors' name; None for any other key."""
    m = _FORMER.fullmatch(key)
    if m is None:
        return None
    head, down, up, part, rest = m.groups()
    if head == "inc":
        return f"Conv1.conv.{rest}"
    if head == "out":
        return f"Conv.{rest}"
    if down is not None:
        return f"Conv{int(down) + 2}.conv.{rest}"
    level = depth + 1 - int(up)  # up.0 is the deepest: the authors' Up{depth+1}
    if part == "fuse":
        return f"Up_conv{level}.conv.{rest}"
    index, _, leaf = rest.partition(".")
    return f"Up{level}.up.{int(index) + 1}.{leaf}"  # their Sequential starts with the Upsample


def _authors_state(blob: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The U-Net's entries of an ``ImageForensicsOSN`` file: a ``U_Net`` state dict, maybe
    saved from DataParallel (``module.``) or inside their ``Detector`` (``osn_net.``),
    without its DiffJPEG's tables."""
    state = {}
    for key, value in blob.items():
        key = key.removeprefix("module.")
        if key.startswith("det_net."):
            continue  # their detector beside the simulator
        key = key.removeprefix("osn_net.")
        if not key.startswith("diff_jpeg."):
            state[key] = value
    return state


def _authors_config(state: Mapping[str, Tensor]) -> dict | None:
    """``base_channels`` and ``depth`` of an authors' state dict (their residual scale is
    0.02); None when the keys are not theirs."""
    first = state.get("Conv1.conv.0.weight")
    if first is None:
        return None
    depth = sum(1 for k in state if re.fullmatch(r"Conv\d+\.conv\.0\.weight", k)) - 1
    return {"base_channels": int(first.shape[0]), "depth": depth, "residual_scale": AUTHORS_RESIDUAL_SCALE}


class NoiseSimulator(nn.Module):
    def __init__(
        self,
        base_channels: int = 64,
        depth: int = 4,
        residual_scale: float = AUTHORS_RESIDUAL_SCALE,
        weights: str | None = None,
        random_init: bool = False,
    ) -> None:
        super().__init__()
        if int(base_channels) < 1 or int(depth) < 1 or not 0 < float(residual_scale) < 1:
            raise ValueError(f"bad simulator shape: base_channels={base_channels}, depth={depth}, residual_scale={residual_scale}")
        self.base_channels, self.depth, self.residual_scale = int(base_channels), int(depth), float(residual_scale)
        ch = [self.base_channels * 2**i for i in range(self.depth + 1)]
        # the authors' names (osn.py U_Net), so their state dict loads as it is
        self.add_module("Conv1", _ConvBlock(3, ch[0]))
        for i in range(1, self.depth + 1):
            self.add_module(f"Conv{i + 1}", _ConvBlock(ch[i - 1], ch[i]))
        for level in range(self.depth + 1, 1, -1):
            self.add_module(f"Up{level}", _UpConv(ch[level - 1], ch[level - 2]))
            self.add_module(f"Up_conv{level}", _ConvBlock(ch[level - 1], ch[level - 2]))
        self.Conv = nn.Conv2d(ch[0], 3, 1)
        self._register_load_state_dict_pre_hook(self._from_former_layout)
        if pretrained_skipped():  # a checkpoint's state dict brings the weights
            return
        if weights:
            self.load_weights(weights)
        elif not random_init:
            raise MissingWeightsError(
                "the OSN noise simulator needs pretrained weights: run `python pretrain_osn.py` and pass "
                "osn.simulator.weights=PATH/simulator.pt (or the authors' OSN_UNet_weights.pth with base_channels=64), "
                "or osn.simulator=null to train with DiffJPEG + resize only (random_init=true only for tests)"
            )

    def _from_former_layout(self, state_dict, prefix, *args) -> None:
        """State dicts written before the authors' names were adopted (simulator.pt files and
        checkpoints): rename their keys, and give their bias-free convolutions zero biases."""
        former = [k for k in state_dict if k.startswith(prefix) and _former_to_authors(k[len(prefix) :], self.depth)]
        if not former:
            return
        for key in former:
            state_dict[prefix + _former_to_authors(key[len(prefix) :], self.depth)] = state_dict.pop(key)
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                weight, bias = f"{prefix}{name}.weight", f"{prefix}{name}.bias"
                if weight in state_dict and bias not in state_dict:
                    state_dict[bias] = torch.zeros_like(module.bias)

    def config(self) -> dict:
        return {"base_channels": self.base_channels, "depth": self.depth, "residual_scale": self.residual_scale}

    def load_weights(self, path: str | Path) -> None:
        """This project's ``simulator.pt`` or the authors' published state dict, strictly."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"simulator weights {path} do not exist (run pretrain_osn.py first)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, Mapping):
            raise MissingWeightsError(f"{path} is not a state dict")
        if "state_dict" in blob and "config" in blob:  # pretrain_osn.py's simulator.pt
            config, state, origin = blob.get("config"), blob["state_dict"], "pretrain_osn.py"
        else:
            state = _authors_state(blob)
            config, origin = _authors_config(state), "the authors' U_Net layout"
            if config is None:
                raise MissingWeightsError(f"{path} is neither a pretrain_osn.py simulator.pt nor an ImageForensicsOSN U_Net state dict")
        if config != self.config():
            raise MissingWeightsError(f"{path} ({origin}) was trained as {config}, but this simulator is {self.config()}")
        self.load_state_dict(state, strict=True)
        log.info("OSN simulator weights from %s (%s)", path, origin)

    def state_blob(self) -> dict:
        return {"config": self.config(), "state_dict": self.state_dict()}

    def forward(self, x: Tensor) -> Tensor:
        """``x`` in [-1, 1], any size (reflect-padded to a multiple of 2**depth inside; the
        authors' network needs that multiple)."""
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        z = F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x
        skips = [self.Conv1(z)]
        for i in range(2, self.depth + 2):
            skips.append(getattr(self, f"Conv{i}")(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for level in range(self.depth + 1, 1, -1):
            y = getattr(self, f"Up_conv{level}")(torch.cat([skips.pop(), getattr(self, f"Up{level}")(y)], dim=1))
        out = self.Conv(y)[..., :h, :w]
        s = self.residual_scale
        return s * torch.tanh(out) + (1.0 - s) * x
