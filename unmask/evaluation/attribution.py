"""Forgery-type attribution of the scored files: confusion matrix, per-type precision,
recall and F1 (the ``type`` column the scorer adds when the detector has an attribution head)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from detectors.wrappers.attribution import AttributionClasses
from unmask.evaluation.base import Evaluator
from unmask.reports.plots import plot_confusion
from unmask.reports.tables import fmt, markdown_table
from unmask.scoring.scorer import Scores


def attribution_report(df: pd.DataFrame, classes: AttributionClasses) -> dict:
    """Confusion matrix (rows: true class, columns: predicted, every class kept), per-class
    precision / recall / F1 / support, accuracy and macro F1 over the classes present in the
    truth, on the rows that have a target (``AttributionClasses.class_of``)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    names = list(classes.names)
    truth = [classes.class_of(g, lab, ok) for g, lab, ok in zip(df["generator"], df["label"], df["ok"])]
    keep = np.array([t is not None for t in truth]) & df["type"].isin(names).to_numpy()
    y_true = np.array([t for t, k in zip(truth, keep) if k], dtype=object)
    y_pred = df["type"].to_numpy(dtype=object)[keep]
    matrix = confusion_matrix(y_true, y_pred, labels=names) if len(y_true) else np.zeros((len(names),) * 2, int)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=names, zero_division=0) if len(y_true) else [np.zeros(len(names))] * 4
    present = [c for c in names if (y_true == c).any()]
    nan = math.nan
    return {
        "classes": names,
        "n": int(len(y_true)),
        "n_ignored": int((~keep).sum()),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else nan,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)) if present else nan,
        "confusion": matrix.astype(int).tolist(),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])} for i, c in enumerate(names)
        },
    }


def render_attribution_markdown(report: dict) -> str:
    names = report["classes"]
    lines = [
        "## Attribution (forgery type)",
        "",
        f"{report['n']} images with a known type ({report['n_ignored']} without one left out); "
        f"accuracy {fmt(report['accuracy'])}, macro F1 {fmt(report['macro_f1'])} "
        "(over the types present in the split). Rows: true type; columns: predicted type.",
        "",
        markdown_table(["true \\ predicted", *names], ([c, *row] for c, row in zip(names, report["confusion"]))),
        "",
        # the class order, also after a JSON round trip (metrics.json sorts keys)
        markdown_table(
            ["type", "precision", "recall", "f1", "support"],
            ([c, *(report["per_class"][c][k] for k in ("precision", "recall", "f1", "support"))] for c in names),
        ),
    ]
    return "\n".join(lines) + "\n"




class Attribution(Evaluator):
    name = "attribution"

    def __init__(self, classes: AttributionClasses) -> None:
        self.classes = classes

    def compute(self, scores: Scores, threshold: float) -> dict | None:
        files = scores.files
        if files.empty or "type" not in files.columns:
            return None
        return attribution_report(files, self.classes)

    def markdown(self, result: dict) -> str:
        return render_attribution_markdown(result)

    def write(self, result: dict, scores: Scores, out_dir: Path) -> None:
        plot_confusion(result, Path(out_dir) / "confusion.png")
