"""Where samples come from: a manifest CSV, a labelled folder tree, or an unlabelled folder.

Each source turns into a list of ``Record``; the data set and the splits only see records.
"""
from __future__ import annotations

import csv
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from data.decode import file_kind

log = logging.getLogger(__name__)

UNLABELLED = -1
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".jfif"}
_LABEL_WORDS = {"real": 0, "0": 0, "0_real": 0, "fake": 1, "1": 1, "1_fake": 1}


def parse_label(value: str) -> int:
    key = str(value).strip().lower()
    if key not in _LABEL_WORDS:
        raise ValueError(f"unknown label {value!r}; expected one of {sorted(_LABEL_WORDS)}")
    return _LABEL_WORDS[key]


@dataclass
class Record:
    path: str
    label: int = UNLABELLED
    split: str | None = None
    source: str = "unknown"
    generator: str = "unknown"
    group: str = ""
    extra: dict = field(default_factory=dict)
    mask: str | None = None  # a ground-truth forgery mask file (white = forged), if the data set has one

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.path  # an image is its own group unless told otherwise


class ManifestSource:
    """``relpath,label[,split,generator,source,group,mask]`` CSV; paths relative to ``root``.

    ``root`` defaults to the manifest's folder. Unknown extra columns ride along in
    ``Record.extra``; a missing file is a logged skip, not a crash. Forgery masks: a ``mask``
    column (path relative to ``root``; empty for none), or ``mask_root``, a folder mirroring
    the image tree (``mask_root/<relpath with .png>``).

    ``split``: ``train``, ``val`` or ``test`` (any case) in every row, or empty in every row
    (the seeded split then assigns them, ``data.split``). Anything else is a ``ValueError``
    naming the rows: a misspelt value (``tset``), or a column filled in some rows only, would
    otherwise throw the whole column away and move declared test images into training.
    """

    def __init__(self, manifest: str, root: str | None = None, mask_root: str | None = None) -> None:
        self.manifest = Path(manifest)
        self.root = Path(root) if root else self.manifest.parent
        self.mask_root = Path(mask_root) if mask_root else None

    def records(self) -> list[Record]:

        if not self.manifest.is_file():
            raise FileNotFoundError(
                f"manifest {self.manifest} not found; set data.source.manifest=PATH "
                "(for faces-dev the shared folder must sit beside the project, or set UNMASK_SHARED)"
            )
        out, missing = [], 0
        unknown, unsplit, n_split = [], [], 0  # (line, relpath[, value]) of rows with a bad split
        with open(self.manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            if not {"relpath", "label"} <= cols:
                raise ValueError(f"{self.manifest}: needs columns relpath,label; has {sorted(cols)}")
            known = {"relpath", "label", "split", "generator", "source", "group", "mask"}
            for row in reader:
                split = (row.get("split") or "").strip().lower() or None
                if split is None:
                    unsplit.append((reader.line_num, row["relpath"]))
                elif split not in SPLITS:
                    unknown.append((reader.line_num, row["relpath"], row["split"]))
                n_split += split is not None
                path = self.root / row["relpath"]
                if not path.exists():
                    missing += 1
                    continue
                try:
                    label = parse_label(row["label"])
                except ValueError as e:  # say where, not only what
                    raise ValueError(f"{self.manifest} line {reader.line_num} ({row['relpath']}): {e}") from None
                out.append(
                    Record(
                        path=str(path),
                        label=label,
                        split=split,
                        source=row.get("source") or "unknown",
                        generator=row.get("generator") or ("real" if label == 0 else "unknown"),
                        group=row.get("group") or "",
                        extra={k: v for k, v in row.items() if k not in known},
                        mask=find_mask(self.root, row.get("mask"), self.mask_root, row["relpath"]),
                    )
                )
        if unknown:
            raise ValueError(
                f"{self.manifest}: unknown split value in {len(unknown)} row(s): "
                f"{_first_rows([f'line {n} ({rel}): {value!r}' for n, rel, value in unknown])}; "
                "a split is train, val or test (or empty in every row, to split by data.split.fractions)"
            )
        if unsplit and n_split:
            raise ValueError(
                f"{self.manifest}: {len(unsplit)} row(s) have no split while {n_split} have one: "
                f"{_first_rows([f'line {n} ({rel})' for n, rel in unsplit])}; fill every split cell, "
                "or leave them all empty to split by data.split.fractions"
            )
        if missing:
            log.warning("%s: %d listed files are missing and were skipped", self.manifest, missing)
        return out


def _first_rows(rows: list[str], n: int = 5) -> str:
    return ", ".join(rows[:n]) + (f" and {len(rows) - n} more" if len(rows) > n else "")


def find_mask(root: Path, listed: str | None, mask_root: Path | None, relpath: str) -> str | None:
    """The mask file of an image: the manifest's ``mask`` entry, else the mirrored file under
    ``mask_root`` (same relative path, ``.png`` or the image's own suffix), else None."""
    if listed:
        path = root / listed
        if not path.is_file():
            raise FileNotFoundError(f"mask {path} listed for {relpath} does not exist")
        return str(path)
    if mask_root is None:
        return None
    for candidate in (mask_root / Path(relpath).with_suffix(".png"), mask_root / relpath):
        if candidate.is_file():
            return str(candidate)
    return None


def _iter_files(root: Path, images_only: bool):
    """The files below ``root`` in sorted path order; no entry vanishes without a word:

    - a regular file, or a symlink to one: yielded;
    - a dangling or looping symlink: yielded too (inference owes it a row; the decoder
      names the reason, "dangling symlink" or "symlink loop");
    - a symlink to a directory: followed once, when that directory is outside ``root`` and
      not listed yet; otherwise a logged warning (it would list files twice, or loop);
    - a FIFO, device or socket: a logged warning; never opened (opening a FIFO blocks);
    - a folder that cannot be listed: a logged warning naming it;
    - hidden names (a leading "."): skipped, counted in one info line.

    Every real directory is listed at most once, so the walk ends whatever the links.
    """
    root_real = root.resolve()
    listed: dict[tuple[int, int], Path] = {}  # (st_dev, st_ino) of each folder walked -> its path
    hidden = 0

    def walk(folder: Path, ident: tuple[int, int]):
        nonlocal hidden
        listed[ident] = folder
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log.warning("%s: cannot list this folder, its files get no rows (%s)", folder, e)
            return
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                hidden += 1
                continue
            try:
                st = path.stat()  # follows symlinks
            except OSError as e:
                if not entry.is_symlink():  # vanished or unreadable: say so
                    log.warning("%s: cannot read this entry, no row (%s)", path, e)
                elif not images_only or path.suffix.lower() in IMAGE_SUFFIXES:
                    yield path  # a broken link: the decoder names it in the file's row
                continue
            if stat.S_ISDIR(st.st_mode):
                sub = (st.st_dev, st.st_ino)
                if entry.is_symlink() and not _follow(path, root_real, listed.get(sub)):
                    continue
                if sub in listed:  # a real folder reached again through a followed link
                    log.warning("%s: folder already listed as %s; not listed again", path, listed[sub])
                    continue
                yield from walk(path, sub)
            elif images_only and path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            elif stat.S_ISREG(st.st_mode):
                yield path
            else:
                log.warning("%s: a %s, not a file: no row (never opened)", path, file_kind(st.st_mode))

    st = root.stat()
    yield from walk(root, (st.st_dev, st.st_ino))
    if hidden:
        log.info("%s: %d hidden entries (names starting with '.') skipped", root, hidden)


def _follow(link: Path, root_real: Path, listed_as: Path | None) -> bool:
    """Whether to walk a symlinked directory; a logged warning when not."""
    target = link.resolve()
    if link.parent.resolve().is_relative_to(target):
        log.warning("%s: symlink to %s, which contains it (a loop); not followed", link, target)
    elif listed_as is not None:
        log.warning("%s: symlink to %s, a folder already listed as %s; not followed", link, target, listed_as)
    elif target.is_relative_to(root_real):
        log.warning("%s: symlink to %s, a folder already listed under its own name; not followed", link, target)
    else:
        log.info("%s: following the symlink to %s", link, target)
        return True
    return False


class FolderSource:
    """A tree whose path names the class: ``real``/``fake`` or ``0_real``/``1_fake`` folders
    at any depth (the CNNDetection / UnivFD layouts). The folder above the class folder,
    if any, becomes ``generator`` (e.g. ``test/progan/1_fake`` -> generator ``progan``)."""

    def __init__(self, root: str, source: str | None = None, mask_root: str | None = None) -> None:
        self.root = Path(root)
        self.source = source or self.root.name
        self.mask_root = Path(mask_root) if mask_root else None  # masks mirroring the tree (see ManifestSource)

    def records(self) -> list[Record]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} not found")
        out, ambiguous = [], 0
        for p in _iter_files(self.root, images_only=True):
            parts = [s.lower() for s in p.relative_to(self.root).parts[:-1]]
            hits = [(i, _LABEL_WORDS[s]) for i, s in enumerate(parts) if s in _LABEL_WORDS and not s.isdigit()]
            if len({lab for _, lab in hits}) != 1:
                ambiguous += 1
                continue
            idx, label = hits[-1]
            generator = parts[idx - 1] if idx > 0 else ("real" if label == 0 else "unknown")
            mask = find_mask(self.root, None, self.mask_root, p.relative_to(self.root).as_posix())
            out.append(Record(str(p), label, None, self.source, "real" if label == 0 else generator, mask=mask))
        if ambiguous:
            log.warning("%s: %d files sit under no (or both) class folders and were skipped", self.root, ambiguous)
        if not out:
            raise ValueError(f"{self.root}: no images under real/fake or 0_real/1_fake folders")
        return out


