"""Diversity and balance (spec 7.1.3, 7.1.4): skin tone from skin pixels as the individual
typology angle (ITA), and the balance of each measure across high / middle / low tertiles.

ITA = atan((L* - 50) / b*) in degrees, from the median L* and b* (CIELAB) of the forehead
and cheek pixels; its bands are Chardon et al. (1991) / Del Bino et al. (2006): very light
> 55, light 41-55, intermediate 28-41, tan 10-28, brown -30-10, dark < -30, folded here into
light (> 41), medium (10-41) and dark (<= 10). A grey image has no skin tone (NaN).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd

from unmask.audit.face_quality import NormalisedFace
from unmask.audit.regions import FOREHEAD, LEFT_CHEEK, RIGHT_CHEEK, is_mesh, region_mask

ITA_BANDS = ((55.0, "very light"), (41.0, "light"), (28.0, "intermediate"), (10.0, "tan"), (-30.0, "brown"), (-math.inf, "dark"))
TONE_OF_BAND = {"very light": "light", "light": "light", "intermediate": "medium", "tan": "medium", "brown": "dark", "dark": "dark"}
GREY_CHROMA = 1.5  # mean |a*| + |b*| of the whole image below which it is grey (no skin tone)
TERTILES = ("low", "middle", "high")


def is_grey(rgb: np.ndarray) -> bool:
    """Whether an RGB image carries (almost) no colour: a grey photo stored as RGB."""
    small = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA) if max(rgb.shape[:2]) > 64 else rgb
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    return float(np.abs(lab[..., 1:]).sum(axis=-1).mean()) < GREY_CHROMA


def ita_band(ita: float) -> str:
    if not math.isfinite(ita):
        return ""
    return next(name for limit, name in ITA_BANDS if ita > limit)


def skin_tone(norm: NormalisedFace, grey: bool) -> dict:
    """ITA of the forehead and cheeks and its bands (NaN / empty for grey images or without
    FaceMesh landmarks)."""
    out = {"skin_tone_ita": math.nan, "skin_tone_band": "", "skin_tone": ""}
    if grey or not is_mesh(norm.landmarks):
        return out
    mask = np.zeros(norm.gray.shape, bool)
    for region in (FOREHEAD, RIGHT_CHEEK, LEFT_CHEEK):
        mask |= region_mask(norm.gray.shape, norm.landmarks, region)
    mask &= norm.valid
    if mask.sum() < 16:
        return out
    lab = cv2.cvtColor(norm.rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)[mask]  # L* 0-100, b* in its units
    ita = math.degrees(math.atan2(float(np.median(lab[:, 0])) - 50.0, float(np.median(lab[:, 2]))))
    band = ita_band(ita)
    return {"skin_tone_ita": ita, "skin_tone_band": band, "skin_tone": TONE_OF_BAND[band]}


def tertile_edges(values: pd.Series) -> tuple[float, float] | None:
    """The 1/3 and 2/3 quantiles of the finite values (None with fewer than 3 distinct)."""
    finite = pd.to_numeric(values, errors="coerce").replace([np.inf, -np.inf], np.nan).dropna()
    if finite.nunique() < 3:
        return None
    return float(finite.quantile(1 / 3)), float(finite.quantile(2 / 3))


def tertile_of(values: pd.Series, edges: tuple[float, float]) -> pd.Series:
    """'low' / 'middle' / 'high' per value ('' where missing)."""
    v = pd.to_numeric(values, errors="coerce")
    out = np.where(v <= edges[0], "low", np.where(v <= edges[1], "middle", "high"))
    return pd.Series(np.where(v.notna(), out, ""), index=values.index)


def tertile_balance(table: pd.DataFrame, measure: str, by: str) -> dict | None:
    """Tertiles of ``measure`` over the whole table, and per value of the ``by`` column the
    share of its files in each tertile. ``imbalance``: the total-variation distance between
    the reals' and the fakes' tertile shares (0: both spread alike; 1: no overlap)."""
    if measure not in table:
        return None
    edges = tertile_edges(table[measure])
    if edges is None:
        return None
    tertile = tertile_of(table[measure], edges)
    shares = {}
    for name, part in tertile[tertile != ""].groupby(table.loc[tertile != "", by]):
        counts = part.value_counts()
        shares[str(name)] = {t: float(counts.get(t, 0) / len(part)) for t in TERTILES} | {"n": int(len(part))}
    by_class = {}
    for label, name in ((0, "real"), (1, "fake")):
        part = tertile[(tertile != "") & (table["label"] == label)]
        if len(part):
            counts = part.value_counts()
            by_class[name] = np.array([counts.get(t, 0) / len(part) for t in TERTILES])
    imbalance = float(0.5 * np.abs(by_class["real"] - by_class["fake"]).sum()) if len(by_class) == 2 else math.nan
    return {"edges": list(edges), "shares": shares, "imbalance": imbalance}
