"""One LightningModule for every detector: the detector's ``DetectorOutput`` is all it reads."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics.aggregation import CatMetric

from data.sample import usable
from detectors.base import Detector
from unmask.core.checkpoint import FORMAT
from unmask.core.metrics import THRESHOLD_POLICIES, binary_metrics, choose_threshold

log = logging.getLogger(__name__)

# A scheduler's state that is training progress (restored on resume); the rest of its state
# (T_max, step_size, gamma, eta_min...) is configuration.
_SCHEDULE_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step", "base_lrs", "verbose"}


class DetectionModule(pl.LightningModule):
    def __init__(
        self,
        detector: Detector,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        threshold_policy: str = "youden",
        run_config: dict | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if threshold_policy not in THRESHOLD_POLICIES:  # fail now, not after the first epoch
            raise ValueError(f"threshold_policy must be one of {THRESHOLD_POLICIES}, got {threshold_policy!r}")
        self.detector = detector
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.threshold_policy = threshold_policy
        # NHWC is the fast layout for convolutions on CPU (oneDNN) and on tensor cores.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Everything needed to rebuild the detector and its preprocessing from the
        # checkpoint alone (infer.py / evaluate.py need no training config).
        self.run_config = run_config or {}
        # Chosen on validation each epoch, so every checkpoint carries its own epoch's; after
        # training the scorer chooses the selected checkpoint's again (scoring.calibration).
        self.threshold = 0.5
        # The validation metrics of the epoch being checkpointed (``unmask.validation``): a
        # sweep's leaderboard reads the selected checkpoint's, not the last epoch's.
        self.validation: dict[str, float] = {}
        # Where the run came from (``unmask.core.provenance``), set by the training task: plain
        # data, stored in every checkpoint as ``unmask.provenance``.
        self.provenance: dict = {}
        self._val = {"prob": CatMetric(), "label": CatMetric()}
        for name, metric in self._val.items():
            self.add_module(f"val_{name}", metric)

    def forward(self, image: torch.Tensor, batch: dict | None = None):
        return self.detector(image, batch)

    def configure_model(self) -> None:
        """The memory layout is set before the strategy wraps the model: DDP registers its
        gradient buckets with the parameters' strides, and a layout changed after that (as
        ``on_fit_start`` did) makes every step copy gradients ("Grad strides do not match
        bucket view strides")."""
        self.detector.to(memory_format=self.memory_format)

    def _step_loss(self, batch: dict, stage: str) -> tuple[torch.Tensor, Any]:
        out = self.detector(batch["image"].contiguous(memory_format=self.memory_format), batch)
        terms = self.detector.loss_terms(out, batch)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        bs = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        if len(terms) > 1:
            for k, v in terms.items():
                self.log(f"{stage}/loss_{k}", v, batch_size=bs, sync_dist=stage != "train")
        return loss, out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step_loss(batch, "train")[0]

    def on_after_backward(self) -> None:
        self.detector.after_backward()  # a no-op unless the detector uses input gradients

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, out = self._step_loss(batch, "val")
        label = torch.as_tensor(batch["label"], device=self.device)
        keep = usable(batch, self.device)
        self._val["prob"].update(out.prob[keep])
        self._val["label"].update(label[keep].float())

    def on_validation_epoch_end(self) -> None:
        probs = self._val["prob"].compute().detach().cpu().numpy() if self._val["prob"].update_count else []
        labels = self._val["label"].compute().detach().cpu().numpy() if self._val["label"].update_count else []
        for m in self._val.values():
            m.reset()
        if self.trainer.sanity_checking or len(labels) == 0:
            return
        threshold = choose_threshold(labels, probs, self.threshold_policy)
        self.threshold = float(threshold)
        metrics = binary_metrics(labels, probs, threshold)
        self.validation = {"epoch": int(self.current_epoch), "n": int(len(labels))}
        for key in ("auc", "ap", "acc", "balanced_acc", "eer", "recall_at_90_real_pass", "threshold"):
            value = float(metrics[key])
            # Never hand NaN to checkpoint/early-stopping monitors (one-class validation).
            self.log(f"val/{key}", 0.0 if math.isnan(value) else value, prog_bar=key in ("auc", "acc"))
            self.validation[f"val/{key}"] = value

    def configure_optimizers(self):
        params = [p for p in self.detector.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the detector has no trainable parameters")
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        self._configured_schedule = {k: v for k, v in scheduler.state_dict().items() if k not in _SCHEDULE_PROGRESS}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "monitor": "val/auc"},
        }

    def on_train_start(self) -> None:
        """After a resume (``ckpt_path=``) Lightning restores the schedulers whole, so a run
        extended with a larger ``trainer.max_epochs`` would keep the old ``T_max`` (and a
        cosine schedule that already reached 0 would train the extra epochs at lr 0). Keep
        the checkpoint's progress but the config's schedule settings."""
        configured = getattr(self, "_configured_schedule", None)
        for sched_cfg in self.trainer.lr_scheduler_configs if configured else []:
            sched = sched_cfg.scheduler
            changed = {k: v for k, v in configured.items() if sched.__dict__.get(k) != v}
            if not changed or not hasattr(sched, "_get_closed_form_lr"):
                continue  # e.g. ReduceLROnPlateau: its state is progress (best, bad epochs), kept as restored
            sched.__dict__.update(changed)
            lrs = sched._get_closed_form_lr()  # the new schedule's lr at the restored epoch
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = list(lrs)
            log.info("resumed %s with the config's %s; lr now %s", type(sched).__name__, changed, lrs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        epoch = self.current_epoch
        checkpoint["unmask"] = {
            "format": FORMAT,
            "run_config": self.run_config,
            "threshold": float(self.threshold),
            "threshold_from": f"validation of epoch {epoch} in the training loop ({self.threshold_policy}, one sample per file)",
            "validation": dict(self.validation),  # this epoch's validation metrics (val/auc...)
            "provenance": self.provenance,  # git commit, package versions, data hash (unmask.core.provenance)
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume: format 1 kept the threshold as a state-dict buffer too."""
        old = checkpoint["state_dict"].pop("threshold", None)
        section = checkpoint.get("unmask", {})
        self.threshold = float(section.get("threshold", old if old is not None else 0.5))
