"""The audit of a set of records: measure every file (through the cache), score the fakes
with the detectors, write ``audit.csv``, ``audit.json``, ``report.md`` and the pictures."""
from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from data.io import atomic_write_json, atomic_write_text
from data.records import Record
from data.video import is_video
from unmask.audit import attack, report
from unmask.audit.cache import AuditCache, file_key, settings_key
from unmask.audit.measures import MeasureContext, measure_file, reference_path
from unmask.core.schemas import ScoringConfig
from unmask.reports.safe import frame_csv
from unmask.scoring.combine import VideoOptions

log = logging.getLogger(__name__)

BASE_COLUMNS = ("path", "label", "split", "source", "generator", "group", "kind", "ok", "error", "note")
OUTPUTS = ("audit.csv", "audit.json", "report.md")
SAVE_EVERY = 200  # files measured between two cache saves


def limit_records(records: list[Record], limit: int | None, seed: int = 0) -> list[Record]:
    """At most ``limit`` files of each (source, class), drawn at random (seeded), in the
    records' order."""
    if not limit:
        return records
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[(r.source, r.label)].append(i)
    rng = random.Random(seed)
    keep = set()
    for members in groups.values():
        keep.update(rng.sample(members, min(limit, len(members))))
    return [r for i, r in enumerate(records) if i in keep]


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier audit unless asked to (``audit.overwrite=true``)."""
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{out} already holds an audit ({', '.join(found)}); choose another audit.output_dir "
                              "or set audit.overwrite=true")


def measure_records(records: list[Record], ctx: MeasureContext, cache: AuditCache, root: Path | None,
                    progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """One row per record (the record's columns, then its measures), and counts of files
    measured now and taken from the cache."""
    rows, stats = [], {"measured": 0, "cached": 0, "seconds": 0.0}
    start = time.perf_counter()
    references = [reference_path(r, root) for r in records]
    keys = [file_key(r.path, ref, r.mask) for r, ref in zip(records, references)]
    if ctx.faces is not None:  # detect the files still to measure once, with a progress bar, into the face cache
        ctx.faces.prepare([r.path for r, k in zip(records, keys) if k not in cache and not is_video(r.path)], progress=progress)
    try:
        for r, reference, key in tqdm(list(zip(records, references, keys)), desc="audit", unit="file", disable=not progress, leave=False):
            measured = cache.get(key)
            if measured is None:
                measured = measure_file(r, ctx, reference)
                stats["measured"] += 1
                if not measured.pop("retry", False):  # an unexpected failure is tried again next run
                    cache.put(key, measured)
                if cache.dirty >= SAVE_EVERY:
                    cache.save()
            else:
                stats["cached"] += 1
            rows.append({"path": r.path, "label": r.label, "split": r.split or "", "source": r.source,
                         "generator": r.generator, "group": r.group, **measured})
    finally:
        cache.save()
    stats["seconds"] = time.perf_counter() - start
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=list(BASE_COLUMNS))
    front = [c for c in BASE_COLUMNS if c in table]
    return table[front + [c for c in table if c not in front]], stats


def audit(records: list[Record], ctx: MeasureContext, out_dir: str | Path, detectors: list[str] = (),
          scoring: ScoringConfig | None = None, video: VideoOptions | None = None, cache_dir: str | Path | None = None,
          root: Path | None = None, info: dict | None = None, progress: bool = True) -> dict:
    """Measure ``records``, score their fakes with ``detectors`` and write the outputs into
    ``out_dir``; returns audit.json's content."""
    out = Path(out_dir)
    cache = AuditCache(cache_dir, f"measures-{settings_key(ctx.settings())}")
    table, stats = measure_records(records, ctx, cache, root, progress)
    attack_summary, scoring_stats = None, {"seconds": 0.0}
    if detectors and len(table):
        scores, names, scoring_stats = attack.score_fakes(records, list(detectors), scoring or ScoringConfig(),
                                                          video or VideoOptions(), cache_dir, progress)
        table = table.join(scores[~scores.index.duplicated()], on="path")
        fake = table["label"] == 1
        score_cols = [f"score_{n}" for n in names]
        table["attack_band"] = ""
        table.loc[fake, "attack_band"] = attack.attack_band(table.loc[fake, score_cols].to_numpy())
        attack_summary = attack.summary(table, names)
    info = {
        "data": "", "splits": [], "faces": "none", "identity": "", **(info or {}),
        "measured": stats["measured"], "cached": stats["cached"], "seconds_measures": stats["seconds"],
        "seconds_scoring": scoring_stats["seconds"],
        "seconds_per_file_measured": stats["seconds"] / stats["measured"] if stats["measured"] else float("nan"),
        "detector_scores": {k: v for k, v in scoring_stats.items() if k != "seconds"},
    }
    summary = report.summarise(table, info, attack_summary)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.csv", frame_csv(table))  # formula-looking names and sources neutralised
    if len(table):
        report.write_pictures(table, summary, out)
    atomic_write_json(out / "audit.json", summary)
    text = report.render(table, summary)
    atomic_write_text(out / "report.md", text)
    log.info("audit of %d files written to %s (%d measured, %d from the cache)", len(table), out, stats["measured"], stats["cached"])
    print(f"audit of {len(table)} files ({stats['measured']} measured in {stats['seconds']:.1f} s, {stats['cached']} from the cache) "
          f"written to {out.resolve()}")
    return summary
