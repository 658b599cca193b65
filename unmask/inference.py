"""infer.py's job: score every file of a folder and write the contest file."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from data.dataset import ImageDataset
from data.records import UnlabelledFolderSource
from unmask.checkpoint import load_detector
from unmask.export import contest_filename, decide, write_contest_csv
from unmask.io import atomic_write_text
from unmask.predict import predict

log = logging.getLogger(__name__)


def run_inference(cfg: DictConfig) -> Path:
    started = dt.datetime.now()
    if cfg.fallback_label not in (0, 1):
        raise ValueError(f"fallback_label must be 0 or 1, got {cfg.fallback_label!r}")
    loaded = load_detector(cfg.ckpt)
    root = Path(cfg.input)
    records = UnlabelledFolderSource(str(root)).records()
    out_dir = Path(cfg.output_dir)
    out_path = out_dir / contest_filename(started)
    if not records:
        log.warning("input folder %s holds no files: writing an empty result", root)
        return write_contest_csv(out_path, [], [])

    dataset = ImageDataset(records, loaded.canonical, train=False)
    df, seconds = predict(
        loaded.detector, dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device, amp=cfg.amp
    )
    df["name"] = [Path(p).relative_to(root).as_posix() for p in df["path"]]
    labels, threshold = decide(df["prob"].to_numpy(), cfg.threshold, loaded.threshold)
    failed = labels < 0
    labels[failed] = int(cfg.fallback_label)
    df["decision"] = labels
    write_contest_csv(out_path, df["name"].tolist(), labels.tolist())

    if failed.any():
        bad = df[failed]
        sidecar = out_path.with_suffix(".undecodable.txt")
        atomic_write_text(sidecar, "".join(f"{n}\t{e}\n" for n, e in zip(bad["name"], bad["error"])))
        log.warning(
            "%d file(s) could not be decoded and got fallback label %d: %s (listed in %s)",
            len(bad), cfg.fallback_label, ", ".join(bad["name"].head(10)), sidecar,
        )
    if cfg.scores:
        scores_path = out_path.with_suffix(".scores.csv")
        cols = df[["name", "prob", "decision", "ok", "error"]].sort_values("name")
        atomic_write_text(scores_path, cols.to_csv(index=False, float_format="%.6f"))
        log.info("scores written to %s", scores_path)
    n = len(df)
    print(
        f"wrote {out_path} ({n} rows, {int(np.sum(labels))} labelled AI-generated, threshold {threshold:.4f}); "
        f"{n / max(seconds, 1e-9):.1f} images/s ({seconds:.1f} s)"
    )
    return out_path
