"""Hydra/OmegaConf glue: the project-root resolver and instantiation helpers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("unmask_root"):
    OmegaConf.register_new_resolver("unmask_root", lambda: str(PROJECT_ROOT))


def instantiate_group(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` child of a group such as ``callbacks`` or ``logger``."""
    from hydra.utils import instantiate

    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def is_empty(node: Any) -> bool:
    return node is None or (isinstance(node, DictConfig) and len(node) == 0)
