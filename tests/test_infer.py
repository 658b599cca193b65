"""Issue 2, sections 6 and 8: infer.py writes the contest file for any folder, never
crashing and never dropping a row, and refuses wrong config values up front."""
from __future__ import annotations

import csv
import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import badimages as bad
from conftest import ROOT, SUBPROCESS_ENV, compose
from unmask.tasks.infer import run_inference

RESULT_NAME = re.compile(r"^result_(\d{8})\.xls$")
NON_UTF8_NAME = os.fsdecode(b"\xc6\xac\xd5\xd5_gbk.jpg")  # GBK bytes, as unzipped from a Windows archive


def _make_testset(root: Path) -> tuple[list[str], set[str]]:
    """Good images, every bad input, a .txt, nested folders, odd names and hidden files.
    Returns (expected row names in ascending order, names expected to be undecodable)."""
    root.mkdir(parents=True)
    for i in range(6):
        (bad.good_jpeg if i % 2 else bad.good_png)(root / f"good_{i:02d}.{'jpg' if i % 2 else 'png'}", seed=i)
    for name, make in bad.BAD_FILES.items():
        make(root / name)
    (root / "notes.txt").write_text("not an image\n")
    (root / "nested" / "deeper").mkdir(parents=True)
    bad.good_jpeg(root / "nested" / "deeper" / "good_n.jpg", seed=10)
    bad.good_png(root / "nested" / "z.png", seed=11)
    bad.good_jpeg(root / "фото_名前.jpg", seed=12)
    bad.good_jpeg(root / "a,b.jpg", seed=13)
    bad.good_jpeg(root / NON_UTF8_NAME, seed=14)
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / ".hidden").mkdir()
    bad.good_jpeg(root / ".hidden" / "x.jpg")
    names = sorted(
        [f"good_{i:02d}.{'jpg' if i % 2 else 'png'}" for i in range(6)]
        + list(bad.BAD_FILES)
        + ["notes.txt", "nested/deeper/good_n.jpg", "nested/z.png", "фото_名前.jpg", "a,b.jpg", NON_UTF8_NAME]
    )
    return names, set(bad.UNDECODABLE) | {"notes.txt"}


def _read_result(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))


def _minute_stamps(start: dt.datetime, end: dt.datetime) -> set[str]:
    t, out = start.replace(second=0, microsecond=0), set()
    while t <= end:
        out.add(f"{t:%m%d%H%M}")
        t += dt.timedelta(minutes=1)
    return out


