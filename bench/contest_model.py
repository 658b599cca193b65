"""The contest recipe (``experiment=contest``) and the shipped default model against the
targets of issue 15: real photos of every source pass, unseen generators are caught, the
in-distribution figures hold, training fits 30 minutes on 2 CPU cores.

    python bench/contest_model.py [--out bench/results/contest_model] [--stages train logo ship summary]
                                  [--generators stylegan2 generated_photos sd deepfake] [--heldout G ...]
                                  [-- overrides]

Stages (a finished stage is reused; overrides go to every train.py run):

- ``train``: ``python train.py experiment=contest hydra.run.dir=OUT/train``; its test pass
  (the checkpoint selected on validation, the threshold chosen on validation) writes
  ``OUT/train/test/metrics.json``.
- ``logo``: leave one generator out (``unmask.robustness.generalization``) with the same
  recipe; the ``train`` run is its all-generator base model (``OUT/logo/base`` links to it).
- ``ship``: the fp16, portable slim file of the selected checkpoint (``python -m unmask.slim
  --fp16 --portable``) as ``OUT/model.safetensors``, its size and SHA-256, its score of
  scikit-image's astronaut (a real NASA portrait no training set of ours contains), and the
  format probe (``format_probe``: PNG test reals scored as PNG and re-saved as JPEG).
- ``summary``: every target with its figure; ``OUT/summary.json``.

Training minutes are the run's own: from its provenance stamp to its last checkpoint.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from bench.common import ROOT  # noqa: E402
from unmask.reports.tables import markdown_table  # noqa: E402

GENERATORS = ["stylegan2", "generated_photos", "sd", "deepfake"]
TARGETS = {"real_pass": 0.95, "logo_acc": 0.90, "d_g": 0.05, "auc": 0.99, "acc": 0.97, "train_minutes": 30.0, "images_per_second": 100.0, "mb": 10.0}


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def train(out: Path, overrides: list[str]) -> Path:
    ckpt = out / "train" / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        run([sys.executable, "train.py", "experiment=contest", f"hydra.run.dir={out / 'train'}", *overrides])
    return ckpt


def training_minutes(run_dir: Path) -> float:
    """Wall minutes of a train.py run: its provenance stamp to its newest checkpoint."""
    started = dt.datetime.fromisoformat(json.loads((run_dir / "provenance.json").read_text())["created"])
    last = max(p.stat().st_mtime for p in (run_dir / "checkpoints").glob("*.ckpt"))
    return (last - started.timestamp()) / 60


def logo(out: Path, generators: list[str], overrides: list[str], heldout: list[str] | None = None) -> pd.DataFrame:
    """The LOGO table for ``heldout`` (default: every generator); finished folds are reused."""
    table = out / "logo" / "logo.csv"
    heldout = heldout or generators
    if not table.is_file() or set(heldout) - set(pd.read_csv(table)["generator"]):
        (out / "logo").mkdir(parents=True, exist_ok=True)
        base = out / "logo" / "base"
        if not base.exists():
            base.symlink_to(out / "train", target_is_directory=True)
        run([sys.executable, "-m", "unmask.robustness.generalization", "--out", str(out / "logo"), "--generators", *generators,
             "--heldout", *heldout, "--", "experiment=contest", *overrides])  # fmt: skip
    return pd.read_csv(table)


def ship(out: Path) -> dict:
    import numpy as np
    from PIL import Image
    from skimage import data as skimage_data

    from data.io import file_digest
    from data.records import UNLABELLED, Record
    from unmask.core.checkpoint import load_detector
    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.scorer import Scorer

    model = out / "model.safetensors"
    if not model.is_file():
        run([sys.executable, "-m", "unmask.slim", str(out / "train" / "checkpoints" / "best.ckpt"), str(model), "--fp16", "--portable"])
    photo = out / "astronaut.jpg"
    Image.fromarray(np.ascontiguousarray(skimage_data.astronaut())).save(photo, quality=90)
    loaded = load_detector(model)
    scores = Scorer(loaded, ScoringConfig(runtime="torch")).score([Record(str(photo), UNLABELLED, source="skimage")], progress=False)
    prob = float(scores.files["prob"].iloc[0])  # unlabelled: usable() would drop it
    return {"file": str(model), "mb": model.stat().st_size / 1e6, "sha256": file_digest(model, "sha256"), "threshold": loaded.threshold,
            "astronaut_prob": prob, "astronaut_label": int(prob >= loaded.threshold),
            "format_probe": format_probe(model, out / "format_probe")}  # fmt: skip


def format_probe(ckpt: Path, folder: Path, n: int = 150, quality: int = 75) -> dict:
    """The JPEG-format shortcut, probed: faces-dev's first ``n`` PNG test reals (FFHQ
    thumbnails), scored as they are and re-saved as JPEG at ``quality`` (the StyleGAN2 fakes'
    quantisation is libjpeg's quality 75). A model that learned "JPEG blocks mean fake" calls
    the re-saved copies AI-generated; the pass rates should be equal."""
    from PIL import Image

    from data.records import Record
    from unmask.core.checkpoint import load_detector
    from unmask.core.config import shared_dir
    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.scorer import Scorer

    shared = shared_dir() / "faces-dev"
    manifest = pd.read_csv(shared / "MANIFEST.csv")
    pngs = manifest[(manifest["split"] == "test") & (manifest["label"] == "real") & (manifest["format"].str.upper() == "PNG")].head(n)
    records = {"png": [], "jpeg": []}
    for i, rel in enumerate(pngs["relpath"]):
        dst = folder / f"{i:04d}.jpg"
        if not dst.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            Image.open(shared / rel).convert("RGB").save(dst, quality=quality)
        records["png"].append(Record(str(shared / rel), 0, source="png"))
        records["jpeg"].append(Record(str(dst), 0, source="jpeg"))
    loaded = load_detector(ckpt)
    passed = {}
    for kind, recs in records.items():
        probs = Scorer(loaded, ScoringConfig(runtime="torch", progress=False)).score(recs, progress=False).usable()["prob"]
        passed[kind] = float((probs < loaded.threshold).mean())
    return {"n": len(pngs), "quality": quality, "pass_png": passed["png"], "pass_jpeg": passed["jpeg"]}


def summary(out: Path, logo_table: pd.DataFrame | None, shipped: dict | None) -> dict:
    test = json.loads((out / "train" / "test" / "metrics.json").read_text())
    reals = {s: m for s, m in test["by_source"].items() if m["n"] > m.get("n_fake", 0)}  # every source with reals
    fakes = {g: m for g, m in test["by_generator"].items() if g != "real"}
    rows = []

    def target(name: str, value: float, goal: float, higher: bool = True) -> None:
        met = value >= goal if higher else value <= goal
        rows.append({"target": name, "value": round(value, 4), "goal": ("≥ " if higher else "≤ ") + str(goal), "met": bool(met)})

    for source, m in sorted(reals.items()):
        target(f"real pass, {source} (n={m['n'] - m.get('n_fake', 0)})", m["real_acc"], TARGETS["real_pass"])
    for gen, m in sorted(fakes.items()):
        rows.append({"target": f"fakes caught, {gen} (n={m['n_fake']}; in distribution)", "value": round(m["fake_acc"], 4), "goal": "", "met": None})
    if logo_table is not None:
        for _, r in logo_table.iterrows():
            target(f"held out {r['generator']}: acc on its fakes + all test reals", r["acc_heldout"], TARGETS["logo_acc"])
            target(f"held out {r['generator']}: spec D_g", r["d_g_spec"], TARGETS["d_g"], higher=False)
            rows.append({"target": f"held out {r['generator']}: its fakes caught / AUC", "value": f"{r['fake_acc_heldout']:.4f} / {r['auc_heldout']:.4f}", "goal": "", "met": None})
    target("in-distribution test AUC", test["overall"]["auc"], TARGETS["auc"])
    target("in-distribution test accuracy", test["overall"]["acc"], TARGETS["acc"])
    target("training minutes (2 CPU cores)", training_minutes(out / "train"), TARGETS["train_minutes"], higher=False)
    target("test split scored, images/s (decode to score, evaluate's scorer)", test["images_per_second"], TARGETS["images_per_second"])
    if shipped:
        target("shipped file, MB", shipped["mb"], TARGETS["mb"], higher=False)
        rows.append({"target": "astronaut (real) probability / label", "value": f"{shipped['astronaut_prob']:.4f} / {shipped['astronaut_label']}",
                     "goal": "label 0", "met": shipped["astronaut_label"] == 0})  # fmt: skip
        probe = shipped["format_probe"]
        rows.append({"target": f"format probe: {probe['n']} PNG test reals pass as PNG / re-saved as JPEG q{probe['quality']}",
                     "value": f"{probe['pass_png']:.4f} / {probe['pass_jpeg']:.4f}", "goal": "equal", "met": None})  # fmt: skip
    blob = {"threshold": test["threshold"], "targets": rows, "shipped": shipped}
    (out / "summary.json").write_text(json.dumps(blob, indent=2, default=str))
    print(f"threshold {test['threshold']:.4f} ({test.get('threshold_from', '')})")
    cols = ["target", "value", "goal", "met"]
    print(markdown_table(cols, ([r[c] for c in cols] for r in rows)))
    return blob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "contest_model"))
    parser.add_argument("--stages", nargs="+", default=["train", "logo", "ship", "summary"], choices=["train", "logo", "ship", "summary"])
    parser.add_argument("--generators", nargs="+", default=GENERATORS)
    parser.add_argument("--heldout", nargs="+", default=None, help="generators to hold out in turn (default: all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every train.py run (after --)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    logo_table = shipped = None
    if "train" in args.stages:
        train(out, args.overrides)
    if "logo" in args.stages:
        logo_table = logo(out, args.generators, args.overrides, args.heldout)
    elif (out / "logo" / "logo.csv").is_file():
        logo_table = pd.read_csv(out / "logo" / "logo.csv")
    if "ship" in args.stages:
        shipped = ship(out)
    if "summary" in args.stages:
        summary(out, logo_table, shipped)


if __name__ == "__main__":
    main()
