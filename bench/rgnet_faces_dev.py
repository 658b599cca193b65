"""Issue-5 benchmark: the residual graph network (detector=rgnet) against CNNSpot, both
trained on the same faces-dev face crops (MediaPipe FaceMesh: ``faces=mesh faces.crop=true``)
through train.py with one CPU-sized recipe, each tested once; prints the overall,
per-source and per-generator test tables side by side.

    python bench/rgnet_faces_dev.py [--out bench/results/rgnet_faces_dev] [--epochs 6]
        [--only cnnspot,rgnet] [extra Hydra overrides for both runs]
    python bench/rgnet_faces_dev.py --quick      (plumbing check: synthetic data, faces=template, < 2 min)

CPU recipe (2 shared cores), identical for both detectors so only the detector differs:
faces-dev with its manifest splits (whole splits, no ``limit_per_split``), face crops
(margin 0.3, only the face: ``faces.whole_image=false faces.train_whole_image_p=0``; a file
without a face is scored whole), 128 px canonical crops (the paper: 300), augment=light,
EfficientNet-Lite0 with offline ImageNet weights, AdamW lr 5e-4 wd 1e-4 + cosine (the
paper's lr 0.005 is for its own from-scratch graph layers; it unsettles a pretrained
backbone at batch 32), batch 32 (paper 64), ``--epochs`` epochs (default 6; paper 100) with
early stopping (patience 4) and selection on validation AUC. rgnet: mesh68 nodes, k-NN
(k 8) edges, 4 levels x 4 radii = 16 scales (configs/detector/rgnet.yaml).
Face detection runs once (cached under .cache/faces) and is shared by both runs.
Wall time not measured here: cnnspot on whole 128 px images took 2.1 min per epoch
(configs/experiment/cnnspot_faces_dev.yaml); rgnet adds little to the same backbone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, run  # noqa: E402
from unmask.reports.tables import fmt, markdown_table  # noqa: E402

DETECTORS = ("cnnspot", "rgnet")

FULL = [
    "data=faces_dev",
    "faces=mesh",
    "faces.crop=true",
    "faces.whole_image=false",
    "faces.train_whole_image_p=0.0",
    "data.image_size=128",
    "data.batch_size=32",
    "augment=light",
    "optimizer=adamw",
    "optimizer.lr=0.0005",
    "optimizer.weight_decay=0.0001",
    "scheduler=cosine",
    "callbacks.early_stopping.patience=4",
    "num_threads=2",
    "trainer.enable_progress_bar=false",
]

QUICK = [
    "data=synthetic",
    "faces=template",
    "data.source.n_per_class=24",
    "data.source.size=32",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "scoring.num_workers=0",  # the validation threshold and the test step score through the scorer
    "detector.pretrained=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "++trainer.num_sanity_val_steps=0",
    "logger=none",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
]

COLUMNS = ("auc", "acc", "balanced_acc")


def side_by_side(reports: dict[str, dict], section: str, first: str) -> str:
    """One markdown table: a row per group, ``n`` then AUC / acc / balanced acc per detector."""
    names = list(reports)
    groups = sorted({g for r in reports.values() for g in r[section]})
    header = [first, "n", *(f"{name} {c}" for name in names for c in COLUMNS)]
    rows = []
    for g in groups:
        found = {name: reports[name][section].get(g) or {} for name in names}
        n = next((m["n"] for m in found.values() if m), None)
        rows.append([g, n, *(found[name].get(c) for name in names for c in COLUMNS)])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default bench/results/rgnet_faces_dev (--quick: ..._quick)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--only", default=",".join(DETECTORS), help="comma-separated subset of cnnspot,rgnet")
    parser.add_argument("--quick", action="store_true", help="synthetic data + faces=template, 1 tiny epoch: checks the plumbing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both train.py runs")
    args = parser.parse_args()
    out = Path(args.out or ROOT / ("bench/results/rgnet_faces_dev" + ("_quick" if args.quick else ""))).resolve()
    chosen = [d.strip() for d in args.only.split(",") if d.strip()]
    if set(chosen) - set(DETECTORS):
        raise SystemExit(f"--only: choose from {DETECTORS}, got {chosen}")
    recipe = QUICK if args.quick else [*FULL, f"trainer.max_epochs={args.epochs}"]
    if args.quick:
        recipe = [*recipe, f"paths.cache_dir={out / 'cache'}"]

    minutes = {}
    for name in chosen:
        run_dir = out / name
        seconds = run(["train.py", *recipe, f"detector={name}", f"task_name={name}_faces_crops",
                       f"hydra.run.dir={run_dir}", "test=true", *args.overrides])
        minutes[name] = seconds / 60

    reports = {name: json.loads((out / name / "test" / "metrics.json").read_text()) for name in chosen}
    print(f"\n# rgnet vs cnnspot on {'synthetic (--quick)' if args.quick else 'faces-dev face crops'}: test split\n")
    print("train.py wall time (min): " + ", ".join(f"{n} {m:.1f}" for n, m in minutes.items()) + "\n")
    print("Thresholds chosen on validation: " + ", ".join(f"{n} {fmt(r['threshold'])}" for n, r in reports.items()) + "\n")
    print("## Overall\n")
    print(side_by_side({n: {"overall": {"all": r["overall"]}} for n, r in reports.items()}, "overall", "set") + "\n")
    print("## By source\n")
    print(side_by_side(reports, "by_source", "source") + "\n")
    print("## By generator (each generator's fakes against all reals)\n")
    print(side_by_side(reports, "by_generator", "generator"), flush=True)


if __name__ == "__main__":
    main()
