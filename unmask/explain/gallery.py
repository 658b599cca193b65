"""Explanation files of an inference run: masks, heatmaps, overlays and an HTML index.

For every explained image ``<name>`` (its path relative to the input folder, sub-folders
mirrored) ``write_explanations`` writes into ``out_dir`` (infer.py: ``result_*.explain/``):

- ``<name>.mask.png``: the map binarised at ``mask_threshold``, 0 / 255, one channel, at the
  canonical resolution the detector scored (the localisation submission format);
- ``<name>.heat.png``: the map itself as 8-bit grey (``heat=False`` leaves it out);
- ``<name>.overlay.png``: the jet-coloured map blended over the canonical image;
- ``<name>.image.png``: the image as the detector scored it (the canonical view: resized and
  re-encoded, or the face crop that decided), shown beside its overlay;

and ``index.html``: one card per file (the scored image beside its overlay, name, score,
decision, links to every PNG and to the original file), highest score first, with a colour
legend of the map, filters by decision (AI-generated / real / undecodable), paging and a
thumbnail size. Self-contained: inline CSS and a little inline JS, no external assets,
relative links, every name escaped; without JS every card shows. An undecodable file gets a
card saying "could not decode" and no PNGs. Every file is written atomically. A name part over
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


def _jet_gradient(stops: int = 9) -> str:
    """The overlay's colour map as a CSS gradient (the legend)."""
    cmap = matplotlib.colormaps["jet"]
    return ", ".join(f"{matplotlib.colors.to_hex(cmap(i / (stops - 1)))} {100 * i / (stops - 1):g}%" for i in range(stops))


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em}.meta{color:#555;font-size:.9em}
.controls{display:flex;flex-wrap:wrap;gap:.6em 1.4em;align-items:center;margin:.8em 0;padding:.6em .8em;background:#fff;border:1px solid #ddd;border-radius:6px;font-size:.9em}
.controls[hidden]{display:none}.controls button{padding:.2em .7em}.controls label{white-space:nowrap}
.legend{display:flex;align-items:center;gap:.5em;font-size:.85em;color:#444;margin:.4em 0 1em}
.legend .bar{display:inline-block;width:220px;height:14px;border:1px solid #999;background:linear-gradient(to right, GRADIENT)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--card,340px),1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.85em;overflow-wrap:anywhere}
.card[hidden]{display:none}
.pair{display:flex;gap:6px}.pair figure{flex:1;margin:0;min-width:0}
.pair img{width:100%;image-rendering:pixelated;display:block;border-radius:3px;background:#eee}
.pair figcaption{font-size:.8em;color:#666;text-align:center}
.pair figure.missing figcaption::after{content:" (missing)";color:#c0392b}
.fake{border-left:5px solid #c0392b}.real{border-left:5px solid #27ae60}.bad{border-left:5px solid #999}
.name{font-weight:600;margin:6px 0 2px}.nodecode{padding:2em 0;text-align:center;color:#999;background:#eee}
.links a{margin-right:.5em}
""".replace("GRADIENT", _jet_gradient())

# Filters, paging and thumbnail size; marks each image loaded or broken (data-state). Plain
# DOM, no names inside: everything it shows comes from attributes the page already holds.
SCRIPT = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input.filter"));
  var perPage = document.getElementById("per-page"), size = document.getElementById("size");
  var prev = document.getElementById("prev"), next = document.getElementById("next"), info = document.getElementById("page-info");
  var page = 0;
  function selected() {
    var on = {};
    boxes.forEach(function (b) { on[b.value] = b.checked; });
    return cards.filter(function (c) { return on[c.getAttribute("data-decision")]; });
  }
  function render() {
    var list = selected(), n = parseInt(perPage.value, 10) || Math.max(list.length, 1);
    var pages = Math.max(1, Math.ceil(list.length / n));
    page = Math.max(0, Math.min(page, pages - 1));
    cards.forEach(function (c) { c.hidden = true; });
    list.slice(page * n, page * n + n).forEach(function (c) { c.hidden = false; });
    info.textContent = "page " + (page + 1) + " of " + pages + " (" + list.length + " of " + cards.length + " files)";
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }
  boxes.forEach(function (b) { b.addEventListener("change", function () { page = 0; render(); }); });
  perPage.addEventListener("change", function () { page = 0; render(); });
  size.addEventListener("change", function () { document.documentElement.style.setProperty("--card", size.value); });
  prev.addEventListener("click", function () { page -= 1; render(); window.scrollTo(0, 0); });
  next.addEventListener("click", function () { page += 1; render(); window.scrollTo(0, 0); });
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if (e.key === "ArrowRight" && !next.disabled) next.click();
    if (e.key === "ArrowLeft" && !prev.disabled) prev.click();
  });
  Array.prototype.forEach.call(document.querySelectorAll(".card img"), function (img) {
    function mark() {
      var ok = img.naturalWidth > 0;
      img.setAttribute("data-state", ok ? "loaded" : "broken");
      if (!ok) img.parentNode.parentNode.classList.add("missing");
    }
    if (img.complete && img.getAttribute("src")) mark();
    img.addEventListener("load", mark);
    img.addEventListener("error", mark);
  });
  document.getElementById("controls").hidden = false;
  render();
})();
"""

DECISIONS = (("ai", "AI-generated"), ("real", "real"), ("bad", "undecodable"))
PER_PAGE = (24, 48, 96, 0)  # 0: all
DEFAULT_PER_PAGE = 48
SIZES = (("small", "220px"), ("medium", "340px"), ("large", "520px"))


def _figure(href: str, caption: str, alt: str) -> str:
    return (
        f'<figure><a href="{href}"><img src="{href}" alt="{alt}" loading="lazy"></a>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _card(row: Mapping, files: Mapping[str, str] | None, original: str | None = None) -> str:
    name = html.escape(_display(row["name"]))
    if files is None:
        error = html.escape(_display(str(row.get("error") or "")))
        return (
            f'<div class="card bad" data-decision="bad"><div class="nodecode">could not decode</div>'
            f'<div class="name">{name}</div><div>{error}</div></div>'
        )
    decision = "AI-generated" if int(row["decision"]) == 1 else "real"
    kind = "ai" if decision != "real" else "real"
    links = [f'<a href="{_href(path)}">{what}</a>' for what, path in files.items()]
    if original:
        links.append(f'<a href="{_href(original)}">original file</a>')
    pair = ""
    if "image" in files:
        pair += _figure(_href(files["image"]), "as scored", f"{name}: the image as scored")
    pair += _figure(_href(files["overlay"]), "forgery map", f"{name}: forgery map over the image")
    return (
        f'<div class="card {"fake" if kind == "ai" else "real"}" data-decision="{kind}" data-prob="{float(row["prob"]):.6f}">'
        f'<div class="pair">{pair}</div>'
        f'<div class="name">{name}</div><div>score {fmt(float(row["prob"]))} &middot; <b>{decision}</b></div>'
        f'<div class="links">{" ".join(links)}</div></div>'
    )


def _controls(counts: Mapping[str, int]) -> str:
    filters = " ".join(
        f'<label><input type="checkbox" class="filter" value="{key}" checked> {label} ({int(counts.get(key, 0))})</label>'
        for key, label in DECISIONS
    )
    pages = "".join(
        f'<option value="{n}"{" selected" if n == DEFAULT_PER_PAGE else ""}>{n or "all"}</option>' for n in PER_PAGE
    )
    sizes = "".join(f'<option value="{v}"{" selected" if v == "340px" else ""}>{k}</option>' for k, v in SIZES)
    return (
        '<div class="controls" id="controls" hidden><span>Show:</span>' + filters
        + f'<label>per page <select id="per-page">{pages}</select></label>'
        + f'<label>size <select id="size">{sizes}</select></label>'
        + '<span class="pager"><button type="button" id="prev">&lsaquo; previous</button> <span id="page-info"></span> '
        '<button type="button" id="next">next &rsaquo;</button></span></div>'
    )


LEGEND = (
    '<div class="legend"><span>forgery map:</span><span class="bar" role="img" aria-label="colour scale from 0 (blue) to 1 (dark red)"></span>'
    "<span>0 (no evidence, blue) &rarr; 1 (strongest evidence, dark red)</span>"
    "<span>&middot; overlay: the map blended half over the image as scored</span></div>"
)


def index_html(cards: Sequence[str], title: str, summary: str, counts: Mapping[str, int] | None = None) -> str:
    counts = counts if counts is not None else {}
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(summary)}</p>\n"
        f"{LEGEND}\n{_controls(counts)}\n"
        '<div class="grid">\n' + "\n".join(cards) + "\n</div>\n"
        f"<script>{SCRIPT}</script></body></html>\n"
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
        cards, counts = [], {"ai": 0, "real": 0, "bad": 0}
        for row in row_list:
            files = self.files.get(row["path"])
            kind = "bad" if files is None else ("ai" if int(row["decision"]) == 1 else "real")
            counts[kind] += 1
            cards.append(_card(row, files, self._original(row["path"]) if files is not None else None))
        thr = f", decision threshold {fmt(threshold)}" if threshold is not None and math.isfinite(threshold) else ""
        summary = f"{len(cards)} file(s), highest score first; maps: {how}; masks binarised at {self.mask_threshold}{thr}."
        index = atomic_write_text(self.out_dir / "index.html", index_html(cards, title, summary, counts))
        log.info("explanations of %d file(s) written to %s", len(cards), self.out_dir)
        return index

    def _original(self, path: str) -> str | None:
        """The input file relative to the gallery folder (a link to it), when it is a file."""
        try:
            if not Path(path).is_file():
                return None
            return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(self.out_dir))).as_posix()
        except (OSError, ValueError):  # another drive, an unreadable path
            return None


def _write_pngs(out_dir: Path, name: str, image: torch.Tensor, heat: np.ndarray, mask_threshold: float, with_heat: bool) -> dict[str, str]:
    """The PNGs of one image; returns {kind: path relative to ``out_dir``}."""
    rel = safe_relpath(name)
    pixels = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    out = {
        "image": (f"{rel}.image.png", pixels),
        "overlay": (f"{rel}.overlay.png", overlay(pixels, heat)),
        "mask": (f"{rel}.mask.png", binary_mask(heat, mask_threshold)),
    }
    if with_heat:
        out["heat"] = (f"{rel}.heat.png", (heat * 255.0).round().astype(np.uint8))
    for relpath, array in out.values():
        atomic_write_bytes(out_dir / relpath, _png(array))
    return {kind: relpath for kind, (relpath, _) in out.items()}
