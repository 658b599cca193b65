"""Leave-one-generator-out (LOGO) generalization and the spec's D_g.

For each held-out generator g, a detector is trained with g's fakes removed from train
and val (``data.train_generators`` = every other generator; reals are always kept) and
is tested on the test split's reals plus g's fakes. The baseline is a detector trained
the same way on every generator, scored on the same images:

    D_g = |Acc' - Acc_base'| / Acc_base'

Acc' is the held-out model's accuracy, Acc_base' the all-generator model's, each at its
own validation-chosen threshold. The test set is all test reals plus g's fakes, so
accuracy is dominated by the reals when g has few fakes: read ``fake_acc`` (held-out
fakes caught) and AUC beside it.

    python -m unmask.robustness.generalization --out DIR --generators stylegan2 generated_photos sd deepfake \
        -- data=faces_dev trainer.max_epochs=3 ...       (overrides for every train.py run)

Every model is scored by the scorer with the ``scoring`` config those overrides compose (the
face stage of each checkpoint included).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data.io import atomic_write_json, atomic_write_text
from unmask.core.checkpoint import load_detector
from unmask.core.config import PROJECT_ROOT
from unmask.core.metrics import binary_metrics
from unmask.core.schemas import ScoringConfig, options
from unmask.reports.safe import frame_csv
from unmask.reports.tables import fmt, markdown_table
from unmask.robustness.grid import generalization_rate
from unmask.scoring.scorer import Scorer

log = logging.getLogger(__name__)

LOGO_COLUMNS = ("generator", "n_real", "n_fake", "acc_base", "acc_heldout", "d_g", "fake_acc_base", "fake_acc_heldout", "auc_base", "auc_heldout")


def _score(ckpt: str | Path, records, scoring: ScoringConfig) -> tuple[pd.DataFrame, float]:
    loaded = load_detector(ckpt)
    return Scorer(loaded, scoring).score(records, progress=False).usable(), loaded.threshold


def logo_table(base_ckpt: str | Path, heldout: dict[str, str | Path], test_records, scoring: ScoringConfig | None = None) -> pd.DataFrame:
    """One row per held-out generator: both models on that generator's fakes + all reals."""
    scoring = scoring or ScoringConfig()
    base_df, base_thr = _score(base_ckpt, test_records, scoring)
    rows = []
    for gen, ckpt in heldout.items():
        keep = [r for r in test_records if r.label == 0 or r.generator == gen]
        if not any(r.label == 1 for r in keep):
            raise ValueError(f"no test fakes of generator {gen!r}; generators here: {sorted({r.generator for r in test_records if r.label == 1})}")
        paths = {r.path for r in keep}
        b = base_df[base_df["path"].isin(paths)]
        h, h_thr = _score(ckpt, keep, scoring)
        mb = binary_metrics(b["label"], b["prob"], base_thr)
        mh = binary_metrics(h["label"], h["prob"], h_thr)
        rows.append(
            {
                "generator": gen,
                "n_real": mh["n_real"],
                "n_fake": mh["n_fake"],
                "acc_base": mb["acc"],
                "acc_heldout": mh["acc"],
                "d_g": generalization_rate(mh["acc"], mb["acc"]),
                "fake_acc_base": mb["fake_acc"],
                "fake_acc_heldout": mh["fake_acc"],
                "auc_base": mb["auc"],
                "auc_heldout": mh["auc"],
                "balanced_acc_base": mb["balanced_acc"],
                "balanced_acc_heldout": mh["balanced_acc"],
            }
        )
    return pd.DataFrame(rows)


def render_logo_markdown(table: pd.DataFrame) -> str:
    cols = list(LOGO_COLUMNS)
    lines = [
        "## Leave-one-generator-out",
        "",
        "Each row: a model trained without that generator (`heldout`) and one trained on all generators "
        "(`base`), both on the test reals plus that generator's test fakes, each at its own validation threshold. "
        "`d_g` = |Acc' - Acc_base'| / Acc_base'.",
        "",
        markdown_table(cols, ([r[c] for c in cols] for _, r in table.iterrows())),
    ]
    lines += ["", f"Mean D_g: {fmt(float(table['d_g'].mean()))}", ""]
    return "\n".join(lines)


def _train(run_dir: Path, overrides: Sequence[str]) -> Path:
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if ckpt.is_file():
        log.info("reusing %s", ckpt)
        return ckpt
    cmd = [sys.executable, "train.py", *overrides, "test=false", f"hydra.run.dir={run_dir}"]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True)
    if not ckpt.is_file():
        raise RuntimeError(f"training wrote no {ckpt}")
    return ckpt


def run_logo(out: str | Path, generators: Sequence[str], overrides: Sequence[str], heldout: Sequence[str] | None = None) -> pd.DataFrame:
    """Train the base model and one model per held-out generator (reusing finished runs),
    then score them and write logo.md / logo.csv / logo.json into ``out``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from unmask.core.config import CONFIG_DIR

    out = Path(out).resolve()
    generators = list(generators)
    heldout = list(heldout or generators)
    seconds = {}
    start = time.perf_counter()
    base = _train(out / "base", list(overrides))
    seconds["base"] = time.perf_counter() - start
    ckpts = {}
    for g in heldout:
        if g not in generators:
            raise ValueError(f"held-out generator {g!r} is not among --generators {generators}")
        rest = [x for x in generators if x != g]
        start = time.perf_counter()
        ckpts[g] = _train(out / f"without_{g}", [*overrides, f"data.train_generators=[{','.join(rest)}]"])
        seconds[g] = time.perf_counter() - start
    # The test split as the base run's data config defines it, without any size limit.
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [*overrides, "data.limit_per_split=null", f"paths.output_dir={out}"])
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    table = logo_table(base, ckpts, datamodule.records["test"], options(cfg.scoring))
    atomic_write_text(out / "logo.csv", frame_csv(table))
    atomic_write_json(out / "logo.json", {"overrides": list(overrides), "train_seconds": seconds, "rows": table.to_dict(orient="records")})
    atomic_write_text(out / "logo.md", render_logo_markdown(table))
    print(render_logo_markdown(table))
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs and logo.md")
    parser.add_argument("--generators", nargs="+", required=True, help="every fake generator of the data set")
    parser.add_argument("--heldout", nargs="*", default=None, help="generators to hold out (default: all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every train.py run (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_logo(args.out, args.generators, args.overrides, args.heldout)


if __name__ == "__main__":
    main()
