"""Atomic file writes: a crash or a full disk never leaves a half-written result behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


# mkstemp creates files readable by their owner only; a result must get the permissions a
# plain open() would give (0666 minus the umask), or a grader running as another user cannot
# read it. The umask can only be read by setting it, so it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file beside ``path``, fsync, then rename over it: readers see the
    old file or the new one, never a part (an interrupted run leaves no half-written output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8", errors: str = "strict") -> Path:
    """``errors="surrogateescape"`` writes file names that are not valid UTF-8 (a zip made
    on another system) back as their original bytes instead of failing. No newline
    translation: the text's own line ends are written."""
    return atomic_write_bytes(path, text.encode(encoding, errors))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def atomic_save_figure(fig, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)
    return path
