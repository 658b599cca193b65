"""What an evaluator is: a metric object fed by the scorer's one loop.

``update`` sees every ``ScoredBatch`` while scoring runs (maps, masks, per-view scores that
the per-file table no longer holds); ``compute`` gets the finished ``Scores`` and the
decision threshold in force, and returns the evaluator's section of ``metrics.json`` (None: nothing to report, e.g. no video in the
split); ``markdown`` renders that section for report.md, ``write`` adds its own files
(plots, tables). A new metric is a new evaluator: evaluate.py's loop never changes.
"""
from __future__ import annotations

from pathlib import Path

from unmask.scoring.scorer import ScoredBatch, Scores


class Evaluator:
    name = "evaluator"  # its key in metrics.json

    def update(self, scored: ScoredBatch) -> None:
        """Called for every scored batch; most evaluators need only the final table."""

    def compute(self, scores: Scores, threshold: float) -> dict | None:
        raise NotImplementedError

    def markdown(self, result: dict) -> str:
        return ""

    def write(self, result: dict, scores: Scores, out_dir: Path) -> None:
        """Extra files beside report.md."""
