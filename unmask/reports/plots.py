"""Every picture a run writes (matplotlib, headless, written atomically)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from data.io import atomic_save_figure  # noqa: E402
from data.sample import usable_rows  # noqa: E402


def plot_roc(df: pd.DataFrame, path: str | Path) -> None:
    """ROC of every usable row, and one curve per generator (its fakes against all reals)."""
    from sklearn.metrics import roc_curve

    scored = df[usable_rows(df)] if len(df) else df
    fig, ax = plt.subplots(figsize=(5, 5))
    if scored["label"].nunique() == 2:
        fpr, tpr, _ = roc_curve(scored["label"], scored["prob"])
        ax.plot(fpr, tpr, label="all")
        reals = scored[scored["label"] == 0]
        for gen, part in scored[scored["label"] == 1].groupby("generator"):
            both = pd.concat([reals, part])
            f, t, _ = roc_curve(both["label"], both["prob"])
            ax.plot(f, t, lw=1, alpha=0.7, label=str(gen))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.axvline(0.1, color="grey", lw=0.6, ls="--")  # 90 % real pass rate
    ax.set(xlabel="false positive rate (reals flagged)", ylabel="true positive rate (fakes caught)", title="ROC")
    ax.legend(fontsize=7, loc="lower right")
    atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(report: dict, path: str | Path) -> Path:
    """Counts in each cell, coloured by the share of the true class (row-normalised)."""

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


def plot_robustness_curves(tables: Mapping[str, pd.DataFrame], path: str | Path, metrics: Sequence[str] = ("acc", "auc")) -> None:
    """One panel per family: ``metrics`` against severity, one line per model; the clean
    value is the dotted line of the same colour."""

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


def plot_histograms(df: pd.DataFrame, columns: Sequence[str], by: str, path: str | Path,
                    titles: Mapping[str, str] | None = None, bins: int = 30) -> Path:
    """One panel per column: its distribution per value of ``by`` (density step histograms
    on shared bins between the 1st and 99th percentiles, values beyond them in the end
    bins; missing values left out)."""
    columns = [c for c in columns if c in df and pd.to_numeric(df[c], errors="coerce").notna().any()]
    ncols = 3
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    groups = sorted(df[by].dropna().astype(str).unique())
    for ax, column in zip(axes.flat, columns):
        values = pd.to_numeric(df[column], errors="coerce")
        finite = values[np.isfinite(values)]
        lo, hi = finite.quantile(0.01), finite.quantile(0.99)  # heavy tails would squash the rest into one bin
        edges = np.linspace(lo, hi, bins + 1) if hi - lo > 1e-9 * max(1.0, abs(hi)) else bins
        values = values.clip(lo, hi)
        for group in groups:
            part = values[(df[by].astype(str) == group) & np.isfinite(values)]
            if len(part):
                ax.hist(part, bins=edges, density=True, histtype="step", lw=1.2, label=f"{group} ({len(part)})")
        ax.set_title((titles or {}).get(column, column), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    if columns:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    out = atomic_save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_stacked_shares(shares: Mapping[str, Mapping[str, Mapping[str, float]]], parts: Sequence[str], path: str | Path,
                        titles: Mapping[str, str] | None = None, reference: Mapping[str, float] | None = None) -> Path:
    """One panel per entry of ``shares`` (panel -> group -> part -> share): a stacked bar per
    group of the shares of ``parts``; ``reference`` adds a bar of target shares."""
    panels = list(shares)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        groups = dict(shares[panel])
        if reference is not None:
            groups = {"target": reference, **groups}
        bottom = np.zeros(len(groups))
        for i, part in enumerate(parts):
            values = np.array([float(g.get(part, 0.0) or 0.0) for g in groups.values()])
            ax.bar(range(len(groups)), values, bottom=bottom, color=colors[i % len(colors)], label=part)
            bottom += values
        ax.set_xticks(range(len(groups)), list(groups), rotation=45, ha="right", fontsize=7)
        ax.set(ylim=(0, 1.0), title=(titles or {}).get(panel, panel))
        ax.title.set_fontsize(9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    out = atomic_save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
