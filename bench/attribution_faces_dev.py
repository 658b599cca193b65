"""Attribution benchmark (issue 6): the CNNSpot spine recipe plus the coarse forgery-type
head (real / gan / diffusion / face_swap / manual_edit), trained on faces-dev through
train.py, then evaluated on validation and test with the confusion matrix printed.

    python bench/attribution_faces_dev.py [--out bench/results/attribution_faces_dev] [extra Hydra overrides]
    python bench/attribution_faces_dev.py --quick      (plumbing check on the synthetic set, < 2 min)

Recipe (CPU-sized, about 20 minutes on 2 idle cores, as bench/cnnspot_faces_dev.py):
``experiment=cnnspot_faces_dev attribution=coarse``: EfficientNet-Lite0 from the offline
ImageNet weights at 128 px, canonicalisation on, AdamW lr 5e-4, 10 epochs (early stopping
on validation AUC), batch 32; the type head is linear on the pooled features, its
cross-entropy weighted 0.5 next to the binary loss. faces-dev has no manual edits, so the
manual_edit row stays empty. The checkpoint is selected on validation AUC (the binary
task); test is read once.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, print_report, run  # noqa: E402
from unmask.reports.tables import fmt  # noqa: E402

RECIPE = ["experiment=cnnspot_faces_dev", "attribution=coarse", "task_name=attribution_faces_dev"]
EVAL_DATA = ["data=faces_dev"]
# --quick: the synthetic smoke set at 32 px, random init, a few steps: proves the plumbing only.
QUICK_DATA = ["data=synthetic", "data.source.n_per_class=16", "data.source.size=32", "data.image_size=32", "data.num_workers=0"]
# The threshold and test scoring of train.py go through the scorer (scoring.*), not data.*.
QUICK_SCORING = ["scoring.num_workers=0"]
QUICK = ["attribution=coarse", *QUICK_DATA, *QUICK_SCORING, "detector.pretrained=none", "data.batch_size=8", "trainer.max_epochs=1",
         "trainer.limit_train_batches=2", "++trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "logger=none"]


def print_attribution(metrics_json: Path, title: str) -> dict:
    from unmask.evaluation.attribution import render_attribution_markdown

    report = json.loads(Path(metrics_json).read_text())
    print_report(metrics_json, title)
    if "attribution" not in report:
        raise SystemExit(f"{metrics_json} has no attribution section: was the model trained with attribution=...?")
    print(render_attribution_markdown(report["attribution"]), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (default bench/results/attribution_faces_dev; --quick: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic run that checks the plumbing (< 2 min)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for train.py")
    args = parser.parse_args()
    if args.out:
        out = Path(args.out).resolve()
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="attribution_quick_"))
    else:
        out = ROOT / "bench/results/attribution_faces_dev"
    extra = [f"paths.cache_dir={out / 'cache'}"] if args.quick else []
    train_s = run(["train.py", *(QUICK if args.quick else RECIPE), *extra, f"hydra.run.dir={out}", *args.overrides])
    ckpt = out / "checkpoints" / "best.ckpt"
    data = (QUICK_DATA + extra) if args.quick else EVAL_DATA
    run(["evaluate.py", f"ckpt={ckpt}", *data, "split=val", f"hydra.run.dir={out}/val", *(QUICK_SCORING if args.quick else [])])
    print(f"\ntraining wall time: {train_s / 60:.1f} min\n")
    print_attribution(out / "val" / "metrics.json", "cnnspot + coarse attribution: validation")
    test = print_attribution(out / "test" / "metrics.json", "cnnspot + coarse attribution: test")
    a, o = test["attribution"], test["overall"]
    print(f"test: binary AUC {fmt(o['auc'])}, acc {fmt(o['acc'])}; attribution accuracy {fmt(a['accuracy'])}, "
          f"macro F1 {fmt(a['macro_f1'])} over {a['n']} images; confusion matrix plot: {out / 'test' / 'confusion.png'}")


if __name__ == "__main__":
    main()
