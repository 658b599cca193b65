"""Robustness benchmark (issue 4) on faces-dev, sized for a shared 2-core CPU:

1. ``pretrain``: the OSN noise simulator g (U-Net at base width 8) on synthetic-platform
   pairs of faces-dev training images (``pretrain_osn.py``);
2. ``logo``: leave-one-generator-out with the reduced cnnspot recipe: one model on all
   generators (``logo/base``, also the reduced "without OSN" model) and one per held-out
   generator, then D_g per generator (``python -m unmask.robustness.generalization``);
3. ``osn``: the same reduced recipe with OSN-robust training (``experiment=osn_robust``: the
   ``osn=robust`` wrapper around cnnspot, with the simulator of stage 1);
4. ``grid``: the spec's perturbation grid (``perturb=spec``) on a class-balanced subset of
   the test split for the lead's full cnnspot checkpoint, the reduced plain model and the
   reduced OSN model;
5. ``summary``: D_r side by side, the D_g table, and robustness_curves.png.

    python bench/robustness_faces_dev.py [--out bench/results/robustness_faces_dev]
        [--stages pretrain logo osn grid summary] [--plain-ckpt PATH] [--subset 200] [--pgd-steps 3]

Finished stages are reused (delete a folder to redo it). The reduced recipe is
``REDUCED`` below; every command is printed before it runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, run  # noqa: E402

GENERATORS = ["stylegan2", "generated_photos", "sd", "deepfake"]
# The reduced recipe shared by the LOGO models and the OSN model (CPU budget): the spine's
# cnnspot_faces_dev recipe at 96 px on a class-balanced 600 images per split, 2 epochs.
REDUCED = [
    "data.image_size=96",
    "data.limit_per_split=600",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
]
SIMULATOR_WIDTH = 8  # U-Net base channels (the paper's 64 is ~60x the compute)


def stage_pretrain(out: Path) -> Path:
    weights = out / "simulator" / "simulator.pt"
    if not weights.is_file():
        run(["pretrain_osn.py", "data=faces_dev", "data.image_size=96", f"simulator.base_channels={SIMULATOR_WIDTH}",
             "steps=60", "batch_size=16", "limit_val=64", f"hydra.run.dir={out / 'simulator'}"])
    return weights


def stage_logo(out: Path) -> None:
    if not (out / "logo" / "logo.md").is_file():
        run(["-m", "unmask.robustness.generalization", "--out", str(out / "logo"), "--generators", *GENERATORS, "--",
             "experiment=cnnspot_faces_dev", *REDUCED])


def stage_osn(out: Path, weights: Path) -> None:
    if not (out / "osn" / "checkpoints" / "best.ckpt").is_file():
        run(["train.py", "experiment=osn_robust", *REDUCED, f"osn.simulator.base_channels={SIMULATOR_WIDTH}",
             f"osn.simulator.weights={weights}", "test=false", f"hydra.run.dir={out / 'osn'}"])


def models(out: Path, plain_ckpt: Path) -> dict[str, Path]:
    return {
        "plain_full": plain_ckpt,
        "plain_reduced": out / "logo" / "base" / "checkpoints" / "best.ckpt",
        "osn_reduced": out / "osn" / "checkpoints" / "best.ckpt",
    }


def stage_grid(out: Path, plain_ckpt: Path, subset: int, pgd_steps: int, only: list[str] | None = None) -> None:
    for name, ckpt in models(out, plain_ckpt).items():
        if (only and name not in only) or (out / "grid" / name / "robustness.csv").is_file():
            continue
        if not ckpt.is_file():
            print(f"skipping {name}: no checkpoint at {ckpt}")
            continue
        run(["evaluate.py", f"ckpt={ckpt}", "data=faces_dev", "split=test", "perturb=spec", f"perturb.subset={subset}",
             f"perturb.families.pgd.make.steps={pgd_steps}", f"hydra.run.dir={out / 'grid' / name}"])


def stage_summary(out: Path, plain_ckpt: Path) -> None:
    import pandas as pd

    from data.io import atomic_write_text
    from unmask.reports.plots import plot_robustness_curves
    from unmask.reports.tables import markdown_table

    tables = {n: pd.read_csv(out / "grid" / n / "robustness.csv") for n in models(out, plain_ckpt) if (out / "grid" / n / "robustness.csv").is_file()}
    lines = ["# Robustness on faces-dev (test subset)", ""]
    if tables:
        first = next(iter(tables.values()))
        cols = ["family", "severity"] + [f"{m} {n}" for n in tables for m in ("acc", "auc", "d_r")]
        lines.append(markdown_table(cols, (
            [r["family"], f"{r['severity']:g}", *(t.loc[i, m] for t in tables.values() for m in ("acc", "auc", "d_r"))]
            for i, r in first.iterrows()
        )))
        summary = []
        for n, t in tables.items():
            p = t[t["family"] != "clean"]
            na = p[~p["family"].isin(["fgsm", "pgd"])]
            summary.append([n, int(t.loc[0, "n"]), t.loc[0, "acc"], t.loc[0, "auc"], p["d_r"].mean(), na["d_r"].mean(), p["d_r"].max()])
        lines += ["", markdown_table(
            ["model", "images", "clean acc", "clean auc", "mean D_r (all cells)", "mean D_r (no attacks)", "max D_r"], summary
        )]
        plot_robustness_curves(tables, out / "robustness_curves.png")
    logo = out / "logo" / "logo.md"
    if logo.is_file():
        lines += ["", logo.read_text()]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/robustness_faces_dev"))
    parser.add_argument("--stages", nargs="+", default=["pretrain", "logo", "osn", "grid", "summary"])
    parser.add_argument("--plain-ckpt", default=str(ROOT / "bench/results/cnnspot_faces_dev/checkpoints/best.ckpt"))
    parser.add_argument("--subset", type=int, default=200, help="test images for the grid (class-balanced)")
    parser.add_argument("--pgd-steps", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=None, help="grid only these (plain_full plain_reduced osn_reduced)")
    args = parser.parse_args()
    out, plain = Path(args.out).resolve(), Path(args.plain_ckpt).resolve()
    weights = out / "simulator" / "simulator.pt"
    if "pretrain" in args.stages:
        weights = stage_pretrain(out)
    if "logo" in args.stages:
        stage_logo(out)
    if "osn" in args.stages:
        stage_osn(out, weights)
    if "grid" in args.stages:
        stage_grid(out, plain, args.subset, args.pgd_steps, args.models)
    if "summary" in args.stages:
        stage_summary(out, plain)


if __name__ == "__main__":
    main()
