"""Video measures (spec 7.1.16-7.1.19) over consecutive frames of a video file.

- Geometric coherence: AKD, the average key-point distance of each frame's landmarks to a
  template face, here the video's own mean shape: every frame's landmarks are aligned to it
  by a similarity transform (``cv2.estimateAffinePartial2D``) and their mean distance is
  divided by the template's inter-ocular distance (0: a rigid face; flicker raises it).
- Motion continuity: OpenCV's Farneback dense optical flow between neighbouring frames;
  each pair's residual is the mean absolute difference between the second frame and the
  first warped along the flow, and continuity = (median residual + 1) / (max residual + 1)
  (1: every step as predictable as the typical one; a jump or a cut lowers it).
- Lighting variation: the correlation of the face's (else the frame's) grey histograms
  between neighbouring frames; ``lighting_consistency`` is their mean.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

FLOW_SIDE = 256  # frames are brought to at most this long side for the optical flow


def _small_gray(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    r = min(1.0, FLOW_SIDE / max(h, w))
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA) if r < 1 else gray


def motion_continuity(frames: list[np.ndarray]) -> dict:
    """Farneback flow between neighbouring frames: continuity, the largest and median
    warp residual (grey levels) and the mean flow magnitude (pixels at ``FLOW_SIDE``)."""
    out = {"motion_continuity": math.nan, "flow_residual_max": math.nan, "flow_residual_median": math.nan, "flow_magnitude": math.nan}
    if len(frames) < 3:
        return out
    grays = [_small_gray(f) for f in frames]
    h, w = grays[0].shape
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=-1)
    residuals, magnitudes = [], []
    for a, b in zip(grays[:-1], grays[1:]):
        if b.shape != a.shape:
            b = cv2.resize(b, (w, h), interpolation=cv2.INTER_AREA)
        # The flow from b back to a: b(x) ~ a(x + flow(x)), so a sampled there predicts b.
        flow = cv2.calcOpticalFlowFarneback(b, a, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        warped = cv2.remap(a, grid + flow, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        m = 4  # the frame's border has no predecessor to warp from
        residuals.append(float(np.abs(warped.astype(np.float32) - b.astype(np.float32))[m:-m, m:-m].mean()))
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
    residuals = np.asarray(residuals)
    out.update(motion_continuity=float((np.median(residuals) + 1.0) / (residuals.max() + 1.0)),
               flow_residual_max=float(residuals.max()), flow_residual_median=float(np.median(residuals)),
               flow_magnitude=float(np.mean(magnitudes)))
    return out


def lighting_consistency(patches: list[np.ndarray]) -> dict:
    """Mean and minimum correlation of 32-bin grey histograms of neighbouring patches."""
    if len(patches) < 2:
        return {"lighting_consistency": math.nan, "lighting_consistency_min": math.nan}
    hists = []
    for p in patches:
        gray = cv2.cvtColor(p, cv2.COLOR_RGB2GRAY) if p.ndim == 3 else p
        hist = cv2.calcHist([gray], [0], None, [32], [0, 256])
        hists.append(hist / max(float(hist.sum()), 1e-12))
    sims = [float(cv2.compareHist(a, b, cv2.HISTCMP_CORREL)) for a, b in zip(hists[:-1], hists[1:])]
    return {"lighting_consistency": float(np.mean(sims)), "lighting_consistency_min": float(np.min(sims))}


def average_keypoint_distance(shapes: list[np.ndarray], eye_indices=None) -> float:
    """AKD of landmark sets (each (L, 2), all of one analyser) to their mean shape after a
    similarity alignment, in units of the template's inter-ocular distance (or of its
    extent's diagonal when the analyser names no eyes)."""
    shapes = [np.asarray(s, np.float32) for s in shapes if s is not None and len(s) >= 3]
    if len(shapes) < 2 or len({len(s) for s in shapes}) != 1:
        return math.nan
    template = shapes[0]
    for _ in range(3):  # Procrustes iterations: align to the template, average, repeat
        aligned = []
        for s in shapes:
            m, _ = cv2.estimateAffinePartial2D(s, template, method=cv2.LMEDS)
            aligned.append(s @ m[:, :2].T + m[:, 2] if m is not None else s)
        template = np.mean(aligned, axis=0).astype(np.float32)
    if eye_indices:
        a, b = (template[list(idx)].mean(0) for idx in eye_indices)
        unit = float(np.linalg.norm(a - b))
    else:
        unit = float(np.linalg.norm(template.max(0) - template.min(0)))
    distances = [float(np.linalg.norm(a - template, axis=1).mean()) for a in aligned]
    return float(np.mean(distances) / max(unit, 1e-6))
