"""The configured face stage (``configs/faces/``): which analyser, which faces count, how they
are cropped, and how per-face scores become one image score.

Data sets ask it for the faces of a file (cached by content, see ``cache``) and for crops;
``prepare`` runs detection once over a whole data set with a progress bar before any loader
starts, so DataLoader workers only read the cache.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from data.faces.cache import FaceCache, content_hash
from data.faces.crop import crop_face
from data.faces.types import Face, FaceAnalyzer, TemplateFaceAnalyzer

log = logging.getLogger(__name__)

# How per-face scores, and then faces and the whole image, combine into one image score.
REDUCTIONS = {"max": np.max, "mean": np.mean}
IMAGE_COMBINE = ("max", "mean", "faces")


class FacePipeline:
    def __init__(
        self,
        analyzer: FaceAnalyzer,
        crop: bool = True,
        margin: float = 0.3,
        align: bool = False,
        max_faces: int = 4,
        min_score: float = 0.0,
        min_face_px: float = 12.0,
        whole_image: bool = True,
        train_whole_image_p: float = 0.2,
        face_combine: str = "max",
        image_combine: str = "max",
        cache_dir: str | None = None,
        save_every: int = 500,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if face_combine not in REDUCTIONS:
            raise ValueError(f"faces.face_combine must be one of {sorted(REDUCTIONS)}, got {face_combine!r}")
        if image_combine not in IMAGE_COMBINE:
            raise ValueError(f"faces.image_combine must be one of {IMAGE_COMBINE}, got {image_combine!r}")
        if not 0.0 <= float(margin) <= 2.0:
            raise ValueError(f"faces.margin must be in [0, 2], got {margin!r}")
        if int(max_faces) < 1:
            raise ValueError(f"faces.max_faces must be >= 1, got {max_faces!r}")
        if not 0.0 <= float(train_whole_image_p) <= 1.0:
            raise ValueError(f"faces.train_whole_image_p must be in [0, 1], got {train_whole_image_p!r}")
        self.analyzer = analyzer
        self.crop, self.margin, self.align = bool(crop), float(margin), bool(align)
        self.max_faces, self.min_score, self.min_face_px = int(max_faces), float(min_score), float(min_face_px)
        self.whole_image, self.train_whole_image_p = bool(whole_image), float(train_whole_image_p)
        self.face_combine, self.image_combine = face_combine, image_combine
        self.cache = FaceCache(analyzer.key, cache_dir)
        self.save_every, self.max_pixels = int(save_every), int(max_pixels)
        # Landmarks for images without a face: the template layout over the whole image, with
        # as many points as the analyser gives, so batches always stack.
        self.template = TemplateFaceAnalyzer(num_landmarks=max(analyzer.num_landmarks, 1))
        self._digests: dict[str, str] = {}

    @property
    def num_landmarks(self) -> int:
        return self.analyzer.num_landmarks

    @property
    def eye_indices(self):
        return getattr(self.analyzer, "eye_indices", None)

    @property
    def mirror_indices(self) -> tuple[int, ...] | None:
        """The analyser's left/right landmark pairs (a flip swaps them), or None."""
        return getattr(self.analyzer, "mirror_indices", None)

    def _digest(self, path: str) -> str:
        digest = self._digests.get(path)
        if digest is None:
            try:
                digest = self._digests[path] = content_hash(path)
            except OSError as e:  # missing or unreadable: the data set reports it like a bad image
                raise ImageDecodeError(f"{path}: {e.strerror or e}") from None
        return digest

    def select(self, faces: list[Face]) -> list[Face]:
        """The faces that count: confident and large enough, most confident first, at most ``max_faces``."""
        kept = [
            f for f in faces
            if f.score >= self.min_score and min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= self.min_face_px
        ]
        return sorted(kept, key=lambda f: -f.score)[: self.max_faces]

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Selected faces of pixels that are not a file (a video frame, a perturbed image): not cached."""
        return self.select(self.analyzer.detect(rgb))

    def faces(self, path: str, rgb: np.ndarray | None = None) -> list[Face]:
        """Selected faces of the file at ``path`` (from the cache, else detected now)."""
        digest = self._digest(path)
        found = self.cache.get(digest)
        if found is None:
            if rgb is None:
                rgb = decode_image(path, self.max_pixels)
            found = self.analyzer.detect(rgb)
            self.cache.put(digest, found)
        return self.select(found)

    def prepare(self, paths: Iterable[str], progress: bool = True) -> dict:
        """Detect every file not yet in the cache (undecodable files are counted and skipped);
        returns counts of images, images with a face, without, undecodable, and cache hits."""
        paths = list(dict.fromkeys(paths))
        stats = {"images": len(paths), "with_face": 0, "no_face": 0, "undecodable": 0, "cached": 0}
        for path in tqdm(paths, desc=f"faces ({self.analyzer.name})", unit="img", disable=not progress, leave=False):
            try:
                digest = self._digest(path)
                hit = digest in self.cache.entries
                faces = self.faces(path)
            except ImageDecodeError as e:
                stats["undecodable"] += 1
                log.debug("no faces for undecodable %s: %s", path, e)
                continue
            stats["cached"] += hit
            stats["with_face" if faces else "no_face"] += 1
            if not hit and self.cache.dirty >= self.save_every:
                self.cache.save()
        self.cache.save()
        log.info("faces (%s): %s", self.analyzer.name, stats)
        return stats

    def crop_face(self, rgb: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray]:
        return crop_face(rgb, face, self.margin, self.align, self.eye_indices)

    def frame_crops(self, rgb: np.ndarray) -> list[np.ndarray]:
        """The video hook (``data.video``): a frame's face crops, plus the whole frame when
        ``whole_image`` or when no face is found (frames are not cached: they have no file)."""
        faces = self.detect(rgb)
        crops = [self.crop_face(rgb, f)[0] for f in faces] if self.crop else []
        return crops + [rgb] if self.whole_image or not crops else crops

    def combine(self, face_probs: np.ndarray, whole_prob: float | None) -> float:
        """One image score from its faces' scores and the whole image's (either may be missing)."""
        face_probs = np.asarray([p for p in face_probs if np.isfinite(p)], np.float64)
        faces = float(REDUCTIONS[self.face_combine](face_probs)) if face_probs.size else None
        whole = whole_prob if whole_prob is not None and np.isfinite(whole_prob) else None
        if faces is None or whole is None:
            return faces if whole is None else whole  # no face: the whole image decides (and vice versa)
        if self.image_combine == "faces":
            return faces
        return max(faces, whole) if self.image_combine == "max" else (faces + whole) / 2.0

