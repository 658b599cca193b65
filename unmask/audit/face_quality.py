"""Face measures from the landmarks: size and area share (spec 7.1.3), head pose, face
quality 0-100 (7.1.8) and local quality per facial part (7.1.9).

Sharpness and contrast are read on a *normalised face*: the face cut out with a margin and
resized so its landmark extent is ``FACE_SIZE`` pixels wide, so a small face blown up to a
large image and a large face shrunk to a thumbnail are compared at one scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from data.faces.crop import apply_affine, face_crop_affine
from data.faces.facemesh import LEFT_EYE, RIGHT_EYE
from data.faces.types import Face
from unmask.audit.image_quality import sharpness, to_gray
from unmask.audit.regions import POSE_POINTS, eye_centres, face_mask, is_mesh, part_masks

FACE_SIZE = 160  # pixels across the landmarks' extent in the normalised face
MARGIN = 0.5  # normalised crop side = extent * (1 + 2 * margin): room for hair, jaw and background
# A generic 3-D face (LearnOpenCV's head-pose model; x right, y up, z towards the camera),
# the points of ``regions.POSE_POINTS`` in that order.
GENERIC_FACE_3D = np.array([(0.0, 0.0, 0.0), (0.0, -330.0, -65.0), (-225.0, 170.0, -135.0), (225.0, 170.0, -135.0),
                            (-150.0, -150.0, -125.0), (150.0, -150.0, -125.0)], np.float64)
# Sub-score scales of the face quality (each sub-score is in [0, 1]).
IOD_RANGE = (15.0, 60.0)  # inter-ocular distance in pixels: 0 at or below the first, 1 at or above the second
SHARPNESS_HALF = 100.0  # Laplacian variance of the normalised face that scores 0.5
BRIGHTNESS_IDEAL = (100.0, 170.0)  # mean grey of the face that scores 1; falls by 1/100 per grey level: 0 at 0 and 270
CONTRAST_FULL = 40.0  # grey standard deviation of the face that scores 1
POSE_LIMIT = 45.0  # |yaw| or |pitch| in degrees that scores 0


@dataclass
class NormalisedFace:
    rgb: np.ndarray  # S x S x 3 uint8
    gray: np.ndarray  # S x S float32 grey levels
    valid: np.ndarray  # S x S bool: inside the original image
    landmarks: np.ndarray  # (L, 2) in the crop's pixels
    box: np.ndarray  # (4,) in the crop's pixels
    scale: float  # crop pixels per original pixel


def face_extent(face: Face) -> np.ndarray:
    """x1, y1, x2, y2 of the face: the landmarks' extent (FaceMesh), else the detector's box."""
    if is_mesh(face.landmarks):
        return np.concatenate([face.landmarks.min(0), face.landmarks.max(0)]).astype(np.float64)
    return np.asarray(face.box, np.float64)


def normalise_face(rgb: np.ndarray, face: Face, size: int = FACE_SIZE, margin: float = MARGIN) -> NormalisedFace:
    """The face cut out at the original scale (no resampling loss), then resized so its
    extent is ``size`` pixels wide (area filter down, cubic up)."""
    box = face_extent(face)
    cut = Face(box.astype(np.float32), face.score, face.landmarks)
    affine, side = face_crop_affine(cut, margin)
    crop = cv2.warpAffine(rgb, affine[:2], (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpAffine(np.ones(rgb.shape[:2], np.uint8), affine[:2], (side, side), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = int(round(size * (1 + 2 * margin)))
    scale = out / side
    crop = cv2.resize(crop, (out, out), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    inside = cv2.resize(inside, (out, out), interpolation=cv2.INTER_NEAREST).astype(bool)
    to_crop = np.diag([scale, scale, 1.0]) @ affine
    landmarks = apply_affine(face.landmarks, to_crop) if face.landmarks.size else face.landmarks
    corners = apply_affine(np.array([box[:2], box[2:]]), to_crop).reshape(-1)
    return NormalisedFace(crop, to_gray(crop), inside, landmarks, corners, scale)


def head_pose(landmarks: np.ndarray, shape: tuple[int, int]) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from FaceMesh landmarks. Yaw (the left-right turn) and
    pitch (the up-down nod): ``cv2.solvePnP`` of six points against a generic 3-D face, with a
    pinhole camera whose focal length is the image width (on the normalised face: one field
    of view for every face); approximate, as the generic face is nobody's. Roll: the eye
    line's tilt (positive clockwise on screen, image y down)."""
    if not is_mesh(landmarks):
        return math.nan, math.nan, math.nan
    h, w = shape
    image_points = np.asarray(landmarks, np.float64)[list(POSE_POINTS.values())]
    camera = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float64)
    # The model's y points up and z to the camera, the image's y down and z away: flip both.
    model = GENERIC_FACE_3D * np.array([1.0, -1.0, -1.0])
    ok, rvec, _ = cv2.solvePnP(model, image_points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return math.nan, math.nan, math.nan
    pitch, yaw, _ = cv2.RQDecomp3x3(cv2.Rodrigues(rvec)[0])[0]
    pitch, yaw = (float((a + 180.0) % 360.0 - 180.0) for a in (pitch, yaw))
    if abs(pitch) > 90:  # the same pose written the other way round
        pitch = float((pitch + 360.0) % 360.0 - 180.0)
    (x1, y1), (x2, y2) = eye_centres(landmarks, (RIGHT_EYE, LEFT_EYE))
    return yaw, pitch, math.degrees(math.atan2(y2 - y1, x2 - x1))


def _ramp(value: float, low: float, high: float) -> float:
    return float(np.clip((value - low) / (high - low), 0.0, 1.0)) if math.isfinite(value) else math.nan


def size_measures(face: Face, shape: tuple[int, int], eye_indices) -> dict:
    """Face size in pixels, its share of the image's area, the inter-ocular distance and the
    share of landmarks inside the frame."""
    h, w = shape
    x1, y1, x2, y2 = face_extent(face)
    if is_mesh(face.landmarks):
        hull = cv2.convexHull(face.landmarks.astype(np.float32))
        area = float(cv2.contourArea(hull))
    else:
        area = float(max(x2 - x1, 0) * max(y2 - y1, 0))
    eyes = eye_centres(face.landmarks, eye_indices)
    iod = float(np.linalg.norm(eyes[1] - eyes[0])) if eyes is not None else 0.4 * float(x2 - x1)
    pts = np.asarray(face.landmarks, np.float64).reshape(-1, 2)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= w) & (pts[:, 1] >= 0) & (pts[:, 1] <= h)
    share = area / float(w * h)
    return {
        "face_width": float(x2 - x1), "face_height": float(y2 - y1), "face_area_share": share,
        "face_share_band": "<30 %" if share < 0.3 else ("30-50 %" if share <= 0.5 else ">50 %"),
        "inter_ocular_px": iod, "completeness": float(inside.mean()) if len(pts) else 1.0,
    }


