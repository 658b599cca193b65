"""Issue-3 benchmark: LGrad (MobileNetV2 gradient source) and UnivFD (EfficientNet-Lite2
encoder: linear probe and k-NN) on faces-dev, same splits as bench/cnnspot_faces_dev.py,
validation and test metrics per source and per generator.

    python bench/lgrad_univfd_faces_dev.py [--out bench/results/lgrad_univfd_faces_dev]
        [--only lgrad,univfd,univfd_knn] [--lgrad-epochs 3] [--lgrad-train-limit 2000]

CPU-sized settings (2 shared cores), all stated in the runs' overrides below:
- every run: 128 px canonical images (``canonical=deterministic``: the same pixels every
  epoch, so gradient maps and embeddings are computed once and cached), no augmentation
  of the images (LGrad crops and flips its gradient maps itself), 1 intra-op thread;
- LGrad: source ``mobilenetv2_100`` (offline ImageNet weights, head kept, output = the max
  of the 1000 logits, the default since issue 12) at 128 px; classifier ``tf_efficientnet_lite0`` with offline ImageNet
  weights instead of the paper's ResNet-50 (no offline ResNet-50 weights here, and about
  4x the compute); random 112 crops (the paper's 224/256) + flips in training, the full map
  at test; Adam lr 5e-4, lr x0.8 every 10 epochs (paper), batch 32, ``--lgrad-epochs``
  epochs on a class-balanced ``--lgrad-train-limit`` training subset (``data.limit_per_split``:
  it keeps every validation and test image, which are fewer, so those splits are
  exactly the cnnspot benchmark's);
- UnivFD probe: AdamW lr 1e-3, weight decay 0, up to 15 epochs, early stopping on val AUC;
- UnivFD k-NN (k = 1, cosine): one epoch fills the bank with every training embedding.
Selection on validation AUC; test read once per run (train.py). The spine's cnnspot figures
(bench/results/cnnspot_faces_dev) are printed alongside when present.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, print_report, run  # noqa: E402

COMMON = [
    "data=faces_dev",
    "canonical=deterministic",
    "augment=none",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
    "+callbacks.epoch_timer._target_=bench.epoch_timer.EpochTimer",
]


def runs(args: argparse.Namespace) -> dict[str, list[str]]:
    cache = Path(args.cache).resolve()
    return {
        "lgrad": [
            "detector=lgrad",
            "detector.source=mobilenetv2_100",
            "detector.source_pretrained=imagenet",
            "detector.classifier=tf_efficientnet_lite0",
            "detector.pretrained=imagenet",
            "detector.mean=[0.5,0.5,0.5]",
            "detector.std=[0.5,0.5,0.5]",
            "detector.train_crop=112",
            f"detector.grad_cache={cache / 'lgrad_gradients'}",
            "optimizer=adam",
            "optimizer.lr=0.0005",
            "scheduler=step",
            "scheduler.step_size=10",
            "scheduler.gamma=0.8",
            "data.batch_size=32",
            f"data.limit_per_split={args.lgrad_train_limit}",
            f"trainer.max_epochs={args.lgrad_epochs}",
        ],
        "univfd": [
            "detector=univfd",
            "detector.encoder=tf_efficientnet_lite2",
            f"detector.feature_cache={cache / 'univfd_embeddings'}",
            "optimizer=adamw",
            "optimizer.lr=0.001",
            "optimizer.weight_decay=0.0",
            "data.batch_size=32",
            "trainer.max_epochs=15",
        ],
        "univfd_knn": [
            "detector=univfd_knn",
            "detector.encoder=tf_efficientnet_lite2",
            "detector.knn_k=1",
            f"detector.feature_cache={cache / 'univfd_embeddings'}",
            "optimizer=adamw",
            "optimizer.lr=0.01",
            "optimizer.weight_decay=0.0",
            "data.batch_size=32",
            "trainer.max_epochs=1",
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/lgrad_univfd_faces_dev"))
    parser.add_argument("--cache", default=str(ROOT / ".cache/bench"), help="gradient-map / embedding caches")
    parser.add_argument("--only", default="lgrad,univfd,univfd_knn")
    parser.add_argument("--lgrad-epochs", type=int, default=3)
    parser.add_argument("--lgrad-train-limit", type=int, default=2000)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every train.py run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    all_runs = runs(args)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(all_runs))
    if unknown:
        raise SystemExit(f"--only: unknown run(s) {unknown}; choose from {sorted(all_runs)}")

    minutes = {}
    for name in chosen:
        run_dir = out / name
        seconds = run(["train.py", *COMMON, *all_runs[name], f"task_name={name}_faces_dev", f"hydra.run.dir={run_dir}", *args.overrides])
        minutes[name] = seconds / 60
        run(["evaluate.py", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", "data=faces_dev", "split=val", f"hydra.run.dir={run_dir / 'val'}"])

    for name in chosen:
        print(f"\n{name}: train.py wall time {minutes[name]:.1f} min (gradient maps / embeddings computed in the first epoch)\n")
        print_report(out / name / "val" / "metrics.json", f"{name} on faces-dev: validation")
        print_report(out / name / "test" / "metrics.json", f"{name} on faces-dev: test")
    cnnspot = ROOT / "bench/results/cnnspot_faces_dev/test/metrics.json"
    if cnnspot.is_file():
        print_report(cnnspot, "cnnspot (spine, bench/cnnspot_faces_dev.py) on faces-dev: test")
    else:
        print(f"(no cnnspot figures at {cnnspot}: run bench/cnnspot_faces_dev.py)")


if __name__ == "__main__":
    main()