def _left_overs(folder: Path) -> list[str]:
    """Temp files an interrupted or non-atomic write would leave behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    root = tmp_path_factory.mktemp("contest") / "testset"
    names, undecodable = _make_testset(root)
    return {"root": root, "names": names, "undecodable": undecodable}


def _cfg(ckpt, input_dir, output_dir, *overrides):
    return compose(
        "infer",
        [f"ckpt={ckpt}", f"input={input_dir}", f"output_dir={output_dir}", "scoring.num_workers=0", "scoring.batch_size=8", *overrides],
    )


# --------------------------------------------------------------- the CLI, once


@pytest.fixture(scope="module")
def cli_run(tiny_ckpt, testset):
    """``python infer.py ckpt=PATH scores=true`` run from the folder that holds ./testset:
    the defaults (input=./testset, output in the current folder) are what is tested."""
    cwd = testset["root"].parent
    start = dt.datetime.now()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), f"ckpt={tiny_ckpt}", "scores=true", "scoring.batch_size=8"],
        cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True, errors="replace", timeout=300,
    )
    end = dt.datetime.now()
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return {"cwd": cwd, "start": start, "end": end, "proc": proc}


@pytest.mark.slow
def test_cli_writes_result_file_named_by_time_in_current_folder(cli_run):
    produced = sorted(p.name for p in cli_run["cwd"].iterdir() if p.is_file())
    results = [n for n in produced if RESULT_NAME.match(n)]
    assert len(results) == 1, produced
    stamp = RESULT_NAME.match(results[0]).group(1)
    assert stamp in _minute_stamps(cli_run["start"], cli_run["end"])
    base = results[0][: -len(".xls")]
    # exactly the result, the undecodable sidecar and the scores: no temp files, no logs
    assert produced == sorted([results[0], base + ".undecodable.txt", base + ".scores.csv"])
    assert _left_overs(cli_run["cwd"]) == []
    assert "images/s" in cli_run["proc"].stdout


@pytest.mark.slow
def test_cli_one_row_per_file_sorted_two_columns(cli_run, testset):
    (result,) = cli_run["cwd"].glob("result_*.xls")
    rows = _read_result(result)
    names = [r[0] for r in rows]
    assert names == testset["names"]  # every non-hidden file once, ascending, no header
    assert names == sorted(names)
    assert all(len(r) == 2 and r[1] in ("0", "1") for r in rows)
    # the raw bytes: plain names are bare fields, lines end in \n, non-UTF-8 names kept as on disk
    raw = result.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw and not raw.startswith(b"name")
    assert b"\n\"a,b.jpg\"," in b"\n" + raw
    assert b"\xc6\xac\xd5\xd5_gbk.jpg," in raw
    assert "фото_名前.jpg,".encode() in raw


@pytest.mark.slow
def test_cli_undecodable_files_get_the_fallback_and_the_sidecar(cli_run, testset):
    (result,) = cli_run["cwd"].glob("result_*.xls")
    labels = dict(_read_result(result))
    assert all(labels[n] == "0" for n in testset["undecodable"])  # fallback_label: 0
    (sidecar,) = cli_run["cwd"].glob("result_*.undecodable.txt")
    listed = [line.split("\t") for line in sidecar.read_text(encoding="utf-8").splitlines()]
    assert sorted(n for n, _ in listed) == sorted(testset["undecodable"])
    assert all(reason.strip() for _, reason in listed)  # each one says why
    reasons = dict(listed)
    assert "empty file" in reasons["empty.jpg"] and "decompression-bomb" in reasons["bomb.png"]
    assert "could not be decoded" in cli_run["proc"].stdout + cli_run["proc"].stderr


@pytest.mark.slow
def test_cli_scores_file(cli_run, testset):
    (result,) = cli_run["cwd"].glob("result_*.xls")
    (scores_path,) = cli_run["cwd"].glob("result_*.scores.csv")
    scores = pd.read_csv(scores_path, keep_default_na=False, na_values=[""], encoding="utf-8", encoding_errors="surrogateescape")
    assert list(scores.columns) == ["name", "prob", "decision", "ok", "error"]
    assert scores["name"].tolist() == testset["names"]
    assert scores["decision"].astype(str).tolist() == [r[1] for r in _read_result(result)]
    ok = scores["ok"].astype(bool)
    assert set(scores.loc[~ok, "name"]) == testset["undecodable"]
    assert scores.loc[~ok, "prob"].isna().all()
    assert scores.loc[ok, "prob"].between(0, 1).all()


# --------------------------------------------------------------- in-process runs


@pytest.fixture(scope="module")
def probs(tiny_ckpt, testset, tmp_path_factory):
    """Full-precision scores of the decodable test files, via the same path as inference."""
    from data.records import UnlabelledFolderSource
    from unmask.core.checkpoint import load_detector
    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.scorer import Scorer

    loaded = load_detector(tiny_ckpt)
    records = UnlabelledFolderSource(str(testset["root"])).records()
    df = Scorer(loaded, ScoringConfig(batch_size=8, num_workers=0, progress=False)).score(records).files
    df["name"] = [Path(p).relative_to(testset["root"]).as_posix() for p in df["path"]]
    return df[df["ok"]].set_index("name")["prob"], loaded.threshold


def _split_point(p: pd.Series) -> float:
    """A threshold strictly between two neighbouring scores near the median."""
    v = np.sort(p.to_numpy())
    mid = len(v) // 2
    assert v[mid] > v[mid - 1], "tiny model gave tied scores"
    return float((v[mid] + v[mid - 1]) / 2)


def _labels(path: Path) -> dict[str, int]:
    return {n: int(label) for n, label in _read_result(path)}


def test_stored_threshold_is_used_by_default(tiny_ckpt, testset, probs, tmp_path):
    p, _ = probs
    # Store a threshold that splits these scores, so the default is visibly the stored one.
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    stored = _split_point(p)
    ckpt["unmask"]["threshold"] = stored  # its one place in the checkpoint
    moved = tmp_path / "moved_threshold.ckpt"
    torch.save(ckpt, moved)
    out = run_inference(_cfg(moved, testset["root"], tmp_path / "out"))
    labels = _labels(out)
    expected = {n: int(v >= np.float32(stored)) for n, v in p.items()}
    assert {n: labels[n] for n in expected} == expected
    assert 0 < sum(expected.values()) < len(expected)


def test_numeric_threshold(tiny_ckpt, testset, probs, tmp_path):
    p, _ = probs
    thr = _split_point(p)
    labels = _labels(run_inference(_cfg(tiny_ckpt, testset["root"], tmp_path, f"scoring.threshold={thr!r}")))
    assert {n: labels[n] for n in p.index} == {n: int(v >= thr) for n, v in p.items()}
    all_fake = _labels(run_inference(_cfg(tiny_ckpt, testset["root"], tmp_path / "zero", "scoring.threshold=0.0")))
    assert all(all_fake[n] == 1 for n in p.index)


def test_prior_half_labels_half_by_rank(tiny_ckpt, testset, probs, tmp_path):
    p, _ = probs
    labels = _labels(run_inference(_cfg(tiny_ckpt, testset["root"], tmp_path, "scoring.threshold=prior:0.5", "fallback_label=1")))
    fakes = {n for n in p.index if labels[n] == 1}
    assert len(fakes) == round(0.5 * len(p))
    assert min(p[list(fakes)]) >= max(p.drop(list(fakes)))  # the top-scored half
    assert all(labels[n] == 1 for n in testset["undecodable"])  # fallback_label=1 applied


def test_empty_folder_gives_an_empty_result(tiny_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    out = run_inference(_cfg(tiny_ckpt, tmp_path / "empty", tmp_path / "out"))
    assert RESULT_NAME.match(out.name) and out.read_bytes() == b""
    assert [p.name for p in (tmp_path / "out").iterdir()] == [out.name]


def test_folder_of_only_bad_files(tiny_ckpt, tmp_path):
    root = tmp_path / "allbad"
    root.mkdir()
    bad.empty_file(root / "e.jpg")
    bad.random_bytes(root / "r.png")
    out = run_inference(_cfg(tiny_ckpt, root, tmp_path / "out", "scoring.threshold=prior:0.5"))
    assert out.read_text() == "e.jpg,0\nr.png,0\n"
    assert sorted(out.with_suffix(".undecodable.txt").read_text().split("\n")[i].split("\t")[0] for i in (0, 1)) == ["e.jpg", "r.png"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("scoring.threshold=abc", "threshold must be empty"),
        ("scoring.threshold=1.5", r"probability in \[0, 1\]"),
        ("scoring.threshold=prior:x", "needs a number P"),
        ("fallback_label=7", "fallback_label must be 0 or 1"),
    ],
)
def test_wrong_config_value_is_a_clear_error_before_any_work(tmp_path, override, message):
    # checked before the checkpoint is even opened: no scoring is wasted on a typo
    with pytest.raises(ValueError, match=message):
        run_inference(_cfg(tmp_path / "not_read.ckpt", tmp_path, tmp_path / "out", override))
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_input_are_clear_errors(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found; pass ckpt="):
        run_inference(_cfg(tmp_path / "nope.ckpt", tmp_path, tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="input folder .* not found"):
        run_inference(_cfg(tiny_ckpt, tmp_path / "no_such_dir", tmp_path / "out"))
