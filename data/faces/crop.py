"""Face crops: a square around a detected face with a margin, optionally rotated so the eyes
are level, returned with the 3x3 map from original to crop coordinates (landmarks and masks
follow the pixels through it)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from data.faces.types import Face


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 2) points through a 3x3 (or 2x3) affine map."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    return (pts @ affine[:2, :2].T + affine[:2, 2]).astype(np.float32)


def eye_angle(face: Face, eye_indices: tuple[Sequence[int], Sequence[int]] | None) -> float:
    """Angle (radians) of the line from the image-left eye to the image-right eye; 0 when
    the analyser names no eye landmarks."""
    if not eye_indices:
        return 0.0
    first, second = (face.landmarks[list(idx)].mean(axis=0) for idx in eye_indices)
    if first[0] > second[0]:
        first, second = second, first
    return math.atan2(float(second[1] - first[1]), float(second[0] - first[0]))


def face_crop_affine(face: Face, margin: float, angle: float = 0.0) -> tuple[np.ndarray, int]:
    """The map original -> crop and the crop's side: a square of side
    ``max(box w, box h) * (1 + 2 * margin)`` centred on the box, rotated by ``angle``."""
    x1, y1, x2, y2 = (float(v) for v in face.box)
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    c, s = math.cos(-angle), math.sin(-angle)
    # translate the centre to the origin, rotate by -angle (eyes level), move to the crop centre
    rotate = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    to_origin = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    to_crop = np.array([[1.0, 0.0, side / 2.0], [0.0, 1.0, side / 2.0], [0.0, 0.0, 1.0]])
    return to_crop @ rotate @ to_origin, max(int(round(side)), 1)


def crop_face(
    rgb: np.ndarray,
    face: Face,
    margin: float = 0.3,
    align: bool = False,
    eye_indices: tuple[Sequence[int], Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(crop, affine)``. Parts of the square outside the image repeat the border pixels
    (a black frame would be a cue tied to where faces sit in a source's photos)."""
    angle = eye_angle(face, eye_indices) if align else 0.0
    affine, side = face_crop_affine(face, margin, angle)
    crop = cv2.warpAffine(rgb, affine[:2], (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, affine


def warp_mask(mask: np.ndarray, affine: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float mask (H, W) of the original image through ``affine`` to ``size`` = (w, h)."""
    return cv2.warpAffine(mask.astype(np.float32), affine[:2], size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
