"""Face analysers backed by real networks: BlazeFace + FaceMesh ("mesh", 468 points) and
facenet-pytorch's MTCNN ("mtcnn", 5 points). Both take uint8 RGB of any size and return
``Face``s in the original image's pixels, most confident first.

Coordinates are continuous pixels: pixel (i, j) covers [i, i+1) x [j, j+1), so its centre
is (i + 0.5, j + 0.5). Resizing by r maps x to x * r exactly in this convention.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch

from data.faces.blazeface import BlazeFaceDetector, load_state_dict
from data.faces.facemesh import INPUT_SIZE as MESH_SIZE
from data.faces.facemesh import LEFT_EYE, MESH_MIRROR, RIGHT_EYE, FaceMesh
from data.faces.types import Face, FaceAnalyzer


def require_file(path: str | Path | None, key: str) -> Path:
    """The weight file at ``path``, or a FileNotFoundError that names the config key: a
    face network is never used with random weights."""
    if path is None or not Path(path).is_file():
        what = "is not set" if path is None else f"points to a missing file: {path}"
        raise FileNotFoundError(f"{key} {what}; set it to the weight file (see /work/shared/README.md, "
                                f"'weights/'; configs use ${{paths.shared_dir}}/weights/...)")
    return Path(path)


def file_digest(path: Path) -> str:
    """Short content hash of a weight file: part of the analyser key, so cached faces are
    recomputed when the weights change."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def check_positive(value: float, key: str, upper: float | None = None) -> float:
    if not value > 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{key} must be {bound}, got {value}")
    return value


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB from HxW / HxWx1 (grey) / HxWx3 / HxWx4 (alpha dropped) uint8 input."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"face analysers take uint8 RGB images, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"face analysers take HxWx3 RGB images, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def working_copy(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale (anti-aliased) so the long side is at most ``max_side``; returns the image
    and the factor r (working = original * r). Detection cost stays bounded on huge photos."""
    h, w = rgb.shape[:2]
    r = min(1.0, max_side / max(h, w))
    if r == 1.0:
        return rgb, 1.0
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    return cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA), nw / w


def _h(m: np.ndarray) -> np.ndarray:
    """2x3 affine -> 3x3 homogeneous."""
    return np.vstack([m, [0.0, 0.0, 1.0]])


def roi_affine(box: np.ndarray, right_eye: np.ndarray, left_eye: np.ndarray, scale: float, size: int) -> np.ndarray:
    """MediaPipe's face-landmark ROI as a 2x3 affine image -> crop (continuous coordinates).

    A square of side ``scale`` * the box's long side, centred on the box, rotated so the
    line from the subject's right eye (image left) to the left eye becomes horizontal.
    """
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = scale * max(box[2] - box[0], box[3] - box[1])
    dx, dy = left_eye - right_eye
    theta = np.arctan2(dy, dx)  # image y points down: positive = clockwise tilt
    k = size / max(side, 1e-6)
    c, s = np.cos(theta) * k, np.sin(theta) * k
    # crop = k * R(-theta) @ (p - centre) + size / 2
    return np.array([[c, s, size / 2 - c * cx - s * cy], [-s, c, size / 2 + s * cx - c * cy]], np.float64)


def warp_crop(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """Crop ``size`` x ``size`` through the affine ``m`` (image -> crop, continuous coords).

    A plain bilinear warp aliases when it shrinks a lot, so the ROI's bounding region is
    first shrunk with INTER_AREA to about the crop's scale; black outside the image.
    """
    zoom = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # crop pixels per image pixel
    if zoom < 0.5:
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inv.T
        h, w = image.shape[:2]
        x0, y0 = np.clip(np.floor(corners.min(0)).astype(int), 0, [w, h])
        x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int), 0, [w, h])
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            region = image[y0:y1, x0:x1]
            nw, nh = max(1, round((x1 - x0) * zoom)), max(1, round((y1 - y0) * zoom))
            image = cv2.resize(region, (nw, nh), interpolation=cv2.INTER_AREA)
            sx, sy = nw / (x1 - x0), nh / (y1 - y0)
            region_to_image = np.array([[1 / sx, 0, x0], [0, 1 / sy, y0]], np.float64)
            m = (_h(m) @ _h(region_to_image))[:2]
    # cv2 samples at integer pixel centres: shift continuous -> index coordinates.
    shift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]], np.float64)
    unshift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], np.float64)
    m_index = (shift @ _h(m) @ unshift)[:2]
    return cv2.warpAffine(image, m_index, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


class MeshFaceAnalyzer(FaceAnalyzer):
    """BlazeFace finds faces; FaceMesh puts 468 landmarks on each.

    Per face: MediaPipe's ROI (``roi_scale`` x the box's long side, eyes levelled using
    BlazeFace's eye keypoints) is warped to 192x192, all crops of an image go through
    FaceMesh in one batch, and the points come back through the inverse affine. The box is
    BlazeFace's box; ``refine_box=True`` replaces it by the landmarks' extent (tighter on
    the chin and forehead, follows the mesh when BlazeFace's box is loose). Faces whose
    FaceMesh presence score is below ``min_presence`` are dropped: the mesh network's own
    face flag. Measured: ~1.0 on clear faces, 0.2-0.45 on a ~15-px face and a half-cut face
    (real faces that MediaPipe's 0.5 tracking threshold would drop), < 0.001 on a
    blurred-noise false positive of BlazeFace; hence 0.1. 0 keeps all.
    """

    name = "mesh"
    num_landmarks = 468
    eye_indices = (RIGHT_EYE, LEFT_EYE)  # contours averaged to eye centres (crop alignment)
    mirror_indices = MESH_MIRROR  # left/right pairs of the mesh (data/faces/facemesh.py)

    def __init__(self, detector_weights: str | Path | None = None, anchors: str | Path | None = None,
                 mesh_weights: str | Path | None = None, min_score: float = 0.75, iou: float = 0.3,
                 max_faces: int = 8, device: str = "cpu", max_side: int = 1024, roi_scale: float = 1.5,
                 refine_box: bool = False, min_presence: float = 0.1) -> None:
        paths = {
            "detector_weights": require_file(detector_weights, "faces.analyzer.detector_weights"),
            "anchors": require_file(anchors, "faces.analyzer.anchors"),
            "mesh_weights": require_file(mesh_weights, "faces.analyzer.mesh_weights"),
        }
        self.min_score = check_positive(float(min_score), "faces.analyzer.min_score", 1.0)
        self.iou = check_positive(float(iou), "faces.analyzer.iou", 1.0)
        self.max_faces = int(check_positive(int(max_faces), "faces.analyzer.max_faces"))
        self.max_side = int(check_positive(int(max_side), "faces.analyzer.max_side"))
        self.roi_scale = check_positive(float(roi_scale), "faces.analyzer.roi_scale")
        if not 0.0 <= min_presence < 1.0:
            raise ValueError(f"faces.analyzer.min_presence must be in [0, 1), got {min_presence}")
        self.refine_box, self.min_presence, self.device = bool(refine_box), float(min_presence), device
        self.digests = {k: file_digest(p) for k, p in paths.items()}
        self.detector = BlazeFaceDetector(paths["detector_weights"], paths["anchors"], self.min_score, self.iou, device)
        self.mesh = FaceMesh()
        self.mesh.load_state_dict(load_state_dict(paths["mesh_weights"]), strict=True)
        self.mesh.eval().to(device)

    def settings(self) -> dict:
        return {"min_score": self.min_score, "iou": self.iou, "max_faces": self.max_faces,
                "max_side": self.max_side, "roi_scale": self.roi_scale, "refine_box": self.refine_box,
                "min_presence": self.min_presence, **{f"{k}_sha256": v for k, v in self.digests.items()}}

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> list[Face]:
        original = as_rgb_uint8(rgb)
        image, r = working_copy(original, self.max_side)
        boxes, keypoints, scores = self.detector.detect(image)
        boxes, keypoints, scores = boxes[:self.max_faces], keypoints[:self.max_faces], scores[:self.max_faces]
        if not len(boxes):
            return []
        affines = [roi_affine(b, kp[0], kp[1], self.roi_scale, MESH_SIZE) for b, kp in zip(boxes, keypoints)]
        crops = np.stack([warp_crop(image, m, MESH_SIZE) for m in affines])
        x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        points, presence = self.mesh(x)
        points, presence = points[..., :2].cpu().double().numpy(), presence.cpu().numpy()
        faces = []
        for box, score, m, pts, pres in zip(boxes, scores, affines, points, presence):
            if pres < self.min_presence:
                continue
            inv = cv2.invertAffineTransform(m)
            landmarks = (pts @ inv[:, :2].T + inv[:, 2]) / r
            box = np.concatenate([landmarks.min(0), landmarks.max(0)]) if self.refine_box else box / r
            faces.append(Face(box.astype(np.float32), float(score), landmarks.astype(np.float32)))
        return faces


class MtcnnFaceAnalyzer(FaceAnalyzer):
    """facenet-pytorch's MTCNN (weights ship inside the package): boxes, probabilities and
    5 points (image-left eye, image-right eye, nose, image-left and image-right mouth corner)."""

    name = "mtcnn"
    num_landmarks = 5
    eye_indices = ((0,), (1,))
    mirror_indices = (1, 0, 2, 4, 3)  # the eyes swap, the nose stays, the mouth corners swap

    def __init__(self, min_score: float = 0.9, min_face_size: int = 20, max_faces: int = 8, device: str = "cpu",
                 max_side: int = 1024) -> None:
        from facenet_pytorch import MTCNN

        self.min_score = check_positive(float(min_score), "faces.analyzer.min_score", 1.0)
        self.min_face_size = int(check_positive(int(min_face_size), "faces.analyzer.min_face_size"))
        self.max_faces = int(check_positive(int(max_faces), "faces.analyzer.max_faces"))
        self.max_side = int(check_positive(int(max_side), "faces.analyzer.max_side"))
        self.mtcnn = MTCNN(keep_all=True, min_face_size=self.min_face_size, select_largest=False,
                           post_process=False, device=device)
        self.mtcnn.eval()

    def settings(self) -> dict:
        from importlib.metadata import version

        return {"min_score": self.min_score, "min_face_size": self.min_face_size, "max_faces": self.max_faces,
                "max_side": self.max_side, "thresholds": tuple(self.mtcnn.thresholds),
                "factor": self.mtcnn.factor, "facenet_pytorch": version("facenet-pytorch")}

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> list[Face]:
        original = as_rgb_uint8(rgb)
        image, r = working_copy(original, self.max_side)
        if min(image.shape[:2]) < self.min_face_size:
            return []  # MTCNN's image pyramid would be empty (and facenet-pytorch crashes on it)
        boxes, probs, points = self.mtcnn.detect(image, landmarks=True)
        if boxes is None or not len(boxes):
            return []
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4) / r
        probs = np.asarray(probs, np.float64).reshape(-1)
        points = np.asarray(points, np.float64).reshape(-1, 5, 2) / r
        order = [i for i in np.argsort(-probs, kind="stable") if probs[i] >= self.min_score][:self.max_faces]
        return [Face(boxes[i].astype(np.float32), float(probs[i]), points[i].astype(np.float32)) for i in order]
