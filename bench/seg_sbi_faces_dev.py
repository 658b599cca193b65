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
from unmask.reports.tables import fmt, markdown_table  # noqa: E402

QUICK = [  # data=synthetic, tiny and random init: proves the plumbing, not accuracy
    "data=synthetic", "data.source.n_per_class=24", "data.source.size=32", "data.image_size=32",
    "data.num_workers=0", "scoring.num_workers=0", "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
    "++trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "logger=none", "detector.pretrained=none",
]


def recipe(args) -> list[str]:
    if args.quick:
        return QUICK
    return ["experiment=cnnspot_faces_dev", f"trainer.max_epochs={args.epochs}", f"faces={args.faces}"]


def blended_test_split(out: Path, args) -> dict:
    """(a)'s held-out split: test reals, SelfBlend p=0.5 with the data set's fixed seed."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from data.augment import SampleAugment
    from data.io import atomic_write_json, atomic_write_text
    from unmask.core.checkpoint import load_detector
    from unmask.core.config import CONFIG_DIR
    from unmask.core.metrics import binary_metrics
    from unmask.core.schemas import ScoringConfig
    from unmask.evaluation.localization import Localization, render_localization_markdown
    from unmask.explain.gradcam import ForgeryMaps
    from unmask.scoring.scorer import Scorer

    torch.set_num_threads(2)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # the same composition as train.py
        cfg = compose(config_name="train", overrides=recipe(args) + list(args.overrides) + ["augment=sbi", f"paths.output_dir={out}"])
    datamodule = instantiate(cfg.data, augment=None)
    datamodule.setup()
    reals = [r for r in datamodule.records["test"] if r.label == 0]
    loaded = load_detector(out / "checkpoints" / "best.ckpt")
    forgery = instantiate(cfg.augment.forgery, p=0.5)  # the training forgery settings, fixed p
    scorer = Scorer(loaded, ScoringConfig(batch_size=32, num_workers=0, device="cpu", progress=False))
    dataset = scorer.dataset(reals, augment=SampleAugment(pixels=None, forgery=forgery), seed=1234)
    # One pass: the file scores (image level) and the detector's own forgery maps (pixel level).
    localization = Localization()
    scores = scorer.score(dataset, evaluators=[localization], explainer=ForgeryMaps("own", required=False))
    summary = localization.compute(scores, loaded.threshold)
    per_image = localization.per_image.assign(mask_from=summary["mask_from"])
    atomic_write_text(out / "blended_test_localization.csv", per_image.to_csv(index=False))
    scored = scores.usable()
    summary["image_level"] = binary_metrics(scored["label"], scored["prob"], loaded.threshold)
    atomic_write_json(out / "blended_test_localization.json", summary)
    print(render_localization_markdown(summary))
    il = summary["image_level"]
    print(f"image level, blended vs clean test reals: AUC {fmt(il['auc'])}, acc {fmt(il['acc'])} "
          f"({il['n_fake']} blended, {il['n_real']} clean)\n")
    return summary


def side_by_side(light: dict, sbi: dict) -> str:
    rows = []

    def row(name, a, b):
        rows.append([name, a.get("n", ""), a.get("acc"), b.get("acc"), a.get("auc"), b.get("auc")])

    row("overall", light["overall"], sbi["overall"])
    for key, title in (("by_source", "source"), ("by_generator", "generator")):
        for name in sorted(set(light[key]) | set(sbi[key])):
            row(f"{title}: {name}", light[key].get(name, {}), sbi[key].get(name, {}))
    return markdown_table(["group", "n", "acc light", "acc sbi", "AUC light", "AUC sbi"], rows)


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
