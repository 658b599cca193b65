"""BlazeFace + FaceMesh ("mesh") and MTCNN ("mtcnn") analysers on real pixels.

Weights come from the shared folder (``${paths.shared_dir}/weights``: ../shared beside the
project or $UNMASK_SHARED); the tests skip only when that folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import unmask.core.config
from data.faces.analyzers import MeshFaceAnalyzer, MtcnnFaceAnalyzer
from data.faces.blazeface import BlazeFace, load_state_dict
from data.faces.facemesh import LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT, NOSE_TIP, RIGHT_EYE, FaceMesh
from data.faces.types import Face

SHARED = Path(os.environ.get("UNMASK_SHARED", unmask.core.config.PROJECT_ROOT / ".." / "shared"))
WEIGHTS = SHARED / "weights"
pytestmark = pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"shared weights folder {WEIGHTS} is absent")

DETECTOR = WEIGHTS / "blazeface_pytorch_front128.pth"
ANCHORS = WEIGHTS / "blazeface_anchors_front128.npy"
MESH = WEIGHTS / "facemesh_pytorch_468.pth"

# skimage.data.astronaut() (512x512), continuous pixel coordinates (pixel i spans [i, i+1)).
# Hand-checked: crops around the eyes, nose and mouth were saved at 10-16x zoom with a
# 1-px grid and read by eye (eye = centre of the dark iris; nose tip = the tip's
# highlight; mouth corner = the dark commissure where the lips meet).
HAND = {
    "eye_image_left": (204.5, 101.0),
    "eye_image_right": (247.5, 103.0),
    "nose_tip": (223.5, 128.5),
    "mouth_image_left": (203.5, 140.5),
    "mouth_image_right": (246.5, 142.5),
}
# 4 px is under 10% of the 43-px inter-ocular distance. Measured: both analysers within
# 2.2 px of every point on the original, 2.8 px (in 512-px units) on the upscaled copies
# (mesh eye = mean of the lid contour, ~1 px below the iris centre; MTCNN's mouth
# corners ~2 px inside the commissure).
TOL = 4.0


def mesh_points(lm: np.ndarray) -> dict[str, np.ndarray]:
    return {"eye_image_left": lm[list(RIGHT_EYE)].mean(0), "eye_image_right": lm[list(LEFT_EYE)].mean(0),
            "nose_tip": lm[NOSE_TIP], "mouth_image_left": lm[MOUTH_RIGHT], "mouth_image_right": lm[MOUTH_LEFT]}


def mtcnn_points(lm: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(HAND, lm))


POINTS = {"mesh": mesh_points, "mtcnn": mtcnn_points}


@pytest.fixture(scope="module")
def analyzers() -> dict:
    return {"mesh": MeshFaceAnalyzer(DETECTOR, ANCHORS, MESH), "mtcnn": MtcnnFaceAnalyzer()}


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skimage_data.astronaut())


def assert_near(points: dict[str, np.ndarray], expected: dict[str, tuple[float, float]], tol: float) -> None:
    for name, xy in expected.items():
        err = float(np.hypot(*(np.asarray(points[name]) - xy)))
        assert err <= tol, f"{name}: got {np.round(points[name], 1)}, hand-checked {xy}, off by {err:.1f} px > {tol}"


def assert_valid(faces: list[Face], num_landmarks: int) -> None:
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    for f in faces:
        assert f.box.shape == (4,) and f.landmarks.shape == (num_landmarks, 2)
        assert f.landmarks.dtype == np.float32 and np.isfinite(f.landmarks).all()
        assert 0.0 <= f.score <= 1.0 and f.box[2] > f.box[0] and f.box[3] > f.box[1]


def test_networks_load_strictly_with_the_published_shapes():
    for net, path, n_params in ((BlazeFace(), DETECTOR, 101390), (FaceMesh(), MESH, 604685)):
        sd = load_state_dict(path)
        assert net.load_state_dict(sd, strict=True).missing_keys == []
        assert sum(p.numel() for p in net.parameters()) == n_params
    raw_boxes, raw_scores = BlazeFace()(torch.zeros(2, 3, 128, 128))
    assert raw_boxes.shape == (2, 896, 16) and raw_scores.shape == (2, 896, 1)
    landmarks, presence = FaceMesh()(torch.zeros(2, 3, 192, 192))
    assert landmarks.shape == (2, 468, 3) and presence.shape == (2,)


@pytest.mark.parametrize("name", ["mesh", "mtcnn"])
def test_astronaut_one_face_at_hand_checked_points(analyzers, astronaut, name):
    analyzer = analyzers[name]
    faces = analyzer.detect(astronaut)
    assert len(faces) == 1
    assert_valid(faces, analyzer.num_landmarks)
    face = faces[0]
    assert face.score > 0.9
    x1, y1, x2, y2 = face.box
    assert 160 < x1 < 200 and 240 < x2 < 290 and 50 < y1 < 100 and 160 < y2 < 200, face.box
    assert_near(POINTS[name](face.landmarks), HAND, TOL)


@pytest.mark.parametrize("name", ["mesh", "mtcnn"])
def test_two_faces_side_by_side_land_in_their_halves(analyzers, astronaut, name):
    head = astronaut[30:230, 130:330]  # 200x200 around the face
    canvas = np.ascontiguousarray(np.concatenate([head, head[:, ::-1]], axis=1))  # second copy mirrored
    faces = analyzers[name].detect(canvas)
    assert len(faces) == 2
    assert_valid(faces, analyzers[name].num_landmarks)
    left, right = sorted(faces, key=lambda f: f.box[0])
    assert left.landmarks[:, 0].max() < 200 < right.landmarks[:, 0].min()
    shifted = {k: (x - 130, y - 30) for k, (x, y) in HAND.items()}
    assert_near(POINTS[name](left.landmarks), shifted, TOL)
    # Mirroring swaps image-left and image-right points; x' = 400 - x in continuous pixels.
    swap = {"eye_image_left": "eye_image_right", "mouth_image_left": "mouth_image_right"}
    swap.update({v: k for k, v in swap.items()})
    mirrored = {swap.get(k, k): (400 - x, y) for k, (x, y) in shifted.items()}
    assert_near(POINTS[name](right.landmarks), mirrored, TOL)


@pytest.mark.parametrize("name", ["mesh", "mtcnn"])
def test_no_face_in_flat_grey_or_smooth_noise(analyzers, name):
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    smooth = cv2.GaussianBlur(noise, (0, 0), 4)
    assert analyzers[name].detect(np.full((300, 200, 3), 128, np.uint8)) == []
    assert analyzers[name].detect(smooth) == []


@pytest.mark.parametrize("name", ["mesh", "mtcnn"])
def test_grayscale_large_and_tiny_images(analyzers, astronaut, name):
    analyzer = analyzers[name]
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    faces = analyzer.detect(np.stack([grey] * 3, axis=-1))
    assert len(faces) == 1
    assert_near(POINTS[name](faces[0].landmarks), HAND, TOL)
    assert len(analyzer.detect(grey)) == 1  # 2-D input is taken as grey too

    # 3000x2000 (WxH): the astronaut upscaled to 2000x2000 at x offset 500 on grey.
    s, off = 2000 / 512, 500
    large = np.full((2000, 3000, 3), 128, np.uint8)
    large[:, off:off + 2000] = cv2.resize(astronaut, (2000, 2000), interpolation=cv2.INTER_LINEAR)
    faces = analyzer.detect(large)
    assert len(faces) == 1
    assert_valid(faces, analyzer.num_landmarks)
    assert_near(POINTS[name](faces[0].landmarks), {k: (x * s + off, y * s) for k, (x, y) in HAND.items()}, TOL * s)

    # Close-up: the face fills a 900x960 frame, so the mesh ROI is shrunk ~5x (the
    # anti-aliased pre-shrink path of the crop).
    x0, y0, z = 150, 50, 6
    close = cv2.resize(astronaut[y0:210, x0:300], None, fx=z, fy=z, interpolation=cv2.INTER_LINEAR)
    faces = analyzer.detect(close)
    assert len(faces) == 1
    expected = {k: ((x - x0) * z, (y - y0) * z) for k, (x, y) in HAND.items()}
    assert_near(POINTS[name](faces[0].landmarks), expected, TOL * z)

    tiny = cv2.resize(astronaut, (16, 16), interpolation=cv2.INTER_AREA)
    assert_valid(analyzer.detect(tiny), analyzer.num_landmarks)
    assert_valid(analyzer.detect(np.zeros((1, 1, 3), np.uint8)), analyzer.num_landmarks)


def test_key_changes_with_analyzer_threshold_and_weights(analyzers, tmp_path):
    mesh, mtcnn = analyzers["mesh"], analyzers["mtcnn"]
    assert mesh.key.startswith("mesh-") and mtcnn.key.startswith("mtcnn-") and mesh.key != mtcnn.key
    assert MeshFaceAnalyzer(DETECTOR, ANCHORS, MESH).key == mesh.key
    assert MeshFaceAnalyzer(DETECTOR, ANCHORS, MESH, min_score=0.8).key != mesh.key
    assert MtcnnFaceAnalyzer(min_score=0.95).key != mtcnn.key
    # Same shapes, different values: the key follows the weight file's content.
    sd = {k: v + 1e-3 for k, v in load_state_dict(MESH).items()}
    torch.save(sd, tmp_path / "mesh_copy.pth")
    assert MeshFaceAnalyzer(DETECTOR, ANCHORS, tmp_path / "mesh_copy.pth").key != mesh.key


def test_missing_or_unset_weights_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"faces\.analyzer\.mesh_weights.*nope\.pth"):
        MeshFaceAnalyzer(DETECTOR, ANCHORS, tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"faces\.analyzer\.detector_weights is not set"):
        MeshFaceAnalyzer(None, ANCHORS, MESH)
    with pytest.raises(ValueError, match=r"faces\.analyzer\.min_score"):
        MtcnnFaceAnalyzer(min_score=1.5)


def test_facemesh_presence_rejects_a_blazeface_false_positive():
    # At a low BlazeFace threshold this blurred noise yields one false face (score ~0.35);
    # FaceMesh's presence flag for it is < 0.001, so the default min_presence drops it.
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8)
    smooth = cv2.GaussianBlur(noise, (0, 0), 4)
    assert len(MeshFaceAnalyzer(DETECTOR, ANCHORS, MESH, min_score=0.3, min_presence=0.0).detect(smooth)) >= 1
    assert MeshFaceAnalyzer(DETECTOR, ANCHORS, MESH, min_score=0.3).detect(smooth) == []
