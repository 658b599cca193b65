"""infer.py's job: score every file of a folder (or of a manifest, or one image or video
file) and write the contest file; with a few files (``verdicts``, 20) print a verdict line per
file. Without ``ckpt`` the shipped default model scores (``unmask.core.default_model``; the
run says so); where that file is missing the error says how to get a checkpoint
(``checkpoint_hint``). A slim ``.safetensors`` (``python -m unmask.slim``) works as a ``.ckpt`` does.

Video files (mp4, avi, mov, webm, mkv, m4v) get one row too: their sampled frames are scored
and aggregated to one score (``configs/video``). The run's QPS_image / QPS_video are printed
(and written to ``result_*.metrics.json`` with ``metrics=true``). ``explain=gallery`` then
writes maps, overlays and an HTML page, after the contest file and its timing.

With ``scoring.devices/num_nodes/strategy`` other than the defaults, or ``scoring.stream=true``,
the files are scored through Lightning into resumable shards (``run_scaled_inference``,
``unmask.scoring.shards``); the contest file and sidecars are the same.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from data.io import atomic_write_json
from data.records import UNLABELLED, ListedFilesSource, Record, UnlabelledFolderSource
from unmask.core.checkpoint import load_detector
from unmask.core.config import is_empty
from unmask.core.metrics import decide
from unmask.core.schemas import ExplainConfig, options
from unmask.reports.contest import (
    release_result,
    reserve_result,
    sidecar,
    write_contest_csv,
    write_frames,
    write_scores,
    write_undecodable,
)
from unmask.reports.safe import one_line
from unmask.reports.tables import fmt, verdict_lines
from unmask.reports.throughput import RunClock, format_throughput, throughput_report
from unmask.scoring.combine import VideoOptions
from unmask.scoring.scorer import Scorer, Scores

log = logging.getLogger(__name__)


def input_records(path: Path) -> tuple[list[Record], Path]:
    """Records of ``input`` and the folder names are relative to: a folder (every file
    below it), a ``.csv`` manifest listing files (``relpath`` column), or one file (an image
    or a video, named in the result by its file name)."""
    if path.is_file() and path.suffix.lower() == ".csv":
        source = ListedFilesSource(str(path))
        return source.records(), source.root
    if path.is_file():
        return [Record(str(path), UNLABELLED, source=path.parent.name or ".")], path.parent
    if not path.is_dir():
        raise FileNotFoundError(
            f"input folder or file {path} not found: input= takes a folder, one image or video file, or a .csv list of files"
        )
    return UnlabelledFolderSource(str(path)).records(), path


QUICKSTART = "python train.py hydra.run.dir=outputs/quickstart"


class MissingCheckpointError(ValueError):
    """No ``ckpt=`` given; the message says how to get one."""


def checkpoint_hint(entry: str = "infer.py") -> str:
    """What to do without a checkpoint: the quick-start training command (about a minute on
    2 CPU cores) and the checkpoints already under ``outputs/`` (newest first)."""
    from unmask.core.config import PROJECT_ROOT

    found = []
    for pattern in ("outputs/*/checkpoints/best.ckpt", "outputs/*/*/checkpoints/best.ckpt", "outputs/**/*.safetensors"):
        found += [p for p in PROJECT_ROOT.glob(pattern) if p.is_file()]
    found = sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)[:3]

    def shown(p: Path) -> str:
        try:
            return os.path.relpath(p)
        except ValueError:  # another drive
            return str(p)

    here = f" Checkpoints already here (newest first): {', '.join(shown(p) for p in found)}." if found else ""
    return (
        f"no checkpoint given: pass ckpt=PATH, a .ckpt written by train.py (outputs/train/<run>/checkpoints/best.ckpt) or a "
        f".safetensors from `python -m unmask.slim CKPT OUT`, e.g. `python {entry} ckpt=outputs/quickstart/checkpoints/best.ckpt`. "
        f"To get one: `{QUICKSTART}` trains the default detector on the built-in synthetic smoke set in about a minute on "
        "2 CPU cores and writes outputs/quickstart/checkpoints/best.ckpt (it proves the pipeline, it is no face detector); "
        "`python train.py experiment=contest` trains the shipped model's recipe on ../shared/faces-dev "
        f"(README, quick start).{here}"
    )


def require_checkpoint(ckpt, entry: str = "infer.py") -> str:
    """``ckpt`` as a string; none given: the shipped default model (checked against its model
    card, and named in the log), or, where it is missing, a ``MissingCheckpointError`` that says
    how to get a checkpoint."""
    if ckpt is not None and str(ckpt).strip():
        return str(ckpt)
    from unmask.core import default_model

    try:
        weights = default_model.default_checkpoint()
    except FileNotFoundError as e:
        raise MissingCheckpointError(f"{e}; {checkpoint_hint(entry)}") from None
    log.info("no ckpt= given: scoring with the shipped default model %s (model card: %s)", weights, default_model.CARD)
    return str(weights)


def file_names(paths, root: Path) -> list[str]:
    """A file's name in the result: its path relative to the input folder (or to a CSV list's
    folder, ``../x.png`` for a listed file outside it), POSIX separators."""
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


def needed_bytes(n_files: int) -> int:
    """A floor on the free space a run needs for its result and sidecars (the gallery not
    counted): a disk with less is refused before any work."""
    return (1 << 20) + 1024 * n_files


def run_inference(cfg: DictConfig) -> Path:
    """Score ``cfg.input`` and write the contest file; returns its path.

    Before the first file is read: every setting, the input (a CSV list is checked row by
    row) and the destination (folder created, writable, enough free space; the result's name
    claimed by ``reports.contest.reserve_result``, ``result_MMDDHHMM_2.xls``... when this
    minute already has a result). A run that fails before its contest file is written
    leaves no result behind; once written, a later failure (the gallery) keeps it."""
    clock = RunClock()
    started = dt.datetime.now()
    # Every setting is checked before the first file is read.
    scoring = options(cfg.scoring)
    explain = None if is_empty(cfg.get("explain")) else options(cfg.explain)
    if cfg.fallback_label not in (0, 1):
        raise ValueError(f"fallback_label must be 0 or 1, got {cfg.fallback_label!r}")
    cfg.ckpt = require_checkpoint(cfg.ckpt)
    video = VideoOptions.from_config(cfg.get("video"))
    records, names_root = input_records(Path(cfg.input))
    if scoring.scale_out and records:
        return run_scaled_inference(cfg, scoring, explain, video, records, names_root, clock, started)
    out_path = reserve_result(cfg.output_dir, started, needed_bytes(len(records)))
    written = False
    try:
        loaded = load_detector(cfg.ckpt)
        if not records:
            log.warning("input folder %s holds no files: writing an empty result", cfg.input)
            write_contest_csv(out_path, [], [])
            written = True
            return out_path

        scorer = Scorer(loaded, scoring, video)
        scores = scorer.score(records)
        files, labels, threshold, failed = write_result(cfg, out_path, scores, names_root, scoring, loaded)
        written = True
    finally:
        if not written:  # no empty file may pass for this run's result
            release_result(out_path)
    write_sidecars(cfg, out_path, clock, scores, files, labels, threshold, failed, names_root)
    if explain is not None:  # last, after the contest file and the timing: it can cost neither
        write_gallery(scorer, records, scores, sidecar(out_path, "explain"), explain, threshold)
    return out_path


def write_result(cfg: DictConfig, out_path: Path, scores: Scores, names_root: Path, scoring, loaded) -> tuple:
    """The contest file from the scored rows: names relative to the input, the threshold rule
    (``metrics.decide``), the fallback label for files that could not be decoded."""
    files = scores.files
    files["name"] = file_names(files["path"], names_root)
    labels, threshold = decide(files["prob"].to_numpy(), scoring.threshold, loaded.threshold)
    failed = labels < 0
    labels[failed] = int(cfg.fallback_label)
    files["decision"] = labels
    write_contest_csv(out_path, files["name"].tolist(), labels.tolist())
    return files, labels, threshold, failed


def write_sidecars(cfg: DictConfig, out_path: Path, clock: RunClock, scores: Scores, files, labels, threshold, failed, names_root: Path) -> None:
    """After the contest file: the undecodable list, scores and frames, the printed summary
    and throughput, metrics.json."""
    throughput = throughput_report(clock.seconds(), scores.n_images, scores.n_videos, scores.video_seconds, scores.n_video_frames)

    undecodable = write_undecodable(out_path, files)
    if undecodable is not None:
        bad = files[failed]
        log.warning(
            "%d file(s) could not be decoded and got fallback label %d: %s (listed in %s)",
            len(bad), cfg.fallback_label, ", ".join(map(one_line, bad["name"].head(10))), undecodable,
        )
    if cfg.scores:
        log.info("scores written to %s", write_scores(out_path, files))
        if len(scores.frames):
            write_frames(out_path, scores.frames.assign(name=file_names(scores.frames["path"], names_root)))
    if 0 < len(files) <= int(cfg.get("verdicts", 20)):
        print("\n".join(verdict_lines(files, threshold, int(cfg.fallback_label))))
    print(
        f"wrote {out_path} ({len(files)} rows, {int(np.sum(labels))} labelled AI-generated, threshold {fmt(threshold)}); "
        f"{len(files) / max(scores.seconds, 1e-9):.1f} images/s ({scores.seconds:.1f} s)"
    )
    print(f"throughput ({scores.runtime} runtime): {format_throughput(throughput)}")
    if cfg.get("metrics", False):
        atomic_write_json(
            sidecar(out_path, "metrics.json"),
            {"qps_image": throughput["qps_image"], "qps_video": throughput["qps_video"], "throughput": throughput, "runtime": scores.runtime},
        )


def run_scaled_inference(cfg: DictConfig, scoring, explain, video, records: list[Record], names_root: Path, clock: RunClock, started) -> Path | None:
    """infer.py through Lightning (``scoring.devices/num_nodes/strategy/stream``): every rank
    scores its chunks into shards under ``<output_dir>/shards/<key>/`` (a re-run with the same
    key scores only the missing chunks); rank zero alone claims the result name, merges the
    shards and writes the contest file and its sidecars, exactly as the one-process pass
    would. Returns the result's path on rank zero, None on the other ranks."""
    from unmask.scoring.shards import ShardStore, ShardWriter, scale_out_trainer, score_to_shards, shard_key

    loaded = load_detector(cfg.ckpt)  # refused before any work when it is not a checkpoint
    facts = shard_key(cfg.ckpt, records, scoring, video, names_root)
    store = ShardStore.for_run(cfg.output_dir, facts)
    trainer = scale_out_trainer(scoring, [ShardWriter(store)])
    if trainer.global_rank != 0:
        score_to_shards(trainer, cfg.ckpt, records, scoring, video, store)
        return None
    store.release_killed_claim()
    out_path = reserve_result(cfg.output_dir, started, needed_bytes(len(records)))
    written = False
    try:
        store.open(facts)
        store.note_result(out_path)
        score_to_shards(trainer, cfg.ckpt, records, scoring, video, store)
        scores = store.merge()
        files, labels, threshold, failed = write_result(cfg, out_path, scores, names_root, scoring, loaded)
        written = True
    finally:
        if not written:
            release_result(out_path)
    log.info("merged %d shards of %s into %s", store.n_chunks, store.folder, out_path)
    write_sidecars(cfg, out_path, clock, scores, files, labels, threshold, failed, names_root)
    if explain is not None:
        write_gallery(Scorer(loaded, scoring, video), records, scores, sidecar(out_path, "explain"), explain, threshold)
    return out_path


def write_gallery(scorer: Scorer, records: list[Record], scores: Scores, out_dir: Path, explain: ExplainConfig, threshold: float) -> Path:
    """The explanation gallery of the image files: one more pass of the scorer over the
    files shown (the ``explain.limit`` highest-scoring), with forgery maps."""
    from data.video import split_videos
    from unmask.explain.gallery import Gallery, ordered_records
    from unmask.explain.gradcam import ForgeryMaps

    images, _ = split_videos(records)
    shown, rows = ordered_records(images, scores.files, explain.limit)
    gallery = Gallery(out_dir, dict(zip(rows["path"], rows["name"])), explain.mask_threshold)
    maps = ForgeryMaps(explain.method, explain.layer)
    if shown:
        scorer.score(shown, evaluators=[gallery], explainer=maps, runtime=scorer.eager_runtime(), progress=False)
    return gallery.write_index(rows, f"Explanations: {Path(scorer.loaded.path).name}", maps.describe(), threshold)
