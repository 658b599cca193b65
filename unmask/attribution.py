"""Forgery-type attribution: which kind of forgery an image is, next to whether it is one.

``AttributedDetector`` wraps any detector whose ``DetectorOutput`` carries ``features`` and
adds a small head on them producing ``class_logits`` (B, C); the binary logit, heatmap,
mask, extra losses and preprocessing stay the inner detector's. Training adds
``weight * cross-entropy`` on class indices taken from the manifest's ``generator`` column
through ``AttributionClasses`` (configs/attribution/*.yaml). The rest of this module turns
the per-class probabilities into predictions columns (infer.py / evaluate.py) and the
confusion-matrix section of an evaluation.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.base import Detector, DetectorOutput

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # cross-entropy's default ignore_index: no attribution target


class AttributionClasses:
    """The ordered class list and the generator -> class mapping of one config.

    A generator absent from ``map`` maps to itself when it is a class name (the ``fine``
    option needs no map at all). Target rules: label 0 -> ``real_class`` whatever the
    generator column says; label 1 -> its generator's class, ignored when that is unknown
    (one warning per name) or is the real class (a contradictory row); label -1 and
    undecodable samples (``meta.ok`` False) -> ignored."""

    def __init__(self, classes: Sequence[str], map: Mapping[str, str] | None = None, real_class: str = "real") -> None:
        names = [str(c) for c in (classes or [])]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"attribution.classes must list at least 2 distinct class names, got {names}")
        if real_class not in names:
            raise ValueError(f"attribution.real_class {real_class!r} is not one of attribution.classes {names}")
        mapping = {str(k): str(v) for k, v in (map or {}).items()}
        wrong = {k: v for k, v in mapping.items() if v not in names}
        if wrong:
            raise ValueError(f"attribution.map sends {wrong} to classes not in attribution.classes {names}")
        self.names: tuple[str, ...] = tuple(names)
        self.map = mapping
        self.real_class = real_class
        self.real_index = names.index(real_class)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.names)

    def class_of(self, generator: str, label: int, ok: bool = True) -> str | None:
        """The class name a sample is trained and scored against, or None (ignored)."""
        label = int(label)
        if not ok or label not in (0, 1):
            return None
        if label == 0:
            return self.real_class
        generator = str(generator)
        name = self.map.get(generator, generator if generator in self.names else None)
        if name is None:
            if generator not in self._warned:
                self._warned.add(generator)
                log.warning(
                    "attribution: generator %r is in no class of %s; its samples get no attribution target "
                    "(add it to attribution.map)", generator, list(self.names),
                )
            return None
        return None if name == self.real_class else name

    def targets(self, batch: Mapping, device: torch.device | str = "cpu") -> Tensor:
        """Class indices (``IGNORE_INDEX`` where there is no target) for a collated batch."""
        labels = torch.as_tensor(batch["label"]).tolist()
        meta = batch.get("meta") or {}
        generators = meta.get("generator") or ["real"] * len(labels)
        oks = meta.get("ok")
        oks = [True] * len(labels) if oks is None else torch.as_tensor(oks).tolist()
        idx = [
            IGNORE_INDEX if (c := self.class_of(g, lab, ok)) is None else self.names.index(c)
            for g, lab, ok in zip(generators, labels, oks)
        ]
        return torch.tensor(idx, dtype=torch.long, device=device)


def _probe_feature_dim(detector: Detector, size: int) -> int:
    """Width of ``detector``'s features, from one forward of a blank image (eval mode, so
    no BatchNorm statistics or training-only state change)."""
    was_training = detector.training
    detector.eval()
    try:
        out = detector(torch.zeros(1, 3, size, size))
    finally:
        detector.train(was_training)
    if out.features is None:
        raise ValueError(
            f"attribution needs the detector's features, but {type(detector).__name__} returns none "
            "(DetectorOutput.features); pick another detector or attribution=none"
        )
    return int(out.features.shape[-1])


class AttributedDetector(Detector):
    """``inner`` plus a forgery-type head on its features.

    ``hidden``: 0 = a linear head; > 0 = Linear -> ReLU -> Linear with that width.
    ``in_features``: the feature width; null = found with one forward of a blank
    ``probe_size`` image at construction."""

    def __init__(
        self,
        detector: Detector,
        classes: Sequence[str],
        map: Mapping[str, str] | None = None,
        real_class: str = "real",
        weight: float = 0.5,
        hidden: int = 0,
        in_features: int | None = None,
        probe_size: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(detector, Detector):
            raise TypeError(f"AttributedDetector wraps a Detector, got {type(detector).__name__}")
        if not float(weight) >= 0:
            raise ValueError(f"attribution.weight must be >= 0, got {weight}")
        if int(hidden) < 0:
            raise ValueError(f"attribution.hidden must be >= 0 (0 = linear head), got {hidden}")
        self.classes = AttributionClasses(classes, map, real_class)
        self.class_names = self.classes.names
        self.weight = float(weight)
        self.inner = detector
        dim = int(in_features) if in_features else _probe_feature_dim(detector, int(probe_size))
        n = len(self.classes)
        self.head = (
            nn.Linear(dim, n) if not hidden else nn.Sequential(nn.Linear(dim, int(hidden)), nn.ReLU(inplace=True), nn.Linear(int(hidden), n))
        )

    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        out = self.inner(image, batch)  # the inner detector normalises; the wrapper never does
        if out.features is None:
            raise ValueError(f"attribution needs features, but {type(self.inner).__name__} returned none")
        return dataclasses.replace(out, class_logits=self.head(out.features))

    def after_backward(self) -> None:
        self.inner.after_backward()

    def loss_terms(self, out: DetectorOutput, batch: Mapping) -> dict[str, Tensor]:
        terms = self.inner.loss_terms(out, batch)
        logits = out.class_logits
        target = self.classes.targets(batch, logits.device)
        if (target != IGNORE_INDEX).any():
            ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        else:  # keep the head in the graph (DDP, AMP) with a zero loss
            ce = logits.sum() * 0.0
        return {**terms, "attribution": self.weight * ce}


# ---- predictions ---------------------------------------------------------------------
def attribution_columns(extras: Mapping, class_names: Sequence[str] | None, oks: Sequence[bool]) -> list[dict]:
    """Per-row ``type``, ``type_prob`` and ``p_<class>`` from a scorer's ``last_extras``;
    empty when the scorer gave no class probabilities (no head, ONNX, compiled)."""
    prob = extras.get("class_prob") if extras else None
    if prob is None or not class_names:
        return []
    prob = prob.float().cpu().numpy()
    rows = []
    for p, ok in zip(prob, oks):
        if not ok:
            rows.append({"type": "", "type_prob": math.nan, **{f"p_{c}": math.nan for c in class_names}})
            continue
        k = int(np.argmax(p))
        rows.append({"type": class_names[k], "type_prob": float(p[k]), **{f"p_{c}": float(v) for c, v in zip(class_names, p)}})
    return rows


# ---- evaluation ----------------------------------------------------------------------
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
    from unmask.tables import fmt_cell

    names = report["classes"]
    lines = [
        "## Attribution (forgery type)",
        "",
        f"{report['n']} images with a known type ({report['n_ignored']} without one left out); "
        f"accuracy {fmt_cell(report['accuracy'])}, macro F1 {fmt_cell(report['macro_f1'])} "
        "(over the types present in the split). Rows: true type; columns: predicted type.",
        "",
        "| true \\ predicted | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(names, report["confusion"])]
    lines += ["", "| type | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for c in names:  # the class order, also after a JSON round trip (metrics.json sorts keys)
        m = report["per_class"][c]
        lines.append(f"| {c} | {fmt_cell(m['precision'])} | {fmt_cell(m['recall'])} | {fmt_cell(m['f1'])} | {m['support']} |")
    return "\n".join(lines) + "\n"


def plot_confusion(report: dict, path: str | Path) -> Path:
    """Counts in each cell, coloured by the share of the true class (row-normalised)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unmask.io import atomic_save_figure

    names = report["classes"]
    counts = np.asarray(report["confusion"], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 1.1 * len(names) + 1.5))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted type", ylabel="true type", title=f"Attribution (acc {report['accuracy']:.3f})")
    out = atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def write_attribution(df: pd.DataFrame, detector: Detector, out_dir: str | Path) -> tuple[dict, str] | None:
    """evaluate.py's attribution section: the report and its markdown, with confusion.png
    written to ``out_dir``; None when the predictions carry no ``type`` column."""
    classes = getattr(detector, "classes", None)
    if not isinstance(classes, AttributionClasses) or df is None or "type" not in df.columns or "generator" not in df.columns:
        return None
    report = attribution_report(df, classes)
    plot_confusion(report, Path(out_dir) / "confusion.png")
    return report, render_attribution_markdown(report)
