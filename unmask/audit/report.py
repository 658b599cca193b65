"""The audit's outputs: ``audit.json`` (per-class, per-source and per-generator summaries,
attack capability, diversity and tertile balance), ``report.md`` (tables, every measure with
its clause and definition, pictures) and the pictures themselves."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from unmask.audit import attack
from unmask.audit.diversity import TERTILES, tertile_balance
from unmask.audit.measures import MEASURE_BY_COLUMN, MEASURES
from unmask.reports.plots import plot_histograms, plot_stacked_shares
from unmask.reports.tables import fmt, markdown_table

CATEGORICAL = ("resolution_class", "face_share_band", "skin_tone", "skin_tone_band", "attack_band")
CLASS_NAMES = {0: "real", 1: "fake"}


def clean(value):
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def measure_columns(table: pd.DataFrame) -> list[str]:
    """The numeric measure columns present (registry order), then the detectors' scores."""
    cols = [m.column for m in MEASURES if m.column in table and m.column not in CATEGORICAL
            and pd.to_numeric(table[m.column], errors="coerce").notna().any()]
    return cols + [c for c in table if c.startswith("score_")]


def headline_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in measure_columns(table) if c in MEASURE_BY_COLUMN and MEASURE_BY_COLUMN[c].headline]


def group_summary(table: pd.DataFrame, by: str) -> dict:
    """Per value of ``by``: file counts and mean / median / std / n of every measure, and the
    counts of every categorical column."""
    out = {}
    columns = measure_columns(table)
    for name, part in table.groupby(by, dropna=False, sort=True):
        ok = part[part["ok"].astype(bool)]
        stats = {}
        for c in columns:
            v = pd.to_numeric(ok[c], errors="coerce").dropna()
            stats[c] = {"mean": float(v.mean()) if len(v) else None, "median": float(v.median()) if len(v) else None,
                        "std": float(v.std()) if len(v) > 1 else None, "n": int(len(v))}
        counts = {c: {str(k): int(n) for k, n in ok[c][ok[c].astype(str) != ""].value_counts().sort_index().items()}
                  for c in CATEGORICAL if c in ok}
        out[str(name)] = {"n": int(len(part)), "n_ok": int(len(ok)), "measures": stats, "counts": counts,
                          "no_face": int((ok.get("n_faces", pd.Series(0, index=ok.index)).fillna(0) == 0).sum())}
    return out


def summarise(table: pd.DataFrame, info: dict, attack_summary: dict | None) -> dict:
    table = table.assign(**{"class": table["label"].map(CLASS_NAMES).fillna("unlabelled")})
    summary = {
        **info,
        "n_files": int(len(table)), "n_ok": int(table["ok"].astype(bool).sum()),
        "n_undecodable": int((~table["ok"].astype(bool)).sum()),
        "measures": {m.column: {"clause": m.clause, "title": m.title, "definition": m.definition}
                     for m in MEASURES if m.column in table},
        "by_class": group_summary(table, "class"), "by_source": group_summary(table, "source"),
        "by_generator": group_summary(table, "generator"), "attack_capability": attack_summary,
        "tertiles": {},
    }
    ok = table[table["ok"].astype(bool)]
    for column in headline_columns(table):
        balance = tertile_balance(ok, column, "generator")
        if balance is not None:
            summary["tertiles"][column] = balance
    return clean(summary)


# ---- report.md ------------------------------------------------------------------------------------
def _measure_table(table: pd.DataFrame) -> str:
    rows = [[m.clause, m.title, f"`{m.column}`", m.definition] for m in MEASURES if m.column in table]
    return markdown_table(["clause", "measure", "column", "definition"], rows)


def _means_table(summary: dict, key: str, columns: list[str]) -> str:
    groups = summary[key]
    header = ["measure", *groups]
    rows = [["files", *(g["n"] for g in groups.values())], ["decoded", *(g["n_ok"] for g in groups.values())],
            ["no face", *(g["no_face"] for g in groups.values())]]
    for c in columns:
        title = MEASURE_BY_COLUMN[c].title if c in MEASURE_BY_COLUMN else c
        rows.append([title, *(fmt(g["measures"].get(c, {}).get("mean"), 3) for g in groups.values())])
    return markdown_table(header, rows)


def _counts_table(summary: dict, key: str, column: str) -> str | None:
    groups = summary[key]
    values = sorted({v for g in groups.values() for v in g["counts"].get(column, {})})
    if not values:
        return None
    rows = [[name, *(g["counts"].get(column, {}).get(v, 0) for v in values)] for name, g in groups.items()]
    return markdown_table([key.removeprefix("by_"), *values], rows)


def _attack_section(a: dict) -> list[str]:
    lines = ["## Attack capability (7.1.5)", "",
             f"Each fake is scored by {len(a['detectors'])} detector(s): {', '.join(f'`{d}`' for d in a['detectors'])}. "
             "A fake is `above_0.8` when at least 80 % of the detectors score it above 0.8 (an easy fake), `0.3-0.7` when "
             "they agree it is uncertain, `below_0.2` when they agree it is real (a strong attack), `mixed` otherwise; "
             "the spec asks a test set for 30 % / 50 % / 20 % in the first three. Verdict: *easy* when at least half are "
             "`above_0.8`, *hard* when at least half are `below_0.2`, *on profile* within 0.15 (total variation) of "
             "30/50/20, else *off profile*.", ""]
    header = ["group", "fakes", *attack.BANDS, "verdict"]
    target = ["spec target", "", *(fmt(attack.TARGET[b], 2) for b in attack.BANDS), ""]
    for key in ("generator", "source", "split"):
        rows = [target] + [[name, p["n"], *(fmt(p[b], 3) for b in attack.BANDS), p["verdict"]] for name, p in a[f"by_{key}"].items()]
        o = a["overall"]
        rows.append(["all fakes", o["n"], *(fmt(o[b], 3) for b in attack.BANDS), o["verdict"]])
        lines += [f"By {key}:", "", markdown_table(header, rows), ""]
    lines += ["![attack capability](attack_capability.png)", ""]
    return lines


