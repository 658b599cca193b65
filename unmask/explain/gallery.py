"""Explanation files of an inference run: masks, heatmaps, overlays and an HTML index.

For every explained image ``<name>`` (its path relative to the input folder, sub-folders
mirrored) ``write_explanations`` writes into ``out_dir`` (infer.py: ``result_*.explain/``):

- ``<name>.mask.png``: the map binarised at ``mask_threshold``, 0 / 255, one channel, at the
  canonical resolution the detector scored (the localisation submission format);
- ``<name>.heat.png``: the map itself as 8-bit grey (``heat=False`` leaves it out);
- ``<name>.overlay.png``: the jet-coloured map blended over the canonical image;

and ``index.html``: one card per file (overlay thumbnail, name, score, decision), highest
score first, self-contained (inline CSS, relative links). An undecodable file gets a card
saying "could not decode" and no PNGs. Every file is written atomically. A name part over
``MAX_PART_BYTES`` is shortened in the file names (readable prefix + ``~`` + hash + suffix) so
that ``<name>.overlay.png`` fits the 255-byte limit; its card shows the full name and links
the shortened files.

Maps come from a pass of the scorer with an explainer (``explain.gradcam.ForgeryMaps``): the
same views, preprocessing and face stage as the scores. Each file is shown by the view that
decided its score (``scoring.combine.deciding_view``): the whole image, or the most
suspicious face.
"""
from __future__ import annotations

import hashlib
import html
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import matplotlib
import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.io import atomic_write_bytes, atomic_write_text
from data.records import Record
from unmask.reports.tables import fmt
from unmask.scoring.scorer import ScoredBatch

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.5  # share of the colour map in the overlay
# A name part longer than this (bytes) is shortened: with ".overlay.png" added, and the
# atomic writer's temporary name, it must stay under the 255-byte file-name limit.
MAX_PART_BYTES = 200
HASH_CHARS = 12


def _short_part(part: str) -> str:
    """``part`` itself, or when over ``MAX_PART_BYTES``: its first characters + ``~`` + a hash
    of the whole part + its suffix (``.png``), unique and still readable."""
    raw = os.fsencode(part)
    if len(raw) <= MAX_PART_BYTES:
        return part
    suffix = PurePosixPath(part).suffix
    suffix = suffix if len(os.fsencode(suffix)) <= 16 else ""
    tail = f"~{hashlib.sha1(raw).hexdigest()[:HASH_CHARS]}{suffix}"
    prefix = part[: len(part) - len(suffix)] if suffix else part
    while len(os.fsencode(prefix + tail)) > MAX_PART_BYTES:
        prefix = prefix[:-1]
    return prefix + tail


def safe_relpath(name: str) -> PurePosixPath:
    """``name`` (a '/'-separated path relative to the input) as a path that stays inside the
    output folder: empty and '.' parts dropped, '..' parts renamed '__', parts over
    ``MAX_PART_BYTES`` shortened (``_short_part``)."""
    parts = [_short_part("__" if p == ".." else p) for p in str(name).split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"cannot make an output file name from {name!r}")
    return PurePosixPath(*parts)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def binary_mask(heat: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) map in [0, 1] -> uint8 0 / 255 (255 where map >= threshold)."""
    return np.where(heat >= threshold, 255, 0).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Jet-coloured ``heat`` (H, W in [0, 1]) blended over ``image`` (H, W, 3 uint8)."""
    colours = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colours, 0, 255).round().astype(np.uint8)


def _display(name: str) -> str:
    # names that are not valid UTF-8 (surrogate-escaped bytes) are shown with U+FFFD
    return os.fsencode(name).decode("utf-8", "replace")


