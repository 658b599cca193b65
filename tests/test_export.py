"""Issue 2, section 6: the contest CSV bytes, the decision rule and the threshold spec."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from unmask.core.metrics import decide, parse_threshold
from unmask.reports.contest import contest_filename, write_contest_csv


def test_contest_filename_pattern():
    assert contest_filename(dt.datetime(2026, 3, 7, 9, 5, 59)) == "result_03070905.xls"
    assert contest_filename(dt.datetime(2026, 12, 31, 23, 59)) == "result_12312359.xls"


def test_csv_exact_bytes_sorted_no_header(tmp_path):
    path = write_contest_csv(tmp_path / "r.xls", ["b.jpg", "a.png", "sub/c.jpg", "A.jpg", "é.jpg"], [1, 0, 1, 0, 1])
    # ascending by code point, no header, "\n" endings, UTF-8, nothing else
    assert path.read_bytes() == "A.jpg,0\na.png,0\nb.jpg,1\nsub/c.jpg,1\né.jpg,1\n".encode()
    assert not [p for p in tmp_path.iterdir() if p.name != "r.xls"]  # no temp file left


def test_csv_accepts_numpy_labels(tmp_path):
    path = write_contest_csv(tmp_path / "r.xls", ["x", "y"], np.array([1, 0]))
    assert path.read_text() == "x,1\ny,0\n"


def test_csv_empty(tmp_path):
    assert write_contest_csv(tmp_path / "r.xls", [], []).read_bytes() == b""


def test_csv_quotes_a_name_with_a_comma_instead_of_dropping_it(tmp_path):
    path = write_contest_csv(tmp_path / "r.xls", ["a,b.jpg", 'q"uote.jpg', "z.jpg"], [1, 0, 0])
    assert path.read_text() == '"a,b.jpg",1\n"q""uote.jpg",0\nz.jpg,0\n'
    import csv

    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["a,b.jpg", "1"], ['q"uote.jpg', "0"], ["z.jpg", "0"]]


@pytest.mark.parametrize(
    "names, labels, message",
    [(["a", "b"], [1], "one label per name"), (["a", "a"], [1, 0], "duplicate"), (["a"], [2], "must be 0 or 1")],
)
def test_csv_refuses_inconsistent_input(tmp_path, names, labels, message):
    with pytest.raises(ValueError, match=message):
        write_contest_csv(tmp_path / "r.xls", names, labels)
    assert not (tmp_path / "r.xls").exists()


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, ("stored", None)),
        ("", ("stored", None)),
        ("stored", ("stored", None)),
        (0.3, ("fixed", 0.3)),
        ("0.7", ("fixed", 0.7)),
        (1, ("fixed", 1.0)),
        ("prior:0.5", ("prior", 0.5)),
        (" PRIOR:0.25", ("prior", 0.25)),
    ],
)
def test_parse_threshold(spec, expected):
    assert parse_threshold(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("abc", "a number or prior:P"),
        (1.5, r"probability in \[0, 1\]"),
        (-0.1, r"probability in \[0, 1\]"),
        (float("nan"), r"probability in \[0, 1\]"),
        ("prior:1.2", r"P in \[0, 1\]"),
        ("prior:half", "needs a number P"),
        (True, "a number or prior:P"),
    ],
)
def test_parse_threshold_refuses_bad_values(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_threshold(spec)


def test_decide_fixed_threshold_ties_count_as_fake_and_nan_stays_unlabelled():
    labels, thr = decide([0.2, 0.5, 0.7, float("nan"), 0.49999], 0.5, stored=0.9)
    assert thr == 0.5
    assert labels.tolist() == [0, 1, 1, -1, 0]


def test_decide_uses_the_stored_threshold_by_default():
    probs = [0.1, 0.3, 0.6, 0.8]
    assert decide(probs, None, stored=0.3)[0].tolist() == [0, 1, 1, 1]
    assert decide(probs, None, stored=0.7)[0].tolist() == [0, 0, 0, 1]
    assert decide(probs, "stored", stored=0.7)[1] == 0.7


def test_decide_prior_labels_the_top_share_and_ignores_nan():
    probs = [0.9, float("nan"), 0.1, 0.5, 0.3, 0.7, float("nan")]
    labels, thr = decide(probs, "prior:0.4", stored=0.5)
    # 5 finite scores, round(0.4 * 5) = 2 fakes: the two highest
    assert labels.tolist() == [1, -1, 0, 0, 0, 1, -1]
    assert thr == 0.7


def test_decide_prior_with_ties_keeps_the_share_exact():
    labels, thr = decide([0.5] * 6, "prior:0.5", stored=0.5)
    assert labels.sum() == 3 and labels.tolist() == [1, 1, 1, 0, 0, 0]  # stable: file order breaks ties
    assert thr == 0.5
    labels, _ = decide([0.2, 0.8, 0.8, 0.8, 0.1], "prior:0.4", stored=0.5)
    assert labels.tolist() == [0, 1, 1, 0, 0]


@pytest.mark.parametrize("n, share, expected", [(10, 0.3, 3), (100, 0.29, 29), (8, 0.6, 5), (9, 0.35, 3), (3, 0.1, 0)])
def test_decide_prior_rounding(n, share, expected):
    probs = np.linspace(0.01, 0.99, n)
    labels, _ = decide(probs, f"prior:{share}", stored=0.5)
    assert labels.sum() == expected
    # exactly the highest scores are fake
    assert np.all(labels[np.argsort(-probs)][:expected] == 1)


@pytest.mark.parametrize("n", [5, 7, 11, 1001])
def test_decide_prior_half_on_odd_counts_is_within_one(n):
    labels, _ = decide(np.random.default_rng(n).random(n), "prior:0.5", stored=0.5)
    assert labels.sum() in (n // 2, n // 2 + 1)


def test_decide_prior_extremes():
    labels, thr = decide([0.2, 0.9], "prior:0", stored=0.5)
    assert labels.tolist() == [0, 0] and math.isinf(thr)
    labels, thr = decide([0.2, 0.9], "prior:1", stored=0.5)
    assert labels.tolist() == [1, 1] and thr == 0.2
    labels, _ = decide([float("nan")] * 3, "prior:0.5", stored=0.5)
    assert labels.tolist() == [-1, -1, -1]


def test_result_gets_the_permissions_of_a_plain_file(tmp_path):
    """The atomic write goes through mkstemp (owner-only 0600); the result must still be
    readable like any file the user writes (a grader may run as another user)."""
    import stat

    (tmp_path / "plain.txt").write_text("x")
    result = write_contest_csv(tmp_path / "r.xls", ["a.jpg"], [1])
    mode = stat.S_IMODE
    assert mode(result.stat().st_mode) == mode((tmp_path / "plain.txt").stat().st_mode)


def test_failed_write_keeps_the_previous_result_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = write_contest_csv(tmp_path / "r.xls", ["a.jpg"], [1])

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("data.io.os.replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_contest_csv(path, ["a.jpg", "b.jpg"], [0, 0])
    assert path.read_text() == "a.jpg,1\n"  # never half-written
    assert [p.name for p in tmp_path.iterdir()] == ["r.xls"]
