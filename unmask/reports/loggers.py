"""What a training run hands its experiment loggers (``configs/logger``: CSV, W&B) beyond
Lightning's own per-step metrics: the resolved config with the run's provenance (as
hyperparameters), the test metrics of the selected checkpoint and, for W&B, a table of the
test predictions with thumbnails."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TABLE_ROWS = 200  # test predictions in the W&B table, worst first
THUMBNAIL = 96  # pixels, the longer side


def is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def log_config(loggers: Sequence[Any], config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
    """The resolved config and the provenance as hyperparameters (CSV: ``hparams.yaml``;
    W&B: the run's config)."""
    for logger in loggers:
        logger.log_hyperparams({**config, "provenance": dict(provenance)})


def log_test(loggers: Sequence[Any], metrics: Mapping[str, float], step: int, predictions: str | Path | None = None, threshold: float | None = None) -> None:
    """``test/*`` metrics into every logger (CSV: rows of ``metrics.csv``); W&B also gets
    ``test/predictions``, a table of the test files, worst first, with thumbnails."""
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)
        if is_wandb(logger) and predictions is not None and Path(predictions).is_file():
            columns, data = predictions_table(pd.read_csv(predictions), threshold)
            logger.log_table(key="test/predictions", columns=columns, data=data)
        logger.save()


def finish(loggers: Sequence[Any]) -> None:
    """End the W&B run, so that the next job of a sweep (same process) starts its own."""
    for logger in loggers:
        if is_wandb(logger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def _file(path: str) -> str:
    """A path of predictions.csv as on disk (formula-looking names carry a leading ``'`` there)."""
    return path[1:] if path.startswith("'") and not Path(path).exists() and Path(path[1:]).exists() else path


def thumbnail(path: str, size: int = THUMBNAIL) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return np.asarray(image)
    except Exception:  # noqa: BLE001 - a video, an undecodable file: no thumbnail, the row stays
        return None


def predictions_table(frame: pd.DataFrame, threshold: float | None, limit: int = TABLE_ROWS) -> tuple[list[str], list[list]]:
    """Columns and rows of the W&B table: the ``limit`` files furthest from their label first
    (undecodable ones last), each with a thumbnail."""
    import wandb

    frame = frame.copy()
    frame["path"] = frame["path"].astype(str).map(_file)
    prob = pd.to_numeric(frame["prob"], errors="coerce")
    label = pd.to_numeric(frame["label"], errors="coerce")
    frame["_error"] = (prob - label).abs().where(label >= 0, prob)
    frame = frame.sort_values("_error", ascending=False, na_position="last").head(limit)
    columns = ["thumbnail", "path", "label", "prob", "pred", "source", "generator"]
    rows = []
    for r in frame.itertuples(index=False):
        p = float(r.prob) if pd.notna(r.prob) else None
        pixels = thumbnail(r.path)
        rows.append([
            wandb.Image(pixels) if pixels is not None else None,
            r.path,
            int(r.label),
            p,
            None if p is None or threshold is None else int(p >= threshold),
            str(getattr(r, "source", "")),
            str(getattr(r, "generator", "")),
        ])
    return columns, rows
