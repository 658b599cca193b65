"""Spine benchmark: train the default CNNSpot recipe on faces-dev within about 30 CPU
minutes, then print validation and test metrics per source and per generator.

    python bench/cnnspot_faces_dev.py [--out bench/results/cnnspot_faces_dev] [extra Hydra overrides]

Targets (issue 2): test ROC AUC >= 0.97, accuracy >= 0.93, no source below 0.85 accuracy,
with canonicalisation on. The checkpoint is selected on validation AUC; test is read once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, print_report, run  # noqa: E402
from unmask.reports.tables import fmt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/cnnspot_faces_dev"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for train.py")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    train_s = run(["train.py", "experiment=cnnspot_faces_dev", f"hydra.run.dir={out}", *args.overrides])
    ckpt = out / "checkpoints" / "best.ckpt"
    run(["evaluate.py", f"ckpt={ckpt}", "data=faces_dev", "split=val", f"hydra.run.dir={out}/val"])
    print(f"\ntraining wall time: {train_s / 60:.1f} min\n")
    print_report(out / "val" / "metrics.json", "cnnspot on faces-dev: validation")
    test = print_report(out / "test" / "metrics.json", "cnnspot on faces-dev: test")
    o = test["overall"]
    worst = min(test["by_source"].items(), key=lambda kv: kv[1]["acc"])
    print(f"test AUC {fmt(o['auc'])} (target >= 0.97), acc {fmt(o['acc'])} (>= 0.93), "
          f"worst source {worst[0]} acc {fmt(worst[1]['acc'])} (>= 0.85)")


if __name__ == "__main__":
    main()
