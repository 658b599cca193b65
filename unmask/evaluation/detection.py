"""Detection metrics of the scored files: overall, per source and per generator, at the
checkpoint's threshold (or the one ``scoring.threshold`` sets), with bootstrap 95 % intervals
of accuracy and AUC (``evaluation.intervals``) and the report's opening: what was evaluated.

The plots (written by ``write`` from the same scored table, no second pass):

- ``roc.png``, ``det.png``: ROC and DET curves, overall and per generator, AUC and n in the legend;
- ``groups.png``: accuracy and AUC per source and per generator with their intervals, small groups marked;
- ``scores.png``: score histograms of reals and fakes, overall and per source, the threshold drawn;
- ``reliability.png``: the reliability diagram (calibration) of the scores;
- ``training.png``: the training run's loss and validation curves, when the checkpoint's run
  folder has Lightning's CSV log (``<run>/csv/version_*/metrics.csv`` beside ``<run>/checkpoints/``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from unmask.core.metrics import grouped_metrics
from unmask.evaluation.base import Evaluator
from unmask.evaluation.intervals import LEVEL, N_RESAMPLES, SEED, SMALL_N, grouped_intervals
from unmask.reports.plots import plot_det, plot_group_bars, plot_reliability, plot_roc, plot_score_histograms, plot_training_curves
from unmask.reports.safe import safe_cell
from unmask.reports.tables import SMALL_MARK, fmt, grouped_tables, interval
from unmask.scoring.scorer import Scores

PLOTS = {
    "roc.png": "ROC: fakes caught against reals flagged, overall and per generator (AUC and n in the legend); "
    "the dashed line is the 90 % real pass rate",
    "det.png": "DET: fakes missed against reals flagged on normal-deviate axes (AUC and n in the legend)",
    "groups.png": "accuracy and AUC per source and per generator with their 95 % bootstrap intervals; hatched: n < 30",
    "scores.png": "score histograms of reals and fakes, overall and per source, the decision threshold dashed",
    "reliability.png": "reliability diagram: the share of fakes per score bin against the bin's mean score (calibration)",
    "training.png": "the training run's loss and validation metrics per epoch (its CSV log)",
}


def training_log(ckpt: str | Path | None) -> Path | None:
    """The CSV log of the run that wrote ``ckpt`` (``<run>/checkpoints/x.ckpt`` ->
    ``<run>/csv/version_N/metrics.csv``, the highest N), or None."""
    if not ckpt:
        return None
    ckpt = Path(ckpt)
    if ckpt.parent.name != "checkpoints":
        return None
    found = [p for p in ckpt.parent.parent.glob("csv/version_*/metrics.csv") if p.is_file()]

    def version(p: Path) -> int:
        match = re.search(r"(\d+)$", p.parent.name)
        return int(match.group(1)) if match else -1

    return max(found, key=version) if found else None


def _short_target(node) -> str:
    target = node.get("_target_", "") if isinstance(node, Mapping) else ""
    return str(target).rsplit(".", 1)[-1]


def _code(text) -> str:
    """A value shown as inline code in the report: one line, no backticks, no formula start."""
    return "`" + str(safe_cell(" ".join(str(text).split()))).replace("`", "'") + "`"


def _names(values, limit: int = 8) -> str:
    values = sorted({str(v) for v in values})
    shown = ", ".join(_code(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def describe_run(ckpt, config: Mapping, threshold: float, threshold_from: str, split: str | None, scores: Scores) -> dict:
    """What was evaluated, for the report's opening and metrics.json: the checkpoint, its
    detector, wrappers and preprocessing, the data it was trained on, the split scored and the
    threshold with how it was chosen."""
    config = config or {}
    detector = config.get("detector") or {}
    data = config.get("data") or {}
    source = data.get("source") or {}
    files = scores.files
    rows = scores.usable()
    wrappers = [f"{group}: {_short_target(config.get(group))}" for group in ("osn", "attribution") if _short_target(config.get(group))]
    faces = config.get("faces") or {}
    trainer = config.get("trainer") or {}
    return {
        "checkpoint": str(ckpt) if ckpt else "",
        "detector": _short_target(detector),
        "detector_target": str(detector.get("_target_", "")),
        "backbone": str(detector.get("backbone") or detector.get("encoder") or ""),
        "wrappers": wrappers,
        "image_size": data.get("image_size"),
        "faces": _short_target(faces.get("analyzer")) if faces else "",
        "train_source": _short_target(source),
        "train_data": str(source.get("manifest") or source.get("root") or ""),
        "train_filters": {k: data.get(k) for k in ("train_generators", "train_sources", "limit_per_split") if data.get(k)},
        "experiment": str(config.get("task_name") or ""),
        "max_epochs": trainer.get("max_epochs"),
        "seed": config.get("seed"),
        "split": split or "",
        "n_files": int(len(files)),
        "n_scored": int(len(rows)),
        "n_real": int((rows["label"] == 0).sum()) if len(rows) else 0,
        "n_fake": int((rows["label"] == 1).sum()) if len(rows) else 0,
        "sources": sorted({str(s) for s in rows["source"]}) if len(rows) else [],
        "generators": sorted({str(g) for g in rows.loc[rows["label"] == 1, "generator"]}) if len(rows) else [],
        "threshold": float(threshold),
        "threshold_from": threshold_from,
    }


def describe_markdown(about: Mapping) -> str:
    detector = _code(about["detector"] or "?")
    if about.get("backbone"):
        detector += f" (backbone {_code(about['backbone'])})"
    detector += "; wrappers: " + (", ".join(about["wrappers"]) if about["wrappers"] else "none")
    detector += f"; input {about['image_size']} px" if about.get("image_size") else ""
    detector += f"; face stage {_code(about['faces'])}" if about.get("faces") else "; no face stage"
    trained = _code(about["train_source"] or "?")
    if about.get("train_data"):
        trained += f" at {_code(about['train_data'])}"
    if about.get("train_filters"):
        trained += "; filters " + ", ".join(f"{k}={_code(v)}" for k, v in about["train_filters"].items())
    trained += " (split train; the checkpoint and its threshold were picked on split val)"
    if about.get("experiment") and about["experiment"] != "train":
        trained += f"; run {_code(about['experiment'])}"
    if about.get("max_epochs") is not None:
        trained += f", up to {about['max_epochs']} epochs"
    if about.get("seed") is not None:
        trained += f", seed {about['seed']}"
    split = f"split {_code(about['split'])}: " if about.get("split") else ""
    evaluated = (
        f"{split}{about['n_files']} files, {about['n_scored']} scored ({about['n_real']} real, {about['n_fake']} fake; "
        f"{about['n_files'] - about['n_scored']} undecodable or unlabelled left out); "
        f"sources {_names(about['sources']) or '—'}; generators {_names(about['generators']) or '—'}"
    )
    return "\n".join(
        [
            "## What was evaluated",
            "",
            f"- **Checkpoint**: {_code(about['checkpoint'])}",
            f"- **Detector**: {detector}",
            f"- **Trained on**: {trained}",
            f"- **Evaluated on**: {evaluated}",
            f"- **Threshold**: {fmt(about['threshold'])}, {about['threshold_from']}",
            "",
        ]
    )


class Detection(Evaluator):
    name = "detection"

    def __init__(
        self, threshold_from: str = "chosen on validation", ckpt: str | Path | None = None, config: Mapping | None = None,
        split: str | None = None, n_resamples: int = N_RESAMPLES, plots: bool = True,
    ) -> None:
        self.threshold_from, self.ckpt, self.config, self.split = threshold_from, ckpt, config, split
        self.n_resamples, self.plots = int(n_resamples), plots

    def compute(self, scores: Scores, threshold: float) -> dict:
        files = scores.files
        rows = scores.usable()
        labels, probs = rows["label"].to_numpy(), rows["prob"].to_numpy()
        result = {
            "threshold": float(threshold),
            "threshold_from": self.threshold_from,
            "n_undecodable": int((~files["ok"].astype(bool)).sum()) if len(files) else 0,
            **grouped_metrics(labels, probs, rows["source"], rows["generator"], threshold),
        }
        intervals = grouped_intervals(labels, probs, rows["source"], rows["generator"], threshold, n_resamples=self.n_resamples)
        result["overall"].update(intervals["overall"])
        for key in ("by_source", "by_generator"):
            for name, values in intervals[key].items():
                result[key][name].update(values)
        result["intervals"] = {
            "method": "percentile bootstrap over files (AUC: within each class; accuracy of a group all right or all wrong: Wilson)", "level": LEVEL, "n_resamples": self.n_resamples,
            "seed": SEED, "small_n": SMALL_N,
        }
        result["evaluated"] = describe_run(self.ckpt, self.config or {}, threshold, self.threshold_from, self.split, scores)
        log = training_log(self.ckpt)
        result["training_log"] = str(log) if log else None
        result["plots"] = {name: what for name, what in PLOTS.items() if self.plots and (name != "training.png" or log is not None)}
        return result

    def markdown(self, result: dict) -> str:
        o = result["overall"]
        headline = (
            f"**Accuracy {fmt(o['acc'])}** (95 % CI {interval(o.get('acc_ci_low'), o.get('acc_ci_high'))}), "
            f"**AUC {fmt(o['auc'])}** (95 % CI {interval(o.get('auc_ci_low'), o.get('auc_ci_high'))}) on {o['n']} files."
        )
        small = [
            f"{k.split('_')[1]} {_code(name)} (n={m['n']})" for k in ("by_source", "by_generator") for name, m in result[k].items()
            if 0 < m["n"] < SMALL_N
        ]
        notes = [
            f"Threshold {fmt(result['threshold'])} (above); {result['n_undecodable']} undecodable files left out of the metrics. "
            "`recall_at_90_real_pass`: share of fakes caught when 90 % of real faces pass. "
            "Per generator: that generator's fakes against all reals of the split.",
            "",
            f"Intervals: {int(result['intervals']['level'] * 100)} % percentile bootstrap over files "
            f"({result['intervals']['n_resamples']} resamples, seed {result['intervals']['seed']}; AUC resampled within each class; "
            "a group with every file right, or every file wrong, gets Wilson's score interval for its accuracy). "
            f"{SMALL_MARK}: fewer than {SMALL_N} files, too few for the row's figures to carry weight: read its interval"
            + (f" ({len(small)} such rows: {', '.join(small[:6])}{' ...' if len(small) > 6 else ''})." if small else "."),
            "",
        ]
        plots = [f"- `{name}`: {what}" for name, what in result.get("plots", {}).items()]
        figures = [f"![{name[:-4]}]({name})" for name in result.get("plots", {})]
        missing_log = [] if result.get("training_log") or not self.ckpt else [
            "- no training curves: the checkpoint's run folder has no CSV log (`csv/version_*/metrics.csv` beside `checkpoints/`)"
        ]
        return "\n".join(
            [
                describe_markdown(result["evaluated"]),
                headline,
                "",
                *notes,
                *grouped_tables(result, small_n=SMALL_N),
                "## Plots",
                "",
                *plots,
                *missing_log,
                "",
                *figures,
                "",
            ]
        )

    def write(self, result: dict, scores: Scores, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        files = scores.files
        plots = result.get("plots", {})
        if "roc.png" in plots:
            plot_roc(files, out_dir / "roc.png")
        if "det.png" in plots:
            plot_det(files, out_dir / "det.png")
        if "groups.png" in plots:
            plot_group_bars({"By source": result["by_source"], "By generator": result["by_generator"]}, out_dir / "groups.png", SMALL_N)
        if "scores.png" in plots:
            plot_score_histograms(files, float(result["threshold"]), out_dir / "scores.png")
        if "reliability.png" in plots:
            plot_reliability(files, out_dir / "reliability.png")
        if "training.png" in plots and result.get("training_log"):
            plot_training_curves(result["training_log"], out_dir / "training.png")

