"""The training job behind train.py: compose -> fit -> select on validation -> test once."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from unmask.config import instantiate_group, is_empty
from unmask.detector_factory import build_detector
from unmask.module import DetectionModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> DetectionModule:
    return DetectionModule(
        detector=build_detector(cfg),
        optimizer=instantiate(cfg.optimizer),
        scheduler=None if is_empty(cfg.get("scheduler")) else instantiate(cfg.scheduler),
        threshold_policy=cfg.get("threshold_policy", "youden"),
        channels_last=cfg.get("channels_last", True),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )


def train(cfg: DictConfig) -> dict[str, float]:
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint else ""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if best:
        log.info("best checkpoint (selected on val/auc): %s", Path(best).resolve())
        print(f"best checkpoint: {Path(best).resolve()}")
    if best and getattr(datamodule, "faces", None) is not None and not trainer.fast_dev_run and trainer.is_global_zero:
        from unmask.calibration import recalibrate_threshold

        threshold = recalibrate_threshold(
            best, datamodule.records["val"], cfg.get("threshold_policy", "youden"),
            batch_size=datamodule.eval_batch_size, num_workers=datamodule.num_workers,
        )
        if threshold is not None:
            metrics["val/threshold_per_file"] = threshold
    if cfg.get("test") and best and not trainer.fast_dev_run:
        from unmask.evaluation import evaluate_checkpoint

        report = evaluate_checkpoint(best, datamodule=datamodule, split="test", out_dir=Path(cfg.paths.output_dir) / "test")
        metrics.update({f"test/{k}": v for k, v in report["overall"].items() if isinstance(v, float)})
    return metrics
