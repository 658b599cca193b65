"""A sweep's leaderboard: one row per run, sorted by the sweep's objective.

Every training run leaves ``summary.json`` in its folder (``run_summary``, written by
``unmask.tasks.train``): its overrides, the objective (the monitored validation score of the
checkpoint it *selected*, what it handed the sweeper), the selected epoch and that epoch's
validation metrics, the test metrics (overall, per source, per generator), wall time and the
selected checkpoint. ``write_leaderboard`` turns the summaries of a sweep folder (or of any run
folders) into ``leaderboard.md`` and ``leaderboard.csv``:

- at the end of ``python train.py -m ...`` (``LeaderboardCallback``, a Hydra callback in
  configs/train.yaml), in the sweep folder;
- for finished runs: ``python -m unmask.leaderboard DIR... [--out DIR]``.

A run folder without a summary (a job that failed or is still running) gets a row with status
``unfinished``, below the finished ones. Text cells go through ``reports.safe`` (CSV) and the
one markdown renderer (``reports.tables``); files are written atomically.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from data.io import atomic_write_json, atomic_write_text
from unmask.reports.safe import frame_csv
from unmask.reports.tables import markdown_table

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
FORMAT = 1
# The validation and test columns: metric key -> column suffix.
HEADLINE = {"auc": "auc", "acc": "acc", "recall_at_90_real_pass": "recall@90"}


def run_summary(
    run_dir: str | Path,
    objective: Mapping[str, Any],
    checkpoint: str | Path | None,
    selected_epoch: int | None,
    validation: Mapping[str, float] | None,
    threshold: float | None,
    test: Mapping[str, Any] | None,
    wall_seconds: float,
    overrides: Sequence[str],
) -> dict[str, Any]:
    """The content of a run's ``summary.json``. ``objective``: ``{"metric", "mode", "value"}``;
    ``test``: an evaluation report (its ``overall``, ``by_source`` and ``by_generator`` are kept)."""
    run_dir = Path(run_dir)
    if checkpoint:  # relative to the run folder, so that a moved sweep folder still points at it
        checkpoint = Path(checkpoint)
        try:
            checkpoint = checkpoint.resolve().relative_to(run_dir.resolve())
        except ValueError:
            pass
    return {
        "format": FORMAT,
        "status": "finished",
        "overrides": [str(o) for o in overrides],
        "objective": {"metric": str(objective.get("metric")), "mode": str(objective.get("mode", "max")), "value": _number(objective.get("value"))},
        "selected": {"epoch": selected_epoch, "checkpoint": str(checkpoint) if checkpoint else None},
        "validation": {k: v if isinstance(v, int) else _number(v) for k, v in (validation or {}).items()},
        "threshold": _number(threshold),
        "test": None if test is None else {k: test.get(k, {}) for k in ("overall", "by_source", "by_generator")},
        "wall_seconds": float(wall_seconds),
    }


def write_summary(run_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    return atomic_write_json(Path(run_dir) / SUMMARY_FILE, dict(summary))


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


def _is_run(folder: Path) -> bool:
    return (folder / SUMMARY_FILE).is_file() or (folder / ".hydra").is_dir()


def find_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """Run folders: each of ``dirs`` that is one, else its sub-folders that are (a sweep
    folder), in job order (``0``, ``1``, ... ``10``)."""

    def job_order(path: Path):
        head = path.name.split("_", 1)[0]
        return (0, int(head), path.name) if head.isdigit() else (1, 0, path.name)

    runs: list[Path] = []
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder}: not a folder (pass a sweep folder or run folders)")
        if _is_run(folder):
            runs.append(folder)
        else:
            runs += sorted((p for p in folder.iterdir() if p.is_dir() and _is_run(p)), key=job_order)
    return runs


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary; for a run without one, an ``unfinished`` stub with its overrides."""
    path = run_dir / SUMMARY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return {"status": "unfinished", "overrides": overrides or [], "objective": {}, "selected": {}, "validation": {}, "test": None}


def _test_auc_columns(test: Mapping | None) -> dict[str, float | None]:
    """``test auc source:NAME`` and ``test auc generator:NAME``: the names follow a fixed
    prefix, so no header starts like a formula."""
    out: dict[str, float | None] = {}
    for kind in ("source", "generator"):
        for name, metrics in ((test or {}).get(f"by_{kind}") or {}).items():
            out[f"test auc {kind}:{name}"] = _number(metrics.get("auc"))
    return out


