"""The framework's shipped default model (``unmask/model_zoo/default/``).

One weights-only ``model.safetensors`` (written by ``python -m unmask.slim --fp16`` from a
``train.py experiment=contest`` run; at most 10 MB) and its model card ``README.md``, which
states the file's SHA-256. infer.py, evaluate.py, serve.py and ``src/main.py`` score with it
when no ``ckpt=`` is given. The file is checked against the card's hash before it is used: a
swapped or damaged file is refused, never scored with.
"""
from __future__ import annotations

import re
from pathlib import Path

from data.io import file_digest
from unmask.core.checkpoint import CheckpointError

ZOO = Path(__file__).resolve().parents[1] / "model_zoo" / "default"
WEIGHTS = ZOO / "model.safetensors"
CARD = ZOO / "README.md"
MAX_BYTES = 10_000_000  # the shipped file's budget: 10 MB
SHA256_LINE = re.compile(r"^SHA-256:\s*`?([0-9a-f]{64})`?\s*$", re.MULTILINE)


def card_sha256(card: Path | None = None) -> str:
    """The SHA-256 the model card states for the weights (its ``SHA-256: <hex>`` line)."""
    card = card or CARD
    found = SHA256_LINE.findall(card.read_text(encoding="utf-8"))
    if len(found) != 1:
        raise CheckpointError(f"{card}: the model card must state the weights' hash on exactly one 'SHA-256: <hex>' line, found {len(found)}")
    return found[0]


def default_checkpoint(weights: Path | None = None, card: Path | None = None) -> Path:
    """The shipped weights, after checking them against the card's hash; a missing file is a
    ``FileNotFoundError`` (an install without package data), a mismatch a ``CheckpointError``."""
    weights, card = weights or WEIGHTS, card or CARD
    if not weights.is_file():
        raise FileNotFoundError(f"the shipped default model {weights} is missing (an install without the package's data files?)")
    actual, stated = file_digest(weights, "sha256"), card_sha256(card)
    if actual != stated:
        raise CheckpointError(
            f"{weights}: its SHA-256 {actual[:16]}... differs from the one its model card {card} states ({stated[:16]}...): "
            "the file was replaced or damaged; reinstall unmask or pass ckpt= explicitly"
        )
    return weights
