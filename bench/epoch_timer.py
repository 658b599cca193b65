"""A Lightning callback that prints the wall time of every epoch's training batches and of
its validation pass (bench use): ``+callbacks.epoch_timer._target_=bench.epoch_timer.EpochTimer``."""
from __future__ import annotations

import time

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self._start = self._last_batch = self._val_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last_batch = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_batch = time.perf_counter()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        train_s = self._last_batch - self._start
        self.train_seconds.append(train_s)
        cache = getattr(pl_module.detector, "_cache", None)
        extra = f"; cache hits {cache.hits} misses {cache.misses}" if cache is not None else ""
        print(
            f"[epoch_timer] epoch {trainer.current_epoch}: training {train_s:.1f} s, "
            f"validation {time.perf_counter() - self._val_start:.1f} s{extra}",
            flush=True,
        )
