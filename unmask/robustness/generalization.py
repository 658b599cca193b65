"""Leave-one-generator-out (LOGO) generalization and the spec's D_g.

For each held-out generator g, a detector is trained with g's fakes removed from train
and val (``data.train_generators`` = every other generator; reals are always kept). Two
figures are reported per g, both ``|Acc' - Acc_base'| / Acc_base'``:

- ``d_g_spec``, the spec's D_g (T/ZFIDA 0003-2024, 7.2.4): *one* service, its accuracy
  before and after its test data switch to a new attack. The held-out model's accuracy on
  the test reals plus the fakes of the generators it was trained on (``acc_seen``,
  Acc_base') against its accuracy on the test reals plus g's fakes (``acc_heldout``, Acc').
- ``d_g_two_model``, this project's earlier figure: two models on the same images (the
  test reals plus g's fakes), the held-out model (``acc_heldout``, Acc') against one
  trained the same way on every generator (``acc_base``, Acc_base').

Each model is scored at its own validation-chosen threshold. The reals are in every test
set, so accuracy is dominated by them when g has few fakes: read ``fake_acc_*`` (fakes
caught) and AUC beside it.

    python -m unmask.robustness.generalization --out DIR --generators stylegan2 generated_photos sd deepfake \
        -- data=faces_dev trainer.max_epochs=3 ...       (overrides for every train.py run)

Every model is scored by the scorer with the ``scoring`` config those overrides compose (the
face stage of each checkpoint included).
"""
from __future__ import annotations

import argparse
import logging
import math
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

LOGO_COLUMNS = (
    "generator", "n_real", "n_fake", "n_fake_seen", "acc_seen", "acc_heldout", "d_g_spec", "acc_base", "d_g_two_model",
    "fake_acc_seen", "fake_acc_heldout", "fake_acc_base", "auc_seen", "auc_heldout", "auc_base",
)  # fmt: skip
# What each column is: written into logo.json and, for the two D_g, into logo.md.
LOGO_QUANTITIES = {
    "generator": "the held-out generator g",
    "n_real": "test reals (in every test set below)",
    "n_fake": "test fakes of g",
    "n_fake_seen": "test fakes of the generators the held-out model was trained on",
    "acc_seen": "held-out model, test reals + seen generators' fakes (the spec's Acc_base')",
    "acc_heldout": "held-out model, test reals + g's fakes (Acc' in both D_g)",
    "d_g_spec": "the spec's D_g (T/ZFIDA 0003-2024, 7.2.4): |acc_heldout - acc_seen| / acc_seen, one model before and after its test data switch to g",
    "acc_base": "all-generator model, test reals + g's fakes (the two-model Acc_base')",
    "d_g_two_model": "two-model comparison (this project's earlier D_g): |acc_heldout - acc_base| / acc_base, on the same images",
    "fake_acc_seen": "held-out model: share of the seen generators' fakes caught",
    "fake_acc_heldout": "held-out model: share of g's fakes caught",
    "fake_acc_base": "all-generator model: share of g's fakes caught",
    "auc_seen": "held-out model's AUC, test reals + seen generators' fakes",
    "auc_heldout": "held-out model's AUC, test reals + g's fakes",
    "auc_base": "all-generator model's AUC, test reals + g's fakes",
    "balanced_acc_seen": "held-out model, balanced accuracy on test reals + seen fakes",
    "balanced_acc_heldout": "held-out model, balanced accuracy on test reals + g's fakes",
    "balanced_acc_base": "all-generator model, balanced accuracy on test reals + g's fakes",
}


def _score(ckpt: str | Path, records, scoring: ScoringConfig) -> tuple[pd.DataFrame, float]:
    loaded = load_detector(ckpt)
    return Scorer(loaded, scoring).score(records, progress=False).usable(), loaded.threshold


