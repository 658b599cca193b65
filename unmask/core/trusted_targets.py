"""What a checkpoint's stored config may build.

A checkpoint carries the resolved run config, and loading rebuilds the detector from it with
Hydra's ``instantiate``, which calls whatever ``_target_`` names. A checkpoint from a stranger
must not be a way to call ``torch.load``, ``builtins.open`` or ``os.system``, so every
``_target_`` in the part of the config that loading builds is checked against this list
*before* anything is imported or called:

- classes of the detector and face-stage modules (``detectors.*``, ``data.canonical``,
  ``data.faces.*``) and of ``torch.nn``: modules and preprocessing, nothing that writes;
- the backbone factories of timm and open_clip.

Functions of the project are refused even where their module is allowed (``data.io`` writes
files). A user who trusts a checkpoint that names their own code (an LGrad discriminator from
``my_pkg``, a TorchScript file through ``torch.jit.load``) allows those targets by name in
``UNMASK_TRUSTED_TARGETS`` (comma-separated; a name ending in ``.`` allows a whole package).
"""
from __future__ import annotations

import inspect
import os

ENV = "UNMASK_TRUSTED_TARGETS"
# Modules whose *classes* a stored config may build (prefix match on the dotted path).
CLASS_MODULES = ("detectors.", "data.canonical.", "data.faces.", "torch.nn.")
# Functions a stored config may call.
FUNCTIONS = frozenset(
    {
        "timm.create_model",
        "open_clip.create_model",
        "open_clip.create_model_and_transforms",
        "open_clip.create_model_from_pretrained",
    }
)


class UntrustedTargetError(ValueError):
    """A stored config names something loading must not call."""


def user_trusted() -> tuple[str, ...]:
    return tuple(t.strip() for t in os.environ.get(ENV, "").split(",") if t.strip())


def is_trusted(target: str) -> bool:
    if any(target == t or (t.endswith(".") and target.startswith(t)) for t in user_trusted()):
        return True
    if target in FUNCTIONS:
        return True
    if not target.startswith(CLASS_MODULES):
        return False  # decided before importing: importing an arbitrary module runs its code
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - a missing name is not trusted; instantiate would fail anyway
        return False
    return inspect.isclass(obj)


def check_targets(node, source: str, where: str = "") -> None:
    """Raise ``UntrustedTargetError`` naming the key if any ``_target_`` below ``node`` is not
    trusted. ``source`` names the file in the message."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not (isinstance(target, str) and is_trusted(target)):
            raise UntrustedTargetError(
                f"{source}: its stored config sets {where + '.' if where else ''}_target_={target!r}, which loading a "
                "checkpoint will not call: a stored config may only build the project's detector and face-stage classes, "
                "torch.nn modules and timm/open_clip models. If you trust this file and the code it names, allow it with "
                f"{ENV}={target}"
            )
        for key, value in node.items():
            check_targets(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, source, f"{where}[{i}]")
