"""Hydra/OmegaConf glue: the project root, its resolver, the typed schemas of the config
groups, and small instantiation helpers."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from unmask.core import schemas

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "configs")


def shared_dir() -> Path:
    """The shared data folder as ``configs/paths/default.yaml`` resolves it: ``$UNMASK_SHARED``,
    else ``../shared`` beside the project."""
    return Path(os.environ.get("UNMASK_SHARED", PROJECT_ROOT.parent / "shared"))


def safe_dirname(*parts: Any, limit: int = 120) -> str:
    """A folder name of the non-empty ``parts`` joined by ``_`` (a sweep job's number and its
    overrides, Hydra's ``override_dirname``) that a command line can name again
    (``ckpt=<sweep>/<job>/checkpoints/best.ckpt``): Hydra's override parser stops at ``=``,
    ``,``, brackets, quotes, ``~``..., so ``=`` becomes ``-``, ``,`` becomes ``_`` and any other
    character but letters, digits, ``. _ + -`` a ``.``; a name longer than ``limit`` is cut and
    ends in a hash of the whole."""
    text = "_".join(str(p) for p in parts if str(p))
    name = re.sub(r"[^A-Za-z0-9._+-]", ".", text.replace("=", "-").replace(",", "_"))
    name = re.sub(r"\.{2,}", ".", name)
    if len(name) > limit:
        name = name[: limit - 9] + "." + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name

if not OmegaConf.has_resolver("unmask_root"):
    OmegaConf.register_new_resolver("unmask_root", lambda: str(PROJECT_ROOT))
if not OmegaConf.has_resolver("unmask_dirname"):  # configs/hydra/default.yaml: sweep folder names
    OmegaConf.register_new_resolver("unmask_dirname", safe_dirname)
schemas.register()


def instantiate_group(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` child of a group such as ``callbacks`` or ``logger``."""
    from hydra.utils import instantiate

    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def is_empty(node: Any) -> bool:
    """A group composed from an empty option (``faces=none``, ``attribution=none``)."""
    return node is None or (isinstance(node, (DictConfig, dict)) and len(node) == 0)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (enums as their names): what a checkpoint stores."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
