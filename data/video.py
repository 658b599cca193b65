"""Video input: probe, sample frames uniformly (N per video or a rate), decode them with PyAV,
and stream them as the usual sample dicts so every detector scores video frames unchanged.

A video becomes frame samples ``{"image", "label", "meta"}`` whose ``meta`` adds
``video_id``, ``timestamp`` (seconds from the video's start), ``frame_index`` (order among the
sampled frames), ``crop_index`` and ``video_seconds`` (the video's duration, for QPS_video).
Frame scores go back to one video score in ``unmask.scoring.combine``.

Faces: ``face_crops`` is the hook for the face pipeline (a callable turning one RGB frame
into a list of face crops). Without it the whole frame is the sample, like an image file.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data.canonical import Canonicalizer
from data.decode import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, ImageDecodeError, require_nonempty
from data.records import Record
from data.sample import make_sample

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v"})
# Seek instead of decoding forward when the next sampled frame is this far ahead: decoding a
# few seconds of frames is cheaper than a seek (which restarts from a keyframe) below that.
SEEK_AHEAD_SECONDS = 2.0

FaceCrops = Callable[[np.ndarray], Sequence[np.ndarray]]


class VideoDecodeError(ImageDecodeError):
    """The file is not a video we can decode frames from; the message says why. A subclass
    of ``ImageDecodeError`` so that callers handling undecodable files handle videos too."""


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def split_videos(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """``(non-video records, video records)``, each in its original order."""
    return [r for r in records if not is_video(r.path)], [r for r in records if is_video(r.path)]


def record_video_id(record: Record, id_column: str = "video_id") -> str | None:
    """The video a record belongs to: the manifest's ``id_column`` (``video_id``, or
    ``group`` for manifests that put the video there); a video file without one is its own
    video (its path); an image without one belongs to no video."""
    if id_column == "group":
        value = record.group if record.group != record.path else ""  # group defaults to the path
    else:
        value = str(record.extra.get(id_column) or "")
    if value:
        return value
    return record.path if is_video(record.path) else None


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    fps: float
    width: int
    height: int
    frames: int | None  # as declared by the container (may be missing or wrong)


@dataclass(frozen=True)
class Frame:
    timestamp: float  # seconds from the start of the video
    index: int  # position among the sampled frames
    pixels: np.ndarray  # HxWx3 uint8 RGB


@dataclass
class FrameSampler:
    """Which moments of a video to score: ``num_frames`` uniformly spread (the centres of
    equal segments), or ``fps`` frames per second from t=0; at most ``max_frames`` either
    way. A video with fewer frames than asked gives each of its frames once."""

    num_frames: int | None = 16
    fps: float | None = None
    max_frames: int = 64

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("video.sampler: set exactly one of num_frames (frames per video) and fps (frames per second)")
        if self.num_frames is not None and int(self.num_frames) < 1:
            raise ValueError(f"video.sampler.num_frames must be >= 1, got {self.num_frames!r}")
        if self.fps is not None and not float(self.fps) > 0:
            raise ValueError(f"video.sampler.fps must be > 0, got {self.fps!r}")
        if int(self.max_frames) < 1:
            raise ValueError(f"video.sampler.max_frames must be >= 1, got {self.max_frames!r}")

    def timestamps(self, duration: float) -> list[float]:
        duration = max(float(duration), 0.0)
        if self.fps is not None:
            step = 1.0 / float(self.fps)
            n = max(1, math.ceil(duration / step - 1e-9))
            return [i * step for i in range(min(n, int(self.max_frames)))]
        n = min(int(self.num_frames), int(self.max_frames))
        return [(i + 0.5) * duration / n for i in range(n)]


def _open(path: Path):
    import av

    require_nonempty(path, VideoDecodeError)
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"{path}: not a decodable video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: holds no video stream")
    return container


def _rate(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return 25.0  # nothing declared: a common rate; only used to convert counts and tolerances


def _duration(container, stream, fps: float) -> float:
    import av

    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    if stream.frames:
        return stream.frames / fps
    # Nothing declared (some streamed files): the last packet's time, read without decoding.
    last = 0.0
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    for packet in container.demux(stream):
        if packet.pts is not None:
            last = max(last, float(packet.pts * stream.time_base) - start + 1.0 / fps)
    container.seek(0)
    return last


def _info(container, path: Path, max_pixels: int) -> VideoInfo:
    stream = container.streams.video[0]
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width * height > max_pixels:
        raise VideoDecodeError(f"{path}: {width}x{height} frames exceed the {max_pixels / 1e6:.0f} MP limit")
    if min(width, height) > 0 and max(width, height) / min(width, height) > DEFAULT_MAX_ASPECT:
        # The images' bound: resizing such a frame's short side would allocate without limit.
        raise VideoDecodeError(f"{path}: {width}x{height} frames, above the {DEFAULT_MAX_ASPECT}:1 aspect-ratio limit")
    fps = _rate(stream)
    return VideoInfo(_duration(container, stream, fps), fps, width, height, int(stream.frames) or None)


def probe_video(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Duration, rate and size from the container headers (no frame is decoded)."""
    import av

    path = Path(path)
    container = _open(path)
    try:
        return _info(container, path, max_pixels)
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: unreadable video headers ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def _upright(pixels: np.ndarray, frame) -> np.ndarray:
    """Apply the container's display rotation (phone videos are stored sideways with a
    rotation tag), so faces reach the detector upright as in a player."""
    quarter_turns = int(round((getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
    return np.rot90(pixels, k=quarter_turns) if quarter_turns else pixels


def read_frames(
    path: str | Path, sampler: FrameSampler, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[VideoInfo, list[Frame]]:
    """Decode the frames ``sampler`` picks: for each target time, the first frame at or
    after it (within half a frame period). A file that breaks part-way keeps the frames
    decoded before the damage (with a warning); one with no decodable frame raises
    ``VideoDecodeError``."""
    import av

    path = Path(path)
    container = _open(path)
    try:
        info = _info(container, path, max_pixels)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame/slice threads inside the decoder
        tb = stream.time_base
        start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        tolerance = 0.5 / info.fps
        decoded = 0

        def frame_time(frame) -> float:
            return float(frame.time) - start if frame.time is not None else decoded / info.fps

        frames_out: list[Frame] = []
        iterator = container.decode(stream)
        current, last_pts = None, object()
        try:
            current = next(iterator, None)
            for target in sampler.timestamps(info.duration):
                if current is not None and target - frame_time(current) > SEEK_AHEAD_SECONDS:
                    container.seek(int((target + start) / tb), stream=stream, backward=True)
                    iterator = container.decode(stream)
                    current = next(iterator, None)
                while current is not None and frame_time(current) < target - tolerance:
                    current = next(iterator, None)
                    decoded += 1
                if current is None:
                    break  # past the last frame: a declared duration longer than the stream
                if current.pts != last_pts:  # two targets on one frame: score it once
                    last_pts = current.pts
                    pixels = _upright(current.to_ndarray(format="rgb24"), current)
                    frames_out.append(Frame(frame_time(current), len(frames_out), np.ascontiguousarray(pixels)))
        except (av.FFmpegError, ValueError) as e:
            if not frames_out:
                raise VideoDecodeError(f"{path}: no decodable frame ({type(e).__name__}: {e})") from e
            log.warning("%s: decoding stopped at a damaged part (%s); keeping %d frame(s)", path, e, len(frames_out))
        if not frames_out:
            raise VideoDecodeError(f"{path}: no decodable frame")
        return info, frames_out
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: unreadable video ({type(e).__name__}: {e})") from e
    finally:
        container.close()


class VideoFrameDataset(IterableDataset):
    """Frame samples of ``records`` (video files). Iterable, so each DataLoader worker opens
    each of its videos once and decodes only the sampled frames, while batches stay a fixed
    number of *frames* (``batch_size``) whatever the videos' lengths.

    An undecodable video yields one sample with ``meta.ok = False`` (and a blank image), so
    it still gets its row and the fallback label; the run goes on."""

    def __init__(
        self,
        records: list[Record],
        canonical: Canonicalizer,
        sampler: FrameSampler | None = None,
        face_crops: FaceCrops | None = None,
        id_column: str = "video_id",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.records = records
        self.canonical = canonical
        self.sampler = sampler or FrameSampler()
        self.face_crops = face_crops
        self.id_column = id_column
        self.max_pixels = max_pixels

    def _sample(self, record: Record, pixels: np.ndarray | None, error: str, **meta) -> dict:
        if error:
            size = self.canonical.size
            pixels = np.zeros((size, size, 3), np.uint8)
        else:  # the same evaluation preprocessing as an image file
            try:
                pixels = self.canonical.resize_stage(pixels)
            except (cv2.error, MemoryError, ImageDecodeError) as e:  # one frame must not end the run
                return self._sample(record, None, f"{record.path}: cannot resize a {pixels.shape[1]}x{pixels.shape[0]} frame: {e}", **meta)
            pixels = self.canonical.encode(self.canonical.finish(pixels, train=False), train=False)
        return make_sample(pixels, record, error=error, video_id=record_video_id(record, self.id_column) or record.path, **meta)

    def samples(self, record: Record) -> Iterator[dict]:
        """Every sample of one video (what one worker yields for it)."""
        failed = {"timestamp": float("nan"), "frame_index": -1, "crop_index": -1, "video_seconds": 0.0}
        try:
            info, frames = read_frames(record.path, self.sampler, self.max_pixels)
        except VideoDecodeError as e:
            log.warning("skipping undecodable video: %s", e)
            yield self._sample(record, None, str(e), **failed)
            return
        produced = 0
        for frame in frames:
            crops = [frame.pixels] if self.face_crops is None else self.face_crops(frame.pixels)
            for c, crop in enumerate(crops):
                produced += 1
                yield self._sample(
                    record, crop, "", timestamp=frame.timestamp, frame_index=frame.index, crop_index=c, video_seconds=info.duration
                )
        if not produced:
            yield self._sample(record, None, f"{record.path}: no face found in {len(frames)} sampled frames", **(failed | {"video_seconds": info.duration}))

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.records if worker is None else self.records[worker.id :: worker.num_workers]
        for record in mine:
            yield from self.samples(record)
