"""pretrain_osn.py's job: pretraining the OSN noise simulator g.

The paper trains g to imitate Facebook on (original, downloaded) pairs; its loss is not
published and no platform pairs exist here. So the "platform" is a known chain that does
what social networks do (``SyntheticPlatform``: down/up resize, sharpening, JPEG), and
g learns it: ``DiffJPEG(g(x), q)`` is fitted to ``platform(x)`` with an L1 loss, where q is
the JPEG quality the platform used, so g learns the part JPEG does not explain and
gradients reach it through the differentiable JPEG. Swap ``platform`` for real pairs
when there are some. The printed PSNRs say how much closer to the platform g gets than
the untouched image and than JPEG alone.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from data.canonical import jpeg_roundtrip
from data.dataset import ImageDataset
from data.io import atomic_path, atomic_write_json
from detectors.diffjpeg import DiffJPEG
from detectors.osn_simulator import NoiseSimulator

log = logging.getLogger(__name__)


class SyntheticPlatform:
    """A stand-in social network: down-scale by ``resize_factor`` and back (area /
    bilinear), kernel sharpening with strength ``sharpen_alpha``, then a PIL JPEG at a
    quality drawn from ``jpeg_quality``. Returns the processed image and that quality."""

    def __init__(self, resize_factor: float = 0.75, sharpen_alpha: float = 0.3, jpeg_quality: Sequence[int] = (71, 95)) -> None:
        self.quality = (int(jpeg_quality[0]), int(jpeg_quality[-1]))
        steps = []
        if resize_factor < 1:
            f = float(resize_factor)
            steps.append(A.Downscale(scale_range=(f, f), interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}, p=1.0))
        if sharpen_alpha > 0:
            steps.append(A.Sharpen(alpha=(sharpen_alpha, sharpen_alpha), lightness=(1.0, 1.0), p=1.0))
        self.pixels = A.Compose(steps)

    def __call__(self, image: np.ndarray, rng: random.Random) -> tuple[np.ndarray, int]:
        q = rng.randint(*self.quality)
        return jpeg_roundtrip(np.ascontiguousarray(self.pixels(image=image)["image"]), q), q


class PairDataset(Dataset):
    """(original, platform-processed, quality) from canonical evaluation pixels."""

    def __init__(self, images: ImageDataset, platform: SyntheticPlatform, seed: int | None = None) -> None:
        self.images, self.platform, self.seed = images, platform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        arr, _ = self.images.load_pixels(index)
        rng = random.Random(None if self.seed is None else self.seed * 1_000_003 + index)
        out, q = self.platform(arr, rng)
        to_t = lambda a: torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255.0)  # noqa: E731
        return to_t(arr), to_t(out), q


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a, b).item()
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


@torch.no_grad()
def _evaluate(sim: NoiseSimulator, jpeg: DiffJPEG, loader: DataLoader) -> dict[str, float]:
    sim.eval()
    sums = {"identity": [], "jpeg_only": [], "simulator": []}
    for x, y, q in loader:
        sums["identity"].append(psnr(x, y))
        sums["jpeg_only"].append(psnr(jpeg(x, q), y))
        sums["simulator"].append(psnr((jpeg((sim(x * 2 - 1) + 1) / 2, q)), y))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def pretrain_simulator(cfg: DictConfig) -> dict:
    torch.manual_seed(int(cfg.seed))
    random.seed(int(cfg.seed))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    canonical = datamodule.canonical
    platform = instantiate(cfg.platform)
    split = lambda s: ImageDataset(datamodule.records[s], canonical, train=False, cache_images=True)  # noqa: E731
    train = PairDataset(split("train"), platform)
    val = PairDataset(split("val"), platform, seed=int(cfg.seed))
    if cfg.get("limit_val"):
        val.images.records = val.images.records[: int(cfg.limit_val)]
    train_loader = DataLoader(train, batch_size=int(cfg.batch_size), shuffle=True, num_workers=int(cfg.num_workers), drop_last=len(train) > int(cfg.batch_size), persistent_workers=int(cfg.num_workers) > 0)
    val_loader = DataLoader(val, batch_size=int(cfg.batch_size), num_workers=0)

    sim = NoiseSimulator(**cfg.simulator, random_init=True)
    jpeg = DiffJPEG(differentiable=True)
    opt = torch.optim.Adam(sim.parameters(), lr=float(cfg.lr))
    before = _evaluate(sim, jpeg, val_loader)
    log.info("before: %s", before)
    start, step, losses = time.perf_counter(), 0, []
    while step < int(cfg.steps):
        for x, y, q in train_loader:
            sim.train()
            pred = jpeg((sim(x * 2 - 1) + 1) / 2, q)
            loss = F.l1_loss(pred, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % max(1, int(cfg.steps) // 10) == 0:
                log.info("step %d/%d  L1 %.5f", step, int(cfg.steps), float(np.mean(losses[-20:])))
            if step >= int(cfg.steps):
                break
    after = _evaluate(sim, jpeg, val_loader)
    out = Path(cfg.output)
    with atomic_path(out) as tmp:
        torch.save(sim.state_blob(), tmp)
    result = {
        "weights": str(out.resolve()),
        "steps": step,
        "seconds": time.perf_counter() - start,
        "final_train_l1": float(np.mean(losses[-20:])) if losses else math.nan,
        "val_images": len(val),
        "val_psnr_db_before": before,
        "val_psnr_db_after": after,
        "simulator": sim.config(),
    }
    atomic_write_json(out.with_suffix(".json"), result)
    print(
        f"simulator -> {out.resolve()}\n"
        f"val PSNR to the platform output over {len(val)} images (dB): untouched {after['identity']:.2f}, "
        f"DiffJPEG alone {after['jpeg_only']:.2f}, untrained g + DiffJPEG {before['simulator']:.2f}, "
        f"trained g + DiffJPEG {after['simulator']:.2f}  ({step} steps, {result['seconds']:.0f} s)"
    )
    return result
