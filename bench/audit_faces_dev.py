"""The data-set audit of faces-dev (spec 7.1): every measure per generator and source, the
attack-capability profile per generator against 30/50/20, and the time per image.

    python bench/audit_faces_dev.py DETECTOR.ckpt [DETECTOR.ckpt ...] [--limit N] [--splits test]
        [--out bench/results/audit_faces_dev] [-- extra audit.py overrides, e.g. faces.cache_dir=...]

Runs ``python audit.py data=faces_dev audit.detectors=[...]`` into ``--out`` (an earlier
audit there is replaced), then prints from its ``audit.json`` / ``audit.csv``: the time per
image (measuring, scoring, wall), the mean of every measure per generator and per source,
the attack-capability bands per generator (all splits, and the test split alone: detectors
trained on faces-dev have seen its training fakes) and the categorical distributions.
``--limit N``: at most N files per source and class. A second run reads the audit's cache
(``.cache/audit``) and only prints.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from bench.common import ROOT, run  # noqa: E402
from unmask.reports.tables import fmt, markdown_table  # noqa: E402


def means_table(table: pd.DataFrame, by: str, columns: list[str], titles: dict) -> str:
    ok = table[table["ok"].astype(bool)]
    groups = sorted(ok[by].astype(str).unique())
    rows = [["files", *(int((table[by].astype(str) == g).sum()) for g in groups)]]
    for c in columns:
        means = ok.groupby(ok[by].astype(str))[c].mean()
        rows.append([titles.get(c, c), *(fmt(means.get(g), 3) for g in groups)])
    return markdown_table(["measure", *groups], rows)


def attack_table(groups: dict, target: dict, bands: tuple) -> str:
    rows = [["spec target", "", *(fmt(target.get(b, 0.0), 2) for b in bands), ""]]
    rows += [[name, p["n"], *(fmt(p[b], 3) for b in bands), p["verdict"]] for name, p in groups.items()]
    return markdown_table(["group", "fakes", *bands, "verdict"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("detectors", nargs="*", help="checkpoints that score the fakes")
    parser.add_argument("--limit", type=int, default=None, help="files per source and class (default: all)")
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "audit_faces_dev"))
    parser.add_argument("--no-run", action="store_true", help="only print the audit already in --out")
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []  # extra audit.py overrides after --
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    wall = None
    if not args.no_run:
        cmd = ["audit.py", "data=faces_dev", f"hydra.run.dir={out}", "audit.overwrite=true",
               f"audit.detectors=[{','.join(str(Path(d).resolve()) for d in args.detectors)}]"]
        if args.limit:
            cmd.append(f"audit.limit={args.limit}")
        if args.splits:
            cmd.append(f"audit.splits=[{args.splits}]")
        cmd += overrides
        start = time.perf_counter()
        run(cmd)
        wall = time.perf_counter() - start

    from unmask.audit import attack
    from unmask.audit.measures import MEASURE_BY_COLUMN
    from unmask.audit.report import CATEGORICAL, measure_columns

    summary = json.loads((out / "audit.json").read_text())
    table = pd.read_csv(out / "audit.csv", keep_default_na=True)
    n = summary["n_files"]
    print(f"\n# Audit of faces-dev ({n} files, splits {', '.join(summary['splits'])}, limit {summary.get('limit')})\n")
    measured = summary["measured"]
    per_image = summary["seconds_measures"] / max(measured, 1)
    print(f"- measuring: {summary['seconds_measures']:.1f} s for {measured} files measured now "
          f"({per_image * 1000:.1f} ms per image; {summary['cached']} from the cache); face stage {summary['faces']}")
    scored = summary["detector_scores"]
    print(f"- scoring: {summary['seconds_scoring']:.1f} s ({scored.get('scored', 0)} detector x fake scores computed, "
          f"{scored.get('cached', 0)} from the cache)")
    if wall is not None:
        print(f"- wall time of audit.py: {wall:.1f} s ({wall / max(n, 1) * 1000:.1f} ms per image, start-up and report included)")
    print(f"- undecodable: {summary['n_undecodable']}; without a face: "
          f"{int((table['n_faces'].fillna(0) == 0).sum()) if 'n_faces' in table else 'n/a'}")

    columns = [c for c in measure_columns(table) if c in MEASURE_BY_COLUMN or c.startswith("score_")]
    titles = {c: f"{MEASURE_BY_COLUMN[c].title} ({MEASURE_BY_COLUMN[c].clause})" if c in MEASURE_BY_COLUMN else c for c in columns}
    for by in ("generator", "source"):
        print(f"\n## Mean of every measure by {by}\n")
        print(means_table(table, by, columns, titles))
    a = summary.get("attack_capability")
    if a:
        print(f"\n## Attack capability (7.1.5) by generator, all splits; detectors: {', '.join(a['detectors'])}\n")
        print(attack_table(a["by_generator"] | {"all fakes": a["overall"]}, a["target"], attack.BANDS))
        test = table[(table["label"] == 1) & (table["split"] == "test")]
        if len(test) and "attack_band" in test:
            groups = {}
            for name, part in test.groupby("generator"):
                p = attack.profile(part["attack_band"])
                groups[name] = p | {"verdict": attack.verdict(p)}
            p = attack.profile(test["attack_band"])
            groups["all test fakes"] = p | {"verdict": attack.verdict(p)}
            print("\n## Attack capability by generator, test split only\n")
            print(attack_table(groups, a["target"], attack.BANDS))
        easy = [g for g, p in a["by_generator"].items() if p["verdict"] == "easy"]
        print(f"\nEasy generators (at least half their fakes above 0.8 for >= 80 % of the detectors): {', '.join(easy) or 'none'}")
    for column in CATEGORICAL:
        if column in table and column != "attack_band":
            counts = pd.crosstab(table["generator"], table[column].fillna(""))
            counts = counts[[c for c in counts.columns if c != ""]]
            if counts.size:
                print(f"\n## `{column}` by generator\n")
                print(markdown_table(["generator", *counts.columns], [[g, *row] for g, row in zip(counts.index, counts.values.tolist())]))
    print("\n## Tertile imbalance (7.1.4): total-variation distance of the reals' and fakes' tertile shares\n")
    rows = sorted(((titles.get(c, c), b["imbalance"]) for c, b in summary["tertiles"].items()), key=lambda r: -(r[1] or 0))
    print(markdown_table(["measure", "imbalance"], [[t, fmt(v, 3)] for t, v in rows]))
    print(f"\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    main()
