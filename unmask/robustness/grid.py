"""The robustness grid: the clean split and every perturbation x severity, scored with one
checkpoint by the scorer, summarised by the spec's degradation rate
D_r = |Acc - Acc_base| / Acc_base.

The baseline (``clean``) is scored through exactly the same pipeline as the perturbed cells
with no perturbation, so D_r measures the perturbation alone; with a face stage (or
``perturb.stage=canonical``) that pipeline is the evaluation's own, so the clean cell gives
the evaluation report's scores. At ``stage=decoded`` without faces the clean cell decodes
JPEGs at full resolution (a perturbation acts on the image as received), where the
evaluation decodes large JPEGs at reduced size (DCT scaling): scores may differ in the last
digits there. Accuracy uses the checkpoint's own threshold (chosen on validation); AUC and
recall at a 90 % real pass rate need no threshold and show whether the ranking survives even
when the operating point moves.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import pandas as pd

from data.io import atomic_write_json, atomic_write_text
from data.records import Record
from data.video import split_videos
from unmask.core.metrics import binary_metrics
from unmask.reports.plots import plot_robustness_curves
from unmask.reports.safe import frame_csv
from unmask.reports.tables import fmt, markdown_table
from unmask.robustness.attacks import AttackedDetector
from unmask.robustness.perturbations import PixelPerturbation
from unmask.scoring.scorer import Scorer, Scores

log = logging.getLogger(__name__)

STAGES = ("decoded", "canonical")
CELL_COLUMNS = ("family", "severity", "unit", "n", "acc", "balanced_acc", "real_acc", "fake_acc", "auc", "recall_at_90_real_pass", "d_r")


def relative_drop(acc: float, acc_base: float) -> float:
    """|Acc - Acc_base| / Acc_base: the spec's D_r (perturbations) and D_g (held-out
    generators) are both this ratio. NaN when the baseline is 0 or undefined."""
    if acc_base is None or not math.isfinite(acc_base) or acc_base == 0 or acc is None or not math.isfinite(acc):
        return math.nan
    return abs(acc - acc_base) / acc_base


degradation_rate = relative_drop  # D_r
generalization_rate = relative_drop  # D_g


def balanced_sample(records: list[Record], n: int | None, seed: int = 0) -> list[Record]:
    """Up to ``n`` records, half per class where possible, in their original order."""
    if not n or n >= len(records):
        return list(records)
    rng = random.Random(seed)
    by_label = {lab: [i for i, r in enumerate(records) if r.label == lab] for lab in (0, 1)}
    chosen: list[int] = []
    for lab, members in by_label.items():
        other = len(by_label[1 - lab])
        take = min(len(members), max(n // 2, n - other))
        chosen += rng.sample(members, take)
    chosen = sorted(chosen)[:n]
    return [records[i] for i in chosen]


@dataclass
class PerturbationFamily:
    make: Callable[[float], Any]  # severity -> albumentations transform, or an attack
    severities: Sequence[float]
    unit: str = ""


@dataclass
class GridCell:
    family: str
    severity: float
    unit: str
    op: Any  # PixelPerturbation, or an attack with ``perturb(detector, image, label)``

    @property
    def is_attack(self) -> bool:
        return not isinstance(self.op, PixelPerturbation)


@dataclass
class PerturbationGrid:
    """``families``: name -> {make, severities, unit} (``configs/perturb/*.yaml``).
    ``subset``: evaluate on a class-balanced sample of this many images (null: all)."""

    families: dict[str, Any] = field(default_factory=dict)
    stage: str = "decoded"
    seed: int = 0
    subset: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"perturb.stage must be one of {STAGES}, got {self.stage!r}")
        fams = {}
        for name, spec in (self.families or {}).items():
            fam = spec if isinstance(spec, PerturbationFamily) else PerturbationFamily(**dict(spec))
            if not callable(fam.make):
                raise ValueError(f"perturb.families.{name}.make must be a callable (a _partial_ _target_)")
            if not list(fam.severities):
                raise ValueError(f"perturb.families.{name}.severities is empty")
            fams[str(name)] = fam
        self.families = fams

    def cells(self) -> Iterator[GridCell]:
        for name, fam in self.families.items():
            for severity in fam.severities:
                op = fam.make(severity)
                if isinstance(op, A.BasicTransform):
                    op = PixelPerturbation(name, float(severity), op, self.seed)
                yield GridCell(name, float(severity), fam.unit, op)

    def __len__(self) -> int:
        return sum(len(list(f.severities)) for f in self.families.values())


def _cell_metrics(scores: Scores, threshold: float) -> dict:
    rows = scores.usable()
    return binary_metrics(rows["label"].to_numpy(), rows["prob"].to_numpy(), threshold)


def evaluate_grid(
    scorer: Scorer, records: list[Record], grid: PerturbationGrid, threshold: float | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per cell (the first is ``clean``) with metrics and D_r, and the per-file scores
    of every cell (``family, severity, path, label, prob``: which files flip, and how far).
    Video files are left out (the grid perturbs images)."""
    thr = scorer.loaded.threshold if threshold is None else float(threshold)
    images, videos = split_videos(balanced_sample(records, grid.subset, grid.seed))
    if videos:
        log.warning("robustness grid: %d video files left out (the grid perturbs images)", len(videos))
    # Every cell reads the same decoded images (stage decoded) or cut views (stage canonical).
    shared = {"raw_cache": {}} if grid.stage == "decoded" else {"views_cache": {}}
    base = scorer.dataset(images, **shared)
    if scorer.loaded.faces is not None:
        scorer.loaded.faces.prepare([r.path for r in images], progress=False)
    base.warm()  # decode once in this process; every cell (and forked worker) reuses it
    cells: list[tuple[GridCell | None, Any, Any]] = [(None, base, None)]
    for cell in grid.cells():
        if cell.is_attack:  # attacks need gradients: the eager detector, attacked per batch
            cells.append((cell, base, scorer.eager_runtime(AttackedDetector(scorer.loaded.detector, cell.op))))
        else:
            hook = {"decoded_hook": cell.op} if grid.stage == "decoded" else {"canonical_hook": cell.op}
            cells.append((cell, scorer.dataset(images, **shared, **hook), None))
    rows, per_file = [], []
    for cell, dataset, runtime in cells:
        start = time.perf_counter()
        scores = scorer.score(dataset, runtime=runtime, progress=False)
        m = _cell_metrics(scores, thr)
        row = {"family": "clean", "severity": 0.0, "unit": ""} if cell is None else {"family": cell.family, "severity": cell.severity, "unit": cell.unit}
        per_file.append(scores.files[["path", "label", "prob"]].assign(family=row["family"], severity=row["severity"]))
        row.update({k: m[k] for k in CELL_COLUMNS if k in m})
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        log.info("%-15s %-6g acc %.4f auc %.4f (%.1f s)", row["family"], row["severity"], row["acc"], row["auc"], row["seconds"])
    table = pd.DataFrame(rows)
    base_acc = float(table.loc[0, "acc"])
    table["d_r"] = [degradation_rate(a, base_acc) for a in table["acc"]]
    files = pd.concat(per_file, ignore_index=True)[["family", "severity", "path", "label", "prob"]]
    return table, files


def render_robustness_markdown(table: pd.DataFrame, stage: str, n_images: int, title: str = "Robustness") -> str:
    cols = ["family", "severity", "unit", "acc", "auc", "recall_at_90_real_pass", "real_acc", "fake_acc", "d_r"]
    lines = [
        f"## {title}",
        "",
        f"{n_images} images; perturbations applied at stage `{stage}` "
        + ("(the decoded image as received, before the canonical resize and JPEG re-encode)" if stage == "decoded" else "(the canonical crop, before the canonical JPEG re-encode)")
        + "; attacks (fgsm, pgd) on the final [0, 1] tensor against this detector. "
        "`d_r` = |Acc - Acc_clean| / Acc_clean at the checkpoint's threshold; lower is more robust.",
        "",
        markdown_table(cols, ([f"{r[c]:g}" if c == "severity" else r[c] for c in cols] for _, r in table.iterrows())),
    ]
    summary = table[table["family"] != "clean"].groupby("family", sort=False)["d_r"].agg(["mean", "max"])
    lines += ["", "Per family: mean and worst D_r", ""]
    lines.append(markdown_table(["family", "mean d_r", "max d_r"], ([fam, r["mean"], r["max"]] for fam, r in summary.iterrows())))
    pert = table[table["family"] != "clean"]
    lines += ["", f"Mean D_r over all {len(pert)} cells: {fmt(float(pert['d_r'].mean()))}", ""]
    return "\n".join(lines)


def write_robustness(
    table: pd.DataFrame, out_dir: str | Path, stage: str, n_images: int, name: str = "model", files: pd.DataFrame | None = None
) -> str:
    """robustness.csv / robustness.json / robustness.png (and robustness_scores.csv, every
    file's score in every cell); returns the markdown section."""
    out = Path(out_dir)
    atomic_write_text(out / "robustness.csv", frame_csv(table))
    if files is not None:
        atomic_write_text(out / "robustness_scores.csv", frame_csv(files, float_format="%.6f"))
    atomic_write_json(out / "robustness.json", {"stage": stage, "n_images": n_images, "cells": table.to_dict(orient="records")})
    plot_robustness_curves({name: table}, out / "robustness.png")
    return render_robustness_markdown(table, stage, n_images)
