"""Robustness grid: the clean split and every perturbation x severity, scored with one
checkpoint, summarised by the spec's degradation rate D_r = |Acc - Acc_base| / Acc_base.

The baseline (``clean``) goes through exactly the same pipeline as the perturbed cells
with no perturbation, so D_r measures the perturbation alone. Accuracy uses the
checkpoint's own threshold (chosen on validation); AUC and recall at a 90 % real pass
rate need no threshold and show whether the ranking survives even when the operating
point moves.
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from data.perturb import GridCell, PerturbationGrid, PerturbedDataset
from data.records import Record
from unmask.attacks import AttackedDetector
from unmask.checkpoint import LoadedDetector
from unmask.io import atomic_save_figure, atomic_write_json, atomic_write_text
from unmask.metrics import binary_metrics
from unmask.predict import predict
from unmask.tables import fmt_cell

log = logging.getLogger(__name__)

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


def _cell_metrics(df: pd.DataFrame, threshold: float) -> dict:
    scored = df[df["ok"]]
    return binary_metrics(scored["label"].to_numpy(), scored["prob"].to_numpy(), threshold)


def evaluate_grid(
    loaded: LoadedDetector,
    records: list[Record],
    grid: PerturbationGrid,
    threshold: float | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
) -> pd.DataFrame:
    """One row per cell (the first is ``clean``) with metrics and D_r."""
    thr = loaded.threshold if threshold is None else float(threshold)
    records = balanced_sample(records, grid.subset, grid.seed)
    cache: dict = {}
    base_ds = PerturbedDataset(records, loaded.canonical, None, grid.stage, cache)
    base_ds.warm()  # decode once in this process; every cell (and forked worker) reuses it
    cells: list[tuple[GridCell | None, PerturbedDataset]] = [(None, base_ds)]
    for cell in grid.cells():
        ds = base_ds if cell.is_attack else PerturbedDataset(records, loaded.canonical, cell.op, grid.stage, cache)
        cells.append((cell, ds))
    rows = []
    for cell, ds in cells:
        detector = AttackedDetector(loaded.detector, cell.op) if cell is not None and cell.is_attack else loaded.detector
        start = time.perf_counter()
        df, _ = predict(detector, ds, batch_size=batch_size, num_workers=num_workers, device=device, progress=False)
        m = _cell_metrics(df, thr)
        row = {"family": "clean", "severity": 0.0, "unit": ""} if cell is None else {"family": cell.family, "severity": cell.severity, "unit": cell.unit}
        row.update({k: m[k] for k in CELL_COLUMNS if k in m})
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        log.info("%-15s %-6g acc %.4f auc %.4f (%.1f s)", row["family"], row["severity"], row["acc"], row["auc"], row["seconds"])
    table = pd.DataFrame(rows)
    base_acc = float(table.loc[0, "acc"])
    table["d_r"] = [degradation_rate(a, base_acc) for a in table["acc"]]
    return table


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
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(fmt_cell(r[c]) if c not in ("severity",) else f"{r[c]:g}" for c in cols) + " |")
    summary = table[table["family"] != "clean"].groupby("family", sort=False)["d_r"].agg(["mean", "max"])
    lines += ["", "Per family: mean and worst D_r", "", "| family | mean d_r | max d_r |", "|---|---|---|"]
    for fam, r in summary.iterrows():
        lines.append(f"| {fam} | {fmt_cell(r['mean'])} | {fmt_cell(r['max'])} |")
    pert = table[table["family"] != "clean"]
    lines += ["", f"Mean D_r over all {len(pert)} cells: {fmt_cell(float(pert['d_r'].mean()))}", ""]
    return "\n".join(lines)


def plot_robustness_curves(tables: dict[str, pd.DataFrame], path: str | Path, metrics: Sequence[str] = ("acc", "auc")) -> None:
    """One panel per family: ``metrics`` against severity, one line per model; the clean
    value is the dotted line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(tables.values()))
    families = [f for f in dict.fromkeys(first["family"]) if f != "clean"]
    ncols = 4
    nrows = max(1, math.ceil(len(families) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    styles = {"acc": "-o", "auc": "--s", "recall_at_90_real_pass": ":^"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, fam in zip(axes.flat, families):
        for i, (name, table) in enumerate(tables.items()):
            part = table[table["family"] == fam].sort_values("severity")
            clean = table[table["family"] == "clean"].iloc[0]
            for m in metrics:
                ax.plot(part["severity"], part[m], styles.get(m, "-"), color=colors[i % len(colors)], ms=3, lw=1, label=f"{name} {m}")
                ax.axhline(clean[m], color=colors[i % len(colors)], lw=0.6, ls=":")
        unit = first.loc[first["family"] == fam, "unit"].iloc[0]
        ax.set(title=fam, xlabel=unit or "severity", ylim=(0.0, 1.02))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_robustness(table: pd.DataFrame, out_dir: str | Path, stage: str, n_images: int, name: str = "model") -> str:
    """robustness.csv / robustness.json / robustness.png; returns the markdown section."""
    out = Path(out_dir)
    atomic_write_text(out / "robustness.csv", table.to_csv(index=False))
    atomic_write_json(out / "robustness.json", {"stage": stage, "n_images": n_images, "cells": table.to_dict(orient="records")})
    plot_robustness_curves({name: table}, out / "robustness.png")
    return render_robustness_markdown(table, stage, n_images)