def render(table: pd.DataFrame, summary: dict) -> str:
    s = summary
    headline = headline_columns(table)
    lines = [
        "# Data-set audit (T/ZFIDA 0003-2024, section 7.1)", "",
        f"Data: {s['data']}; splits: {', '.join(s['splits'])}; {s['n_files']} files "
        f"({s['n_undecodable']} undecodable); face stage: {s['faces']}. "
        f"Measuring took {s['seconds_measures']:.1f} s ({s['measured']} measured now, {s['cached']} from the cache; "
        f"{fmt(s['seconds_per_file_measured'] * 1000 if s['seconds_per_file_measured'] is not None else None, 1)} ms per "
        f"measured file); scoring {s['seconds_scoring']:.1f} s.",
        "", "One row per file is in `audit.csv`; the summaries below (means per group) and more (medians, "
        "standard deviations, counts) are in `audit.json`. Per generator: the reals are generator `real`.", "",
        "## Measures", "", _measure_table(table), "",
    ]
    lines += [f"Identity measures (7.1.14, 7.1.17): {s['identity']}", ""]
    if not (table.get("kind", pd.Series(dtype=str)) == "video").any():
        lines += ["Video measures (7.1.16-7.1.19): no video files in this data set.", ""]
    if "mask_blending" not in table:
        lines += ["Tampered-region blending (7.1.20): no masks in this data set.", ""]
    if "ssim" not in table:
        lines += ["SSIM / PSNR (7.1.6): no `reference` column in this data set, so no-reference measures only.", ""]
    if s.get("attack_capability"):
        lines += _attack_section(s["attack_capability"])
    else:
        lines += ["## Attack capability (7.1.5)", "", "No detectors given (`audit.detectors=[ckpt,...]`): not measured.", ""]
    for key, title in (("by_class", "class"), ("by_generator", "generator"), ("by_source", "source")):
        lines += [f"## Means by {title}", "", _means_table(s, key, headline), ""]
    lines += ["## Resolution (7.1.7), face size (7.1.3) and skin tone (7.1.3)", ""]
    for column in ("resolution_class", "face_share_band", "skin_tone", "skin_tone_band"):
        for key in ("by_class", "by_generator"):
            t = _counts_table(s, key, column)
            if t:
                lines += [f"`{column}` {key.replace('_', ' ')}:", "", t, ""]
    grey = int(table.get("greyscale", pd.Series(dtype=bool)).fillna(False).astype(bool).sum())
    lines += [f"{grey} grey images have no skin tone.", ""]
    if s["tertiles"]:
        lines += ["## Balance in tertiles (7.1.4)", "",
                  "Each measure's values over all decoded files are cut at their 1/3 and 2/3 quantiles into low / middle / "
                  "high; a balanced set has its reals and fakes (and each generator) spread alike. `imbalance`: total-variation "
                  "distance between the reals' and the fakes' tertile shares (0 balanced, 1 disjoint): a large value marks a "
                  "measure that alone tells the classes apart.", ""]
        rows = []
        for column, b in sorted(s["tertiles"].items(), key=lambda kv: -(kv[1]["imbalance"] or 0)):
            real = b["shares"].get("real", {})
            fakes = {g: v for g, v in b["shares"].items() if g != "real"}
            fake = {t: np.average([v[t] for v in fakes.values()], weights=[v["n"] for v in fakes.values()]) if fakes else None
                    for t in TERTILES}
            rows.append([MEASURE_BY_COLUMN[column].title, f"{fmt(b['edges'][0], 3)} / {fmt(b['edges'][1], 3)}",
                         fmt(b["imbalance"], 3), *(fmt(real.get(t), 2) for t in TERTILES), *(fmt(fake[t], 2) for t in TERTILES)])
        lines += [markdown_table(["measure", "edges", "imbalance", "real low", "real mid", "real high", "fake low", "fake mid",
                                  "fake high"], rows), "", "![tertile balance per generator](tertiles.png)", ""]
    lines += ["## Distributions", "", "![by class](hist_by_class.png)", "", "![by generator](hist_by_generator.png)", ""]
    return "\n".join(lines)


def write_pictures(table: pd.DataFrame, summary: dict, out: Path) -> None:
    headline = headline_columns(table)
    ok = table[table["ok"].astype(bool)].assign(**{"class": table["label"].map(CLASS_NAMES).fillna("unlabelled")})
    titles = {c: f"{MEASURE_BY_COLUMN[c].title} ({MEASURE_BY_COLUMN[c].clause})" for c in headline}
    plot_histograms(ok, headline, "class", out / "hist_by_class.png", titles)
    plot_histograms(ok, headline, "generator", out / "hist_by_generator.png", titles)
    if summary["tertiles"]:
        shares = {c: b["shares"] for c, b in summary["tertiles"].items()}
        plot_stacked_shares(shares, TERTILES, out / "tertiles.png", titles)
    a = summary.get("attack_capability")
    if a:
        plot_stacked_shares({"attack capability by generator (7.1.5)": a["by_generator"]}, attack.BANDS,
                            out / "attack_capability.png", reference=a["target"])
