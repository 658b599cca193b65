"""train.py's job: compose -> fit -> select on validation -> choose the threshold on
validation with the scorer -> score the test split once, as evaluate.py would."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from unmask.core.build import build_detector
from unmask.core.config import instantiate_group, is_empty, to_plain
from unmask.core.module import DetectionModule
from unmask.core.schemas import options
from unmask.scoring.calibration import calibrate_threshold
from unmask.scoring.combine import VideoOptions
from unmask.tasks.evaluate import evaluate_records

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> DetectionModule:
    return DetectionModule(
        detector=build_detector(cfg),
        optimizer=instantiate(cfg.optimizer),
        scheduler=None if is_empty(cfg.get("scheduler")) else instantiate(cfg.scheduler),
        threshold_policy=options(cfg.scoring).threshold_policy,
        channels_last=cfg.get("channels_last", True),
        run_config=to_plain(cfg),
    )


def resume_path(value) -> str | None:
    if value is None or str(value) == "":
        return None
    if "://" in str(value):
        raise ValueError(f"ckpt_path={value}: resume from a local file only (a checkpoint is read as data from this machine)")
    if not Path(value).is_file():
        raise FileNotFoundError(f"ckpt_path={value}: no such checkpoint file (resume from DIR/checkpoints/last.ckpt)")
    return str(value)


def train(cfg: DictConfig) -> dict[str, float]:
    """Returns the run's metrics: the last validation epoch's, ``threshold`` (the selected
    checkpoint's, chosen on validation by the scorer) and ``test/*`` when ``test`` is on."""
    scoring = options(cfg.scoring)  # a bad value fails here, before any training
    video = VideoOptions.from_config(cfg.get("video"))
    if cfg.get("num_threads"):
        # Fewer intra-op threads than cores helps when other jobs share the CPU: spinning
        # OpenMP threads that lose their core stall every operator.
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, augment=None if is_empty(cfg.get("augment")) else instantiate(cfg.augment))
    module = build_module(cfg)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write (Lightning refuses it)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # A resumed checkpoint is data, like every other: local files only, no unpickled objects.
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.get("ckpt_path")), weights_only=True)

    # The selecting checkpoint is the one with a monitor (last.ckpt's callback has none).
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    best = checkpoint.best_model_path if checkpoint else ""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if not best or trainer.fast_dev_run or not trainer.is_global_zero:
        return metrics  # under DDP the selected checkpoint is scored once, by rank zero
    log.info("best checkpoint (selected on val/auc): %s", Path(best).resolve())
    print(f"best checkpoint: {Path(best).resolve()}")
    threshold = calibrate_threshold(best, datamodule.records["val"], scoring, video)
    if threshold is not None:
        metrics["threshold"] = threshold
    if cfg.get("test"):
        if not datamodule.records["test"]:
            log.warning("the test split is empty: no test metrics (the selected checkpoint and its threshold are kept)")
            print("test split empty: nothing to test")
            return metrics
        report = evaluate_records(best, datamodule.records["test"], Path(cfg.paths.output_dir) / "test", scoring, video, split="test")
        metrics.update({f"test/{k}": v for k, v in report["overall"].items() if isinstance(v, float)})
    return metrics
