"""Scale-out and streaming scoring: Lightning's ``Trainer.predict`` over chunks of files, each
rank writing the rows of every chunk it scored to a shard on disk, rank zero merging them.

The one scoring loop stays ``Scorer``: Lightning only hands out the work. The input list is
cut into chunks of ``scoring.shard_size`` files (chunk ``i`` is files ``i*size ..``, in
listing order); a chunk is the unit that is scored (by one rank, through ``Scorer.score``),
written (one JSON file, atomically: it exists whole or not at all) and skipped by a resumed
run. Ranks take the pending chunks round-robin; a prediction writer writes each chunk's shard
as soon as it is scored, so memory holds one chunk of rows, whatever the number of files.

Shards live in ``<output folder>/shards/<key>/``. The key is a hash of what decides the
scores: the checkpoint's bytes, the input listing (names, sizes, modification times), the
scoring settings that change a probability (runtime, ONNX file, AMP on the accelerator, the
video options) and the chunk size. A run with the same key (the same command, the same output
folder, nothing changed) reuses the finished shards and scores only the missing chunks; any
change gives a new key, hence a fresh folder. The merged rows equal a one-process
``Scorer.score`` of the whole list: images in listing order, then videos by path, frames
sorted as the scorer sorts them.

Settings (``configs/scoring``): ``accelerator``, ``devices``, ``num_nodes``, ``strategy``
(Lightning's), ``stream`` (go through shards on one device too) and ``shard_size``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from data.io import atomic_write_json, atomic_write_text
from data.records import Record
from data.video import split_videos
from unmask.core.checkpoint import load_detector
from unmask.core.schemas import ScoringConfig
from unmask.scoring.combine import VideoOptions
from unmask.scoring.scorer import FILE_COLUMNS, Scorer, Scores

log = logging.getLogger(__name__)

SHARD_FORMAT = 1
SHARDS_DIR = "shards"
NO_CHUNK = -1  # the one step of a rank that has no chunk to score


# ---- what decides the scores: the shard folder's key -------------------------------------------
def file_digest(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def listing_digest(records: Sequence[Record], root: str | Path | None = None) -> str:
    """A hash of the input list as scored: every file's name (relative to ``root``), size and
    modification time, in order (a changed, added or removed file changes it)."""
    h = hashlib.sha256()
    for r in records:
        try:
            st = os.stat(r.path)
            facts = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError as e:
            facts = f"unreadable:{e.errno}"
        name = os.path.relpath(r.path, root) if root is not None else r.path
        h.update(os.fsencode(f"{name}\0{facts}\0{r.label}\n"))
    return h.hexdigest()


def resolved_accelerator(scoring: ScoringConfig) -> str:
    """Lightning's accelerator name: ``scoring.accelerator``, or with ``auto`` the kind of
    ``scoring.device`` (``auto``: CUDA when there is one, else the CPU)."""
    acc = scoring.accelerator
    if acc == "auto":
        device = str(scoring.device)
        acc = "cuda" if device.startswith("cuda") else device if device in ("cpu", "mps") else ("cuda" if torch.cuda.is_available() else "cpu")
    return "cuda" if acc == "gpu" else acc


def lightning_devices(scoring: ScoringConfig):
    """``scoring.devices`` for the Trainer; ``scoring.device=cuda:N`` on one device picks GPU N."""
    device = str(scoring.device)
    if scoring.devices == 1 and device.startswith("cuda:") and resolved_accelerator(scoring) == "cuda":
        return [int(device.split(":")[1])]
    return scoring.devices


def video_fingerprint(video: VideoOptions) -> str:
    crops = video.face_crops
    crops = "none" if crops is None else f"{type(crops).__module__}.{type(crops).__qualname__}"
    return f"{video.sampler!r}|{video.aggregator!r}|{crops}|{video.id_column}"


def shard_key(ckpt: str | Path, records: Sequence[Record], scoring: ScoringConfig, video: VideoOptions, root: str | Path | None = None) -> dict:
    """The facts that decide the scores of a run, and their hash (``key``)."""
    accelerator = resolved_accelerator(scoring)
    facts = {
        "format": SHARD_FORMAT,
        "checkpoint_sha256": file_digest(ckpt),
        "listing_sha256": listing_digest(records, root),
        "files": len(records),
        "shard_size": int(scoring.shard_size),
        "runtime": scoring.runtime,
        "onnx_model": scoring.onnx_model,
        "amp": bool(scoring.amp and accelerator == "cuda"),  # fp16 autocast changes the scores; it acts on CUDA only
        "accelerator": accelerator,
        "video": video_fingerprint(video),
    }
    facts["key"] = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]
    return facts


# ---- the shards ------------------------------------------------------------------------------
def _native(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _table(frame: pd.DataFrame | None) -> dict | None:
    if frame is None:
        return None
    return {
        "columns": [str(c) for c in frame.columns],
        "dtypes": [str(t) for t in frame.dtypes],
        "rows": frame.astype(object).values.tolist(),
    }


def _frame(table: dict | None) -> pd.DataFrame | None:
    """The frame ``_table`` wrote, with its dtypes (NaN travels as JSON's ``NaN``)."""
    if table is None:
        return None
    frame = pd.DataFrame(table["rows"], columns=table["columns"])
    for column, dtype in zip(table["columns"], table["dtypes"]):
        if str(frame[column].dtype) != dtype:
            frame[column] = frame[column].astype(dtype)
    return frame


@dataclass
class ChunkResult:
    """One chunk's rows: the image files', the video files' (each as ``Scorer.score`` gives
    them for that kind alone) and the videos' frames."""

    chunk: int
    images: pd.DataFrame | None
    videos: pd.DataFrame | None
    frames: pd.DataFrame | None
    n_images: int = 0
    n_videos: int = 0
    seconds: float = 0.0
    runtime: str = "torch"


class ShardStore:
    """The shard folder of one key: ``manifest.json`` (the facts of the key), one
    ``chunk_NNNNNN.json`` per scored chunk, and ``run.json`` (the result file of the run that
    uses it, so that a resumed run can release a killed run's empty claim)."""

    def __init__(self, folder: str | Path, n_chunks: int) -> None:
        self.folder = Path(folder)
        self.n_chunks = int(n_chunks)

    @classmethod
    def for_run(cls, output_dir: str | Path, facts: dict) -> ShardStore:
        n_chunks = math.ceil(facts["files"] / facts["shard_size"])
        return cls(Path(output_dir) / SHARDS_DIR / facts["key"], n_chunks)

    def open(self, facts: dict) -> None:
        """Create the folder (or check that it belongs to these facts)."""
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except ValueError:
                stored = None
            if stored != facts:
                raise RuntimeError(f"{self.folder}: its manifest.json belongs to other inputs; remove the folder to start afresh")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, facts)

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk_{chunk:06d}.json"

    def done(self) -> list[int]:
        return [i for i in range(self.n_chunks) if self.path(i).is_file()]

    def pending(self) -> list[int]:
        done = set(self.done())
        return [i for i in range(self.n_chunks) if i not in done]

    def write(self, result: ChunkResult) -> Path:
        doc = {
            "format": SHARD_FORMAT, "chunk": result.chunk, "n_images": result.n_images, "n_videos": result.n_videos,
            "seconds": result.seconds, "runtime": result.runtime,
            "images": _table(result.images), "videos": _table(result.videos), "frames": _table(result.frames),
        }
        # file names that are not UTF-8 travel as their bytes
        return atomic_write_text(self.path(result.chunk), json.dumps(doc, default=_native), errors="surrogateescape")

    def read(self, chunk: int) -> ChunkResult:
        doc = json.loads(self.path(chunk).read_bytes().decode("utf-8", "surrogateescape"))
        if doc.get("format") != SHARD_FORMAT or doc.get("chunk") != chunk:
            raise RuntimeError(f"{self.path(chunk)}: not a shard of format {SHARD_FORMAT} for chunk {chunk}")
        return ChunkResult(
            chunk, _frame(doc["images"]), _frame(doc["videos"]), _frame(doc["frames"]),
            doc["n_images"], doc["n_videos"], doc["seconds"], doc["runtime"],
        )

    def merge(self) -> Scores:
        """Every chunk's rows as one ``Scores``, equal to one ``Scorer.score`` of the list."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"{self.folder}: {len(missing)} of {self.n_chunks} chunks were not scored (first: {missing[0]})")
        images, videos, frames = [], [], []
        n_images = n_videos = 0
        seconds, runtime = 0.0, "torch"
        for i in range(self.n_chunks):
            part = self.read(i)
            n_images, n_videos, seconds, runtime = n_images + part.n_images, n_videos + part.n_videos, seconds + part.seconds, part.runtime
            images += [part.images] if part.images is not None and len(part.images) else []
            videos += [part.videos] if part.videos is not None and len(part.videos) else []
            frames += [part.frames] if part.frames is not None and len(part.frames) else []
        parts = []
        if images:
            parts.append(pd.concat(images, ignore_index=True) if len(images) > 1 else images[0])
        if videos:  # the scorer's video rows come sorted by path
            v = pd.concat(videos, ignore_index=True)
            parts.append(v.sort_values("path", kind="stable").reset_index(drop=True))
        files = pd.concat(parts, ignore_index=True) if len(parts) > 1 else (parts[0] if parts else pd.DataFrame(columns=FILE_COLUMNS))
        frame_rows = pd.DataFrame()
        if frames:
            frame_rows = pd.concat(frames, ignore_index=True)
            frame_rows = frame_rows.sort_values(["video_id", "timestamp", "crop_index"], kind="stable", na_position="first").reset_index(drop=True)
        return Scores(files, frame_rows, seconds, runtime, n_images, n_videos)

    # ---- the claim of the run that uses these shards ------------------------------------------
    def note_result(self, result: Path) -> None:
        atomic_write_json(self.folder / "run.json", {"result": str(Path(result).resolve()), "pid": os.getpid(), "host": socket.gethostname()})

    def release_killed_claim(self) -> Path | None:
        """A run killed before writing its result left its claimed name empty: when that run's
        process is gone (same machine), remove the empty claim. Returns the freed path."""
        note = self.folder / "run.json"
        try:
            run = json.loads(note.read_text())
            claim, pid, host = Path(run["result"]), int(run["pid"]), str(run["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if host != socket.gethostname() or pid == os.getpid() or _alive(pid):
            return None
        if claim.is_file() and claim.stat().st_size == 0:
            claim.unlink(missing_ok=True)
            log.warning("removed %s: the empty claim of an earlier run of these shards that was killed (pid %d)", claim, pid)
            return claim
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- Lightning: the module, the data and the writer ---------------------------------------------
class ShardedScoring(pl.LightningModule):
    """``predict_step`` scores one chunk of files with the scorer on this rank's device; the
    checkpoint is loaded in each process (``setup``). The chunks come from
    ``predict_dataloader``: rank zero's list of pending chunks, broadcast, taken round-robin."""

    def __init__(self, ckpt: str, records: list[Record], scoring: ScoringConfig, video: VideoOptions, store: ShardStore) -> None:
        super().__init__()
        self.ckpt, self.records, self.options, self.video, self.store = str(ckpt), records, scoring, video, store
        self.size = int(scoring.shard_size)
        self.scorer: Scorer | None = None

    def setup(self, stage: str) -> None:
        device = str(self.trainer.strategy.root_device)
        options = dataclasses.replace(self.options, device="mps" if device.startswith("mps") else device, progress=False)
        self.scorer = Scorer(load_detector(self.ckpt), options, self.video)

    def predict_dataloader(self) -> DataLoader:
        strategy = self.trainer.strategy
        pending = strategy.broadcast(self.store.pending() if self.trainer.global_rank == 0 else None, src=0)
        # A rank with no chunk (fewer pending chunks than ranks) still takes one step, a no-op
        # (-1): Lightning refuses an empty loader on one rank of several, and every rank must
        # reach the barrier of on_predict_end.
        mine = pending[self.trainer.global_rank :: self.trainer.world_size] or [NO_CHUNK]
        done = self.store.n_chunks - len(pending)
        if self.trainer.global_rank == 0:
            log.info(
                "%s: %d of %d chunks of %d files already scored; %d to score on %d process(es)",
                self.store.folder, done, self.store.n_chunks, self.size, len(pending), self.trainer.world_size,
            )
        return DataLoader(mine, batch_size=None, shuffle=False, num_workers=0)

    def predict_step(self, chunk, batch_idx: int = 0) -> ChunkResult | None:
        chunk = int(chunk)
        if chunk == NO_CHUNK:
            return None
        images, videos = split_videos(self.records[chunk * self.size : (chunk + 1) * self.size])
        image_scores = self.scorer.score(images) if images else None
        video_scores = self.scorer.score(videos) if videos else None
        done = [s for s in (image_scores, video_scores) if s is not None]
        return ChunkResult(
            chunk,
            image_scores.files if image_scores is not None else None,
            video_scores.files if video_scores is not None else None,
            video_scores.frames if video_scores is not None else None,
            len(images), len(videos), sum(s.seconds for s in done), done[0].runtime if done else "torch",
        )

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier("unmask-shards-written")  # rank zero merges after every rank's last shard


