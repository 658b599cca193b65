"""The one sample dict every detector consumes.

``{"image": float tensor 3xHxW in [0, 1] (RGB), "label": 0 real / 1 fake / -1 unknown,
   "meta": {"path", "source", "generator", "group", "ok", "error"}}``
plus, when the data set has a face stage (``faces``):
``"landmarks"``: float (L, 2) x, y in pixels of ``image`` (continuous coordinates: the image
spans [0, W] x [0, H]), and ``meta["face_found"]``, ``meta["face_index"]`` (-1: whole image);
plus, when it has masks (a mask file per image, or a forgery synthesiser in ``augment``):
``"mask"``: float (1, H, W) in [0, 1] (1 = forged pixel) and ``meta["mask_ok"]`` (False: no
ground truth for this sample, pixel losses and metrics skip it).

Detectors normalise inside their own ``forward`` (each has its own mean/std), so data,
perturbations and adversarial attacks all work in one pixel space. ``meta.ok`` is False
when the file could not be decoded: the sample then carries a blank image, the training
loss and metrics mask it out, and inference writes the configured fallback label.

Geometry: every step that moves pixels (face crop, resize, rescale, crop) also yields its
3x3 map, so landmarks and masks stay aligned with the pixels; albumentations moves them
through the training augmentation.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.augment import as_sample_augment
from data.canonical import Canonicalizer
from data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from data.faces.crop import apply_affine, warp_mask
from data.faces.pipeline import FacePipeline
from data.records import Record

log = logging.getLogger(__name__)

WHOLE_IMAGE = -1  # face_index of the whole-image sample
CHOOSE = None  # face_index resolved at load time: see ImageDataset._resolve_face


@dataclass
class _Resized:
    """The deterministic, cacheable part of a sample: resized pixels and their geometry."""

    pixels: np.ndarray
    landmarks: np.ndarray | None  # in ``pixels`` coordinates; None: no face landmarks
    mask: np.ndarray | None  # float HxW in ``pixels`` coordinates; None: no ground truth
    face_found: bool
    face_index: int


def load_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """A forgery mask file as float {0, 1} at ``size`` = (w, h) of its decoded image."""
    arr = decode_image(path, draft_size=None)
    gray = arr.max(axis=2)
    if gray.shape[::-1] != size:
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_NEAREST)
    return (gray > 127).astype(np.float32)


class ImageDataset(Dataset):
    """``faces``: a ``FacePipeline`` (``configs/faces``); ``expand_faces``: one sample per
    face plus the whole image (inference and evaluation combine them back per file), else
    one sample per file (training: the top face, or the whole image with
    ``faces.train_whole_image_p``; evaluation: the top face, the whole image when none).
    ``masks``: carry a ``mask`` in every sample (None: when any record has a mask file or
    ``augment`` synthesises forgeries)."""

    def __init__(
        self,
        records: list[Record],
        canonical: Canonicalizer,
        augment: Any = None,
        train: bool = False,
        cache_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_decode: bool = True,
        faces: FacePipeline | None = None,
        expand_faces: bool = False,
        masks: bool | None = None,
        seed: int = 0,
    ) -> None:
        self.records = records
        self.canonical = canonical
        self.augment = as_sample_augment(augment)
        self.train = train
        self.cache_images = cache_images
        self.max_pixels = max_pixels
        self.draft_decode = draft_decode
        self.faces = faces
        self.seed = int(seed)
        forgery = self.augment is not None and self.augment.forgery is not None
        self.has_masks = bool(masks) if masks is not None else (forgery or any(r.mask for r in records))
        self.items: list[tuple[int, int | None]] = self._items(expand_faces)
        # Per-process cache of decoded + resized pixels (the expensive, deterministic part);
        # each DataLoader worker fills its own, so keep workers persistent when caching.
        self._cache: dict[tuple[int, int | None], _Resized | str] = {}
        self._reals = [i for i, r in enumerate(records) if r.label == 0]

    def _items(self, expand_faces: bool) -> list[tuple[int, int | None]]:
        if self.faces is None or not expand_faces:
            return [(i, CHOOSE) for i in range(len(self.records))]
        items = []
        for i, r in enumerate(self.records):
            try:
                n = len(self.faces.faces(r.path))
            except ImageDecodeError:
                n = 0  # the whole-image item reports the decode error
            if self.faces.whole_image or n == 0:
                items.append((i, WHOLE_IMAGE))
            items += [(i, k) for k in range(n)]
        return items

    def __len__(self) -> int:
        return len(self.items)

    def _resolve_face(self, face_index: int | None, n_faces: int) -> int:
        if face_index is not CHOOSE:
            return face_index
        if n_faces == 0:
            return WHOLE_IMAGE
        if self.train and random.random() < self.faces.train_whole_image_p:
            return WHOLE_IMAGE
        return 0

    def _decode_resize(self, index: int, face_index: int | None) -> _Resized:
        record = self.records[index]
        if self.faces is None:
            draft = self.canonical.size if self.draft_decode and self.canonical.resize != "none" else None
            rgb = decode_image(record.path, self.max_pixels, draft_size=draft)
            resized, affine = self.canonical.resize_stage_affine(rgb)
            mask = load_mask(record.mask, rgb.shape[1::-1]) if record.mask and self.has_masks else None
            return _Resized(resized, None, None if mask is None else warp_mask(mask, affine, resized.shape[1::-1]), False, WHOLE_IMAGE)
        # Faces need the full resolution: a face is often a small part of the file.
        rgb = decode_image(record.path, self.max_pixels)
        faces = self.faces.faces(record.path, rgb)
        chosen = self._resolve_face(face_index, len(faces))
        if chosen >= len(faces):  # an index from another run's face list
            raise ImageDecodeError(f"{record.path}: face {chosen} not found (the file has {len(faces)})")
        face = faces[chosen] if chosen >= 0 else None
        if face is not None and self.faces.crop:
            crop, to_crop = self.faces.crop_face(rgb, face)
        else:
            crop, to_crop = rgb, np.eye(3)
        resized, to_resized = self.canonical.resize_stage_affine(crop)
        affine = to_resized @ to_crop
        ref = face or (faces[0] if faces else None)  # whole image: the top face's landmarks
        landmarks = apply_affine(ref.landmarks, affine) if ref is not None and ref.landmarks.size else None
        mask = None
        if record.mask and self.has_masks:
            mask = warp_mask(load_mask(record.mask, rgb.shape[1::-1]), affine, resized.shape[1::-1])
        return _Resized(resized, landmarks, mask, ref is not None, chosen)

    def _resized(self, index: int, face_index: int | None) -> _Resized:
        if self.faces is not None and face_index is CHOOSE:
            # Choose first (the face list is cached), so the cache holds each choice once.
            face_index = self._resolve_face(CHOOSE, len(self.faces.faces(self.records[index].path)))
        key = (index, face_index)
        hit = self._cache.get(key)
        if hit is not None:
            if isinstance(hit, str):
                raise ImageDecodeError(hit)
            return hit
        try:
            out = self._decode_resize(index, face_index)
        except ImageDecodeError as e:
            log.warning("skipping undecodable image: %s", e)
            if self.cache_images:
                self._cache[key] = str(e)
            raise
        if self.cache_images:
            self._cache[key] = out
        return out

    def whole_pixels(self, index: int) -> np.ndarray:
        """Resized pixels of the whole image of record ``index`` (raises ``ImageDecodeError``)."""
        return self._resized(index, WHOLE_IMAGE if self.faces is not None else CHOOSE).pixels

    def resized_or_blank(self, index: int) -> tuple[np.ndarray, str]:
        """Resized pixels of record ``index`` and "", or a blank canonical-size image and the decode error."""
        try:
            return self.whole_pixels(index), ""
        except ImageDecodeError as e:
            size = self.canonical.size
            return np.zeros((size, size, 3), np.uint8), str(e)

    def load_pixels(self, index: int) -> tuple[np.ndarray, str]:
        """Canonical uint8 pixels of record ``index`` (whole image) and the decode error ("" if none)."""
        arr, error = self.resized_or_blank(index)
        arr = self.canonical.finish(arr, self.train)
        if self.augment is not None and not error:
            arr = self.augment.apply_pixels(arr)[0]
        return self.canonical.encode(arr, self.train), error

    def plain_sample(self, index: int, arr: np.ndarray, error: str) -> dict:
        """The sample dict of record ``index`` from finished pixels (no faces, no masks)."""
        r = self.records[index]
        image = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        meta = {"path": r.path, "source": r.source, "generator": r.generator, "group": r.group, "ok": not error, "error": error}
        return {"image": image, "label": r.label, "meta": meta}

    def _rng(self, item: int) -> np.random.Generator:
        # Training draws afresh (python's random is seeded per worker by Lightning); evaluation
        # forges the same way every run, so a blended test split is a fixed test split.
        seed = random.getrandbits(63) if self.train else (self.seed, item)
        return np.random.default_rng(seed)

    def _donor(self, rng: np.random.Generator) -> np.ndarray:
        """A random real image at canonical size (for splicing forgeries)."""
        pool = self._reals or list(range(len(self.records)))
        arr, _ = self.resized_or_blank(int(rng.choice(pool)))
        return self.canonical.finish(arr, train=False)

    def __getitem__(self, item: int) -> dict:
        index, face_index = self.items[item]
        r = self.records[index]
        label, generator, error = r.label, r.generator, ""
        size = self.canonical.size
        try:
            resized = self._resized(index, face_index)
        except ImageDecodeError as e:
            error = str(e)
            resized = _Resized(np.zeros((size, size, 3), np.uint8), None, None, False, face_index if face_index is not None else WHOLE_IMAGE)
        arr, to_final = self.canonical.finish_affine(resized.pixels, self.train)
        landmarks = None
        if self.faces is not None:
            landmarks = (
                apply_affine(resized.landmarks, to_final)
                if resized.landmarks is not None
                else self.faces.template.detect(arr)[0].landmarks  # no face: the template layout
            )
        mask = mask_ok = None
        if self.has_masks:
            if resized.mask is not None:
                mask, mask_ok = warp_mask(resized.mask, to_final, (size, size)), True
            else:  # reals are clean; a fake without a mask file has no ground truth
                mask, mask_ok = np.zeros((size, size), np.float32), label == 0
        if self.augment is not None and not error:
            if self.augment.forgery is not None:
                forged = self.augment.forgery(
                    arr, label, landmarks if resized.face_found else None, self._rng(item), donor=self._donor
                )
                arr, new_label, new_mask, new_generator = forged
                if new_mask is not None and self.has_masks:
                    mask, mask_ok = new_mask.astype(np.float32), True
                if new_label != label:
                    label, generator = new_label, new_generator or generator
            arr, mask, landmarks = self.augment.apply_pixels(arr, mask, landmarks)
        arr = self.canonical.encode(arr, self.train)
        image = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        meta = {"path": r.path, "source": r.source, "generator": generator, "group": r.group, "ok": not error, "error": error}
        sample = {"image": image, "label": label, "meta": meta}
        if self.faces is not None:
            sample["landmarks"] = torch.from_numpy(np.asarray(landmarks, np.float32).reshape(-1, 2).copy())
            meta["face_found"] = bool(resized.face_found)
            meta["face_index"] = int(resized.face_index)
        if self.has_masks:
            sample["mask"] = torch.from_numpy(np.asarray(mask, np.float32).copy())[None]
            meta["mask_ok"] = bool(mask_ok) and not error
        return sample