def leaderboard_frame(runs: Sequence[Path], sort_by: str | None = None) -> tuple[pd.DataFrame, str, str]:
    """One row per run, best first; returns ``(frame, metric, mode)`` of the objective sorted by.
    ``sort_by``: another column (e.g. ``test auc``), sorted in the objective's direction."""
    rows, metrics, modes = [], [], []
    for run in runs:
        s = read_summary(run)
        objective, selected, validation = s.get("objective") or {}, s.get("selected") or {}, s.get("validation") or {}
        overall = (s.get("test") or {}).get("overall") or {}
        if objective.get("metric"):
            metrics.append(objective["metric"])
            modes.append(objective.get("mode", "max"))
        checkpoint = selected.get("checkpoint")
        row = {
            "run": run.name,
            "overrides": " ".join(s.get("overrides") or []),
            "status": s.get("status", "finished"),
            "objective": _number(objective.get("value")),
            "epoch": selected.get("epoch"),
            **{f"val {name}": _number(validation.get(f"val/{k}")) for k, name in HEADLINE.items()},
            **{f"test {name}": _number(overall.get(k)) for k, name in HEADLINE.items()},
            **_test_auc_columns(s.get("test")),
            "threshold": _number(s.get("threshold")),
            "wall s": _number(s.get("wall_seconds")),
            "checkpoint": str(run / checkpoint) if checkpoint and not Path(checkpoint).is_absolute() else checkpoint,
        }
        rows.append(row)
    metric = metrics[0] if metrics else "val/auc"
    mode = modes[0] if modes else "max"
    if len(set(metrics)) > 1:
        log.warning("these runs monitored different metrics (%s): sorted by each run's own", sorted(set(metrics)))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, metric, mode
    # A group with no AUC in any run (the reals' own "generator", one class) is no column.
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("test auc ") and frame[c].isna().all()])
    key = sort_by or "objective"
    if key not in frame.columns:
        raise KeyError(f"no column {key!r} to sort by; the columns are {list(frame.columns)}")
    frame["_finished"] = frame["status"] != "finished"
    frame = frame.sort_values(["_finished", key], ascending=[True, mode == "min"], na_position="last", kind="stable")
    frame = frame.drop(columns="_finished").reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    frame["epoch"] = frame["epoch"].astype("Int64")
    return frame, metric, mode


def leaderboard_markdown(frame: pd.DataFrame, metric: str, mode: str, title: str = "Leaderboard") -> str:
    sense = "highest" if mode == "max" else "lowest"
    lines = [
        f"# {title}",
        "",
        f"{len(frame)} run(s), {sense} objective first. Objective: `{metric}` of the checkpoint each run selected "
        "(validation; what the run returned to the sweeper). `val *`: the selected epoch's validation metrics; "
        "`test *`: the test split scored once with that checkpoint and its threshold (chosen on validation); "
        "`recall@90`: recall of AI-generated images at a 90 % real pass rate; `test auc source:S` / `generator:G`: "
        "the test AUC of one source, of one generator's fakes against all reals.",
        "",
    ]
    cells = [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in frame.itertuples(index=False)]
    cells = [[None if v is pd.NA else v for v in row] for row in cells]
    lines.append(markdown_table(list(frame.columns), cells))
    return "\n".join(lines) + "\n"


def write_leaderboard(out_dir: str | Path, dirs: Iterable[str | Path], sort_by: str | None = None) -> tuple[pd.DataFrame, str]:
    """``leaderboard.md`` and ``leaderboard.csv`` of the runs in ``dirs`` into ``out_dir``;
    returns the frame and the markdown."""
    frame, metric, mode = leaderboard_frame(find_runs(dirs), sort_by)
    text = leaderboard_markdown(frame, metric, mode)
    out = Path(out_dir)
    atomic_write_text(out / "leaderboard.md", text)
    atomic_write_text(out / "leaderboard.csv", frame_csv(frame))
    return frame, text


try:  # Hydra's callback API (hydra-core >= 1.1)
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class LeaderboardCallback(_HydraCallback):
    """At the end of a multirun (``-m``, or an Optuna search): the leaderboard of its runs in
    the sweep folder."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir() or not find_runs([sweep_dir]):
            return
        frame, text = write_leaderboard(sweep_dir, [sweep_dir])
        log.info("leaderboard of %d runs: %s", len(frame), (sweep_dir / "leaderboard.md").resolve())
        print(text)
        print(f"leaderboard written to {(sweep_dir / 'leaderboard.md').resolve()}")
