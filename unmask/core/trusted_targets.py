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
files), and so is a class only *reachable* through an allowed module (``data.canonical.io.FileIO``
is ``io.FileIO``, which empties a file): a class must be defined in an allowed module. The state
dict brings the weights, so a factory node may only build an architecture: an argument that
loads or fetches weights (``pretrained``, ``checkpoint_path``, ``weights_only=False``...) is
refused, and so is any string that names a hub (``hf-hub:``) or is an interpolation (``${...}``:
a stored config is written resolved, and one would change a value after this check).

A user who trusts a checkpoint that names their own code (an LGrad discriminator from
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


# Arguments of those factories that load or fetch weights (the state dict brings them).
FACTORY_LOADING = (
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "pretrained_image",
    "pretrained_image_path", "pretrained_text_path", "require_pretrained",
)
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


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
    # Defined there, not only reachable from there (``data.canonical.io.FileIO`` is ``io.FileIO``).
    return inspect.isclass(obj) and f"{obj.__module__}.".startswith(CLASS_MODULES)


def factory_refusal(node: dict) -> str | None:
    """Why a stored timm/open_clip factory node would load, fetch or unpickle weights; None
    when it only builds an architecture."""
    args = node.get("_args_") or []
    if len(args) > 1:  # open_clip takes weights_only, pretrained... positionally too
        return "positional arguments beyond the model name"
    if node.get("weights_only", True) is not True:
        return f"weights_only={node['weights_only']!r} (would unpickle a file as code)"
    for key in FACTORY_LOADING:
        if node.get(key) not in (None, False, "", "none"):
            return f"{key}={node[key]!r} (loads or fetches weights; the checkpoint's state dict brings them)"
    return None


def value_refusal(value) -> str | None:
    """Why a string of a stored config is refused: a hub name, or an interpolation."""
    if isinstance(value, str) and "${" in value:
        return f"{value[:80]!r} is an interpolation (a stored config is written resolved)"
    if isinstance(value, str) and value.lower().startswith(HUB_PREFIXES):
        return f"{value[:80]!r} names a model hub (loading fetches nothing)"
    return None


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
        why = factory_refusal(node) if target in FUNCTIONS else None
        if why:
            raise UntrustedTargetError(f"{source}: its stored config calls {where + '.' if where else ''}_target_={target!r} with {why}")
        for key, value in node.items():
            check_targets(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, source, f"{where}[{i}]")
    elif value_refusal(node):
        raise UntrustedTargetError(f"{source}: its stored config sets {where or 'a value'}: {value_refusal(node)}; refused")
