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


def _text(value, limit: int = 32) -> str:
    """A name as plot text: shortened, and ``$`` escaped (matplotlib would read mathtext)."""
    text = " ".join(str(value).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _curves(df: pd.DataFrame):
    """(name, labels, scores) of the curves a ROC / DET plot draws: every usable row, then
    one per generator (its fakes against all reals) when there are several."""
    scored = df[usable_rows(df)] if len(df) else df
    if not len(scored) or scored["label"].nunique() < 2:
        return []
    curves = [("all", scored["label"].to_numpy(), scored["prob"].to_numpy())]
    reals = scored[scored["label"] == 0]
    fakes = scored[scored["label"] == 1]
    if fakes["generator"].nunique() > 1:
        for gen, part in fakes.groupby("generator"):
            both = pd.concat([reals, part])
            curves.append((str(gen), both["label"].to_numpy(), both["prob"].to_numpy()))
    return curves


def _no_curve(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}: the split needs real and fake files", ha="center", va="center", fontsize=8, transform=ax.transAxes)


def plot_roc(df: pd.DataFrame, path: str | Path) -> Path:
    """ROC of every usable row, and one curve per generator (its fakes against all reals);
    the legend gives each curve's AUC and n (scikit-learn's ``RocCurveDisplay``)."""
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    curves = _curves(df)
    for i, (name, y, p) in enumerate(curves):
        RocCurveDisplay.from_predictions(
            y, p, name=f"{_text(name)} (n={len(y)})", ax=ax, curve_kwargs={"lw": 2.0 if i == 0 else 1.0, "alpha": 1.0 if i == 0 else 0.8},
        )
    if not curves:
        _no_curve(ax, "ROC")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.axvline(0.1, color="grey", lw=0.6, ls="--")  # 90 % real pass rate
    ax.set(xlabel="false positive rate (reals flagged)", ylabel="true positive rate (fakes caught)", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    out = atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_det(df: pd.DataFrame, path: str | Path) -> Path:
    """DET curves (miss rate against false alarm rate on normal-deviate axes, scikit-learn's
    ``DetCurveDisplay``), the same curves as ``plot_roc``, AUC and n in the legend."""
    from sklearn.metrics import DetCurveDisplay, roc_auc_score

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    curves = _curves(df)
    for i, (name, y, p) in enumerate(curves):
        DetCurveDisplay.from_predictions(y, p, name=f"{_text(name)} (AUC {roc_auc_score(y, p):.3f}, n={len(y)})", ax=ax, lw=2.0 if i == 0 else 1.0)
    if not curves:
        _no_curve(ax, "DET curve")
    ax.set(title="DET", xlabel="false positive rate (reals flagged)", ylabel="false negative rate (fakes missed)")
    if curves:
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    out = atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_group_bars(groups: Mapping[str, Mapping[str, Mapping]], path: str | Path, small_n: int = 30) -> Path:
    """One panel per breakdown (``{"by source": {name: metrics}, "by generator": ...}``):
    accuracy and AUC per group as horizontal bars with their 95 % intervals
    (``acc_ci_low/high``, ``auc_ci_low/high``); groups under ``small_n`` files hatched, their
    n in red."""
    panels = [(title, rows) for title, rows in groups.items() if rows]
    heights = [max(2.0, 0.42 * len(rows) + 1.2) for _, rows in panels] or [2.0]
    fig, axes = plt.subplots(len(heights), 1, figsize=(7.5, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights})
    colours = {"acc": "#4c72b0", "auc": "#dd8452"}
    for ax, (title, rows) in zip(axes[:, 0], panels):
        names = list(rows)
        y = np.arange(len(names))
        for k, metric in enumerate(("acc", "auc")):
            values = np.array([float(rows[n].get(metric, np.nan)) for n in names], dtype=float)
            low = np.array([float(rows[n].get(f"{metric}_ci_low", np.nan)) for n in names], dtype=float)
            high = np.array([float(rows[n].get(f"{metric}_ci_high", np.nan)) for n in names], dtype=float)
            shown = np.nan_to_num(values, nan=0.0)
            err = np.vstack([np.clip(shown - np.nan_to_num(low, nan=shown), 0, None), np.clip(np.nan_to_num(high, nan=shown) - shown, 0, None)])
            small = [0 < int(rows[n].get("n", 0)) < small_n for n in names]
            offset = (k - 0.5) * 0.38
            bars = ax.barh(y + offset, shown, height=0.36, color=colours[metric], alpha=0.85)
            for bar, is_small, value in zip(bars, small, values):
                if is_small:
                    bar.set_hatch("///")
                    bar.set_alpha(0.45)
                if np.isnan(value):
                    bar.set_visible(False)
            ax.errorbar(shown, y + offset, xerr=err, fmt="none", ecolor="black", elinewidth=0.9, capsize=2)
        labels = [f"{_text(n, 28)} (n={int(rows[n].get('n', 0))})" for n in names]
        ax.set_yticks(y, labels, fontsize=7)
        for tick, n in zip(ax.get_yticklabels(), names):
            if 0 < int(rows[n].get("n", 0)) < small_n:
                tick.set_color("#c0392b")
        ax.invert_yaxis()
        ax.set(xlim=(0, 1.0), title=title)
        ax.title.set_fontsize(8)
        ax.grid(axis="x", alpha=0.3)
    if not panels:
        _no_curve(axes[0, 0], "groups")
    from matplotlib.patches import Patch

    handles = [Patch(color=colours["acc"], label="accuracy"), Patch(color=colours["auc"], label="AUC"),
               Patch(facecolor="white", edgecolor="grey", hatch="///", label=f"n < {small_n}")]
    axes[-1, 0].set_xlabel("value (whiskers: 95 % bootstrap interval)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False)
    out = atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_score_histograms(df: pd.DataFrame, threshold: float, path: str | Path, max_panels: int = 12) -> Path:
    """Scores of reals and fakes, overall and per source (the largest sources first, at most
    ``max_panels`` panels), on 20 bins over [0, 1], with the decision threshold drawn."""
    scored = df[usable_rows(df)] if len(df) else df
    panels = [("all", scored)]
    if len(scored) and scored["source"].nunique() > 1:
        sizes = scored["source"].astype(str).value_counts()
        panels += [(name, scored[scored["source"].astype(str) == name]) for name in sizes.index[: max_panels - 1]]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 2.8 * nrows), squeeze=False)
    edges = np.linspace(0.0, 1.0, 21)
    for ax, (name, part) in zip(axes.flat, panels):
        for label, colour, text in ((0, "#27ae60", "real"), (1, "#c0392b", "fake")):
            values = part.loc[part["label"] == label, "prob"].to_numpy(dtype=float)
            if len(values):
                ax.hist(values, bins=edges, color=colour, alpha=0.45, label=f"{text} ({len(values)})")
        ax.axvline(threshold, color="black", ls="--", lw=1.0, label=f"threshold {threshold:.3f}")
        ax.set_title(f"{_text(name)} (n={len(part)})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.supxlabel("P(AI-generated)", fontsize=8)
    fig.supylabel("files", fontsize=8)
    fig.tight_layout()
    out = atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_reliability(df: pd.DataFrame, path: str | Path, bins: int = 10) -> Path:
    """Reliability diagram (``sklearn.calibration.calibration_curve``, uniform bins): the
    share of fakes among the files of each score bin against the bin's mean score, the
    diagonal a calibrated model would follow, and below it how many files each bin holds."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    scored = df[usable_rows(df)] if len(df) else df
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k:", lw=0.8, label="calibrated")
    if len(scored) and scored["label"].nunique() == 2:
        y, p = scored["label"].to_numpy(), scored["prob"].to_numpy(dtype=float)
        share, mean = calibration_curve(y, p, n_bins=bins, strategy="uniform")
        top.plot(mean, share, "o-", lw=1.5, label=f"model (Brier {brier_score_loss(y, p):.3f}, n={len(y)})")
        bottom.hist(p, bins=np.linspace(0, 1, bins + 1), color="#4c72b0", alpha=0.7)
        top.legend(fontsize=7, loc="upper left")
    else:
        _no_curve(top, "reliability curve")
    top.set(ylabel="share of fakes in the bin", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    bottom.set(xlabel="mean P(AI-generated) in the bin", ylabel="files")
    top.grid(alpha=0.3)
    fig.tight_layout()
    out = atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_training_curves(metrics_csv: str | Path, path: str | Path) -> Path:
    """The training run's CSV log (Lightning's ``csv/version_*/metrics.csv``): training loss
    (per logged step, and its epoch mean) with validation loss, and the validation metrics per
    epoch, the epoch with the best validation AUC marked."""
    log = pd.read_csv(metrics_csv)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if "train/loss" in log and "step" in log:
        steps = log.dropna(subset=["train/loss"])
        left.plot(steps["step"], steps["train/loss"], lw=0.8, alpha=0.5, label="train loss (logged steps)")
        if "epoch" in steps:
            per_epoch = steps.groupby("epoch").agg(step=("step", "max"), loss=("train/loss", "mean"))
            left.plot(per_epoch["step"], per_epoch["loss"], "o-", lw=1.5, label="train loss (epoch mean)")
    if "val/loss" in log and "step" in log:
        val = log.dropna(subset=["val/loss"])
        left.plot(val["step"], val["val/loss"], "s--", lw=1.5, label="val loss")
    left.set(xlabel="step", ylabel="loss", title="Loss")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    metrics = [m for m in ("val/auc", "val/acc", "val/balanced_acc", "val/recall_at_90_real_pass") if m in log]
    if metrics and "epoch" in log:
        val = log.dropna(subset=[metrics[0]])
        for m in metrics:
            right.plot(val["epoch"], val[m], "o-", ms=3, lw=1.2, label=m)
        if "val/auc" in val and len(val):
            best = val.loc[val["val/auc"].idxmax()]
            right.axvline(best["epoch"], color="grey", ls="--", lw=0.8, label=f"best val/auc {best['val/auc']:.3f} (epoch {int(best['epoch'])})")
    right.set(xlabel="epoch", ylabel="value", title="Validation", ylim=(0, 1.02))
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.legend(fontsize=7, loc="lower right")
    right.grid(alpha=0.3)
    fig.tight_layout()
    out = atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


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
