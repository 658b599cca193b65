"""train.py's job: compose -> fit -> select on validation -> choose the threshold on
validation with the scorer -> score the test split once, as evaluate.py would.

Around it, the run's record: ``provenance.json`` and ``config.yaml`` before training (and the
provenance in every checkpoint), ``summary.json`` after it (what a sweep's leaderboard reads),
the config and the test metrics in the experiment loggers."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from unmask.core import provenance
from unmask.core.build import build_detector
from unmask.core.checkpoint import read_checkpoint
from unmask.core.config import instantiate_group, is_empty, to_plain
from unmask.core.module import DetectionModule
from unmask.core.schemas import options
from unmask.reports import loggers as run_loggers
from unmask.reports.leaderboard import run_summary, write_summary
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


def selected_checkpoint(path: str | Path, callback: ModelCheckpoint) -> dict:
    """The selected checkpoint's epoch, monitored score and validation metrics, read from the
    file (a launcher that spawns processes hands back the path, not the score)."""
    ckpt = read_checkpoint(path)
    states = [v for k, v in ckpt.get("callbacks", {}).items() if k.startswith(ModelCheckpoint.__name__) and isinstance(v, dict)]
    state = next((s for s in states if s.get("monitor") == callback.monitor), {})
    score = state.get("best_model_score", callback.best_model_score)
    validation = ckpt["unmask"].get("validation") or {}
    return {
        "epoch": int(ckpt.get("epoch", -1)),
        "score": float(score) if score is not None else validation.get(callback.monitor),
        "validation": validation,
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Returns the run's metrics: the last validation epoch's, ``objective`` (the selected
    checkpoint's monitored score: what train.py hands a sweeper), ``selected_epoch``,
    ``threshold`` (the selected checkpoint's, chosen on validation by the scorer) and
    ``test/*`` when ``test`` is on."""
    started = time.monotonic()
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
    out_dir = Path(cfg.paths.output_dir)
    overrides = provenance.task_overrides()
    datamodule.setup("fit")  # the records (Lightning's own setup call then finds them): the data's fingerprint
    module.provenance = provenance.collect(datamodule.source, datamodule.records, overrides)
    if trainer.is_global_zero:
        provenance.write(out_dir, module.provenance, module.run_config)
    run_loggers.log_config(trainer.loggers, module.run_config, module.provenance)
    # A resumed checkpoint is data, like every other: local files only, no unpickled objects.
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.get("ckpt_path")), weights_only=True)

    # The selecting checkpoint is the one with a monitor (last.ckpt's callback has none).
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    best = checkpoint.best_model_path if checkpoint else ""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    monitor = checkpoint.monitor if checkpoint else "val/auc"
    metrics["objective"] = metrics.get(monitor, float("nan"))  # without a selection: the last epoch's
    if not best or trainer.fast_dev_run or not trainer.is_global_zero:
        run_loggers.finish(trainer.loggers)
        return metrics  # under DDP the selected checkpoint is scored once, by rank zero
    log.info("best checkpoint (selected on %s): %s", monitor, Path(best).resolve())
    print(f"best checkpoint: {Path(best).resolve()}")
    selected = selected_checkpoint(best, checkpoint)
    metrics.update(objective=selected["score"], selected_epoch=float(selected["epoch"]))
    threshold = calibrate_threshold(best, datamodule.records["val"], scoring, video)
    if threshold is not None:
        metrics["threshold"] = threshold
    report = None
    if cfg.get("test") and not datamodule.records["test"]:
        log.warning("the test split is empty: no test metrics (the selected checkpoint and its threshold are kept)")
        print("test split empty: nothing to test")
    elif cfg.get("test"):
        report = evaluate_records(best, datamodule.records["test"], out_dir / "test", scoring, video, split="test")
        test_metrics = {f"test/{k}": v for k, v in report["overall"].items() if isinstance(v, float)}
        metrics.update(test_metrics)
        run_loggers.log_test(trainer.loggers, test_metrics, trainer.global_step, out_dir / "test" / "predictions.csv", threshold)
    summary = run_summary(
        out_dir,
        {"metric": monitor, "mode": checkpoint.mode, "value": selected["score"]},
        best,
        selected["epoch"],
        selected["validation"],
        threshold,
        report,
        time.monotonic() - started,
        overrides,
    )
    write_summary(out_dir, summary)
    run_loggers.finish(trainer.loggers)
    return metrics


def main(cfg: DictConfig) -> float | None:
    """The body of ``train.py`` and ``unmask-train``: train, and hand a sweeper the selected
    checkpoint's monitored score (not the last epoch's)."""
    objective = train(cfg).get("objective")
    return None if objective is None else float(objective)
