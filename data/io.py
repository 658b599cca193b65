"""Atomic file writes, the only writer of result files in the project.

A crash, a kill or a full disk never leaves a half-written result behind: every writer
goes through ``atomic_path``, which hands out a temporary file beside the target, fsyncs it
and renames it over the target only when the write finished.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# mkstemp creates files readable by their owner only; a result must get the permissions a
# plain open() would give (0666 minus the umask), or a grader running as another user cannot
# read it. The umask can only be read by setting it, so it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

NAME_MAX = 255  # bytes in one file name on the usual Linux, macOS and Windows file systems


def _temp_affixes(path: Path) -> tuple[str, str]:
    """mkstemp's prefix and suffix for ``path``: ``.<name>.`` and ``.tmp<suffix>``, the name cut
    so that the temporary name (8 random characters more) fits ``NAME_MAX`` whenever the
    target's own name does."""
    suffix = f".tmp{path.suffix}" if len(os.fsencode(path.suffix)) <= 16 else ".tmp"
    room = NAME_MAX - 8 - 2 - len(os.fsencode(suffix))
    stem = path.name
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return f".{stem}.", suffix


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (torch.save,
    np.save, an exporter, matplotlib); when the block ends without an error the file is
    fsynced (unless ``durable=False``: caches that can be recomputed) and renamed over
    ``path``, otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def writable_dir(path: str | Path, need_bytes: int = 0) -> Path:
    """Create folder ``path`` if missing and prove a result can be written there, so that a
    run fails before its work, not after it: ``NotADirectoryError`` when it (or a parent) is a
    file, ``PermissionError`` when nothing can be created in it, ``OSError`` (ENOSPC) when it
    has less than ``need_bytes`` free. A disk that fills later still fails at the (atomic) write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output folder {path} is not a folder (a file has that name)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"output folder {path} is not a folder: {e.strerror} ({e.filename})") from e
    except OSError as e:
        raise PermissionError(f"output folder {path} cannot be created: {e.strerror}") from e
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(f"output folder {path} is not writable: {e.strerror}") from e
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"output folder {path} has {free} bytes free, a run needs about {need_bytes}")
    return path


def reserve_file(path: str | Path) -> bool:
    """Create ``path`` empty if no file has that name yet (O_CREAT | O_EXCL: of two processes
    asking at once exactly one gets it); False when the name is taken. An atomic writer then
    replaces the empty file."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8", errors: str = "strict") -> Path:
    """``errors="surrogateescape"`` writes file names that are not valid UTF-8 (a zip made
    on another system) back as their original bytes instead of failing. No newline
    translation: the text's own line ends are written."""
    return atomic_write_bytes(path, text.encode(encoding, errors))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def atomic_save_figure(fig, path: str | Path, **kwargs) -> Path:
    """A matplotlib figure; the format comes from ``path``'s suffix."""
    kwargs.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return Path(path)


def read_json_gz(path: str | Path, what: str) -> dict:
    """The dict a cache keeps in the gzip JSON file ``path``: empty when there is none, and
    when it is damaged (with a warning naming ``what``): a damaged cache costs recomputing
    its entries, never the run."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("%s %s unreadable (%s); starting a new one", what, path, e)
        return {}
    if not isinstance(entries, dict):
        log.warning("%s %s holds no table; starting a new one", what, path)
        return {}
    return entries


def write_json_gz(path: str | Path, entries: dict) -> Path:
    """``entries`` as compact gzip JSON at ``path``, atomically (NaN stays NaN)."""
    payload = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return atomic_write_bytes(path, gzip.compress(payload, compresslevel=3))


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class JsonGzStore:
    """A table of JSON values by key, kept in one gzip JSON file (``file``; None: in memory
    only). ``dirty`` counts the entries put since the last ``save``, which writes atomically."""

    def __init__(self, file: str | Path | None, what: str) -> None:
        self.file = Path(file) if file else None
        self.entries: dict = read_json_gz(self.file, what) if self.file is not None else {}
        self.dirty = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self.dirty += 1

    def save(self) -> None:
        if self.file is None or not self.dirty:
            return
        write_json_gz(self.file, self.entries)
        self.dirty = 0
