"""Explanation files of an inference run: masks, heatmaps, overlays and an HTML index.

For every explained image ``<name>`` (its path relative to the input folder, sub-folders
mirrored) ``write_explanations`` writes into ``out_dir`` (infer.py: ``result_*.explain/``):

- ``<name>.mask.png``: the map binarised at ``mask_threshold``, 0 / 255, one channel, at the
  canonical resolution the detector scored (the localisation submission format);
- ``<name>.heat.png``: the map itself as 8-bit grey (``heat=False`` leaves it out);
- ``<name>.overlay.png``: the jet-coloured map blended over the canonical image;

and ``index.html``: one card per file (overlay thumbnail, name, score, decision), highest
score first, self-contained (inline CSS, relative links). An undecodable file gets a card
saying "could not decode" and no PNGs. Every file is written atomically.

Maps are computed (``unmask.explain``) on the same canonical pixels the detector scored:
``ImageDataset(records, loaded.canonical, train=False, faces=loaded.faces)`` (with a face
stage: the most confident face's crop, the whole image when none), eager torch, in batches.
"""
from __future__ import annotations

import html
import io
import logging
import math
import os
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence
from urllib.parse import quote

import matplotlib
import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.dataset import ImageDataset
from data.records import Record
from unmask.checkpoint import LoadedDetector
from unmask.explain import METHODS, explain_maps, resolve_method
from unmask.io import atomic_write_bytes, atomic_write_text
from unmask.runtime import pick_device

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.5  # share of the colour map in the overlay


def safe_relpath(name: str) -> PurePosixPath:
    """``name`` (a '/'-separated path relative to the input) as a path that stays inside the
    output folder: empty and '.' parts dropped, '..' parts renamed '__'."""
    parts = ["__" if p == ".." else p for p in str(name).split("/") if p not in ("", ".")]
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
        f'<div class="name">{name}</div><div>score {float(row["prob"]):.4f} &middot; <b>{decision}</b></div>'
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


def write_explanations(
    loaded: LoadedDetector,
    records: Sequence[Record],
    predictions: pd.DataFrame,
    out_dir: str | Path,
    *,
    method: str = "auto",
    target_layer: str | None = None,
    mask_threshold: float = 0.5,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    heat: bool = True,
    threshold: float | None = None,
) -> Path:
    """Write the explanation files of ``records`` (image records of an inference run) into
    ``out_dir`` and return the path of its ``index.html``. ``predictions``: one row per file
    with ``path``, ``name``, ``prob``, ``decision`` (0/1), ``ok``, ``error`` (infer.py's
    frame); ``limit``: only the ``limit`` highest-scoring files get maps and cards;
    ``threshold``: the decision threshold, shown in the page header."""
    out_dir = Path(out_dir)
    rows = _ordered_rows(records, predictions, limit)
    by_path = {r.path: r for r in records}
    # With a face stage: the top face (the whole image when none), with its landmarks.
    dataset = ImageDataset([by_path[p] for p in rows["path"]], loaded.canonical, train=False, faces=loaded.faces)
    detector = loaded.detector.to(pick_device(device) if isinstance(device, str) else device)
    dev = next(iter(detector.parameters()), torch.empty(0)).device
    resolved: tuple[str, str | None] | None = None
    files: dict[str, dict[str, str] | None] = {}
    row_list = rows.to_dict("records")
    names = {row["path"]: row["name"] for row in row_list}
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        ok = [s for s in samples if s["meta"]["ok"]]
        for s in samples:
            files.setdefault(s["meta"]["path"], None)  # an undecodable file keeps None: no PNGs
        if not ok:
            continue
        image = torch.stack([s["image"] for s in ok]).to(dev)
        # landmark detectors (rgnet) read the landmarks of the batch, the others ignore it
        batch = {"landmarks": torch.stack([s["landmarks"] for s in ok]).to(dev)} if "landmarks" in ok[0] else None
        if resolved is None:  # decided once: one discovery pass for the whole run
            resolved = resolve_method(detector, image, batch, method, target_layer)
            log.info("explanations: %s%s", resolved[0], f" on layer {resolved[1]}" if resolved[1] else "")
        maps = explain_maps(detector, image, batch, resolved[0], resolved[1])[:, 0].cpu().numpy()
        for s, m in zip(ok, maps):
            files[s["meta"]["path"]] = _write_pngs(out_dir, names[s["meta"]["path"]], s["image"], m, mask_threshold, heat)
    cards = [_card(row, files.get(row["path"])) for row in row_list]
    how = "no image decoded" if resolved is None else (
        "the detector's own map" if resolved[0] == "own" else f"Grad-CAM on layer {resolved[1]}"
    )
    thr = f", decision threshold {threshold:.4f}" if threshold is not None and math.isfinite(threshold) else ""
    summary = f"{len(cards)} file(s), highest score first; maps: {how}; masks binarised at {mask_threshold}{thr}."
    index = atomic_write_text(out_dir / "index.html", index_html(cards, f"Explanations: {Path(loaded.path).name}", summary))
    log.info("explanations of %d file(s) written to %s", len(cards), out_dir)
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


def write_explanations_from_config(loaded: LoadedDetector, records: Sequence[Record], predictions: pd.DataFrame, out_dir: str | Path, cfg: Mapping, threshold: float | None = None) -> Path:
    """``write_explanations`` with the ``explain_*`` keys of infer.yaml, checked."""
    method = cfg.get("explain_method", "auto")
    if method not in METHODS:
        raise ValueError(f"explain_method must be one of {METHODS}, got {method!r}")
    mask_threshold = cfg.get("explain_mask_threshold", 0.5)
    if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, (int, float)) or not 0.0 <= float(mask_threshold) <= 1.0:
        raise ValueError(f"explain_mask_threshold must be a number in [0, 1], got {mask_threshold!r}")
    limit = cfg.get("explain_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"explain_limit must be null (every file) or an integer >= 0, got {limit!r}")
    return write_explanations(
        loaded, records, predictions, out_dir,
        method=method, target_layer=cfg.get("explain_layer") or None, mask_threshold=float(mask_threshold), limit=limit,
        batch_size=int(cfg.get("batch_size", 16)), device=cfg.get("device", "cpu"), threshold=threshold,
    )
