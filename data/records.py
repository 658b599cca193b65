"""Where samples come from: a manifest CSV, a labelled folder tree, or an unlabelled folder.

Each source turns into a list of ``Record``; the data set and the splits only see records.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

UNLABELLED = -1
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
        with open(self.manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            if not {"relpath", "label"} <= cols:
                raise ValueError(f"{self.manifest}: needs columns relpath,label; has {sorted(cols)}")
            known = {"relpath", "label", "split", "generator", "source", "group", "mask"}
            for row in reader:
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
                        split=(row.get("split") or None),
                        source=row.get("source") or "unknown",
                        generator=row.get("generator") or ("real" if label == 0 else "unknown"),
                        group=row.get("group") or "",
                        extra={k: v for k, v in row.items() if k not in known},
                        mask=find_mask(self.root, row.get("mask"), self.mask_root, row["relpath"]),
                    )
                )
        if missing:
            log.warning("%s: %d listed files are missing and were skipped", self.manifest, missing)
        return out


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
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if images_only and p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        yield p


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
    """Every regular, non-hidden file below ``root`` (images or not): inference must give
    every file a row, so nothing is filtered here; undecodable files are flagged later."""

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
    listed file its row (a missing one gets the fallback label, like an undecodable one)."""

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
                for row in reader
            ]
