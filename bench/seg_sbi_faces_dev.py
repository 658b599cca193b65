"""Localisation benchmark on faces-dev with self-blended forgeries (data/sbi.py).

(a) ``detector=seg augment=sbi``: the UNet-like SegDetector (EfficientNet-Lite0, offline
    ImageNet weights) trained on the faces-dev train split, where half of the reals are
    self-blended on the fly (their masks supervise the pixel head; the dataset's own fakes
    have no mask and only train the image head). Scored on a held-out blended split: the
    test split's reals, forged with SelfBlend p=0.5 with a fixed seed (the same every run):
    challenge score (F1 + IoU), F1, IoU, pixel AUC, plus the image-level AUC of blended vs
    clean reals.
(b) ``augment=sbi`` on CNNSpot: two runs of the same reduced recipe (experiment
    cnnspot_faces_dev with ``--epochs`` epochs), augment=light vs augment=sbi, and their
    test tables (overall, per source, per generator) side by side.

CPU-sized recipe: 128 px, batch 32, AdamW lr 5e-4, cosine, ``--epochs`` (default 3) epochs
per run, 3 runs; roughly 3 x 3 x 2-3 min on 2 idle cores.

    python bench/seg_sbi_faces_dev.py [--epochs 3] [--faces none|mesh] [--only seg|cnnspot]
    python bench/seg_sbi_faces_dev.py --quick      # plumbing check on data=synthetic (< 2 min)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, run  # noqa: E402

QUICK = [  # data=synthetic, tiny and random init: proves the plumbing, not accuracy
    "data=synthetic", "data.source.n_per_class=24", "data.source.size=32", "data.image_size=32",
    "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
    "++trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "logger=none", "detector.pretrained=none",
]


def recipe(args) -> list[str]:
    if args.quick:
        return QUICK
    return ["experiment=cnnspot_faces_dev", f"trainer.max_epochs={args.epochs}", f"faces={args.faces}"]


def blended_test_split(out: Path, args) -> dict:
    """(a)'s held-out split: test reals, SelfBlend p=0.5 with the data set's fixed seed."""
    import torch
    from hydra.utils import instantiate

    from data.augment import SampleAugment
    from data.dataset import ImageDataset
    from unmask.checkpoint import load_detector
    from unmask.localization import evaluate_localization, render_localization_markdown
    from unmask.metrics import binary_metrics
    from unmask.predict import predict

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose  # the same composition as train.py

    torch.set_num_threads(2)
    cfg = compose("train", recipe(args) + list(args.overrides) + ["augment=sbi", f"paths.output_dir={out}"])
    datamodule = instantiate(cfg.data, augment=None)
    datamodule.setup()
    reals = [r for r in datamodule.records["test"] if r.label == 0]
    loaded = load_detector(out / "checkpoints" / "best.ckpt")
    forgery = instantiate(cfg.augment.forgery, p=0.5)  # the training forgery settings, fixed p
    dataset = ImageDataset(
        reals, loaded.canonical, augment=SampleAugment(pixels=None, forgery=forgery), train=False,
        faces=loaded.faces, seed=1234,
    )
    per_image, summary = evaluate_localization(loaded.detector, dataset, batch_size=32, num_workers=0, device="cpu")
    per_image.to_csv(out / "blended_test_localization.csv", index=False)
    df, _ = predict(loaded.detector, dataset, batch_size=32, num_workers=0, device="cpu", progress=False)
    scored = df[df["ok"]]
    summary["image_level"] = binary_metrics(scored["label"], scored["prob"], loaded.threshold)
    (out / "blended_test_localization.json").write_text(json.dumps(summary, indent=2))
    print(render_localization_markdown(summary))
    il = summary["image_level"]
    print(f"image level, blended vs clean test reals: AUC {il['auc']:.4f}, acc {il['acc']:.4f} "
          f"({il['n_fake']} blended, {il['n_real']} clean)\n")
    return summary


def side_by_side(light: dict, sbi: dict) -> str:
    lines = ["| group | n | acc light | acc sbi | AUC light | AUC sbi |", "|---|---|---|---|---|---|"]

    def row(name, a, b):
        f = lambda m, k: "n/a" if m is None or m.get(k) is None or m[k] != m[k] else f"{m[k]:.4f}"  # noqa: E731
        lines.append(f"| {name} | {a.get('n', '')} | {f(a, 'acc')} | {f(b, 'acc')} | {f(a, 'auc')} | {f(b, 'auc')} |")

    row("overall", light["overall"], sbi["overall"])
    for key, title in (("by_source", "source"), ("by_generator", "generator")):
        for name in sorted(set(light[key]) | set(sbi[key])):
            row(f"{title}: {name}", light[key].get(name, {}), sbi[key].get(name, {}))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/seg_sbi_faces_dev"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--faces", default="none", help="face stage for landmark hulls: none (random blobs) | mesh")
    parser.add_argument("--only", choices=("seg", "cnnspot"), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny synthetic run: checks the plumbing only")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every train.py run")
    args = parser.parse_args()
    out = Path(args.out).resolve() / ("quick" if args.quick else "")
    base = recipe(args) + list(args.overrides)

    if args.only in (None, "seg"):
        seg_dir = out / "seg_sbi"
        run(["train.py", *base, "detector=seg", "augment=sbi", f"hydra.run.dir={seg_dir}"])
        print("\n# (a) seg + self-blended reals: held-out blended test reals\n")
        blended_test_split(seg_dir, args)

    if args.only in (None, "cnnspot"):
        reports = {}
        for aug in ("light", "sbi"):
            run_dir = out / f"cnnspot_{aug}"
            run(["train.py", *base, "detector=cnnspot", f"augment={aug}", f"hydra.run.dir={run_dir}"])
            reports[aug] = json.loads((run_dir / "test" / "metrics.json").read_text())
        print(f"\n# (b) CNNSpot, augment=light vs augment=sbi ({'quick' if args.quick else f'{args.epochs} epochs'}): test split\n")
        print(side_by_side(reports["light"], reports["sbi"]))


if __name__ == "__main__":
    main()