class ShardWriter(BasePredictionWriter):
    """Writes each chunk's rows to its shard as soon as the chunk is scored."""

    def __init__(self, store: ShardStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(self, trainer, pl_module, prediction: ChunkResult | None, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        if prediction is not None:  # None: an idle rank's no-op step
            self.store.write(prediction)


def scale_out_trainer(scoring: ScoringConfig, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """The Trainer that hands out chunks: ``scoring.accelerator/devices/num_nodes/strategy``.
    Its ``global_rank`` is known at once (the launchers of the other ranks set it), so a task
    can keep rank-zero work (claiming the result, merging) to rank zero."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Couldn't infer the batch indices.*")  # a batch is one chunk id
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    return pl.Trainer(
        accelerator=resolved_accelerator(scoring), devices=lightning_devices(scoring), num_nodes=int(scoring.num_nodes),
        strategy=scoring.strategy, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=bool(scoring.progress), use_distributed_sampler=False, precision="32-true",
        callbacks=list(callbacks), inference_mode=True,
    )


def score_to_shards(trainer: pl.Trainer, ckpt: str | Path, records: list[Record], scoring: ScoringConfig, video: VideoOptions, store: ShardStore) -> None:
    """Score every pending chunk of ``records`` into ``store`` on the trainer's ranks (every
    rank calls this); returns when every rank has written its last shard."""
    writer = next((c for c in trainer.callbacks if isinstance(c, ShardWriter)), None)
    if writer is None:
        raise ValueError("the trainer needs a ShardWriter callback for this store (scale_out_trainer(..., [ShardWriter(store)]))")
    writer.store = store
    trainer.predict(ShardedScoring(str(ckpt), records, scoring, video, store), return_predictions=False)


def score_sharded(
    ckpt: str | Path, records: list[Record], scoring: ScoringConfig, video: VideoOptions, output_dir: str | Path,
    root: str | Path | None = None, trainer: pl.Trainer | None = None,
) -> Scores | None:
    """The scale-out pass: shards of ``records`` under ``output_dir/shards/<key>``, scored on
    every rank, merged on rank zero. Returns the merged ``Scores`` on rank zero, None on the
    others."""
    facts = shard_key(ckpt, records, scoring, video, root)
    store = ShardStore.for_run(output_dir, facts)
    trainer = trainer or scale_out_trainer(scoring, [ShardWriter(store)])
    if trainer.global_rank == 0:
        store.open(facts)
    score_to_shards(trainer, ckpt, records, scoring, video, store)
    return store.merge() if trainer.global_rank == 0 else None
