"""The audit's cache: per-file measure rows and detector scores of earlier runs, so a second
audit of the same files is instant.

One gzip JSON file per namespace under ``<cache_dir>/audit``: ``measures-<key>`` (the key
holds ``MEASURE_VERSION`` and every setting that changes a row: face analyser, working size,
identity weights...) and ``scores-<key>`` (one per checkpoint file and runtime). Entries are
keyed by the file's path, size and modification time (and its reference's and mask's), so
an edited file is measured again. Saves are atomic and periodic, so an interrupted run keeps
what it measured.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from data.io import JsonGzStore

log = logging.getLogger(__name__)


def file_key(*paths: str | Path | None) -> str:
    """Path, size and mtime of each file named (None and missing files count as such)."""
    parts = []
    for p in paths:
        if p is None:
            parts.append("-")
            continue
        try:
            st = os.stat(p)
            parts.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{os.path.abspath(p)}:missing")
    return "|".join(parts)


def settings_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class AuditCache(JsonGzStore):
    """``get`` / ``put`` rows by file key; ``save`` writes the namespace's file (nothing is
    written when ``directory`` is None: an in-memory cache for ``audit.cache=false``)."""

    def __init__(self, directory: str | Path | None, namespace: str) -> None:
        super().__init__(Path(directory) / f"{namespace}.json.gz" if directory else None, "audit cache")
