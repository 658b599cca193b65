"""The one scoring loop: records in, one probability per file out.

Every job that scores a checkpoint goes through ``Scorer``: infer.py, evaluate.py, the
training run's test step and its threshold, the robustness grid, the generalization study,
localisation metrics and the explanation gallery. So a checkpoint is scored one way:

- image files become their views (``data.dataset.ViewsDataset``: the whole image and, with
  the checkpoint's face stage, its face crops); the views' scores combine into the file's
  (``combine.combine_views``);
- video files become their sampled frames (and the frames' face crops), aggregated per
  video (``configs/video``);
- the runtime (``scoring.runtime``; ``auto``: ``unmask.scoring.choice``) gives per view
  P(fake) and, with an attribution head, the forgery-type probabilities; an explainer, when
  given, the forgery maps;
- whole-image files travel from the DataLoader workers as uint8 pixels, or as JPEG bytes that
  the GPU decodes (``unmask.scoring.loading``); batch and worker counts default to the machine
  (``machine_batch_size``, ``machine_workers``);
- evaluators see every batch as a ``ScoredBatch`` (``update``) and the result as ``Scores``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import ViewsDataset
from data.records import Record
from data.sample import usable_rows
from data.video import VideoFrameDataset, split_videos
from unmask.core.checkpoint import LoadedDetector
from unmask.core.schemas import ScoringConfig
from unmask.scoring.choice import RuntimeChoice, choose_runtime
from unmask.scoring.combine import VideoOptions, combine_views, deciding_view, video_file_rows
from unmask.scoring.loading import Batches, device_decoding_works
from unmask.scoring.runtimes import RuntimeOutput, TorchRuntime, pick_device

log = logging.getLogger(__name__)

# The meta keys every sample carries; scalar extras (a frame's timestamp, a view's index...)
# become columns of the view rows too.
BASE_META = ("path", "ok", "error", "source", "generator", "group")
FILE_COLUMNS = ("path", "prob", "label", "ok", "error", "source", "generator", "group")  # every Scores.files has these

# (detector, image, batch, eager output or None) -> (V, 1, H, W) maps in [0, 1]; an attribute
# ``source`` may say what they are (unmask.explain.gradcam.ForgeryMaps).
Explainer = Callable[..., Tensor]


@dataclass
class ScoredBatch:
    """One batch of scored views (or video frames), as evaluators see it."""

    batch: dict  # the collated samples: image, label, meta (file, view, ok, ...), mask, landmarks
    prob: Tensor  # (V,) float32, NaN where the view could not be decoded
    class_prob: Tensor | None = None  # (V, C) forgery-type probabilities, with an attribution head
    maps: Tensor | None = None  # (V, 1, H, W) forgery maps in [0, 1], when an explainer was given
    kind: str = "images"  # images | frames
    map_source: str | None = None  # what the maps are: mask | heatmap | gradcam (the explainer's ``source``)

    def deciding_views(self) -> list[int]:
        """Batch positions of each file's deciding view (its highest-scoring decodable one);
        a file's views are never split across batches."""
        meta = self.batch["meta"]
        files = torch.as_tensor(meta["file"]).view(-1).numpy()
        ok = torch.as_tensor(meta["ok"], dtype=torch.bool).view(-1).numpy()
        probs = self.prob.numpy()
        out = []
        for f in np.unique(files):
            members = np.flatnonzero(files == f)
            out.append(int(members[deciding_view(probs[members], ok[members])]))
        return out


class Evaluator(Protocol):
    def update(self, scored: ScoredBatch) -> None: ...


# Batch sizes when scoring.batch_size is null: 64 files keep a CPU busy without long waits for
# the first batch; a GPU wants more work per launch.
CPU_BATCH, GPU_BATCH = 64, 256
# DataLoader workers decoding beside a model that runs on the same CPU cores yield to it (the
# kernel's niceness): the model's threads are not pre-empted mid-operator by a decoding worker,
# and the workers still run whenever the model waits for data (bench/README.md, issue 18).
WORKER_NICENESS = 10


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def machine_batch_size(device: torch.device) -> int:
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


