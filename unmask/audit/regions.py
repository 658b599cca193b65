"""Facial regions from landmarks: the FaceMesh index sets of each part, and masks cut from them.

Index sets follow MediaPipe's 468-point FaceMesh topology (``face_mesh_connections.py`` of
google/mediapipe: ``FACEMESH_FACE_OVAL``, ``FACEMESH_LIPS``, ``FACEMESH_LEFT_EYE`` ...,
``FACEMESH_NOSE``), written here as closed contours. The forehead and cheek patches are not
MediaPipe sets: they are chosen on the same mesh (forehead: the band from the brows' upper
edge to the row 104-151-333; cheeks: the patch below the eye, beside the nose, above the
mouth corner) and were checked by drawing them on skimage's astronaut. "Right" and "left"
are the subject's: the subject's right eye lies on the image's left.
"""
from __future__ import annotations

import cv2
import numpy as np

from data.faces.facemesh import LEFT_EYE, NUM_LANDMARKS, RIGHT_EYE

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149,
             150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
# The lower part of the oval, ear to ear through the chin (an open line).
JAW_LINE = (234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454)
RIGHT_BROW = (46, 53, 52, 65, 55, 107, 66, 105, 63, 70)
LEFT_BROW = (276, 283, 282, 295, 285, 336, 296, 334, 293, 300)
NOSE = (168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 294, 278, 344, 440, 275, 45, 220, 115, 48, 64)  # hull
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
FOREHEAD = (104, 69, 108, 151, 337, 299, 333, 334, 296, 336, 9, 107, 66, 105)
RIGHT_CHEEK = (117, 118, 101, 36, 205, 187, 123)
LEFT_CHEEK = (346, 347, 330, 266, 425, 411, 352)
# Points for the head pose (solvePnP against a generic 3-D face, see face_quality.head_pose).
POSE_POINTS = {"nose_tip": 4, "chin": 152, "eye_outer_image_left": 33, "eye_outer_image_right": 263,
               "mouth_image_left": 61, "mouth_image_right": 291}

PARTS = {  # local quality (spec 7.1.9): part -> contours (each a polygon)
    "eyes": (RIGHT_EYE, LEFT_EYE),
    "brows": (RIGHT_BROW, LEFT_BROW),
    "nose": (NOSE,),
    "mouth": (LIPS_OUTER,),
}
CONVEX = {NOSE}  # index sets listed as points, not in contour order: their convex hull is the region


def is_mesh(landmarks: np.ndarray | None) -> bool:
    """Whether the landmarks are FaceMesh's 468 (the region sets need them)."""
    return landmarks is not None and len(landmarks) == NUM_LANDMARKS


def polygon_mask(shape: tuple[int, int], points: np.ndarray, convex: bool = False) -> np.ndarray:
    """A bool mask of ``shape`` (h, w) filled inside the polygon ``points`` (x, y pixels,
    continuous coordinates: pixel i spans [i, i + 1))."""
    mask = np.zeros(shape, np.uint8)
    pts = np.round((np.asarray(points, np.float64) - 0.5) * 16).astype(np.int32)  # 4 bits of sub-pixel precision
    if convex:
        pts = cv2.convexHull(pts)
    cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def region_mask(shape: tuple[int, int], landmarks: np.ndarray, contour) -> np.ndarray:
    return polygon_mask(shape, landmarks[list(contour)], convex=contour in CONVEX)


def line_mask(shape: tuple[int, int], points: np.ndarray, thickness: int) -> np.ndarray:
    """A bool mask of an open polyline drawn ``thickness`` pixels wide."""
    mask = np.zeros(shape, np.uint8)
    pts = np.round((np.asarray(points, np.float64) - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(mask, [pts], False, 1, thickness=max(int(thickness), 1), lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def face_mask(shape: tuple[int, int], landmarks: np.ndarray | None, box: np.ndarray) -> np.ndarray:
    """The face: the oval of FaceMesh landmarks, else the detector's box."""
    if is_mesh(landmarks):
        return region_mask(shape, landmarks, FACE_OVAL)
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    return polygon_mask(shape, np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))


def hair_mask(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    """The hair region: a band above the face oval, as wide as the oval and 35 % of its
    height tall (reaching 5 % into it), minus the oval itself."""
    x1, y1 = landmarks[list(FACE_OVAL)].min(0)
    x2, y2 = landmarks[list(FACE_OVAL)].max(0)
    h = y2 - y1
    band = polygon_mask(shape, np.array([[x1, y1 - 0.35 * h], [x2, y1 - 0.35 * h], [x2, y1 + 0.05 * h], [x1, y1 + 0.05 * h]]))
    return band & ~region_mask(shape, landmarks, FACE_OVAL)


def part_masks(shape: tuple[int, int], landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the facial parts of ``PARTS`` and the hair region (FaceMesh landmarks)."""
    out = {}
    for name, contours in PARTS.items():
        mask = np.zeros(shape, bool)
        for contour in contours:
            mask |= region_mask(shape, landmarks, contour)
        out[name] = mask
    out["hair"] = hair_mask(shape, landmarks)
    return out


def eye_centres(landmarks: np.ndarray, eye_indices) -> tuple[np.ndarray, np.ndarray] | None:
    """The two eye centres (image-left first) from the analyser's eye index sets, if it has them."""
    if not eye_indices or landmarks is None:
        return None
    a, b = (np.asarray(landmarks, np.float64)[list(idx)].mean(0) for idx in eye_indices)
    return (a, b) if a[0] <= b[0] else (b, a)
