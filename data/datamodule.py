"""LightningDataModule: records -> splits -> filtered -> data sets -> loaders."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from data.canonical import Canonicalizer
from data.dataset import ImageDataset
from data.decode import DEFAULT_MAX_PIXELS
from data.faces.pipeline import FacePipeline
from data.records import Record
from data.splits import SPLITS, assign_splits, check_groups_disjoint

log = logging.getLogger(__name__)


def _keep(records: list[Record], generators: Sequence[str] | None, sources: Sequence[str] | None) -> list[Record]:
    """Filter by generator/source; reals are always kept by a generator filter (the
    generator column names the *fake* method; a held-out generator test needs reals)."""
    out = records
    if generators:
        out = [r for r in out if r.label == 0 or r.generator in set(generators)]
    if sources:
        out = [r for r in out if r.source in set(sources)]
    return out


class FaceDataModule(pl.LightningDataModule):
    def __init__(
        self,
        source: Any,
        image_size: int = 128,
        canonical: Canonicalizer | None = None,
        augment: Callable | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
        split_seed: int = 0,
        cache_images: bool = True,
        draft_decode: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        train_generators: Sequence[str] | None = None,
        test_generators: Sequence[str] | None = None,
        train_sources: Sequence[str] | None = None,
        test_sources: Sequence[str] | None = None,
        limit_per_split: int | None = None,
        faces: Any = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.image_size = int(image_size)
        self.canonical = canonical or Canonicalizer(size=self.image_size)
        self.augment = augment
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.split_fractions, self.split_seed = tuple(split_fractions), split_seed
        self.cache_images, self.draft_decode, self.max_pixels = cache_images, draft_decode, max_pixels
        self.filters = {
            "train": (train_generators, train_sources),
            "val": (train_generators, train_sources),  # validation is in-domain: selection never peeks at held-out data
            "test": (test_generators, test_sources),
        }
        self.limit_per_split = limit_per_split
        # configs/faces: a FacePipeline, or nothing (faces=none composes to an empty node).
        self.faces = faces if isinstance(faces, FacePipeline) else None
        self.records: dict[str, list[Record]] = {}
        self.datasets: dict[str, ImageDataset] = {}

    def split_records(self) -> dict[str, list[Record]]:
        """The records of each split after the generator/source filters and
        ``limit_per_split``: no face detection, no data sets, no check of the classes
        present (the data-set audit reads any source this way)."""
        records = assign_splits(self.source.records(), self.split_fractions, self.split_seed)
        check_groups_disjoint(records)
        out = {}
        for split in SPLITS:
            chosen = _keep([r for r in records if r.split == split], *self.filters[split])
            if self.limit_per_split:
                chosen = _balanced_subset(chosen, int(self.limit_per_split), self.split_seed)
            out[split] = chosen
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.records = self.split_records()
        if self.faces is not None:  # detect once, in this process, before any worker starts
            self.faces.prepare([r.path for split in SPLITS for r in self.records[split]])
        for split in SPLITS:
            chosen = self.records[split]
            self.datasets[split] = ImageDataset(
                chosen,
                self.canonical,
                augment=self.augment if split == "train" else None,
                train=split == "train",
                cache_images=self.cache_images,
                max_pixels=self.max_pixels,
                draft_decode=self.draft_decode,
                faces=self.faces,
                seed=self.split_seed,
            )
            counts = Counter("fake" if r.label == 1 else "real" for r in chosen)
            log.info("split %-5s: %5d images (%s)", split, len(chosen), dict(counts))
        for split in ("train", "val"):
            if len({r.label for r in self.records[split]}) < 2:
                raise ValueError(f"the {split} split needs both real and fake images; check data filters")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        batch = self.batch_size if shuffle else self.eval_batch_size
        return DataLoader(
            ds,
            batch_size=batch,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
            drop_last=shuffle and len(ds) > batch,  # a lone last sample breaks BatchNorm
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def split_dataloader(self, split: str) -> DataLoader:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        return self._loader(split, shuffle=False)


def _balanced_subset(records: list[Record], limit: int, seed: int) -> list[Record]:
    import random

    rng = random.Random(seed)
    out = []
    for label in (0, 1):
        members = [r for r in records if r.label == label]
        rng.shuffle(members)
        out += members[: limit // 2]
    return out
