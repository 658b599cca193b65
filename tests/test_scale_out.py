"""Issue 14, part 3: scale-out batch inference on Lightning, streaming and resume.

- the shards of a streamed run merge into exactly the scorer's one-process rows (images,
  undecodable files and videos), and a re-run with the same key scores nothing again;
- infer.py streamed: a run whose shards were partly lost scores only the missing chunks and
  writes the same files as before, under a new result name;
- two processes (Lightning's ddp, gloo on the CPU) write exactly the rows of one process,
  also resuming with fewer pending chunks than ranks;
- kill -9 half way, then the same command again: the result files are identical to an
  uninterrupted run's, and the killed run's empty result claim is gone;
- memory stays flat as the number of files grows (one chunk of rows at a time);
- evaluate.py through shards gives the one-process report; what it cannot do is refused.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest

import badimages as bad
from conftest import ROOT, SUBPROCESS_ENV, compose
from data.records import UnlabelledFolderSource
from unmask.core.checkpoint import load_detector
from unmask.core.schemas import ScoringConfig
from unmask.scoring.combine import VideoOptions
from unmask.scoring.scorer import Scorer
from unmask.scoring.shards import ShardStore, ShardWriter, scale_out_trainer, score_sharded, score_to_shards, shard_key
from unmask.tasks.infer import run_inference


def make_folder(root: Path, n_good: int, videos: bool = False, bad_files: bool = True) -> Path:
    root.mkdir(parents=True)
    for i in range(n_good):
        (bad.good_jpeg if i % 2 else bad.good_png)(root / f"good_{i:03d}.{'jpg' if i % 2 else 'png'}", seed=i)
    if bad_files:
        for name in ("empty.jpg", "random_bytes.jpg", "truncated.jpg"):
            bad.BAD_FILES[name](root / name)
    if videos:
        from test_video import counter_frames, write_video

        write_video(root / "clip_a.mp4", counter_frames(8))
        write_video(root / "nested_b.mp4", counter_frames(5))
        (root / "broken.mp4").write_bytes(b"\x00" * 64)
    return root


def results(where: Path) -> dict[str, bytes]:
    """A run's files by kind (xls, scores.csv, undecodable.txt) -> bytes: those of the result
    ``where`` (a .xls), or of the one non-empty result in the folder ``where``."""
    if where.is_dir():
        (where,) = [p for p in where.glob("result_*.xls") if p.stat().st_size]
    return {p.name[len(where.stem) + 1 :]: p.read_bytes() for p in where.parent.glob(f"{where.stem}.*")}


def infer_cfg(ckpt, input_dir, output_dir, *overrides):
    return compose("infer", [f"ckpt={ckpt}", f"input={input_dir}", f"output_dir={output_dir}", "scoring.num_workers=0",
                             "scoring.batch_size=4", "scores=true", "scoring.progress=false", *overrides])


STREAM = ["scoring.stream=true", "scoring.shard_size=4"]


def test_shards_merge_into_the_scorers_rows_and_a_rerun_scores_nothing(tiny_ckpt, tmp_path, caplog):
    root = make_folder(tmp_path / "in", 9, videos=True)
    records = UnlabelledFolderSource(str(root)).records()
    options = ScoringConfig(num_workers=0, batch_size=3, progress=False, stream=True, shard_size=3)
    one = Scorer(load_detector(tiny_ckpt), options).score(records)
    merged = score_sharded(tiny_ckpt, records, options, VideoOptions(), tmp_path / "out", root)

    # Videos between the images shift the image batches against the one-process pass: the
    # same rows, columns and dtypes, probabilities equal up to float32 noise of other batch shapes.
    pd.testing.assert_frame_equal(merged.files, one.files, check_exact=False, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(merged.frames, one.frames, check_exact=False, rtol=0, atol=1e-6)
    assert (merged.n_images, merged.n_videos, merged.video_seconds) == (one.n_images, one.n_videos, one.video_seconds)
    (folder,) = (tmp_path / "out" / "shards").iterdir()
    chunks = sorted(folder.glob("chunk_*.json"))
    assert len(chunks) == -(-len(records) // 3)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"] == folder.name and manifest["files"] == len(records)

    stamps = {p: p.stat().st_mtime_ns for p in chunks}
    caplog.clear()
    with caplog.at_level("INFO", logger="unmask.scoring.shards"):
        again = score_sharded(tiny_ckpt, records, options, VideoOptions(), tmp_path / "out", root)
    assert f"{len(chunks)} of {len(chunks)} chunks" in caplog.text  # nothing left to score
    assert {p: p.stat().st_mtime_ns for p in chunks} == stamps
    pd.testing.assert_frame_equal(again.files, merged.files, check_exact=True)


def test_the_key_follows_what_changes_a_score(tiny_ckpt, tmp_path):
    root = make_folder(tmp_path / "in", 3, bad_files=False)
    records = UnlabelledFolderSource(str(root)).records()
    base = shard_key(tiny_ckpt, records, ScoringConfig(stream=True), VideoOptions(), root)["key"]
    assert shard_key(tiny_ckpt, records, ScoringConfig(stream=True, batch_size=7, threshold="0.3"), VideoOptions(), root)["key"] == base
    assert shard_key(tiny_ckpt, records, ScoringConfig(stream=True, shard_size=2), VideoOptions(), root)["key"] != base
    assert shard_key(tiny_ckpt, records[:2], ScoringConfig(stream=True), VideoOptions(), root)["key"] != base
    os.utime(records[0].path, ns=(1, 1))  # the file changed
    assert shard_key(tiny_ckpt, records, ScoringConfig(stream=True), VideoOptions(), root)["key"] != base


def test_streamed_infer_equals_the_one_process_files_and_resumes_only_missing_chunks(tiny_ckpt, tmp_path):
    root = make_folder(tmp_path / "in", 10)
    expected = results(run_inference(infer_cfg(tiny_ckpt, root, tmp_path / "plain")))
    first = run_inference(infer_cfg(tiny_ckpt, root, tmp_path / "stream", *STREAM))
    assert results(first) == expected  # shard size a multiple of the batch: the same batches, the same bits
    assert set(expected) == {"xls", "scores.csv", "undecodable.txt"}

    (folder,) = (tmp_path / "stream" / "shards").iterdir()
    chunks = sorted(folder.glob("chunk_*.json"))
    lost = chunks[1::2]
    for p in lost:
        p.unlink()
    kept = {p: p.stat().st_mtime_ns for p in chunks if p not in lost}
    second = run_inference(infer_cfg(tiny_ckpt, root, tmp_path / "stream", *STREAM))
    assert all(p.is_file() for p in lost)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished shards were not scored again
    assert second != first and results(first) == expected  # a new result; the first one untouched
    assert results(second) == expected


@pytest.mark.slow
def test_two_ddp_processes_write_exactly_the_rows_of_one_process(tiny_ckpt, tmp_path):
    root = make_folder(tmp_path / "in", 13)
    one = run_inference(infer_cfg(tiny_ckpt, root, tmp_path / "one"))
    command = [sys.executable, str(ROOT / "infer.py"), f"ckpt={tiny_ckpt}", f"input={root}", f"output_dir={tmp_path / 'two'}",
               "scoring.accelerator=cpu", "scoring.devices=2", "scoring.strategy=ddp", "scoring.shard_size=4", "scoring.batch_size=4",
               "scoring.num_workers=0", "scoring.progress=false", "scores=true"]
    proc = subprocess.run(command, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "on 2 process(es)" in proc.stdout + proc.stderr
    assert results(tmp_path / "two") == results(one)
    (first,) = (tmp_path / "two").glob("result_*.xls")  # rank one claimed no result of its own
    (folder,) = (tmp_path / "two" / "shards").iterdir()
    chunks = sorted(folder.glob("chunk_*.json"))
    assert len(chunks) == 4  # 16 files in chunks of 4, shared by the two ranks

    # Fewer pending chunks than ranks (a resume with one chunk lost; also any input under
    # 2 * shard_size files): the idle rank takes a no-op step and the run completes.
    chunks[2].unlink()
    again = subprocess.run(command, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, errors="replace", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-2000:]
    assert "3 of 4 chunks" in again.stdout + again.stderr and chunks[2].is_file()
    (second,) = set((tmp_path / "two").glob("result_*.xls")) - {first}
    assert results(second) == results(one)


@pytest.mark.slow
def test_kill_9_half_way_then_the_same_command_gives_identical_files(tiny_ckpt, tmp_path):
    root = make_folder(tmp_path / "in", 29)  # 32 files, one per chunk
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "infer.py"), f"ckpt={tiny_ckpt}", f"input={root}", f"output_dir={out}", "scoring.stream=true",
               "scoring.shard_size=1", "scoring.batch_size=1", "scoring.num_workers=0", "scoring.progress=false", "scores=true"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written, deadline = 0, time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        written = len(list(out.glob("shards/*/chunk_*.json")))
        if written >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed half way"
    written = len(list(out.glob("shards/*/chunk_*.json")))
    assert 8 <= written < 32
    assert [p.stat().st_size for p in out.glob("result_*.xls")] == [0]  # the killed run's empty claim

    done = subprocess.run(command, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{written} of 32 chunks" in done.stdout + done.stderr  # only the missing chunks were scored
    assert not [p for p in out.glob("result_*") if p.stat().st_size == 0]  # the claim was released, not left behind
    whole = run_inference(infer_cfg(tiny_ckpt, root, tmp_path / "whole", "scoring.stream=true", "scoring.shard_size=1", "scoring.batch_size=1"))
    assert results(out) == results(whole)


def test_memory_stays_flat_as_the_number_of_files_grows(tiny_ckpt, tmp_path):
    options = ScoringConfig(num_workers=0, batch_size=8, progress=False, stream=True, shard_size=8)

    def peak(n: int) -> int:
        root = make_folder(tmp_path / f"in{n}", n, bad_files=False)
        records = UnlabelledFolderSource(str(root)).records()
        facts = shard_key(tiny_ckpt, records, options, VideoOptions(), root)
        store = ShardStore.for_run(tmp_path / f"out{n}", facts)
        store.open(facts)
        trainer = scale_out_trainer(options, [ShardWriter(store)])
        tracemalloc.start()
        try:
            score_to_shards(trainer, tiny_ckpt, records, options, VideoOptions(), store)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(8)  # first-use allocations (imports, caches) are not the files'
    small, large = peak(24), peak(96)
    assert large < 1.25 * small + (256 << 10), f"peak traced memory {small} B for 24 files, {large} B for 96"


def test_evaluate_through_shards_writes_the_one_process_report(tiny_ckpt, tmp_path):
    from unmask.tasks.evaluate import evaluate_records

    root = make_folder(tmp_path / "in", 8, bad_files=False)
    records = [r.__class__(r.path, label=i % 2) for i, r in enumerate(UnlabelledFolderSource(str(root)).records())]
    one = evaluate_records(tiny_ckpt, records, tmp_path / "one", ScoringConfig(num_workers=0, batch_size=4, progress=False))
    sharded = evaluate_records(tiny_ckpt, records, tmp_path / "sharded", ScoringConfig(num_workers=0, batch_size=4, progress=False,
                                                                                      stream=True, shard_size=4), scale_out=True)
    assert sharded["overall"] == one["overall"]
    assert (tmp_path / "one" / "predictions.csv").read_bytes() == (tmp_path / "sharded" / "predictions.csv").read_bytes()
    assert list((tmp_path / "sharded" / "shards").iterdir())

    masked = [r.__class__(r.path, label=r.label, mask=r.path) for r in records]
    with pytest.raises(ValueError, match="localisation"):
        evaluate_records(tiny_ckpt, masked, tmp_path / "m", ScoringConfig(stream=True), scale_out=True)


@pytest.mark.parametrize(
    "override,key",
    [("scoring.devices=0", "scoring.devices"), ("scoring.num_nodes=0", "scoring.num_nodes"), ("scoring.strategy=horovod", "scoring.strategy"),
     ("scoring.accelerator=tpu9", "scoring.accelerator"), ("scoring.shard_size=0", "scoring.shard_size")],
)
def test_scale_out_settings_are_checked_before_any_work(override, key, tmp_path):
    from unmask.core.schemas import options

    with pytest.raises(ValueError, match=key):
        options(compose("infer", ["ckpt=x.ckpt", f"output_dir={tmp_path}", override]).scoring)


@pytest.mark.gpu
def test_streaming_on_cuda_gives_the_cpus_decisions(tiny_ckpt, tmp_path):
    root = make_folder(tmp_path / "in", 12)
    records = UnlabelledFolderSource(str(root)).records()
    cpu = Scorer(load_detector(tiny_ckpt), ScoringConfig(device="cpu", num_workers=0, progress=False)).score(records).files
    cuda = score_sharded(tiny_ckpt, records, ScoringConfig(accelerator="gpu", stream=True, shard_size=4, progress=False), VideoOptions(), tmp_path / "o")
    assert cuda["path"].tolist() == cpu["path"].tolist()
    assert (cuda["prob"] - cpu["prob"]).abs().max() < 5e-3