def logo_table(
    base_ckpt: str | Path,
    heldout: dict[str, str | Path],
    test_records,
    scoring: ScoringConfig | None = None,
    generators: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per held-out generator g (columns: ``LOGO_QUANTITIES``). The held-out model is
    scored on the whole test split: its reals plus g's fakes, and its reals plus the fakes of
    the generators it saw (``generators`` minus g; default: every other test generator).
    The base model is scored on the reals plus g's fakes. ``d_g_spec`` is NaN when no
    seen generator has test fakes."""
    scoring = scoring or ScoringConfig()
    test_gens = sorted({r.generator for r in test_records if r.label == 1})
    base_df, base_thr = _score(base_ckpt, test_records, scoring)
    rows = []
    for gen, ckpt in heldout.items():
        if gen not in test_gens:
            raise ValueError(f"no test fakes of generator {gen!r}; generators here: {test_gens}")
        seen = [g for g in (generators or test_gens) if g != gen]
        h_df, h_thr = _score(ckpt, test_records, scoring)
        mh = _metrics(h_df, [gen], h_thr)
        ms = _metrics(h_df, seen, h_thr)
        mb = _metrics(base_df, [gen], base_thr)
        rows.append(
            {
                "generator": gen,
                "n_real": mh["n_real"],
                "n_fake": mh["n_fake"],
                "n_fake_seen": ms["n_fake"],
                "acc_seen": ms["acc"],
                "acc_heldout": mh["acc"],
                "d_g_spec": generalization_rate(mh["acc"], ms["acc"]) if ms["n_fake"] else math.nan,  # no seen fakes: no "before"
                "acc_base": mb["acc"],
                "d_g_two_model": generalization_rate(mh["acc"], mb["acc"]),
                "fake_acc_seen": ms["fake_acc"],
                "fake_acc_heldout": mh["fake_acc"],
                "fake_acc_base": mb["fake_acc"],
                "auc_seen": ms["auc"],
                "auc_heldout": mh["auc"],
                "auc_base": mb["auc"],
                "balanced_acc_seen": ms["balanced_acc"],
                "balanced_acc_heldout": mh["balanced_acc"],
                "balanced_acc_base": mb["balanced_acc"],
            }
        )
    return pd.DataFrame(rows)


def _metrics(scores: pd.DataFrame, fakes_of: Sequence[str], threshold: float) -> dict:
    """Metrics on every real of ``scores`` plus the fakes of the generators ``fakes_of``."""
    rows = scores[(scores["label"] == 0) | ((scores["label"] == 1) & scores["generator"].isin(list(fakes_of)))]
    return binary_metrics(rows["label"], rows["prob"], threshold)


def render_logo_markdown(table: pd.DataFrame) -> str:
    cols = list(LOGO_COLUMNS)
    lines = [
        "## Leave-one-generator-out",
        "",
        "Each row: a model trained without generator g (`heldout` model) and one trained on all generators "
        "(`base` model), each at its own validation threshold; every test set holds all test reals.",
        "",
        f"- `d_g_spec`: {LOGO_QUANTITIES['d_g_spec']}; `acc_seen`: {LOGO_QUANTITIES['acc_seen']}.",
        f"- `d_g_two_model`: {LOGO_QUANTITIES['d_g_two_model']}; `acc_base`: {LOGO_QUANTITIES['acc_base']}.",
        "",
        markdown_table(cols, ([r[c] for c in cols] for _, r in table.iterrows())),
    ]
    lines += ["", f"Mean D_g (spec): {fmt(float(table['d_g_spec'].mean()))}; mean D_g (two-model): {fmt(float(table['d_g_two_model'].mean()))}", ""]
    return "\n".join(lines)


def write_logo(out: str | Path, table: pd.DataFrame, overrides: Sequence[str], train_seconds: dict) -> None:
    """logo.csv, logo.json (the rows, what each column is, the overrides and training times)
    and logo.md into ``out``."""
    out = Path(out)
    atomic_write_text(out / "logo.csv", frame_csv(table))
    columns = {c: LOGO_QUANTITIES.get(c, "") for c in table.columns}
    blob = {"overrides": list(overrides), "train_seconds": train_seconds, "columns": columns, "rows": table.to_dict(orient="records")}
    atomic_write_json(out / "logo.json", blob)
    atomic_write_text(out / "logo.md", render_logo_markdown(table))


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
    table = logo_table(base, ckpts, datamodule.records["test"], options(cfg.scoring), generators)
    write_logo(out, table, overrides, seconds)
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
