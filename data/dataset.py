"""Data sets of image files: ``ImageDataset`` (one sample per file, for training and
validation) and ``ViewsDataset`` (every view of a file that the scorer scores).

The samples follow ``data.sample`` (the sample dict). Detectors normalise inside their own
``forward``, so data, perturbations and adversarial attacks all work in one pixel space.

Geometry: every step that moves pixels (face crop, resize, rescale, crop) also yields its
3x3 map, so landmarks and masks stay aligned with the pixels; albumentations moves them
through the training augmentation.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from data.augment import as_sample_augment
from data.canonical import Canonicalizer
from data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from data.faces.crop import apply_affine, warp_mask
from data.faces.pipeline import FacePipeline
from data.records import Record
from data.sample import make_sample

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
    """One sample per file. With ``faces`` (a ``FacePipeline``, ``configs/faces``) the sample
    is the top face (training: the whole image with probability
    ``faces.train_whole_image_p``), the whole image when no face is found. ``masks``: carry
    a ``mask`` in every sample (None: when any record has a mask file or ``augment``
    synthesises forgeries)."""

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
        # Per-process cache of decoded + resized pixels (the expensive, deterministic part);
        # each DataLoader worker fills its own, so keep workers persistent when caching.
        self._cache: dict[tuple[int, int | None], _Resized | str] = {}
        self._reals = [i for i, r in enumerate(records) if r.label == 0]

    def __len__(self) -> int:
        return len(self.records)

    # ---- decoding and geometry ------------------------------------------------------
    def _resolve_face(self, face_index: int | None, n_faces: int) -> int:
        if face_index is not CHOOSE:
            return face_index
        if n_faces == 0:
            return WHOLE_IMAGE
        if self.train and random.random() < self.faces.train_whole_image_p:
            return WHOLE_IMAGE
        return 0

    def _decode(self, index: int, draft: bool) -> np.ndarray:
        """Decoded RGB of record ``index``; ``draft``: JPEG DCT-domain down-scaling to about the
        canonical size (only without faces: a face is often a small part of the file)."""
        size = self.canonical.resize_target if draft and self.canonical.resize != "none" else None
        return decode_image(self.records[index].path, self.max_pixels, draft_size=size)

    def _cut(self, index: int, rgb: np.ndarray, faces: list, chosen: int) -> _Resized:
        """The view ``chosen`` (a face index, or ``WHOLE_IMAGE``) of the decoded ``rgb``:
        cropped, resized, with landmarks and mask mapped along."""
        record = self.records[index]
        face = faces[chosen] if chosen >= 0 else None
        try:
            if face is not None and self.faces.crop:
                crop, to_crop = self.faces.crop_face(rgb, face)
            else:
                crop, to_crop = rgb, np.eye(3)
            resized, to_resized = self.canonical.resize_stage_affine(crop)
        except (cv2.error, MemoryError, ImageDecodeError) as e:
            # One file's failure (a shape too extreme to resize, an allocation that fails),
            # flagged like an undecodable file: it must not end a scoring or training run.
            raise ImageDecodeError(f"{record.path}: cannot resize {rgb.shape[1]}x{rgb.shape[0]}: {e}") from e
        affine = to_resized @ to_crop
        ref = face or (faces[0] if faces else None)  # whole image: the top face's landmarks
        landmarks = apply_affine(ref.landmarks, affine) if ref is not None and ref.landmarks.size else None
        mask = None
        if record.mask and self.has_masks:
            mask = warp_mask(load_mask(record.mask, rgb.shape[1::-1]), affine, resized.shape[1::-1])
        return _Resized(resized, landmarks, mask, ref is not None, chosen)

    def _decode_resize(self, index: int, face_index: int | None) -> _Resized:
        record = self.records[index]
        if self.faces is None:
            return self._cut(index, self._decode(index, self.draft_decode), [], WHOLE_IMAGE)
        rgb = self._decode(index, draft=False)
        faces = self.faces.faces(record.path, rgb)
        chosen = self._resolve_face(face_index, len(faces))
        if chosen >= len(faces):  # an index from another run's face list
            raise ImageDecodeError(f"{record.path}: face {chosen} not found (the file has {len(faces)})")
        return self._cut(index, rgb, faces, chosen)

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

    def _blank(self, face_index: int | None = WHOLE_IMAGE) -> _Resized:
        size = self.canonical.size
        return _Resized(np.zeros((size, size, 3), np.uint8), None, None, False, WHOLE_IMAGE if face_index is None else face_index)

    def load_pixels(self, index: int) -> tuple[np.ndarray, str]:
        """Canonical uint8 pixels of record ``index`` (whole image) and the decode error ("" if none)."""
        try:
            arr, error = self._resized(index, WHOLE_IMAGE if self.faces is not None else CHOOSE).pixels, ""
        except ImageDecodeError as e:
            arr, error = self._blank().pixels, str(e)
        arr = self.canonical.finish(arr, self.train)
        if self.augment is not None and not error:
            arr = self.augment.apply_pixels(arr)[0]
        return self.canonical.encode(arr, self.train), error

    # ---- samples --------------------------------------------------------------------
    def _rng(self, key: tuple) -> np.random.Generator:
        # Training draws afresh (python's random is seeded per worker by Lightning); evaluation
        # forges the same way every run, so a blended test split is a fixed test split.
        return np.random.default_rng(random.getrandbits(63) if self.train else (self.seed, *key))

    def _donor(self, rng: np.random.Generator) -> np.ndarray:
        """A random real image at canonical size (for splicing forgeries)."""
        index = int(rng.choice(self._reals or list(range(len(self.records)))))
        try:
            arr = self._resized(index, WHOLE_IMAGE if self.faces is not None else CHOOSE).pixels
        except ImageDecodeError:
            arr = self._blank().pixels
        return self.canonical.finish(arr, train=False)

    def _sample(self, index: int, resized: _Resized, error: str, rng_key: tuple, canonical_hook: Callable | None = None, **meta) -> dict:
        """The sample dict from a view's resized pixels: the canonical crop, an optional
        perturbation of it (``canonical_hook``), the forgery and pixel augmentation, the
        canonical re-encode."""
        r = self.records[index]
        label, generator = r.label, r.generator
        size = self.canonical.size
        arr, to_final = self.canonical.finish_affine(resized.pixels, self.train)
        if canonical_hook is not None and not error:
            arr = canonical_hook(arr, index)
            if arr.shape[:2] != (size, size):  # a crop changes the size: back to the model's
                arr = self.canonical.finish(self.canonical.resize_stage(arr), train=False)
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
                    arr, label, landmarks if resized.face_found else None, self._rng(rng_key), donor=self._donor
                )
                arr, new_label, new_mask, new_generator = forged
                if new_mask is not None and self.has_masks:
                    mask, mask_ok = new_mask.astype(np.float32), True
                if new_label != label:
                    label, generator = new_label, new_generator or generator
            # a flip swaps the face's left and right: the analyser's mirror table re-indexes the
            # landmarks (template landmarks of a face-less view have no anatomy to swap)
            mirror = self.faces.mirror_indices if self.faces is not None and resized.face_found else None
            arr, mask, landmarks = self.augment.apply_pixels(arr, mask, landmarks, mirror=mirror)
        arr = self.canonical.encode(arr, self.train)
        sample = make_sample(arr, r, error=error, label=label, generator=generator, **meta)
        if self.faces is not None:
            sample["landmarks"] = torch.from_numpy(np.asarray(landmarks, np.float32).reshape(-1, 2).copy())
            sample["meta"]["face_found"] = bool(resized.face_found)
            sample["meta"]["face_index"] = int(resized.face_index)
        if self.has_masks:
            sample["mask"] = torch.from_numpy(np.asarray(mask, np.float32).copy())[None]
            sample["meta"]["mask_ok"] = bool(mask_ok) and not error
        return sample

    def __getitem__(self, index: int) -> dict:
        try:
            resized, error = self._resized(index, CHOOSE), ""
        except ImageDecodeError as e:
            resized, error = self._blank(), str(e)
        return self._sample(index, resized, error, (index,))


class ViewsDataset(ImageDataset):
    """What the scorer scores: item ``i`` is the list of every view of file ``i`` (evaluation
    preprocessing), each a sample dict with ``meta["file"] = i`` and ``meta["view"]``.

    Without a face stage a file has one view, the whole image. With one, the whole image
    (when ``faces.whole_image``, or when no face is found) and up to ``faces.max_faces``
    face crops; the scorer combines their scores into the file's. An undecodable file is
    one blank view with ``meta.ok`` False. ``collate_views`` flattens a batch of files.

    Perturbations for robustness studies: ``decoded_hook(rgb, index)`` acts on the decoded
    image as received (faces are then detected on the perturbed image, as a service would),
    ``canonical_hook(pixels, index)`` on each view's canonical crop before the re-encode.
    ``raw_cache`` (decoded images) and ``views_cache`` (resized views) can be shared by
    several data sets over the same records, so a grid decodes each file once; ``warm``
    fills them before DataLoader workers fork.
    """

    def __init__(
        self,
        records: list[Record],
        canonical: Canonicalizer,
        faces: FacePipeline | None = None,
        augment: Any = None,
        draft_decode: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        masks: bool | None = None,
        seed: int = 0,
        decoded_hook: Callable[[np.ndarray, int], np.ndarray] | None = None,
        canonical_hook: Callable[[np.ndarray, int], np.ndarray] | None = None,
        raw_cache: dict | None = None,
        views_cache: dict | None = None,
    ) -> None:
        # A perturbation of the image as received needs it at full resolution.
        super().__init__(
            records, canonical, augment=augment, train=False, max_pixels=max_pixels,
            draft_decode=draft_decode and decoded_hook is None and raw_cache is None, faces=faces, masks=masks, seed=seed,
        )
        self.decoded_hook, self.canonical_hook = decoded_hook, canonical_hook
        self.raw_cache, self.views_cache = raw_cache, views_cache

    def _cached(self, cache: dict | None, index: int, make: Callable):
        if cache is None:
            return make()
        hit = cache.get(index)
        if hit is None:
            try:
                hit = make()
            except ImageDecodeError as e:
                hit = str(e)
            cache[index] = hit
        if isinstance(hit, str):
            raise ImageDecodeError(hit)
        return hit

    def _raw(self, index: int) -> np.ndarray:
        """The decoded image, through ``raw_cache`` when one is shared."""
        return self._cached(self.raw_cache, index, lambda: self._decode(index, self.draft_decode and self.faces is None))

    def _views(self, index: int) -> list[_Resized]:
        if self.decoded_hook is None and self.raw_cache is None:
            return self._cached(self.views_cache, index, lambda: self._cut_views(index, self._raw(index)))
        return self._cut_views(index, self._raw(index))

    def _cut_views(self, index: int, rgb: np.ndarray) -> list[_Resized]:
        if self.decoded_hook is not None:
            rgb = self.decoded_hook(rgb, index)
        if self.faces is None:
            return [self._cut(index, rgb, [], WHOLE_IMAGE)]
        if self.decoded_hook is not None:
            faces = self.faces.detect(rgb)  # the perturbed pixels are not a file: not cached
        else:
            faces = self.faces.faces(self.records[index].path, rgb)
        wanted = ([WHOLE_IMAGE] if self.faces.whole_image or not faces else []) + list(range(len(faces)))
        return [self._cut(index, rgb, faces, k) for k in wanted]

    def warm(self) -> None:
        """Fill the shared caches (decoded images, or cut views) in this process."""
        for index in range(len(self)):
            try:
                if self.raw_cache is not None:
                    self._raw(index)
                elif self.views_cache is not None:
                    self._views(index)
            except ImageDecodeError:
                pass

    def __getitem__(self, index: int) -> list[dict]:
        try:
            views, error = self._views(index), ""
        except ImageDecodeError as e:
            log.warning("skipping undecodable image: %s", e)
            views, error = [self._blank()], str(e)
        return [
            # the first view forges as ImageDataset's sample of the same file does
            self._sample(index, view, error, (index,) if k == 0 else (index, k), self.canonical_hook, file=index, view=view.face_index)
            for k, view in enumerate(views)
        ]


def collate_views(items: list[list[dict]]) -> dict:
    """A batch of files -> one batch of all their views (files are never split)."""
    return default_collate([sample for views in items for sample in views])
