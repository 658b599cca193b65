"""The one sample dict every detector consumes.

``{"image": float tensor 3xHxW in [0, 1] (RGB), "label": 0 real / 1 fake / -1 unknown,
   "meta": {"path", "source", "generator", "group", "ok", "error"}}``

Detectors normalise inside their own ``forward`` (each has its own mean/std), so data,
perturbations and adversarial attacks all work in one pixel space. ``meta.ok`` is False
when the file could not be decoded: the sample then carries a blank image, the training
loss and metrics mask it out, and inference writes the configured fallback label.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from data.canonical import Canonicalizer
from data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from data.records import Record

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    def __init__(
        self,
        records: list[Record],
        canonical: Canonicalizer,
        augment: Callable | None = None,
        train: bool = False,
        cache_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_decode: bool = True,
    ) -> None:
        self.records = records
        self.canonical = canonical
        self.augment = augment
        self.train = train
        self.cache_images = cache_images
        self.max_pixels = max_pixels
        self.draft_decode = draft_decode
        # Per-process cache of decoded + resized pixels (the expensive, deterministic part);
        # each DataLoader worker fills its own, so keep workers persistent when caching.
        self._cache: dict[int, np.ndarray | str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _resized(self, index: int) -> np.ndarray:
        hit = self._cache.get(index)
        if hit is not None:
            if isinstance(hit, str):
                raise ImageDecodeError(hit)
            return hit
        path = self.records[index].path
        try:
            draft = self.canonical.size if self.draft_decode and self.canonical.resize != "none" else None
            arr = self.canonical.resize_stage(decode_image(path, self.max_pixels, draft_size=draft))
        except ImageDecodeError as e:
            log.warning("skipping undecodable image: %s", e)
            if self.cache_images:
                self._cache[index] = str(e)
            raise
        if self.cache_images:
            self._cache[index] = arr
        return arr

    def resized_or_blank(self, index: int) -> tuple[np.ndarray, str]:
        """Resized pixels and "", or a blank canonical-size image and the decode error."""
        try:
            return self._resized(index), ""
        except ImageDecodeError as e:
            size = self.canonical.size
            return np.zeros((size, size, 3), np.uint8), str(e)

    def load_pixels(self, index: int) -> tuple[np.ndarray, str]:
        """Canonical uint8 pixels of sample ``index`` and the decode error ("" if none)."""
        arr, error = self.resized_or_blank(index)
        arr = self.canonical.finish(arr, self.train)
        if self.augment is not None and not error:
            arr = self.augment(image=arr)["image"]
        return self.canonical.encode(arr, self.train), error

    def __getitem__(self, index: int) -> dict:
        arr, error = self.load_pixels(index)
        r = self.records[index]
        image = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return {
            "image": image,
            "label": r.label,
            "meta": {"path": r.path, "source": r.source, "generator": r.generator, "group": r.group, "ok": not error, "error": error},
        }
