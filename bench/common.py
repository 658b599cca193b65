"""Helpers shared by the benchmark scripts: run a job, print a report's tables."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> float:
    """Run ``python <args>`` from the project root, streaming its output; returns seconds."""
    start = time.perf_counter()
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def render_report(report: dict, title: str) -> str:
    """An evaluate.py ``metrics.json`` as markdown: the threshold line, then the overall,
    per-source and per-generator tables."""
    from unmask.reports.tables import fmt, grouped_tables

    how = report.get("threshold_from") or "chosen on validation unless overridden"
    parts = [
        f"# {title}",
        "",
        f"Threshold {fmt(report['threshold'])} ({how}); "
        f"{report['n_undecodable']} undecodable files left out of the metrics. "
        "`recall_at_90_real_pass`: share of fakes caught when 90 % of real faces pass. "
        "Per generator: that generator's fakes against all reals of the split.",
        "",
        *grouped_tables(report),
    ]
    return "\n".join(parts)


def print_report(metrics_json: Path, title: str) -> dict:
    report = json.loads(Path(metrics_json).read_text())
    print(render_report(report, title), flush=True)
    return report
