"""The Hydra apps of the entry points, one per task: ``train.py``, ``infer.py`` and
``evaluate.py`` at the project root run them, and so do the console commands that
``pip install`` puts on the PATH (``pyproject.toml`` ``[project.scripts]``)::

    unmask-train detector=npr data=faces_dev        # = python train.py detector=npr data=faces_dev
    unmask-infer ckpt=PATH input=./testset          # = python infer.py ...
    unmask-evaluate ckpt=PATH split=test            # = python evaluate.py ...

The configs are found by absolute path (``configs/`` of the project), so a console command
works from any folder; relative paths on its command line are relative to that folder. Each
app only composes the config and calls its task (imported when it runs: ``--help`` stays fast).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from unmask.core.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train(cfg: DictConfig) -> float | None:
    """Train a detector; returns the selected checkpoint's monitored score (for sweepers)."""
    from unmask.tasks.train import main

    return main(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="infer")
def infer(cfg: DictConfig) -> None:
    """The contest export: one row per file of ``input``."""
    from unmask.tasks.infer import run_inference

    run_inference(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def evaluate(cfg: DictConfig) -> None:
    """Evaluate a checkpoint on a split (report.md, metrics.json, predictions.csv...)."""
    from unmask.tasks.evaluate import run_evaluation

    run_evaluation(cfg)
