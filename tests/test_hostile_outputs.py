"""Issue 17, output side: hostile file names and hostile destinations never corrupt or lose a
result. Formula-looking names are kept byte-exact in the contest file but neutralised in every
file a person opens (item 3); the destination and a CSV input are checked before any scoring
(item 8); line breaks in names keep one row per file (item 9); over-long names get shortened
explanation files (item 10); a second run in the same minute never replaces a result (item 17).
"""
from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import types
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest

import badimages as bad
from conftest import compose
from data.records import Record
from unmask.scoring.scorer import Scorer
from unmask.tasks.infer import run_inference

FORMULA = "=cmd|' /C calc'!A0.jpg"  # OWASP's CSV-injection example: file "C calc'!A0.jpg" in folder "=cmd|' "
GOOD = [FORMULA, "+plus.png", "-1+2.png", "@at.jpg", "\ttab.png", "line\nbreak.jpg", "carriage\rreturn.png", "plain.png"]
BROKEN = ["=broken.jpg", "bro\nken.jpg"]  # undecodable: they land in undecodable.txt
NAMES = sorted(GOOD + BROKEN)


def _neutral(name: str) -> str:
    """What a person's copy (scores.csv...) shows: a formula-looking text gets a leading quote."""
    return "'" + name if name[:1] in ("=", "+", "-", "@", "\t", "\r") else name