def machine_workers(device: torch.device, cores: int | None = None, processes: int | None = None) -> int:
    """DataLoader workers when scoring.num_workers is null, from this process's share of the
    cores (``LOCAL_WORLD_SIZE`` scoring processes share the machine).

    With the model on the CPU its threads need the cores. Up to 2 cores: none, the files are
    decoded in the scoring process between batches (on 2 cores 1.2x the end-to-end rate of one
    worker and 1.3x two: a worker only takes cores from the model and adds the hand-over,
    bench/README.md, issue 18). More cores: one worker per 4 (decoding is ~1/3 of the work of
    a CPU pass of the default detector). With the model on a GPU decoding is the work: every
    core but the scoring process's, at most 16."""
    cores = cores or available_cores()
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = max(1, cores // max(1, processes))
    if device.type == "cuda":
        return max(1, min(16, share - 1))
    return 0 if share <= 2 else max(1, share // 4)


def _yield_to_model(worker_id: int) -> None:
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not allowed here: same priority
        pass


def runs_on_cpu(runtime) -> bool:
    on_cpu = getattr(runtime, "on_cpu", None)
    return bool(on_cpu) if on_cpu is not None else getattr(runtime, "device", torch.device("cpu")).type == "cpu"


@dataclass
class Scores:
    """The scored result of one pass: one row per file, and the video frames behind videos.

    ``files`` columns: ``path, prob, label, ok, error, source, generator, group``; with a face
    stage ``n_faces, face_fallback, whole_prob, face_probs``; with an attribution head
    ``type, type_prob, p_<class>``; for video files ``n_frames, video_seconds``. ``prob`` is
    NaN where a file could not be decoded (``ok`` False, ``error`` says why)."""

    files: pd.DataFrame
    frames: pd.DataFrame = field(default_factory=pd.DataFrame)
    seconds: float = 0.0
    runtime: str = "torch"
    n_images: int = 0
    n_videos: int = 0

    def usable(self) -> pd.DataFrame:
        """The rows that metrics and thresholds count (decoded and labelled)."""
        return self.files[usable_rows(self.files)] if len(self.files) else self.files

    @property
    def video_seconds(self) -> float:
        """Total duration of the video files scored (the spec's QPS_video numerator)."""
        if self.files.empty or "video_seconds" not in self.files:
            return 0.0
        return float(self.files["video_seconds"].fillna(0).sum())

    @property
    def n_video_frames(self) -> int:
        return int(self.frames["ok"].sum()) if len(self.frames) else 0


def _value(v):
    return v.item() if isinstance(v, Tensor) else v


def view_rows(scored: ScoredBatch, class_names: Sequence[str] | None) -> list[dict]:
    """One row per view: its score, its sample's meta, and the forgery type when known."""
    meta = scored.batch["meta"]
    labels = torch.as_tensor(scored.batch["label"]).view(-1).tolist()
    extra = [k for k in meta if k not in BASE_META and not isinstance(meta[k], dict)]
    class_prob = scored.class_prob.float().numpy() if scored.class_prob is not None and class_names else None
    rows = []
    for i, p in enumerate(scored.prob.tolist()):
        ok = bool(meta["ok"][i])
        row = {
            "path": meta["path"][i],
            "prob": p,
            "label": int(labels[i]),
            "ok": ok,
            "error": meta["error"][i],
            "source": meta["source"][i],
            "generator": meta["generator"][i],
            "group": meta["group"][i],
            **{k: _value(meta[k][i]) for k in extra},
        }
        if class_prob is not None:
            q = class_prob[i]
            k = int(np.argmax(q))
            row.update(type=class_names[k] if ok else "", type_prob=float(q[k]) if ok else math.nan)
            row.update({f"p_{c}": float(v) if ok else math.nan for c, v in zip(class_names, q)})
        rows.append(row)
    return rows


class Scorer:
    """Scores records with a loaded checkpoint as ``options`` (``configs/scoring``) say.

    ``video``: frame sampling and aggregation for video files; the checkpoint's face stage
    crops frames too unless ``video.face_crops`` is set."""

    def __init__(self, loaded: LoadedDetector, options: ScoringConfig | None = None, video: VideoOptions | None = None) -> None:
        self.loaded = loaded
        self.options = options or ScoringConfig()
        video = video or VideoOptions()
        if loaded.faces is not None and video.face_crops is None:
            video = dataclasses.replace(video, face_crops=loaded.faces.frame_crops)
        self.video = video
        self._runtime = None
        self.runtime_choice: RuntimeChoice | None = None

    # ---- runtimes ---------------------------------------------------------------------
    @property
    def runtime(self):
        """The configured runtime, built on first use (an ONNX export happens then)."""
        if self._runtime is None:
            self._runtime = self.build_runtime()
        return self._runtime

    def build_runtime(self):
        """The runtime ``scoring.runtime`` asks for (``auto``: ``choice.choose_runtime``);
        the choice and its reason are logged and kept in ``runtime_choice``."""
        self.runtime_choice = choose_runtime(self.loaded, self.options)
        log.info("%s", self.runtime_choice.line())
        return self.runtime_choice.runtime

    def eager_runtime(self, detector=None) -> TorchRuntime:
        """Eager PyTorch on the scoring device, e.g. around an attacked detector (attacks
        need gradients, which only the eager runtime has)."""
        o = self.options
        return TorchRuntime(detector or self.loaded.detector, device=o.device, amp=o.amp)

    @property
    def device(self) -> torch.device:
        return pick_device(self.options.device)

    @property
    def batch_size(self) -> int:
        """``scoring.batch_size``, or by the device (``machine_batch_size``)."""
        return int(self.options.batch_size or machine_batch_size(self.device))

    @property
    def num_workers(self) -> int:
        """``scoring.num_workers``, or from the machine (``machine_workers``)."""
        n = self.options.num_workers
        return int(n) if n is not None else machine_workers(self.device)

    # ---- data -------------------------------------------------------------------------
    def dataset(self, records: list[Record], **kwargs) -> ViewsDataset:
        """The views of ``records`` as this checkpoint scores them; ``kwargs`` go to
        ``ViewsDataset`` (perturbation hooks, shared caches, a forgery augment)."""
        return ViewsDataset(records, self.loaded.canonical, faces=self.loaded.faces, **kwargs)

    def _loader(self, dataset, collate=None, workers: int | None = None, runtime=None) -> DataLoader:
        workers = self.num_workers if workers is None else workers
        nice = workers > 0 and runtime is not None and runs_on_cpu(runtime)
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda", worker_init_fn=_yield_to_model if nice else None,
        )

    # ---- the loop -----------------------------------------------------------------------
    def score(
        self,
        records: Iterable[Record] | ViewsDataset,
        evaluators: Sequence[Evaluator] = (),
        explainer: Explainer | None = None,
        runtime=None,
        progress: bool | None = None,
    ) -> Scores:
        """Score image and video records (or a prepared ``ViewsDataset`` of images).

        ``evaluators`` see each batch; ``explainer`` adds forgery maps to the batches (eager
        detector); ``runtime`` replaces the configured one for this pass."""
        start = time.perf_counter()
        progress = self.options.progress if progress is None else progress
        runtime = runtime or self.runtime
        if isinstance(records, ViewsDataset):
            dataset, videos = records, []
        else:
            images, videos = split_videos(list(records))
            dataset = self.dataset(images)
        faces = self.loaded.faces
        if faces is not None and dataset.decoded_hook is None and len(dataset):
            faces.prepare([r.path for r in dataset.records], progress=progress)
        parts, frames = [], pd.DataFrame()
        if len(dataset):
            batches = self.batches(dataset, runtime)
            source, collate = batches.dataset_and_collate()
            loader = self._loader(source, collate, runtime=runtime)
            views = self._loop(loader, runtime, evaluators, explainer, "images", progress, batches.finish)
            parts.append(combine_views(views, faces))
        if videos:
            frames = self._loop(self._video_loader(videos, runtime), runtime, evaluators, explainer, "frames", progress)
            frames = frames.sort_values(["video_id", "timestamp", "crop_index"], kind="stable", na_position="first").reset_index(drop=True)
            parts.append(video_file_rows(frames, self.video.aggregator))
        files = pd.concat(parts, ignore_index=True) if len(parts) > 1 else (parts[0] if parts else pd.DataFrame(columns=FILE_COLUMNS))
        return Scores(files, frames, time.perf_counter() - start, runtime.name, len(dataset), len(videos))

    def batches(self, dataset: ViewsDataset, runtime) -> Batches:
        """How ``dataset``'s batches are made for ``runtime`` (``loading.Batches``)."""
        eager = isinstance(runtime, TorchRuntime)
        device = runtime.device if eager else torch.device("cpu")
        mode = Batches.choose(dataset, self.options.decode, device, eager)
        channels_last = eager and getattr(runtime, "channels_last", False)
        if mode == "gpu" and not device_decoding_works(device):
            log.warning("scoring.decode=%s: decoding on %s does not work here; the DataLoader workers decode", self.options.decode, device)
            mode = "pixels"
        return Batches(dataset, mode, device, channels_last)

    def _video_loader(self, videos: list[Record], runtime=None) -> DataLoader:
        v = self.video
        dataset = VideoFrameDataset(videos, self.loaded.canonical, v.sampler, v.face_crops, v.id_column)
        # A worker per video at most: an idle worker only costs start-up time.
        return self._loader(dataset, workers=min(self.num_workers, len(videos)), runtime=runtime)

    def _loop(self, loader, runtime, evaluators, explainer, kind: str, progress: bool, finish: Callable[[dict], dict] | None = None) -> pd.DataFrame:
        rows: list[dict] = []
        detector = self.loaded.detector
        if explainer is not None:
            detector.to(self.device)  # maps come from the eager detector, whatever the runtime
        for batch in tqdm(loader, desc=f"scoring {kind}", unit="batch", disable=not progress, leave=False):
            if finish is not None:
                batch = finish(batch)
            out: RuntimeOutput = runtime(batch["image"], batch)
            ok = torch.as_tensor(batch["meta"]["ok"], dtype=torch.bool).view(-1)
            prob = torch.where(ok, out.prob.float(), torch.full_like(out.prob.float(), math.nan))
            maps = None
            if explainer is not None:
                maps = explainer(detector, batch["image"].to(self.device), batch, out.output)
                maps = None if maps is None else maps.detach().float().cpu()
            if evaluators and batch["image"].device.type != "cpu":  # made on the GPU: evaluators get host tensors, as always
                batch = {**batch, "image": batch["image"].cpu()}
            scored = ScoredBatch(batch, prob, out.class_prob, maps, kind, getattr(explainer, "source", None))
            for evaluator in evaluators:
                evaluator.update(scored)
            rows += view_rows(scored, detector.class_names)
        return pd.DataFrame(rows)
