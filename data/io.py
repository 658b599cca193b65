"""Atomic file writes, the only writer of result files in the project.

A crash, a kill or a full disk never leaves a half-written result behind: every writer
goes through ``atomic_path``, which hands out a temporary file beside the target, fsyncs it
and renames it over the target only when the write finished.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# mkstemp creates files readable by their owner only; a result must get the permissions a
# plain open() would give (0666 minus the umask), or a grader running as another user cannot
# read it. The umask can only be read by setting it, so it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (torch.save,
    np.save, an exporter, matplotlib); when the block ends without an error the file is
    fsynced (unless ``durable=False``: caches that can be recomputed) and renamed over
    ``path``, otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
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