def _cfg(ckpt, input_path, output_dir, *overrides):
    return compose(
        "infer",
        [f"ckpt={ckpt}", f"input={input_path}", f"output_dir={output_dir}", "scoring.num_workers=0", "scoring.batch_size=8", *overrides],
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def hostile_run(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "testset"
    root.mkdir()
    for i, name in enumerate(GOOD):
        (root / name).parent.mkdir(exist_ok=True)
        (bad.good_jpeg if name.endswith(".jpg") else bad.good_png)(root / name, seed=i)
    for name in BROKEN:
        bad.random_bytes(root / name)
    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        result = run_inference(_cfg(tiny_ckpt, root, root.parent / "out", "scores=true"))
    finally:
        logging.getLogger().removeHandler(handler)
    return {"result": result, "warnings": handler.messages, "root": root}


def _contest_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# --------------------------------------------------------------- item 3: formula injection


def test_formula_name_is_byte_exact_in_the_contest_file_and_warned(hostile_run):
    result = hostile_run["result"]
    raw = result.read_bytes()
    assert b"\n" + FORMULA.encode() + b"," in b"\n" + raw  # the contest needs the name as it is
    assert [r[0] for r in _contest_rows(result)] == NAMES
    warned = [m for m in hostile_run["warnings"] if "formula" in m]
    assert warned and FORMULA in warned[0], hostile_run["warnings"]


def test_formula_names_are_neutralised_in_scores_and_undecodable(hostile_run):
    result = hostile_run["result"]
    scores = pd.read_csv(result.with_suffix(".scores.csv"), keep_default_na=False, na_values=[""])
    assert scores["name"].tolist() == [_neutral(n) for n in NAMES]
    assert "'" + FORMULA in scores["name"].tolist()
    assert pd.api.types.is_float_dtype(scores["prob"])  # numbers stay numbers
    text = result.with_suffix(".undecodable.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) == len(BROKEN)  # one line per file, whatever its name holds
    assert lines[0].split("\t")[0] == "'=broken.jpg"


def test_markdown_tables_neutralise_text_but_keep_numbers():
    from unmask.reports.tables import markdown_table

    table = markdown_table(["source", "auc", "text number"], [[FORMULA, -0.5, "-0.25"], ["@gen", 0.5, "+1e3"]])
    assert "| '=cmd\\|' /C calc'!A0.jpg | -0.5000 | -0.25 |" in table
    assert "| '@gen | 0.5000 | +1e3 |" in table


def test_evaluate_outputs_neutralise_formulas(tiny_ckpt, tmp_path, monkeypatch):
    from unmask.core.schemas import ScoringConfig
    from unmask.tasks.evaluate import evaluate_records

    data = tmp_path / "data"
    data.mkdir()
    names = [FORMULA, "real_a.png", "@fake.jpg", "real_b.png"]
    for i, name in enumerate(names):
        (data / name).parent.mkdir(exist_ok=True)
        (bad.good_jpeg if name.endswith(".jpg") else bad.good_png)(data / name, seed=i)
    monkeypatch.chdir(data)  # relative paths: the path column starts with the hostile name
    records = [Record(n, label=i % 2, source="=HYPERLINK(\"http://x\")", generator="+gen") for i, n in enumerate(names)]
    evaluate_records(str(tiny_ckpt), records, tmp_path / "eval", ScoringConfig(num_workers=0, batch_size=4, progress=False))
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert sorted(predictions["path"]) == sorted(_neutral(n) for n in names)
    assert pd.api.types.is_float_dtype(predictions["prob"])
    report = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| '=HYPERLINK(\"http://x\") |" in report and "| '+gen |" in report
    assert "| =HYPERLINK" not in report


def test_audit_csv_neutralises_formulas(tmp_path):
    """audit.csv (added after the issue) was written with a bare ``to_csv`` (audit of issue 17)."""
    from unmask.audit.measures import MeasureContext
    from unmask.audit.run import audit

    data = tmp_path / "data"
    data.mkdir()
    records = [
        Record(str(bad.good_png(data / name, seed=i)), label=i % 2, source='=HYPERLINK("http://x")', generator="+gen")
        for i, name in enumerate(["a.png", "b.png"])
    ]
    audit(records, MeasureContext(), tmp_path / "audit", cache_dir=tmp_path / "cache", progress=False)
    table = pd.read_csv(tmp_path / "audit" / "audit.csv")
    assert table["source"].tolist() == ["'=HYPERLINK(\"http://x\")"] * 2 and table["generator"].tolist() == ["'+gen"] * 2
    assert pd.api.types.is_numeric_dtype(table["label"])


# --------------------------------------------------------------- item 9: line breaks in names


def test_line_breaks_in_names_keep_one_row_per_file(hostile_run):
    result = hostile_run["result"]
    rows = _contest_rows(result)
    assert len(rows) == len(NAMES) and [r[0] for r in rows] == NAMES
    assert all(len(r) == 2 for r in rows)
    frame = pd.read_csv(result, header=None, keep_default_na=False)
    assert frame.shape == (len(NAMES), 2) and frame[0].tolist() == NAMES
    scores = pd.read_csv(result.with_suffix(".scores.csv"), keep_default_na=False, na_values=[""])
    assert len(scores) == len(NAMES)
    assert {"line\nbreak.jpg", "carriage\rreturn.png"} <= set(scores["name"])
    with open(result.with_suffix(".scores.csv"), newline="", encoding="utf-8") as f:
        assert len(list(csv.reader(f))) == len(NAMES) + 1  # + the header


# --------------------------------------------------------------- item 8: check before the work


class WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model or scoring a file fails the test: the error must come first."""

    def boom(*args, **kwargs):
        raise WorkStarted("the model was loaded or files were scored before the check")

    monkeypatch.setattr("unmask.tasks.infer.load_detector", boom)
    monkeypatch.setattr("unmask.tasks.evaluate.load_detector", boom)
    monkeypatch.setattr(Scorer, "score", boom)


@pytest.fixture
def one_image(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    bad.good_png(root / "a.png")
    return root


def test_output_dir_that_is_a_file_fails_before_any_work(tiny_ckpt, tmp_path, one_image, no_work):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="taken.*not a folder"):
        run_inference(_cfg(tiny_ckpt, one_image, target))
    assert target.read_text() == "not a folder"


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: a chmod 555 one, or for root (which ignores
    modes) a folder of sysfs, where nobody creates files."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("running as root without sysfs: no folder root cannot write")
    return Path("/sys/kernel")


def test_read_only_output_dir_fails_before_any_work(tiny_ckpt, tmp_path, one_image, no_work):
    locked = _read_only_folder(tmp_path)
    try:
        with pytest.raises(PermissionError, match="not writable|cannot be created"):
            run_inference(_cfg(tiny_ckpt, one_image, locked))
    finally:
        if locked.is_relative_to(tmp_path):
            locked.chmod(0o755)


def test_full_disk_fails_before_any_work(tiny_ckpt, tmp_path, one_image, no_work, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=100))
    with pytest.raises(OSError, match="free"):
        run_inference(_cfg(tiny_ckpt, one_image, tmp_path / "out"))
    assert not list((tmp_path / "out").glob("result_*"))  # no empty result left behind


def test_evaluate_output_dir_that_is_a_file_fails_before_any_work(tiny_ckpt, tmp_path, one_image, no_work):
    from unmask.tasks.evaluate import evaluate_records

    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        evaluate_records(str(tiny_ckpt), [Record(str(one_image / "a.png"), label=0)], target)


@pytest.mark.parametrize(
    "rows, message",
    [
        (["a.png", "b.png", "a.png"], r"line 4: duplicate relpath 'a\.png'.*line 2"),
        (["a.png", "./a.png"], r"line 3: duplicate relpath '\./a\.png'.*line 2"),
        (["a.png", "{root}/a.png"], r"line 3: duplicate relpath '/.*a\.png'.*line 2"),
        (["../in/a.png", "a.png"], r"line 3: duplicate relpath 'a\.png'.*line 2"),
        (["a.png", "\"\""], r"line 3.*empty"),  # a quoted empty field: a blank line is skipped
    ],
    ids=["duplicate", "same-file", "absolute-same-file", "dotdot-same-file", "empty"],
)
def test_bad_csv_input_fails_before_any_work(tiny_ckpt, tmp_path, one_image, no_work, rows, message):
    manifest = one_image / "list.csv"
    manifest.write_text("relpath\n" + "".join(f"{r.format(root=one_image)}\n" for r in rows))
    with pytest.raises(ValueError, match=message):
        run_inference(_cfg(tiny_ckpt, manifest, tmp_path / "out"))
    assert not list((tmp_path / "out").glob("result_*")) if (tmp_path / "out").exists() else True


def test_csv_rows_outside_the_list_folder_get_their_rows(tiny_ckpt, tmp_path):
    """Absolute and ``..`` rows were scored, then crashed the run when it named them."""
    lists, other = tmp_path / "lists", tmp_path / "other"
    lists.mkdir()
    other.mkdir()
    bad.good_png(other / "b.png", seed=2)
    bad.good_png(other / "c.png", seed=3)
    manifest = lists / "list.csv"
    manifest.write_text(f"relpath\n../other/b.png\n{other / 'c.png'}\n")
    result = run_inference(_cfg(tiny_ckpt, manifest, tmp_path / "out"))
    with open(result, newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["../other/b.png", "../other/c.png"]


# --------------------------------------------------------------- item 10: over-long names


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("a", "img"):
            self.links.append(attrs.get("href") or attrs["src"])


def test_overlong_name_gets_a_shortened_explanation_file(tiny_ckpt, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    long_name = "x" * 246 + ".png"  # 250 bytes: fine on disk, too long with ".overlay.png" added
    bad.good_png(root / long_name, seed=1)
    bad.good_png(root / "short.png", seed=2)
    result = run_inference(_cfg(tiny_ckpt, root, tmp_path / "out", "explain=gallery", "explain.limit=2"))
    assert [r[0] for r in _contest_rows(result)] == sorted([long_name, "short.png"])
    out = result.with_suffix(".explain")
    index = (out / "index.html").read_text(encoding="utf-8")
    assert long_name in index  # the card shows the full name
    parser = _Links()
    parser.feed(index)
    assert len(parser.links) >= 6
    for link in parser.links:
        target = out / unquote(link)
        assert target.is_file(), link
        assert len(os.fsencode(target.name)) <= 255
    shortened = [p.name for p in out.iterdir() if p.name.startswith("xxxx")]
    assert shortened and all(len(n) < 250 for n in shortened)


def test_atomic_write_of_a_name_near_the_limit(tmp_path):
    from data.io import atomic_write_bytes

    target = tmp_path / ("a" * 251 + ".png")  # 255 bytes: the limit itself
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_gallery_failure_keeps_the_contest_file(tiny_ckpt, tmp_path, one_image, monkeypatch):
    def broken_gallery(*args, **kwargs):
        raise OSError("disk full while writing the gallery")

    monkeypatch.setattr("unmask.tasks.infer.write_gallery", broken_gallery)
    with pytest.raises(OSError, match="gallery"):
        run_inference(_cfg(tiny_ckpt, one_image, tmp_path / "out", "explain=gallery", "scores=true"))
    (result,) = (tmp_path / "out").glob("result_*.xls")
    assert _contest_rows(result)[0][0] == "a.png"
    assert result.with_suffix(".scores.csv").is_file()


# --------------------------------------------------------------- item 17: one result per run


FIXED = dt.datetime(2026, 1, 2, 12, 30, 5)


@pytest.fixture
def same_minute(monkeypatch):
    """Every run starts at the same minute, as two runs seconds apart would."""

    class Fixed(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED

    monkeypatch.setattr("unmask.tasks.infer.dt", types.SimpleNamespace(datetime=Fixed))


def test_second_run_in_the_same_minute_gets_its_own_result(tiny_ckpt, tmp_path, one_image, same_minute, caplog):
    out = tmp_path / "out"
    first = run_inference(_cfg(tiny_ckpt, one_image, out, "scores=true"))
    assert first.name == "result_01021230.xls"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad.good_png(one_image / "b.png", seed=3)  # the second run sees one more file
    with caplog.at_level(logging.WARNING):
        second = run_inference(_cfg(tiny_ckpt, one_image, out, "scores=true"))
    assert second.name == "result_01021230_2.xls"
    assert {n: (out / n).read_bytes() for n in before} == before  # the first run is untouched
    assert [r[0] for r in _contest_rows(second)] == ["a.png", "b.png"]
    assert pd.read_csv(second.with_suffix(".scores.csv"))["name"].tolist() == ["a.png", "b.png"]
    assert any("result_01021230.xls" in r.getMessage() and second.name in r.getMessage() for r in caplog.records)


def test_no_result_sits_beside_a_stale_sidecar(tiny_ckpt, tmp_path, one_image, same_minute):
    out = tmp_path / "out"
    first = run_inference(_cfg(tiny_ckpt, one_image, out, "scores=true"))
    second = run_inference(_cfg(tiny_ckpt, one_image, out, "scores=false"))
    assert second != first and not second.with_suffix(".scores.csv").exists()
    first.unlink()  # a person removes a result but keeps its scores
    third = run_inference(_cfg(tiny_ckpt, one_image, out, "scores=false"))
    assert third not in (first, second) and not third.with_suffix(".scores.csv").exists()
    assert sorted(p.name for p in out.glob("result_*.xls")) == sorted([second.name, third.name])


def test_two_reservations_in_the_same_minute_never_share_a_name(tmp_path):
    from unmask.reports.contest import reserve_result

    a, b = reserve_result(tmp_path, FIXED), reserve_result(tmp_path, FIXED)
    assert a != b and a.is_file() and b.is_file()
    assert a.name == "result_01021230.xls" and b.name == "result_01021230_2.xls"