def _href(relpath: str) -> str:
    return quote(os.fsencode(relpath), safe="/")


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em}.meta{color:#555;font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.85em;overflow-wrap:anywhere}
.card img{width:100%;image-rendering:pixelated;display:block;border-radius:3px}
.fake{border-left:5px solid #c0392b}.real{border-left:5px solid #27ae60}.bad{border-left:5px solid #999}
.name{font-weight:600;margin:6px 0 2px}.nodecode{padding:2em 0;text-align:center;color:#999;background:#eee}
"""


def _card(row: Mapping, files: Mapping[str, str] | None) -> str:
    name = html.escape(_display(row["name"]))
    if files is None:
        error = html.escape(_display(str(row.get("error") or "")))
        return (
            f'<div class="card bad"><div class="nodecode">could not decode</div>'
            f'<div class="name">{name}</div><div>{error}</div></div>'
        )
    decision = "AI-generated" if int(row["decision"]) == 1 else "real"
    links = " ".join(f'<a href="{_href(path)}">{kind}</a>' for kind, path in files.items())
    return (
        f'<div class="card {"fake" if decision != "real" else "real"}">'
        f'<a href="{_href(files["overlay"])}"><img src="{_href(files["overlay"])}" alt="{name}" loading="lazy"></a>'
        f'<div class="name">{name}</div><div>score {fmt(float(row["prob"]))} &middot; <b>{decision}</b></div>'
        f"<div>{links}</div></div>"
    )


def index_html(cards: Sequence[str], title: str, summary: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(summary)}</p>\n"
        f'<div class="grid">\n' + "\n".join(cards) + "\n</div></body></html>\n"
    )


def _ordered_rows(records: Sequence[Record], predictions: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """The prediction rows of ``records`` (one per path), highest score first (undecodable
    last, then by name), cut to ``limit``."""
    paths = {r.path for r in records}
    rows = predictions[predictions["path"].isin(paths)].drop_duplicates("path")
    rows = rows.assign(_score=rows["prob"].fillna(-math.inf)).sort_values(["_score", "name"], ascending=[False, True], kind="stable")
    return (rows if limit is None else rows.head(limit)).drop(columns="_score")


def ordered_records(records: Sequence[Record], predictions: pd.DataFrame, limit: int | None) -> tuple[list[Record], pd.DataFrame]:
    """The records to explain and their prediction rows, highest score first, cut to ``limit``."""
    rows = _ordered_rows(records, predictions, limit)
    by_path = {r.path: r for r in records}
    return [by_path[p] for p in rows["path"]], rows


class Gallery:
    """Fed by the scorer (``update`` per batch, maps from an explainer): writes each file's
    PNGs from the view that decided it; ``write_index`` then writes ``index.html``.
    ``names``: path -> the name shown and mirrored under ``out_dir``."""

    def __init__(self, out_dir: str | Path, names: Mapping[str, str], mask_threshold: float = 0.5, heat: bool = True) -> None:
        self.out_dir, self.names = Path(out_dir), dict(names)
        self.mask_threshold, self.heat = float(mask_threshold), heat
        self.files: dict[str, dict[str, str] | None] = {}

    def update(self, scored: ScoredBatch) -> None:
        if scored.kind != "images" or scored.maps is None:
            return
        meta = scored.batch["meta"]
        for view in scored.deciding_views():
            path = meta["path"][view]
            if not meta["ok"][view]:
                self.files[path] = None  # an undecodable file keeps None: no PNGs
                continue
            heat = scored.maps[view, 0].numpy()
            self.files[path] = _write_pngs(self.out_dir, self.names[path], scored.batch["image"][view], heat, self.mask_threshold, self.heat)

    def write_index(self, rows: pd.DataFrame, title: str, how: str, threshold: float | None = None) -> Path:
        """``index.html``: one card per row of ``rows`` (``path, name, prob, decision, ok,
        error``), in their order; ``how``: what the maps are, for the page header."""
        row_list = rows.to_dict("records")
        cards = [_card(row, self.files.get(row["path"])) for row in row_list]
        thr = f", decision threshold {fmt(threshold)}" if threshold is not None and math.isfinite(threshold) else ""
        summary = f"{len(cards)} file(s), highest score first; maps: {how}; masks binarised at {self.mask_threshold}{thr}."
        index = atomic_write_text(self.out_dir / "index.html", index_html(cards, title, summary))
        log.info("explanations of %d file(s) written to %s", len(cards), self.out_dir)
        return index


def _write_pngs(out_dir: Path, name: str, image: torch.Tensor, heat: np.ndarray, mask_threshold: float, with_heat: bool) -> dict[str, str]:
    """The PNGs of one image; returns {kind: path relative to ``out_dir``}."""
    rel = safe_relpath(name)
    pixels = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    out = {
        "overlay": (f"{rel}.overlay.png", overlay(pixels, heat)),
        "mask": (f"{rel}.mask.png", binary_mask(heat, mask_threshold)),
    }
    if with_heat:
        out["heat"] = (f"{rel}.heat.png", (heat * 255.0).round().astype(np.uint8))
    for relpath, array in out.values():
        atomic_write_bytes(out_dir / relpath, _png(array))
    return {kind: relpath for kind, (relpath, _) in out.items()}