class UnlabelledFolderSource:
    """Every non-hidden file below ``root`` (images or not; broken symlinks too): inference
    must give every file a row, so nothing is filtered here; undecodable files are flagged
    later. Entries that are not files are logged, never opened (see ``_iter_files``)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def records(self) -> list[Record]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"input folder {self.root} not found")
        return [Record(str(p), UNLABELLED, source=self.root.name) for p in _iter_files(self.root, images_only=False)]


class ListedFilesSource:
    """An inference manifest: a CSV with a ``relpath`` column (paths relative to its folder,
    or to ``root``); ``label`` and other columns (``video_id``...) are optional and ride
    along. Every listed row becomes a record, missing files too: inference gives each
    listed file its row (a missing one gets the fallback label, like an undecodable one).

    The list is checked before any file is read, since the result has one row per file: an
    empty relpath and a file listed twice (also as ``./a.png`` beside ``a.png``, or by its
    absolute path) are a ``ValueError`` naming their lines. Absolute paths and paths with
    ``..`` are allowed (the result names such a file by its path relative to ``root``)."""

    MAX_REPORTED = 10  # problems named in one error

    def __init__(self, manifest: str, root: str | None = None) -> None:
        self.manifest = Path(manifest)
        self.root = Path(root) if root else self.manifest.parent

    def records(self) -> list[Record]:
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest {self.manifest} not found")
        with open(self.manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "relpath" not in (reader.fieldnames or []):
                raise ValueError(f"{self.manifest}: needs a relpath column; has {reader.fieldnames}")
            rows = [(reader.line_num, row) for row in reader]  # line_num: the file line a row ends on
        self._check_relpaths(rows)
        known = {"relpath", "label", "source", "generator", "group"}
        return [
            Record(
                path=str(self.root / row["relpath"]),
                label=parse_label(row["label"]) if row.get("label") else UNLABELLED,
                source=row.get("source") or self.manifest.stem,
                generator=row.get("generator") or "unknown",
                group=row.get("group") or "",
                extra={k: v for k, v in row.items() if k not in known},
            )
            for _, row in rows
        ]

    def _check_relpaths(self, rows: list[tuple[int, dict]]) -> None:
        problems, first_line = [], {}
        for line, row in rows:
            rel = row.get("relpath") or ""
            if not rel.strip():
                problems.append(f"line {line}: empty relpath")
                continue
            key = os.path.normpath(self.root / rel)  # 'a//b', './a' and /abs/root/a name the file 'a/b', 'a' names
            if key in first_line:
                problems.append(f"line {line}: duplicate relpath {rel!r}, the file of line {first_line[key]}")
            else:
                first_line[key] = line
        if problems:
            more = f" (and {len(problems) - self.MAX_REPORTED} more)" if len(problems) > self.MAX_REPORTED else ""
            raise ValueError(f"{self.manifest}: " + "; ".join(problems[: self.MAX_REPORTED]) + more)
