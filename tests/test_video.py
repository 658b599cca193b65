"""Video input: frame sampling, aggregation, damaged files, and videos through infer.py /
evaluate.py with their QPS figures. Every video here is encoded by the test itself (PyAV)
from generated frames; frame ``i`` of a "counter" video is a flat grey of 10 * i + 20, so a
decoded frame tells which frame it was."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import compose
from data.canonical import Canonicalizer
from data.records import Record
from data.video import FrameSampler, VideoDecodeError, VideoFrameDataset, probe_video, read_frames
from unmask.scoring.combine import ScoreAggregator, aggregate_videos


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "mpeg4") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.bit_rate = 2_000_000  # high enough that a flat grey frame keeps its level
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def counter_frames(n: int, step: int = 10, size=(48, 64)) -> list[np.ndarray]:
    return [np.full((*size, 3), (step * i + 20) % 256, np.uint8) for i in range(n)]


def noise_frames(n: int, seed: int, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def decoded_index(frame, step: int = 10) -> int:
    """Which counter frame a decoded frame shows (lossy codecs move the grey a little)."""
    return int(round((float(frame.pixels.mean()) - 20) / step))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {
        "mp4": write_video(d / "counter.mp4", counter_frames(20)),
        "avi": write_video(d / "counter.avi", counter_frames(20)),
        "mov": write_video(d / "counter.mov", counter_frames(20), codec="mjpeg"),
        "webm": write_video(d / "counter.webm", counter_frames(20), codec="libvpx"),
        "short": write_video(d / "short.mp4", counter_frames(5)),
        # 10 s at 5 fps, a keyframe every 12 frames: far targets are reached by seeking
        "long": write_video(d / "long.mp4", counter_frames(50, step=4), fps=5),
    }
    (d / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    data = out["long"].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # mp4 index (moov) is at the end: lost
    (d / "empty.webm").write_bytes(b"")
    (d / "text.avi").write_text("not a video\n")
    out.update({k: d / n for k, n in [("random", "random.mp4"), ("truncated", "truncated.mp4"), ("empty", "empty.webm"), ("text", "text.avi")]})
    return out


# --------------------------------------------------------------- sampling


@pytest.mark.parametrize("kind", ["mp4", "avi", "mov", "webm"])
def test_uniform_sampling_count_timestamps_and_content(videos, kind):
    info = probe_video(videos[kind])
    assert info.duration == pytest.approx(2.0, abs=0.01) and info.fps == pytest.approx(10.0)
    assert (info.width, info.height) == (64, 48)
    _, frames = read_frames(videos[kind], FrameSampler(num_frames=4))
    assert len(frames) == 4
    targets = [0.25, 0.75, 1.25, 1.75]  # centres of 4 equal segments of 2 s
    for f, t in zip(frames, targets):
        assert abs(f.timestamp - t) <= 0.5 / 10 + 1e-6  # within half a frame period
        assert decoded_index(f) == round(f.timestamp * 10)  # the pixels are the frame at that time
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert frames[0].pixels.shape == (48, 64, 3) and frames[0].pixels.dtype == np.uint8


def test_rate_sampling_and_cap(videos):
    _, frames = read_frames(videos["mp4"], FrameSampler(num_frames=None, fps=2))
    assert [round(f.timestamp, 6) for f in frames] == [0.0, 0.5, 1.0, 1.5]
    assert [decoded_index(f) for f in frames] == [0, 5, 10, 15]
    _, capped = read_frames(videos["mp4"], FrameSampler(num_frames=None, fps=10, max_frames=7))
    assert len(capped) == 7


def test_short_video_gives_each_frame_once(videos):
    _, frames = read_frames(videos["short"], FrameSampler(num_frames=16))
    assert [decoded_index(f) for f in frames] == [0, 1, 2, 3, 4]
    assert len({f.timestamp for f in frames}) == 5


def test_far_targets_are_reached_by_seeking(videos):
    _, frames = read_frames(videos["long"], FrameSampler(num_frames=3))
    # targets 1.67, 5.0, 8.33 s -> the first frames at or after them, less half a period
    assert [round(f.timestamp, 1) for f in frames] == [1.6, 5.0, 8.4]
    assert [decoded_index(f, step=4) for f in frames] == [8, 25, 42]


def test_sampler_refuses_ambiguous_settings():
    with pytest.raises(ValueError, match="exactly one"):
        FrameSampler(num_frames=8, fps=2)
    with pytest.raises(ValueError, match="exactly one"):
        FrameSampler(num_frames=None, fps=None)
    with pytest.raises(ValueError, match="num_frames"):
        FrameSampler(num_frames=0)


# --------------------------------------------------------------- aggregation


def test_aggregators_on_known_numbers():
    scores = [0.1, 0.9, 0.4, float("nan")]  # NaN: a frame that failed, ignored
    assert ScoreAggregator("mean")(scores) == pytest.approx(1.4 / 3)
    assert ScoreAggregator("max")(scores) == pytest.approx(0.9)
    assert ScoreAggregator("topk_mean", top_k=2)(scores) == pytest.approx(0.65)
    assert ScoreAggregator("topk_mean", top_k=10)(scores) == pytest.approx(1.4 / 3)  # k > frames: all
    assert math.isnan(ScoreAggregator("mean")([float("nan")]))
    with pytest.raises(ValueError, match="method"):
        ScoreAggregator("median")


def test_aggregate_videos_table():
    frames = pd.DataFrame(
        {
            "video_id": ["b", "a", "a", "a", "c"],
            "prob": [0.2, 0.1, 0.7, float("nan"), float("nan")],
            "ok": [True, True, True, False, False],
            "label": [0, 1, 1, 1, 1],
            "error": ["", "", "", "bad frame", "cannot open"],
            "video_seconds": [3.0, 2.0, 2.0, 2.0, 0.0],
        }
    )
    table = aggregate_videos(frames, ScoreAggregator("max")).set_index("video_id")
    assert list(table.index) == ["a", "b", "c"]
    assert table.loc["a", "prob"] == pytest.approx(0.7) and table.loc["a", "n_frames"] == 2 and table.loc["a", "n_failed"] == 1
    assert table.loc["b", "label"] == 0 and table.loc["a", "label"] == 1
    assert not table.loc["c", "ok"] and "cannot open" in table.loc["c", "error"]
    assert table.loc["a", "video_seconds"] == 2.0


# --------------------------------------------------------------- damaged files


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "text"])
def test_damaged_video_raises_a_clear_error(videos, kind):
    with pytest.raises(VideoDecodeError) as e:
        read_frames(videos[kind], FrameSampler(num_frames=4))
    assert str(videos[kind]) in str(e.value)


def test_dataset_skips_damaged_videos_and_goes_on(videos):
    records = [Record(str(videos[k]), label=1) for k in ("random", "mp4", "truncated", "short")]
    ds = VideoFrameDataset(records, Canonicalizer(size=32), FrameSampler(num_frames=4))
    samples = list(ds)
    by_path: dict[str, list] = {}
    for s in samples:
        by_path.setdefault(s["meta"]["path"], []).append(s)
    assert [len(by_path[r.path]) for r in records] == [1, 4, 1, 4]  # short: 5 frames, 4 asked
    for k in ("random", "truncated"):
        (bad,) = by_path[str(videos[k])]
        assert not bad["meta"]["ok"] and str(videos[k]) in bad["meta"]["error"]
        assert bad["image"].shape == (3, 32, 32) and float(bad["image"].abs().sum()) == 0.0
    good = by_path[str(videos["mp4"])]
    assert all(s["meta"]["ok"] and s["image"].shape == (3, 32, 32) for s in good)
    assert [s["meta"]["video_id"] for s in good] == [str(videos["mp4"])] * 4
    assert good[0]["meta"]["video_seconds"] == pytest.approx(2.0)
    assert [s["meta"]["frame_index"] for s in good] == [0, 1, 2, 3]


def test_face_crops_hook_turns_a_frame_into_several_samples(videos):
    def two_halves(frame):  # stands in for the face pipeline
        w = frame.shape[1]
        return [frame[:, : w // 2], frame[:, w // 2 :]]

    ds = VideoFrameDataset([Record(str(videos["mp4"]))], Canonicalizer(size=16), FrameSampler(num_frames=2), face_crops=two_halves)
    samples = list(ds)
    assert [(s["meta"]["frame_index"], s["meta"]["crop_index"]) for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]


# --------------------------------------------------------------- infer.py / evaluate.py


def _write_png(path: Path, seed: int) -> None:
    Image.fromarray(noise_frames(1, seed, 40)[0]).save(path)


@pytest.fixture(scope="module")
def infer_run(tiny_ckpt, videos, tmp_path_factory):
    from unmask.tasks.infer import run_inference

    root = tmp_path_factory.mktemp("infer_in")
    (root / "sub").mkdir()
    _write_png(root / "b_image.png", 1)
    _write_png(root / "sub" / "a_image.png", 2)
    (root / "notes.txt").write_text("hello")
    write_video(root / "clip.mp4", noise_frames(20, 3))
    write_video(root / "sub" / "clip.webm", noise_frames(10, 4), codec="libvpx")
    (root / "broken.mov").write_bytes(videos["random"].read_bytes())
    out = tmp_path_factory.mktemp("infer_out")
    cfg = compose(
        "infer",
        [f"ckpt={tiny_ckpt}", f"input={root}", f"output_dir={out}", "scoring.num_workers=2", "scoring.batch_size=8", "scores=true",
         "metrics=true", "video.sampler.num_frames=4", "video.aggregate.method=mean"],
    )
    result = run_inference(cfg)
    return {"root": root, "out": out, "result": result}


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_infer_one_row_per_file_videos_included(infer_run):
    rows = _rows(infer_run["result"])
    names = [r[0] for r in rows]
    assert names == sorted(["b_image.png", "sub/a_image.png", "notes.txt", "clip.mp4", "sub/clip.webm", "broken.mov"])
    assert all(r[1] in ("0", "1") for r in rows)
    undecodable = dict(line.split("\t", 1) for line in infer_run["result"].with_suffix(".undecodable.txt").read_text().splitlines())
    assert set(undecodable) == {"notes.txt", "broken.mov"}  # the damaged video got the fallback, the run went on
    assert dict(rows)["broken.mov"] == "0"


def test_infer_video_score_is_the_mean_of_its_frames(infer_run):
    scores = pd.read_csv(infer_run["result"].with_suffix(".scores.csv")).set_index("name")
    frames = pd.read_csv(infer_run["result"].with_suffix(".frames.csv"))
    assert scores.loc["clip.mp4", "n_frames"] == 4 and scores.loc["sub/clip.webm", "n_frames"] == 4
    assert scores.loc["clip.mp4", "video_seconds"] == pytest.approx(2.0)
    assert scores.loc["sub/clip.webm", "video_seconds"] == pytest.approx(1.0)
    for name in ("clip.mp4", "sub/clip.webm"):
        mine = frames[frames["name"] == name]
        assert len(mine) == 4 and mine["timestamp"].is_monotonic_increasing
        assert scores.loc[name, "prob"] == pytest.approx(mine["prob"].mean(), abs=2e-6)
    assert not scores.loc["broken.mov", "ok"] and math.isnan(scores.loc["broken.mov", "prob"])


def test_infer_reports_qps(infer_run):
    metrics = json.loads(infer_run["result"].with_suffix(".metrics.json").read_text())
    t = metrics["throughput"]
    assert (t["n_images"], t["n_videos"], t["n_video_frames"]) == (3, 3, 8)
    assert t["video_seconds"] == pytest.approx(3.0)  # 2 s + 1 s; the damaged video adds nothing
    assert t["wall_seconds"] > 0
    assert metrics["qps_image"] == pytest.approx(3 / t["wall_seconds"])
    assert metrics["qps_video"] == pytest.approx(3.0 / t["wall_seconds"])


def test_infer_accepts_a_manifest(tiny_ckpt, infer_run, tmp_path):
    from unmask.tasks.infer import run_inference

    root = infer_run["root"]
    (root / "list.csv").write_text("relpath\nclip.mp4\nsub/a_image.png\nmissing.jpg\n")
    cfg = compose("infer", [f"ckpt={tiny_ckpt}", f"input={root / 'list.csv'}", f"output_dir={tmp_path}", "scoring.num_workers=0", "video.sampler.num_frames=2"])
    rows = _rows(run_inference(cfg))
    assert [r[0] for r in rows] == ["clip.mp4", "missing.jpg", "sub/a_image.png"]


@pytest.fixture(scope="module")
def video_manifest(tmp_path_factory, videos) -> Path:
    """train/val: images; test: 4 video files, 2 videos given as frame images with a
    video_id, and a damaged video."""
    root = tmp_path_factory.mktemp("video_manifest")
    rows = []
    for split in ("train", "val"):
        for i, label in enumerate(["real", "fake"] * 2):
            _write_png(root / f"{split}_{i}.png", 100 + i + (10 if split == "val" else 0))
            rows.append({"relpath": f"{split}_{i}.png", "label": label, "split": split, "video_id": ""})
    for i, label in enumerate(["real", "fake", "real", "fake"]):
        write_video(root / f"v{i}.mp4", noise_frames(6, 200 + i), fps=5)
        rows.append({"relpath": f"v{i}.mp4", "label": label, "split": "test", "video_id": ""})
    for v, label in enumerate(["real", "fake"]):
        for j in range(3):
            _write_png(root / f"framevid{v}_{j}.png", 300 + 3 * v + j)
            rows.append({"relpath": f"framevid{v}_{j}.png", "label": label, "split": "test", "video_id": f"fv{v}"})
    (root / "broken.avi").write_bytes(videos["random"].read_bytes())
    rows.append({"relpath": "broken.avi", "label": "fake", "split": "test", "video_id": ""})
    with open(root / "MANIFEST.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "MANIFEST.csv"


def test_evaluate_reports_video_level_metrics_and_qps(tiny_ckpt, video_manifest, tmp_path):
    from hydra.utils import instantiate

    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.combine import VideoOptions
    from unmask.tasks.evaluate import evaluate_records

    cfg = compose("evaluate", ["data=manifest", f"data.source.manifest={video_manifest}", "data.image_size=32", "output_dir=/tmp", "hydra.run.dir=/tmp"])
    options = VideoOptions(sampler=FrameSampler(num_frames=3), aggregator=ScoreAggregator("max"))
    data = instantiate(cfg.data)
    data.setup()
    report = evaluate_records(str(tiny_ckpt), data.records["test"], tmp_path, ScoringConfig(num_workers=1, progress=False), options)
    video = report["video"]
    assert video["n_videos"] == 7 and video["n_undecodable"] == 1 and video["aggregate"] == "max"
    assert video["overall"]["n"] == 6 and 0.0 <= video["overall"]["auc"] <= 1.0
    predictions = pd.read_csv(tmp_path / "predictions.csv")  # one row per file, a video file's aggregated
    frames = pd.read_csv(tmp_path / "frames.csv")  # the frames behind the video files
    table = pd.read_csv(tmp_path / "videos.csv").set_index("video_id")
    assert len(predictions) == 11 and predictions["path"].is_unique
    # the frame images of a manifest video are aggregated under their explicit id
    fv0 = predictions[predictions["video_id"] == "fv0"]
    assert len(fv0) == 3 and table.loc["fv0", "prob"] == pytest.approx(fv0["prob"].max())
    assert table.loc["fv1", "label"] == 1 and table.loc["fv0", "label"] == 0
    v1 = str(video_manifest.parent / "v1.mp4")
    assert table.loc[v1, "n_frames"] == 3 and table.loc[v1, "prob"] == pytest.approx(frames.loc[frames["path"] == v1, "prob"].max())
    assert predictions.set_index("path").loc[v1, "prob"] == pytest.approx(table.loc[v1, "prob"])  # the file's row is its video score
    saved = json.loads((tmp_path / "metrics.json").read_text())
    t = saved["throughput"]
    assert (t["n_images"], t["n_videos"], t["n_video_frames"]) == (6, 5, 12)
    assert t["video_seconds"] == pytest.approx(4 * 1.2)
    assert saved["qps_video"] == pytest.approx(4 * 1.2 / t["wall_seconds"]) and saved["qps_image"] == pytest.approx(6 / t["wall_seconds"])
    assert "## Video level" in (tmp_path / "report.md").read_text()


def test_evaluate_image_only_has_qps_and_no_video_part(tiny_run, tmp_path):
    from hydra.utils import instantiate

    from unmask.core.schemas import ScoringConfig
    from unmask.tasks.evaluate import evaluate_records

    cfg = compose(
        "evaluate",
        ["data.source.n_per_class=16", "data.source.size=32", "data.image_size=32", f"paths.cache_dir={tiny_run['cache_dir']}", "output_dir=/tmp", "hydra.run.dir=/tmp"],
    )
    data = instantiate(cfg.data)
    data.setup()
    report = evaluate_records(str(tiny_run["ckpt"]), data.records["test"], tmp_path, ScoringConfig(num_workers=0, progress=False))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert "video" not in saved and not (tmp_path / "videos.csv").exists()
    assert saved["qps_video"] == 0.0 and saved["qps_image"] == pytest.approx(report["overall"]["n"] / saved["throughput"]["wall_seconds"])
    assert "video_id" not in pd.read_csv(tmp_path / "predictions.csv").columns
    assert os.path.getsize(tmp_path / "roc.png") > 0
