"""Where a run came from: the code (git commit, and whether the tree was dirty), the package
versions, the data it read and the resolved config.

``collect`` gathers it as plain data (strings, numbers, lists, dicts): the training run keeps
it in every checkpoint (``unmask.provenance``; checkpoints are read with ``weights_only``) and
``write`` puts it in the run folder as ``provenance.json`` beside ``config.yaml`` (the resolved
config; Hydra's ``.hydra/config.yaml`` keeps the interpolations).

The data's fingerprint: the sha256 of the manifest file when the source reads one
(``data=manifest``, ``faces_dev``, ``synthetic``) and, for every source, the sha256 of the
listing the run used (split, label, source, generator, path relative to the source's root and
byte size of every file, after the split filters): a folder source's only fingerprint.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data.io import atomic_write_json, atomic_write_text, file_digest
from data.records import Record
from unmask.core.config import PROJECT_ROOT

# name in the record -> distribution on PyPI
PACKAGES = {
    "torch": "torch",
    "lightning": "pytorch-lightning",
    "timm": "timm",
    "open_clip": "open_clip_torch",
    "albumentations": "albumentations",
    "numpy": "numpy",
    "unmask": "unmask",
}
PROVENANCE_FILE = "provenance.json"
CONFIG_FILE = "config.yaml"


def package_versions() -> dict[str, str | None]:
    """The installed version of each of ``PACKAGES`` (None: not installed) and Python's."""
    versions: dict[str, str | None] = {}
    for name, dist in PACKAGES.items():
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: str | Path = PROJECT_ROOT) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the project's checkout; both None where there is no
    git or no repository (an installed wheel). Dirty: tracked files differ from the commit
    (untracked files do not count)."""
    commit = _git(Path(root), "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(Path(root), "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}




def manifest_of(source: Any) -> Path | None:
    """The manifest file a data source reads, if it reads one."""
    manifest = getattr(source, "manifest", None)
    if manifest is None and getattr(source, "folder", None) is not None:  # data.synthetic: a generated manifest
        manifest = Path(source.folder) / "MANIFEST.csv"
    return Path(manifest) if manifest is not None and Path(manifest).is_file() else None


def listing_sha256(records: Mapping[str, Sequence[Record]], root: str | Path | None = None) -> str:
    """sha256 of the sorted lines ``split, label, source, generator, relative path, bytes``:
    the same files with the same labels and splits give the same hash on any machine."""
    lines = []
    for split, chosen in records.items():
        for r in chosen:
            path = r.path
            if root is not None:
                rel = os.path.relpath(path, root)
                path = path if rel.startswith("..") else rel
            try:
                size = os.stat(r.path).st_size
            except OSError:
                size = -1
            lines.append("\t".join(str(v) for v in (split, r.label, r.source, r.generator, Path(path).as_posix(), size)))
    return hashlib.sha256("\n".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest()


def data_fingerprint(source: Any, records: Mapping[str, Sequence[Record]]) -> dict[str, Any]:
    """What identifies the data a run read: the source's kind, files per split, the listing's
    hash and, when there is one, the manifest's path and sha256."""
    root = getattr(source, "root", None)
    found: dict[str, Any] = {
        "source": type(source).__name__,
        "files": {split: len(chosen) for split, chosen in records.items()},
        "listing_sha256": listing_sha256(records, root),
    }
    manifest = manifest_of(source)
    if manifest is not None:
        found.update(manifest=str(manifest), manifest_sha256=file_digest(manifest, "sha256"))
    return found


def task_overrides() -> list[str]:
    """The command line's overrides of this Hydra job (a sweep's per-job values included);
    empty outside a Hydra app (tests composing configs)."""
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def collect(source: Any = None, records: Mapping[str, Sequence[Record]] | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The run's provenance as plain data (the resolved config is stored beside it)."""
    return {
        "git": git_state(),
        "versions": package_versions(),
        "data": data_fingerprint(source, records) if source is not None and records is not None else None,
        "overrides": [str(o) for o in overrides],
        "command": [str(a) for a in sys.argv],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }


def write(out_dir: str | Path, provenance: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """``provenance.json`` and ``config.yaml`` (the resolved config) into the run folder, atomically."""
    out = Path(out_dir)
    atomic_write_json(out / PROVENANCE_FILE, dict(provenance))
    atomic_write_text(out / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(dict(config))))
