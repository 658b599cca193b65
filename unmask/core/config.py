"""Hydra/OmegaConf glue: the project root, its resolver, the typed schemas of the config
groups, and small instantiation helpers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from unmask.core import schemas

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("unmask_root"):
    OmegaConf.register_new_resolver("unmask_root", lambda: str(PROJECT_ROOT))
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
