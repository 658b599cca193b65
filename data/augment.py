"""Training augmentation of one sample: an optional forgery synthesiser (``data.sbi``) that
turns some reals into forged images with exact masks, then the albumentations pixel
pipeline, which moves landmarks (keypoints) and masks with the pixels.

``configs/augment/*.yaml`` give either a bare albumentations ``Compose`` (pixels only) or a
``SampleAugment``; the data set accepts both.

Landmarks have anatomy: after a horizontal flip the subject's left eye sits where the right
one was. albumentations moves the points but keeps their indices, so a pipeline that mirrors
the image (a flip, a transpose: any odd number of reflections) also gets the landmarks
re-indexed with the face analyser's mirror table (``mirror``, e.g. FaceMesh's
``data.faces.facemesh.MESH_MIRROR``): landmark i of the result is the moved landmark
``mirror[i]``. Whether the pipeline mirrored is read off three probe points carried through
it with the landmarks (the orientation of their triangle), so any geometric transform counts.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# albumentations counts keypoints in pixel indices (a pixel's centre is its integer index);
# the data pipeline uses continuous coordinates (the image spans [0, W]): centres at i + 0.5.
_ALB_OFFSET = 0.5


def _probes(width: int, height: int) -> np.ndarray:
    """Three points spanning a triangle inside the image (counter-clockwise in x right, y down)."""
    return np.array([[0.25 * width, 0.25 * height], [0.75 * width, 0.25 * height], [0.25 * width, 0.75 * height]], np.float32)


def _orientation(points: np.ndarray) -> float:
    """Signed area of the triangle of three points (its sign flips under a reflection)."""
    (ax, ay), (bx, by), (cx, cy) = np.asarray(points, np.float64)
    return float((bx - ax) * (cy - ay) - (by - ay) * (cx - ax))


class SampleAugment:
    def __init__(self, pixels: Callable | None = None, forgery: Callable | None = None) -> None:
        self.pixels = pixels
        self.forgery = forgery
        self._with_keypoints = None
        self._seeded_for: tuple[int, int] | None = None

    def _seed_pixels(self) -> None:
        """albumentations keeps its own random generator, seeded from OS entropy, so
        ``seed_everything`` does not reach it and two runs of one config augment differently.
        Seed it from torch's seed of this process (a DataLoader worker's is base seed +
        worker id, drawn from the seeded main process), once per process."""
        key = (os.getpid(), torch.initial_seed())
        if self._seeded_for == key:
            return
        self._seeded_for = key
        for pipeline in (self.pixels, self._with_keypoints):
            if hasattr(pipeline, "set_random_seed"):
                pipeline.set_random_seed(torch.initial_seed() % 2**32)

    def _keypoint_pipeline(self):
        """The pixel pipeline with keypoint support (built once, same transforms)."""
        if self._with_keypoints is None:
            import albumentations as A

            transforms = list(getattr(self.pixels, "transforms", [self.pixels]))
            self._with_keypoints = A.Compose(
                transforms, keypoint_params=A.KeypointParams(format="xy", remove_invisible=False), p=getattr(self.pixels, "p", 1.0)
            )
            self._seeded_for = None  # seed the new pipeline too
        return self._with_keypoints

    def apply_pixels(
        self, image: np.ndarray, mask: np.ndarray | None = None, keypoints: np.ndarray | None = None,
        mirror: tuple[int, ...] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The pixel pipeline on ``image`` and, with it, ``mask`` and ``keypoints`` (L x 2,
        continuous pixels). ``mirror``: the keypoints' left/right table (a permutation of
        range(L)); when the pipeline mirrored the image, keypoint i of the result is the moved
        keypoint ``mirror[i]``. None: the keypoints keep their indices."""
        if self.pixels is None:
            return image, mask, keypoints
        if keypoints is not None:
            self._keypoint_pipeline()
        self._seed_pixels()
        args: dict[str, Any] = {"image": image}
        if mask is not None:
            args["mask"] = mask
        if keypoints is None:
            out = self.pixels(**args)
            return out["image"], out.get("mask") if mask is not None else None, None
        points = np.asarray(keypoints, np.float32).reshape(-1, 2)
        if mirror is not None and len(mirror) != len(points):
            raise ValueError(f"the landmark mirror table has {len(mirror)} entries, the sample has {len(points)} landmarks")
        probes = _probes(image.shape[1], image.shape[0])
        args["keypoints"] = np.concatenate([points, probes]) - _ALB_OFFSET
        out = self._keypoint_pipeline()(**args)
        moved = np.asarray(out["keypoints"], np.float32).reshape(-1, 2) + _ALB_OFFSET
        moved, moved_probes = moved[: len(points)], moved[len(points):]
        if mirror is not None and _orientation(moved_probes) * _orientation(probes) < 0:
            moved = moved[np.asarray(mirror, np.int64)]  # the image was mirrored: so is the face's anatomy
        return out["image"], out.get("mask") if mask is not None else None, moved


def as_sample_augment(augment: Any) -> SampleAugment | None:
    """A ``SampleAugment`` from whatever ``configs/augment`` gave (None, a Compose, or one)."""
    if augment is None or isinstance(augment, SampleAugment):
        return augment
    return SampleAugment(pixels=augment)
