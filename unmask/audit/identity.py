"""Identity measures (spec 7.1.14, 7.1.17) with a face-recognition model the user supplies:
facenet-pytorch's ``InceptionResnetV1`` loaded from a local weights file
(``audit.identity_weights``, e.g. the published ``20180402-114759-vggface2.pt``); nothing is
downloaded. Without a file these measures are left out and the report says so.

- ``identity_similarity`` (7.1.14): cosine similarity of the face's embedding with the face
  of the file's reference image (the manifest's ``reference`` column).
- ``identity_consistency`` (7.1.17): for a video, the mean cosine similarity of each
  frame's face embedding with the video's mean embedding.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch

from data.faces.types import Face

CHIP = 160  # InceptionResnetV1's input side


def weights_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def face_chip(rgb: np.ndarray, face: Face, margin: float = 0.1) -> np.ndarray:
    """The face's box grown by ``margin`` on each side, resized to 160 x 160 (as MTCNN crops
    for facenet)."""
    x1, y1, x2, y2 = np.asarray(face.box, np.float64)
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    h, w = rgb.shape[:2]
    x1, y1 = int(max(0, x1 - dx)), int(max(0, y1 - dy))
    x2, y2 = int(min(w, np.ceil(x2 + dx))), int(min(h, np.ceil(y2 + dy)))
    crop = rgb[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
    return cv2.resize(crop, (CHIP, CHIP), interpolation=cv2.INTER_AREA if crop.shape[0] > CHIP else cv2.INTER_CUBIC)


class IdentityModel:
    """Unit-length 512-d face embeddings from an ``InceptionResnetV1`` weights file."""

    def __init__(self, weights: str | Path, device: str = "cpu") -> None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"audit.identity_weights points to a missing file: {path} (an InceptionResnetV1 state dict, "
                                    "e.g. facenet-pytorch's 20180402-114759-vggface2.pt; null leaves the identity measures out)")
        from facenet_pytorch import InceptionResnetV1

        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}  # the classifier head is not used
        self.model = InceptionResnetV1(classify=False)
        self.model.load_state_dict(state, strict=True)
        self.model.eval().to(device)
        self.device = device
        self.digest = weights_digest(path)

    @torch.inference_mode()
    def embed(self, chips: list[np.ndarray]) -> np.ndarray:
        if not chips:
            return np.zeros((0, 512), np.float32)
        x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()
        x = (x - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
        return self.model(x.to(self.device)).cpu().numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def consistency(embeddings: np.ndarray) -> float:
    """Mean cosine similarity of each embedding with their mean."""
    if len(embeddings) < 2:
        return float("nan")
    mean = embeddings.mean(axis=0)
    return float(np.mean([cosine(e, mean) for e in embeddings]))
