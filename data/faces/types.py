"""What a face analyser returns, and the interface every analyser implements.

Coordinates are always in the *original* image's pixels (x right, y down), whatever size
the analyser's network runs at, so crops, caches and landmarks never depend on it.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class Face:
    box: np.ndarray  # (4,) float32 x1, y1, x2, y2 in original pixels
    score: float  # detector confidence in [0, 1]
    landmarks: np.ndarray  # (L, 2) float32 x, y in original pixels (L = analyser.num_landmarks)

    def to_dict(self) -> dict:
        return {"box": np.asarray(self.box, np.float32).round(2).tolist(), "score": round(float(self.score), 5),
                "landmarks": np.asarray(self.landmarks, np.float32).round(2).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Face:
        return cls(np.asarray(d["box"], np.float32), float(d["score"]), np.asarray(d["landmarks"], np.float32).reshape(-1, 2))

    @property
    def size(self) -> float:
        x1, y1, x2, y2 = self.box
        return float(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))


class FaceAnalyzer(ABC):
    """``detect(rgb)``: every face of an RGB uint8 HxWx3 image of any size, most confident
    first. ``key`` names the analyser and every setting that changes its output: the face
    cache is keyed by image content *and* this key."""

    name: str = "analyzer"
    num_landmarks: int = 0
    eye_indices: tuple | None = None  # (indices of one eye, of the other): crops can level them
    # Left/right symmetry of the landmarks: after a horizontal flip, landmark i of the flipped
    # face is landmark mirror_indices[i] of the original (data.augment applies it). None: the
    # points have no anatomy (the template layout); a flip moves them and keeps their indices.
    mirror_indices: tuple[int, ...] | None = None

    @abstractmethod
    def detect(self, rgb: np.ndarray) -> list[Face]: ...

    def settings(self) -> dict:
        """Settings that change the output (thresholds, weight files' hashes); part of ``key``."""
        return {}

    @property
    def key(self) -> str:
        text = self.name + repr(sorted(self.settings().items()))
        return f"{self.name}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


class TemplateFaceAnalyzer(FaceAnalyzer):
    """No network: "finds" one face filling the middle of every image, with ``num_landmarks``
    points at fixed pseudo-random positions inside it (seeded). Gives synthetic data and
    tests landmarks without weights; it says nothing about real faces."""

    name = "template"

    def __init__(self, num_landmarks: int = 468, fill: float = 0.8, seed: int = 0) -> None:
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if not 0.0 < fill <= 1.0:
            raise ValueError(f"fill must be in (0, 1], got {fill}")
        self.num_landmarks, self.fill, self.seed = int(num_landmarks), float(fill), int(seed)
        self._unit = np.random.default_rng(seed).uniform(0.05, 0.95, size=(self.num_landmarks, 2)).astype(np.float32)

    def settings(self) -> dict:
        return {"num_landmarks": self.num_landmarks, "fill": self.fill, "seed": self.seed}

    def detect(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        bw, bh = w * self.fill, h * self.fill
        x1, y1 = (w - bw) / 2, (h - bh) / 2
        landmarks = self._unit * np.array([bw, bh], np.float32) + np.array([x1, y1], np.float32)
        return [Face(np.array([x1, y1, x1 + bw, y1 + bh], np.float32), 1.0, landmarks)]
