"""Checkpoints people can ship: ``python -m unmask.slim CKPT OUT [--fp16]``.

A training checkpoint carries the optimizer's state (Adam: two more copies of every weight),
the schedulers, the callbacks and the loop counters. Inference needs the detector's tensors,
the run config that rebuilds it and the threshold. The slim file is a ``.safetensors``: the
detector's tensors (``detector.*`` of the state dict; fp32, or fp16 with ``--fp16``, half the
size again) and, as metadata (JSON strings), ``run_config``, ``threshold`` and
``threshold_from``; with ``--portable`` this machine's folders in the config (``paths.*``: the
project, ../shared, the cache, the run folder) are replaced by ``<root_dir>``-style names, for a
file that is shared or shipped. infer.py, evaluate.py and serve.py take it as ``ckpt=model.safetensors``;
``unmask.core.checkpoint.read_checkpoint`` reads it without unpickling anything, and the
stored config may build only what a ``.ckpt``'s may (``unmask.core.trusted_targets``).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from data.io import atomic_path
from unmask.core.checkpoint import FORMAT, SLIM_SUFFIX, read_checkpoint, stored_threshold

PREFIX = "detector."  # the detector's tensors in a training checkpoint's state dict


def slim_tensors(state: dict, fp16: bool = False) -> dict[str, torch.Tensor]:
    """The detector's tensors, each its own contiguous copy (safetensors refuses shared
    storage), floating-point ones in fp16 when asked (integer buffers stay as they are)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(PREFIX) or not isinstance(value, torch.Tensor):
            continue
        value = value.detach().cpu()
        if fp16 and value.is_floating_point():
            value = value.to(torch.float16)
        out[key] = value.contiguous().clone()
    return out


def portable_config(run_config: dict) -> dict:
    """``run_config`` with every string's machine folders (the values of its ``paths``
    section, longest first) replaced by ``<key>``: nothing that rebuilds the detector reads
    them, and a shipped file should not carry where it was trained."""
    folders = {key: str(value).rstrip("/") for key, value in (run_config.get("paths") or {}).items() if str(value).startswith("/")}
    # Longest first (the run folder may sit inside the project); a folder only where a path
    # component ends, so /work/main never eats into /work/main2.
    order = [(key, re.compile(re.escape(folder) + r"(?=/|$)")) for key, folder in sorted(folders.items(), key=lambda kv: len(kv[1]), reverse=True)]

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str):
            for key, folder in order:
                value = folder.sub(f"<{key}>", value)
        return value

    out = strip({k: v for k, v in run_config.items() if k != "paths"})
    out["paths"] = {key: f"<{key}>" for key in run_config.get("paths") or {}}
    return out


def write_slim(ckpt: str | Path, out: str | Path, fp16: bool = False, portable: bool = False) -> Path:
    """Write the slim ``.safetensors`` of checkpoint ``ckpt`` to ``out`` (atomically); returns
    its path. ``ckpt`` may itself be slim (e.g. to make an fp16 copy); ``portable``: the run
    config without this machine's folders (``portable_config``)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix.lower() != SLIM_SUFFIX:
        raise ValueError(f"{out}: the slim file's name must end in {SLIM_SUFFIX} (infer.py reads it by its suffix)")
    source = read_checkpoint(ckpt)
    tensors = slim_tensors(source["state_dict"], fp16)
    if not tensors:
        raise ValueError(f"{ckpt}: its state dict holds no detector tensors ({PREFIX}*)")
    section = source["unmask"]
    metadata = {
        "format": "pt",  # the safetensors convention for PyTorch tensors
        "unmask_format": str(FORMAT),
        "run_config": json.dumps(portable_config(section["run_config"]) if portable else section["run_config"]),
        "threshold": json.dumps(stored_threshold(source, ckpt)),
        "threshold_from": json.dumps(str(section.get("threshold_from", ""))),
        "dtype": "float16" if fp16 else "float32",
        "source": json.dumps(Path(ckpt).name),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unmask.slim",
        description="Write a weights-only .safetensors of a checkpoint (no optimizer state; run config and threshold as "
        "metadata) that infer.py, evaluate.py and serve.py accept as ckpt=OUT.",
    )
    parser.add_argument("ckpt", help="a .ckpt written by train.py (or a slim .safetensors)")
    parser.add_argument("out", help="the file to write, ending in .safetensors")
    parser.add_argument("--fp16", action="store_true", help="store floating-point tensors in fp16 (half the size; scores move by up to about 0.01)")
    parser.add_argument("--portable", action="store_true", help="replace this machine's folders in the stored config by <root_dir>-style names")
    parser.add_argument("--no-check", action="store_true", help="skip rebuilding the detector from the written file")
    args = parser.parse_args(argv)
    out = write_slim(args.ckpt, args.out, fp16=args.fp16, portable=args.portable)
    if not args.no_check:
        from unmask.core.checkpoint import load_detector

        load_detector(out)  # the written file rebuilds the detector, as infer.py will
    before, after = Path(args.ckpt).stat().st_size, out.stat().st_size
    print(f"wrote {out} ({after / 1e6:.2f} MB, {after / max(before, 1):.0%} of {args.ckpt}, {'fp16' if args.fp16 else 'fp32'})")
    return 0
