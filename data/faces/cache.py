"""Detect once per image and data set: faces keyed by file content *and* analyser.

The cache is one gzip JSON file per analyser key under ``cache_dir``; the key names the
analyser and every setting that changes its output (``FaceAnalyzer.key``), and each entry is
keyed by the SHA-1 of the file's bytes, so a renamed or copied file is a hit and an edited
one a miss. Saves are atomic and periodic during a long detection pass, so an interrupted
run keeps what it found.
"""
from __future__ import annotations

import logging
from pathlib import Path

from data.faces.types import Face
from data.io import JsonGzStore, file_digest

log = logging.getLogger(__name__)


def content_hash(path: str | Path) -> str:
    """The cache's key of a file: the SHA-1 of its bytes."""
    return file_digest(path, "sha1")


class FaceCache(JsonGzStore):
    def __init__(self, analyzer_key: str, cache_dir: str | Path | None = None) -> None:
        super().__init__(Path(cache_dir) / f"faces-{analyzer_key}.json.gz" if cache_dir else None, "face cache")
        self.analyzer_key = analyzer_key
        self.hits = self.misses = 0

    def get(self, digest: str) -> list[Face] | None:
        found = self.entries.get(digest)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return [Face.from_dict(d) for d in found]

    def put(self, digest: str, faces: list[Face]) -> None:
        super().put(digest, [f.to_dict() for f in faces])
