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


def print_report(metrics_json: Path, title: str) -> dict:
    from unmask.evaluation import render_markdown

    report = json.loads(Path(metrics_json).read_text())
    print(render_markdown(report, title), flush=True)
    return report
