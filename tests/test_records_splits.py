"""Issue 2, section 3: the three record sources and seeded, group-aware splits."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from data.records import UNLABELLED, FolderSource, ManifestSource, Record, UnlabelledFolderSource
from data.splits import assign_splits, check_groups_disjoint


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "MANIFEST.csv"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- ManifestSource


def test_manifest_reads_all_columns(tmp_path):
    for rel in ("img/a.png", "img/b.jpg", "img/c.jpg"):
        _touch(tmp_path / rel)
    m = _manifest(
        tmp_path,
        "relpath,label,split,generator,source,group,quality\n"
        "img/a.png,real,train,,ffhq,vid1,high\n"
        "img/b.jpg,fake,val,stylegan2,ffhq,vid2,low\n"
        "img/c.jpg,1,test,,,,\n",
    )
    recs = ManifestSource(str(m)).records()
    assert [Path(r.path) for r in recs] == [tmp_path / "img/a.png", tmp_path / "img/b.jpg", tmp_path / "img/c.jpg"]
    a, b, c = recs
    assert (a.label, a.split, a.generator, a.source, a.group) == (0, "train", "real", "ffhq", "vid1")
    assert (b.label, b.split, b.generator, b.source, b.group) == (1, "val", "stylegan2", "ffhq", "vid2")
    assert a.extra == {"quality": "high"}
    # empty optional fields: unknown source/generator, its own group (a split is all or none:
    # tests/test_hostile_data.py)
    assert (c.label, c.split, c.generator, c.source, c.group) == (1, "test", "unknown", "unknown", c.path)


@pytest.mark.parametrize("word", ["real", "Real", "0", "0_real", " REAL "])
def test_manifest_real_label_spellings_give_generator_real(tmp_path, word):
    _touch(tmp_path / "a.png")
    (rec,) = ManifestSource(str(_manifest(tmp_path, f"relpath,label\na.png,{word}\n"))).records()
    assert rec.label == 0 and rec.generator == "real"


def test_manifest_root_override(tmp_path):
    _touch(tmp_path / "data" / "a.png")
    m = _manifest(tmp_path, "relpath,label\na.png,fake\n")
    (rec,) = ManifestSource(str(m), root=str(tmp_path / "data")).records()
    assert Path(rec.path) == tmp_path / "data" / "a.png"


def test_manifest_missing_files_are_skipped_with_a_warning(tmp_path, caplog):
    _touch(tmp_path / "here.png")
    m = _manifest(tmp_path, "relpath,label\nhere.png,real\ngone1.png,fake\ngone2.png,real\n")
    with caplog.at_level(logging.WARNING, logger="data.records"):
        recs = ManifestSource(str(m)).records()
    assert [Path(r.path).name for r in recs] == ["here.png"]
    assert any("2 listed files are missing" in r.getMessage() for r in caplog.records)


def test_manifest_bad_label_is_a_clear_error(tmp_path):
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "b.png")
    m = _manifest(tmp_path, "relpath,label\na.png,real\nb.png,maybe\n")
    with pytest.raises(ValueError, match=r"MANIFEST.csv line 3 \(b.png\): unknown label 'maybe'"):
        ManifestSource(str(m)).records()


def test_manifest_missing_columns_is_a_clear_error(tmp_path):
    m = _manifest(tmp_path, "path,class\na.png,real\n")
    with pytest.raises(ValueError, match=r"needs columns relpath,label; has \['class', 'path'\]"):
        ManifestSource(str(m)).records()


def test_manifest_not_found_says_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.manifest"):
        ManifestSource(str(tmp_path / "nope.csv")).records()


# ---------------------------------------------------------------- FolderSource


def test_folder_real_fake_layout(tmp_path):
    root = tmp_path / "tree"
    _touch(root / "real" / "r1.png")
    _touch(root / "real" / "r2.JPG")
    _touch(root / "fake" / "f1.jpg")
    _touch(root / "fake" / "notes.txt")  # not an image: not a sample
    _touch(root / "fake" / ".hidden.jpg")
    recs = FolderSource(str(root)).records()
    got = {Path(r.path).name: (r.label, r.generator, r.source) for r in recs}
    assert got == {"r1.png": (0, "real", "tree"), "r2.JPG": (0, "real", "tree"), "f1.jpg": (1, "unknown", "tree")}


def test_folder_cnndetection_layout_names_the_generator_by_parent(tmp_path):
    root = tmp_path / "test"
    for gen in ("progan", "stylegan"):
        _touch(root / gen / "0_real" / "a.png")
        _touch(root / gen / "1_fake" / "b.png")
    _touch(root / "deep" / "biggan" / "cat" / "1_fake" / "c.png")  # class folder at any depth
    recs = FolderSource(str(root), source="cnndet").records()
    got = sorted((Path(r.path).relative_to(root).as_posix(), r.label, r.generator) for r in recs)
    assert got == [
        ("deep/biggan/cat/1_fake/c.png", 1, "cat"),
        ("progan/0_real/a.png", 0, "real"),
        ("progan/1_fake/b.png", 1, "progan"),
        ("stylegan/0_real/a.png", 0, "real"),
        ("stylegan/1_fake/b.png", 1, "stylegan"),
    ]
    assert {r.source for r in recs} == {"cnndet"}


def test_folder_ambiguous_files_are_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "tree"
    _touch(root / "real" / "ok.png")
    _touch(root / "fake" / "ok.png")
    _touch(root / "real" / "fake" / "both.png")  # both classes on the path
    _touch(root / "misc" / "none.png")  # no class folder
    _touch(root / "0" / "digit.png")  # a bare digit folder is not a class name
    with caplog.at_level(logging.WARNING, logger="data.records"):
        recs = FolderSource(str(root)).records()
    assert sorted(Path(r.path).relative_to(root).as_posix() for r in recs) == ["fake/ok.png", "real/ok.png"]
    assert any("3 files sit under no (or both) class folders" in r.getMessage() for r in caplog.records)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        FolderSource(str(tmp_path / "nope")).records()
    _touch(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no images under real/fake"):
        FolderSource(str(tmp_path / "flat")).records()


# ---------------------------------------------------------------- UnlabelledFolderSource


def test_unlabelled_keeps_every_non_hidden_file_in_order(tmp_path):
    root = tmp_path / "testset"
    for rel in ("b.jpg", "a.png", "notes.txt", "sub/c.jpg", "sub/deeper/d", "ü名.jpg", ".DS_Store", ".git/x.jpg", "sub/.hidden.png"):
        _touch(root / rel)
    (root / "emptydir").mkdir()
    recs = UnlabelledFolderSource(str(root)).records()
    names = [Path(r.path).relative_to(root).as_posix() for r in recs]
    assert names == ["a.png", "b.jpg", "notes.txt", "sub/c.jpg", "sub/deeper/d", "ü名.jpg"]
    assert all(r.label == UNLABELLED and r.source == "testset" for r in recs)


def test_unlabelled_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    assert UnlabelledFolderSource(str(tmp_path / "empty")).records() == []
    with pytest.raises(FileNotFoundError, match="input folder .* not found"):
        UnlabelledFolderSource(str(tmp_path / "nope")).records()


# ---------------------------------------------------------------- splits


def _grouped_records(n_groups_per_label=20, per_group=3):
    recs = []
    for label in (0, 1):
        for g in range(n_groups_per_label):
            for i in range(per_group):
                recs.append(Record(f"/x/{label}_{g}_{i}.png", label, group=f"vid{label}_{g}"))
    return recs


def _splits(recs):
    return [r.split for r in recs]


def test_splits_are_seeded_and_deterministic():
    a = _splits(assign_splits(_grouped_records(), seed=3))
    b = _splits(assign_splits(_grouped_records(), seed=3))
    c = _splits(assign_splits(_grouped_records(), seed=4))
    assert a == b
    assert a != c
    # input order does not matter either (groups are sorted before the seeded shuffle)
    recs = _grouped_records()
    rev = assign_splits(list(reversed(recs)), seed=3)
    assert {r.path: r.split for r in rev} == {r.path: s for r, s in zip(_grouped_records(), a)}


def test_splits_are_group_aware_and_have_both_classes():
    recs = assign_splits(_grouped_records(), (0.7, 0.15, 0.15), seed=0)
    check_groups_disjoint(recs)  # raises if a group spans two splits
    by_group = defaultdict(set)
    for r in recs:
        by_group[r.group].add(r.split)
    assert all(len(s) == 1 for s in by_group.values())
    for split in ("train", "val", "test"):
        assert {r.label for r in recs if r.split == split} == {0, 1}
    counts = Counter(r.split for r in recs)
    assert counts == {"train": 84, "val": 18, "test": 18}  # 14/3/3 groups of 3 per class


def test_images_without_group_are_their_own_group():
    recs = [Record(f"/x/{i}.png", i % 2) for i in range(40)]
    assign_splits(recs, (0.5, 0.25, 0.25), seed=0)
    assert Counter(r.split for r in recs) == {"train": 20, "val": 10, "test": 10}


def test_existing_manifest_splits_are_respected():
    recs = [Record("/a.png", 0, split="test"), Record("/b.png", 1, split="train")]
    assert _splits(assign_splits(recs, seed=0)) == ["test", "train"]
    # but a partial split column is not trusted: everything is reassigned
    recs = _grouped_records(5, 1)
    recs[0].split = "test"
    assign_splits(recs, seed=0)
    assert all(r.split in ("train", "val", "test") for r in recs)


def test_check_groups_disjoint_catches_a_leak():
    recs = [Record("/a.png", 0, split="train", group="v"), Record("/b.png", 0, split="test", group="v")]
    with pytest.raises(ValueError, match="group 'v' spans splits 'train' and 'test'"):
        check_groups_disjoint(recs)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1), (0.5, 0.3, 0.1, 0.1)])
def test_bad_fractions_are_a_clear_error(fractions):
    with pytest.raises(ValueError, match="three non-negative numbers summing to 1"):
        assign_splits(_grouped_records(2, 1), fractions)