def face_quality(norm: NormalisedFace, sizes: dict, shape: tuple[int, int]) -> dict:
    """Face quality 0-100 (7.1.8): 100 x completeness x the mean of five sub-scores in
    [0, 1]: size (inter-ocular distance), sharpness, brightness, contrast and pose."""
    region = face_mask(norm.gray.shape, norm.landmarks, norm.box) & norm.valid
    values = norm.gray[region]
    brightness = float(values.mean()) if values.size else math.nan
    contrast = float(values.std()) if values.size else math.nan
    sharp = sharpness(norm.gray, region)
    yaw, pitch, roll = head_pose(norm.landmarks, norm.gray.shape)
    low, high = BRIGHTNESS_IDEAL
    scores = {
        "q_size": _ramp(sizes["inter_ocular_px"], *IOD_RANGE),
        "q_sharpness": sharp / (sharp + SHARPNESS_HALF) if math.isfinite(sharp) else math.nan,
        "q_brightness": float(np.clip(1.0 - max(low - brightness, brightness - high, 0.0) / low, 0, 1)) if values.size else math.nan,
        "q_contrast": float(min(contrast / CONTRAST_FULL, 1.0)) if values.size else math.nan,
        "q_pose": float(np.clip(1.0 - max(abs(yaw), abs(pitch)) / POSE_LIMIT, 0, 1)) if math.isfinite(yaw) else math.nan,
    }
    parts = [v for v in scores.values() if math.isfinite(v)]
    quality = 100.0 * sizes["completeness"] * float(np.mean(parts)) if parts else math.nan
    return {"face_quality": quality, **scores, "face_sharpness": sharp, "face_brightness": brightness,
            "face_contrast": contrast, "yaw": yaw, "pitch": pitch, "roll": roll}


def local_quality(norm: NormalisedFace) -> dict:
    """Local quality 0-100 per facial part (7.1.9): the mean of the part's sharpness and
    contrast sub-scores (as in the face quality), on the normalised face."""
    out = {}
    for name, mask in part_masks(norm.gray.shape, norm.landmarks).items():
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & norm.valid
        if mask.sum() < 16:
            out[f"local_quality_{name}"] = math.nan
            continue
        sharp = sharpness(norm.gray, mask)
        contrast = float(norm.gray[mask].std())
        out[f"local_quality_{name}"] = 100.0 * 0.5 * (sharp / (sharp + SHARPNESS_HALF) + min(contrast / CONTRAST_FULL, 1.0))
    return out
