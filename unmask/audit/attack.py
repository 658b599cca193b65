"""Attack capability (spec 7.1.5): how hard a data set's fakes are for detectors.

Every fake is scored by each detector checkpoint through the one scorer
(``unmask.scoring.scorer.Scorer``, with the checkpoint's own preprocessing and face stage).
A fake falls in a band when at least 80 % of the detectors that scored it agree:

- ``above_0.8``: they call it AI-generated with confidence (an easy fake);
- ``0.3-0.7``: they are unsure;
- ``below_0.2``: they call it real with confidence (a strong attack);
- ``mixed``: no such agreement (or a score in 0.2-0.3 / 0.7-0.8); ``unscored``: no detector
  could score it. The shares of the five sum to 1.

The spec's profile for a test set is 30 % / 50 % / 20 % in the first three bands. A
generator is called *easy* when at least half its fakes are ``above_0.8``, *hard* when at
least half are ``below_0.2``, *on profile* when its shares are within 0.15 (total variation)
of 30/50/20, else *off profile*.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data.records import Record
from unmask.audit.cache import AuditCache, file_key, settings_key
from unmask.core.checkpoint import load_detector
from unmask.core.schemas import ScoringConfig
from unmask.scoring.combine import VideoOptions
from unmask.scoring.scorer import Scorer

log = logging.getLogger(__name__)

AGREEMENT = 0.8  # share of detectors that must agree
BANDS = ("above_0.8", "0.3-0.7", "below_0.2", "mixed", "unscored")
TARGET = {"above_0.8": 0.30, "0.3-0.7": 0.50, "below_0.2": 0.20, "mixed": 0.0, "unscored": 0.0}


def detector_names(paths: list[str]) -> list[str]:
    """A short name per checkpoint: the run folder of ``<run>/checkpoints/x.ckpt``, else the
    file's stem; repeated names get a numeric suffix."""
    names = []
    for p in paths:
        path = Path(p)
        base = path.parent.parent.name if path.parent.name == "checkpoints" and path.parent.parent.name else path.stem
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def score_fakes(records: list[Record], checkpoints: list[str], scoring: ScoringConfig, video: VideoOptions,
                cache_dir: str | Path | None, progress: bool = True) -> tuple[pd.DataFrame, list[str], dict]:
    """``score_<name>`` per detector for every fake of ``records`` (index: path), the names,
    and timings / cache counts. Scores of files already scored by the same checkpoint file
    come from the cache."""
    fakes = [r for r in records if r.label == 1]
    names = detector_names(list(checkpoints))
    table = pd.DataFrame(index=pd.Index([r.path for r in fakes], name="path"))
    stats = {"seconds": 0.0, "scored": 0, "cached": 0}
    for ckpt, name in zip(checkpoints, names):
        key = settings_key({"ckpt": file_key(ckpt), "runtime": scoring.runtime, "onnx": scoring.onnx_model})
        cache = AuditCache(cache_dir, f"scores-{key}")
        keys = {r.path: file_key(r.path) for r in fakes}
        todo = [r for r in fakes if keys[r.path] not in cache]
        if todo:
            start = time.perf_counter()
            scorer = Scorer(load_detector(ckpt), scoring, video)
            scores = scorer.score(todo, progress=progress).files
            for path, prob in zip(scores["path"], scores["prob"]):
                cache.put(keys[path], None if pd.isna(prob) else float(prob))
            cache.save()
            stats["seconds"] += time.perf_counter() - start
            log.info("detector %s scored %d fakes (%d from the cache)", name, len(todo), len(fakes) - len(todo))
        stats["scored"] += len(todo)
        stats["cached"] += len(fakes) - len(todo)
        table[f"score_{name}"] = [np.nan if cache.get(keys[r.path]) is None else cache.get(keys[r.path]) for r in fakes]
    return table, names, stats


def attack_band(scores: np.ndarray) -> list[str]:
    """The band of each row of ``scores`` (files x detectors, NaN where unscored)."""
    scores = np.asarray(scores, np.float64).reshape(len(scores), -1)
    out = []
    for row in scores:
        valid = row[np.isfinite(row)]
        if not valid.size:
            out.append("unscored")
            continue
        need = math.ceil(AGREEMENT * valid.size - 1e-9)
        if (valid > 0.8).sum() >= need:
            out.append("above_0.8")
        elif ((valid >= 0.3) & (valid <= 0.7)).sum() >= need:
            out.append("0.3-0.7")
        elif (valid < 0.2).sum() >= need:
            out.append("below_0.2")
        else:
            out.append("mixed")
    return out


def profile(bands: pd.Series) -> dict:
    """Shares of each band (they sum to 1) and the fakes counted."""
    n = int(len(bands))
    counts = bands.value_counts()
    return {**{b: float(counts.get(b, 0) / n) if n else math.nan for b in BANDS}, "n": n}


def verdict(shares: dict) -> str:
    if not shares.get("n"):
        return ""
    if shares["above_0.8"] >= 0.5:
        return "easy"
    if shares["below_0.2"] >= 0.5:
        return "hard"
    distance = 0.5 * sum(abs(shares[b] - TARGET[b]) for b in BANDS)
    return "on profile" if distance <= 0.15 else "off profile"


def summary(table: pd.DataFrame, names: list[str]) -> dict:
    """The profile overall, per generator, per source and per split (fakes only)."""
    fakes = table[table["label"] == 1]
    out = {"detectors": names, "agreement": AGREEMENT, "target": {b: TARGET[b] for b in BANDS[:3]}}
    out["overall"] = profile(fakes["attack_band"]) | {"verdict": verdict(profile(fakes["attack_band"]))}
    for key in ("generator", "source", "split"):
        groups = {}
        for name, part in fakes.groupby(key, dropna=False):
            p = profile(part["attack_band"])
            groups[str(name)] = p | {"verdict": verdict(p)}
        out[f"by_{key}"] = groups
    return out
