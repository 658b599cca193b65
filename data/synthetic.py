"""A smoke data set the framework makes itself, so ``python train.py`` runs with no data.

"Real": images with natural-image statistics (1/f amplitude spectrum, a few soft
blobs, correlated colour channels). "Fake": a different such image, halved and brought
back up by a random stride-2 transposed convolution, the up-sampler of GAN generators,
which leaves the periodic (checkerboard) spectral peaks that detectors learn. Good for
checking that training, evaluation and export work end to end; says nothing about faces.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.io import atomic_write_text
from data.records import ManifestSource, Record

_VERSION = 1


def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0 / size
    amplitude = radius ** -rng.uniform(0.9, 1.3)
    phase = np.exp(2j * np.pi * rng.random((size, size)))
    base = np.real(np.fft.ifft2(amplitude * phase))
    channels = []
    for _ in range(3):  # colour channels share structure, as in photos
        noise = np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((size, size)))))
        channels.append(base + 0.3 * noise)
    img = np.stack(channels, axis=-1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(rng.integers(2, 5)):  # soft blobs: large smooth regions like skin or sky
        cy, cx, r = rng.random(), rng.random(), rng.uniform(0.1, 0.35)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.normal(0, 2.0, size=3) * img.std()
    img = (img - img.mean()) / (img.std() + 1e-8)
    img = 0.5 + 0.18 * img + rng.uniform(-0.1, 0.1, size=3)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def transposed_conv_fake(real: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Halve the image, then up-sample x2 with a random transposed convolution."""
    x = torch.from_numpy(real).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[-2:]
    small = F.interpolate(x, scale_factor=0.5, mode="area")
    kernel = torch.from_numpy(rng.uniform(0.2, 1.0, size=(3, 1, 4, 4))).float()
    # Each output phase of a stride-2 4x4 transposed conv sums one 2x2 sub-kernel; normalise
    # them so brightness is kept, leaving their *differences* as the periodic artefact.
    for py in range(2):
        for px in range(2):
            sub = kernel[:, :, py::2, px::2]
            kernel[:, :, py::2, px::2] = sub / sub.sum(dim=(2, 3), keepdim=True)
    up = F.conv_transpose2d(small, kernel, stride=2, padding=1, groups=3)
    up = F.interpolate(up, size=(h, w), mode="nearest") if up.shape[-2:] != (h, w) else up
    out = up[0].permute(1, 2, 0).clamp(0, 1).numpy()
    return (out * 255 + 0.5).astype(np.uint8)


class SyntheticSource:
    """Writes ``n_per_class`` real and fake PNGs plus a manifest under ``root`` once
    (re-made only when the parameters change), then reads them like any manifest."""

    def __init__(self, root: str, n_per_class: int = 160, size: int = 64, seed: int = 0) -> None:
        if n_per_class < 4:
            raise ValueError(f"data.source.n_per_class must be >= 4, got {n_per_class}")
        self.root = Path(root)
        self.n_per_class, self.size, self.seed = int(n_per_class), int(size), int(seed)

    @property
    def folder(self) -> Path:
        return self.root / f"synthetic_v{_VERSION}_n{self.n_per_class}_s{self.size}_seed{self.seed}"

    def records(self) -> list[Record]:
        if not (self.folder / "MANIFEST.csv").is_file():
            self._generate()
        return ManifestSource(str(self.folder / "MANIFEST.csv")).records()

    def _generate(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Build in a temporary folder and rename: concurrent runs never see half a set.
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp_synthetic_"))
        rng = np.random.default_rng(self.seed)
        rows = []
        n = self.n_per_class
        for i in range(n):
            split = "train" if i < 0.7 * n else "val" if i < 0.85 * n else "test"
            real = natural_image(rng, self.size)
            fake = transposed_conv_fake(natural_image(rng, self.size), rng)
            for label, arr in (("real", real), ("fake", fake)):
                rel = f"{label}/{label}_{i:05d}.png"
                (tmp / label).mkdir(exist_ok=True)
                Image.fromarray(arr).save(tmp / rel)
                gen = "real" if label == "real" else "transposed_conv"
                rows.append({"relpath": rel, "label": label, "split": split, "generator": gen, "source": "synthetic"})
        with open(tmp / "MANIFEST.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "params.json").write_text(json.dumps(vars(self) | {"root": str(self.root), "version": _VERSION}))
        try:
            os.replace(tmp, self.folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)


def write_testset(folder: str | Path, n: int = 40, size: int = 64, seed: int = 1) -> Path:
    """A contest-shaped folder: ``n`` JPEGs with random 16-character names, half of them
    fake, and the answer key beside the folder (``<folder>.labels.csv``), for trying
    ``infer.py`` end to end without data of one's own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    key = []
    for i in range(n):
        name = "".join(rng.choice(alphabet, 16)) + ".jpg"
        real = natural_image(rng, size)
        label = i % 2
        arr = transposed_conv_fake(real, rng) if label else real
        Image.fromarray(arr).save(folder / name, quality=95)
        key.append(f"{name},{label}\n")
    return atomic_write_text(folder.with_name(folder.name + ".labels.csv"), "".join(sorted(key)))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a contest-shaped synthetic test folder.")
    parser.add_argument("--testset", default="testset", help="folder to create (default ./testset)")
    parser.add_argument("-n", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    a = parser.parse_args()
    key = write_testset(a.testset, a.n, a.size, a.seed)
    print(f"wrote {a.n} images to {a.testset}/ and the answer key to {key}")
