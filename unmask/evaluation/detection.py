"""Detection metrics of the scored files: overall, per source and per generator, at the
checkpoint's threshold (or the one ``scoring.threshold`` sets)."""
from __future__ import annotations

from pathlib import Path

from unmask.core.metrics import grouped_metrics
from unmask.evaluation.base import Evaluator
from unmask.reports.plots import plot_roc
from unmask.reports.tables import fmt, grouped_tables
from unmask.scoring.scorer import Scores


class Detection(Evaluator):
    name = "detection"

    def __init__(self, threshold_from: str = "chosen on validation") -> None:
        self.threshold_from = threshold_from

    def compute(self, scores: Scores, threshold: float) -> dict:
        files = scores.files
        rows = scores.usable()
        return {
            "threshold": float(threshold),
            "threshold_from": self.threshold_from,
            "n_undecodable": int((~files["ok"].astype(bool)).sum()) if len(files) else 0,
            **grouped_metrics(rows["label"].to_numpy(), rows["prob"].to_numpy(), rows["source"], rows["generator"], threshold),
        }

    def markdown(self, result: dict) -> str:
        return "\n".join(
            [
                f"Threshold {fmt(result['threshold'])} ({result['threshold_from']}); "
                f"{result['n_undecodable']} undecodable files left out of the metrics. "
                "`recall_at_90_real_pass`: share of fakes caught when 90 % of real faces pass. "
                "Per generator: that generator's fakes against all reals of the split.",
                "",
                *grouped_tables(result),
            ]
        )

    def write(self, result: dict, scores: Scores, out_dir: Path) -> None:
        plot_roc(scores.files, Path(out_dir) / "roc.png")
