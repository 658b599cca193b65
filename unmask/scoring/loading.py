"""How the scorer's batches of image files are made.

The general path is ``data.dataset.ViewsDataset`` + ``collate_views``: every view a float
sample dict. For the plain case (whole images: no face stage, no perturbation hooks, shared
caches, augmentation or masks: what infer.py scores for a contest) two faster paths give the
same batches:

- **pixels** (every device): DataLoader workers hand over each file's canonical uint8 pixels
  (``ImageDataset.load_pixels``: the same decode, resize, crop and re-encode), a quarter of
  float32's bytes through shared memory (and through pinned memory to a GPU); the float
  conversion runs once per batch where the model runs: ``x / 255`` in float32, the same bits
  as ``data.sample.to_tensor``.
- **gpu** (CUDA with the eager runtime, ``scoring.decode``): workers hand over the bytes of
  JPEG files; the GPU decodes a batch in one nvjpeg call (``torchvision.io.decode_jpeg``),
  averages f x f blocks where the CPU path decodes DCT-scaled by 1/f (``draft_scale``),
  resizes with cv2's weights (area down, bilinear up: ``resize_weights``), crops and
  re-encodes at the evaluation JPEG quality (``encode_jpeg``/``decode_jpeg`` on the GPU).
  Anything else (PNG, CMYK, an EXIF rotation, a file the GPU cannot decode) takes the pixels
  path, file by file. The pixels differ from the CPU path's within JPEG decoder differences
  (nvjpeg's IDCT; the block mean against libjpeg's scaled IDCT; cv2's fixed-point rounding),
  which the re-encode carries on: 1-2 levels on average.

``Batches`` builds the loader for a scorer and turns what it yields into the collated batch
the runtimes and evaluators see (``batch["image"]`` float on the device).
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate, get_worker_info

from data.canonical import Canonicalizer
from data.dataset import WHOLE_IMAGE, ViewsDataset
from data.decode import DEFAULT_MAX_ASPECT, _check_size, require_nonempty

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112


def plain(dataset) -> bool:
    """Whether ``dataset`` is a ``ViewsDataset`` of whole images only, with nothing that acts
    between decoding and the finished pixels but canonicalisation."""
    return (
        isinstance(dataset, ViewsDataset) and dataset.faces is None and dataset.augment is None and not dataset.has_masks
        and dataset.decoded_hook is None and dataset.canonical_hook is None and dataset.raw_cache is None and dataset.views_cache is None
    )


def sample_meta(dataset: ViewsDataset, index: int, error: str) -> dict:
    """A view's sample dict without its image, as ``ViewsDataset`` makes it (``make_sample``
    with ``file`` and ``view``); ``tests/test_fast_default.py`` holds the two to equality."""
    r = dataset.records[index]
    meta = {"path": r.path, "source": r.source, "generator": r.generator, "group": r.group, "ok": not error, "error": error}
    return {"label": r.label, "meta": {**meta, "file": index, "view": WHOLE_IMAGE}}


# ---- pixels -------------------------------------------------------------------------------------
class PixelViews(Dataset):
    """Item ``i``: file ``i``'s finished uint8 pixels (HxWx3) and its sample dict without image."""

    def __init__(self, views: ViewsDataset) -> None:
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        pixels, error = self.views.load_pixels(index)
        return _tensor(pixels), sample_meta(self.views, index, error)


def _tensor(pixels: np.ndarray) -> Tensor:
    pixels = np.ascontiguousarray(pixels)
    return torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())


def collate_pixels(items: list[tuple[Tensor, dict]]) -> dict:
    batch = default_collate([meta for _, meta in items])
    if get_worker_info() is not None:  # a worker: stacked straight into shared memory
        batch["pixels"] = default_collate([p for p, _ in items])
    else:  # the main process (num_workers=0): by numpy, not waking the model's intra-op threads
        batch["pixels"] = torch.from_numpy(np.stack([p.numpy() for p, _ in items]))
    return batch  # pixels: (N, H, W, 3) uint8


def to_float(pixels: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1] on ``device``: ``x / 255``, the
    values ``data.sample.to_tensor`` gives. ``channels_last``: keep NHWC strides (the eager
    runtime's layout, no copy); else contiguous NCHW (what onnxruntime reads).

    On the CPU numpy divides, in this thread: PyTorch's intra-op threads in the main process
    are the model's, and on a loaded machine waking them for one element-wise op took up to
    0.5 s per batch of 64 (against 2 ms single-threaded; the same IEEE division, same bits)."""
    if device.type == "cpu":
        array = pixels.numpy().transpose(0, 3, 1, 2)
        if not channels_last:
            array = np.ascontiguousarray(array)
        out = np.empty(array.shape, np.float32) if not channels_last else np.empty_like(array, dtype=np.float32)
        np.divide(array, np.float32(255.0), out=out, dtype=np.float32)
        return torch.from_numpy(out)
    pixels = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if not channels_last:
        pixels = pixels.contiguous()
    return pixels.float().div_(255.0)


# ---- JPEG bytes for the GPU --------------------------------------------------------------------
def device_jpeg(path: str | Path, max_pixels: int, max_aspect: float = DEFAULT_MAX_ASPECT) -> bytes | None:
    """The bytes of ``path`` when a GPU decoder gives the same image as ``decode_image``: a
    complete JPEG in YCbCr or grayscale, upright (no EXIF rotation), within the size limits.
    None for anything else (the CPU path decodes it, or says why it cannot)."""
    try:
        path = Path(path)
        require_nonempty(path)
        with Image.open(path) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            _check_size(path, *img.size, max_pixels, max_aspect)
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None
        data = path.read_bytes()
    except Exception:  # noqa: BLE001 (the CPU path gives the error its words)
        return None
    return data if data.rstrip(b"\0").endswith(b"\xff\xd9") else None  # truncated: the CPU path decodes what is there


class EncodedViews(Dataset):
    """Item ``i``: file ``i``'s JPEG bytes (``jpeg``) when the GPU can decode it, else its
    finished pixels (``pixels``) from the CPU path; and its sample dict without image."""

    def __init__(self, views: ViewsDataset) -> None:
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict:
        data = device_jpeg(self.views.records[index].path, self.views.max_pixels)
        if data is not None:
            return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "sample": sample_meta(self.views, index, "")}
        pixels, error = self.views.load_pixels(index)
        return {"pixels": _tensor(pixels), "sample": sample_meta(self.views, index, error)}


def collate_encoded(items: list[dict]) -> dict:
    return {"items": items}


@functools.lru_cache(maxsize=1024)
def resize_weights(n_in: int, n_out: int, area: bool) -> Tensor:
    """(n_out, n_in) float64 weights of cv2's resize along one axis: ``INTER_AREA`` (each
    output pixel the mean of the input it covers, fractions counted) or ``INTER_LINEAR``
    (half-pixel centres, edges replicated)."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    if area:
        for o in range(n_out):
            start, end = o * scale, (o + 1) * scale
            for i in range(int(math.floor(start)), min(n_in, int(math.ceil(end)))):
                w[o, i] = (min(end, i + 1) - max(start, i)) / scale
        return w
    for o in range(n_out):
        fx = (o + 0.5) * scale - 0.5
        sx = math.floor(fx)
        fx -= sx
        if sx < 0:
            fx, sx = 0.0, 0
        if sx >= n_in - 1:
            fx, sx = 0.0, n_in - 1
        w[o, sx] += 1.0 - fx
        w[o, min(sx + 1, n_in - 1)] += fx
    return w


@functools.lru_cache(maxsize=1024)
def _device_weights(n_in: int, n_out: int, area: bool, device: torch.device) -> Tensor:
    # kept on the device: a copy from pageable host memory per image would wait for the GPU
    return resize_weights(n_in, n_out, area).to(device, torch.float32)


def _geometry(h: int, w: int, canonical: Canonicalizer) -> tuple[int, int, bool, int, int]:
    """``canonical.resize_stage`` then ``finish(train=False)`` as sizes: the resized (h, w),
    whether the resize shrinks (area) or enlarges (bilinear), and the crop's top and left
    (``data.canonical.resize_image_affine`` and ``_crop``)."""
    size, target, policy = canonical.size, canonical.resize_target, canonical.resize
    if policy == "none":
        new_w, new_h = w, h
    elif policy == "square":
        new_w, new_h = target, target
    else:
        scale = target / min(h, w)
        new_w, new_h = max(target, round(w * scale)), max(target, round(h * scale))
    shrink = new_w * new_h < w * h
    if new_h < size or new_w < size:  # policy none on a small image: the crop enlarges it first
        new_w, new_h, shrink = max(new_w, size), max(new_h, size), False
    align = canonical.crop_align
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if align > 1:
        top, left = top // align * align, left // align * align
    return new_h, new_w, shrink, top, left


def draft_factor(width: int, height: int, draft_size: int | None) -> int:
    """The power of two (1, 2, 4, 8) by which ``decode_image(draft_size=...)`` has libjpeg
    scale a JPEG of this size in the DCT domain (PIL's ``draft``); 1: decoded whole."""
    if not draft_size or min(width, height) < 2 * draft_size:
        return 1
    scale = min(width // draft_size, height // draft_size)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def draft_scale(image: Tensor, factor: int) -> Tensor:
    """(3, H, W) uint8 -> (3, ceil(H/f), ceil(W/f)) uint8: the mean of each f x f block from
    the top left, what DCT-domain scaling by 1/f computes up to its filter (on the test
    images the pixels then differ from libjpeg's by 0.3 levels on average, against 6-9 for a
    full-size decode resized)."""
    if factor == 1:
        return image
    pooled = torch.nn.functional.avg_pool2d(image.float()[None], factor, ceil_mode=True)[0]
    return pooled.round_().clamp_(0, 255).to(torch.uint8)


def resize_crop(image: Tensor, canonical: Canonicalizer) -> Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: the canonical resize and centre crop as two
    matrix products (only the rows and columns the crop keeps), rounded like cv2."""
    _, h, w = image.shape
    new_h, new_w, shrink, top, left = _geometry(h, w, canonical)
    size = canonical.size
    if (new_h, new_w) == (h, w):
        return image[:, top : top + size, left : left + size]
    wy = _device_weights(h, new_h, shrink, image.device)[top : top + size]
    wx = _device_weights(w, new_w, shrink, image.device)[left : left + size]
    out = wy @ image.float() @ wx.T
    return out.round_().clamp_(0, 255).to(torch.uint8)


class DeviceCanonicalizer:
    """The canonical evaluation steps on ``device`` for a batch of JPEG bytes: batched
    decode, the DCT scaling the CPU path would use (``draft_size``, emulated by
    ``draft_scale``), resize and crop, JPEG re-encode at ``eval_jpeg_quality`` (batched), as
    uint8."""

    def __init__(self, canonical: Canonicalizer, device: torch.device | str, draft_size: int | None = None) -> None:
        self.canonical = canonical
        self.device = torch.device(device)
        self.draft_size = draft_size

    def decode(self, datas: list[Tensor]) -> list[Tensor | None]:
        """Each byte tensor decoded to (3, H, W) uint8 on the device; None where it fails."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not datas:
            return []
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device))
        except Exception:  # noqa: BLE001 (one bad file fails the batch: find it)
            out = []
            for data in datas:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out

    def reencode(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) uint8 through JPEG at the evaluation quality, as ``Canonicalizer.encode``."""
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        c = self.canonical
        if not c.reencode or not c.eval_jpeg_quality or not len(images):
            return images
        encoded = encode_jpeg(list(images), quality=int(c.eval_jpeg_quality))
        decoded = decode_jpeg([e.cpu() for e in encoded], mode=ImageReadMode.RGB, device=self.device)
        return torch.stack(list(decoded))

    def __call__(self, datas: list[Tensor]) -> list[Tensor | None]:
        """Finished (3, S, S) uint8 images on the device, None where the GPU failed."""
        decoded = self.decode(datas)
        done = [
            resize_crop(draft_scale(d, draft_factor(d.shape[2], d.shape[1], self.draft_size)), self.canonical) if d is not None else None
            for d in decoded
        ]
        ok = [i for i, d in enumerate(done) if d is not None]
        if ok:
            finished = self.reencode(torch.stack([done[i] for i in ok]))
            for k, i in enumerate(ok):
                done[i] = finished[k]
        return done


_DEVICE_DECODING_WORKS: dict[str, bool] = {}


def device_decoding_works(device: torch.device) -> bool:
    """Whether ``DeviceCanonicalizer`` runs on ``device`` here (torchvision built with
    nvjpeg, the encoder available...): one small JPEG through every step, once per device.
    A pass would otherwise fall back to the CPU file by file, in the main process."""
    key = str(device)
    if key not in _DEVICE_DECODING_WORKS:
        import io

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        try:
            out = DeviceCanonicalizer(Canonicalizer(size=16), device, 16)([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)])
            _DEVICE_DECODING_WORKS[key] = out[0] is not None and tuple(out[0].shape) == (3, 16, 16)
        except Exception as e:  # noqa: BLE001
            log.warning("JPEG decoding on %s does not work here (%s: %s)", device, type(e).__name__, str(e)[:160])
            _DEVICE_DECODING_WORKS[key] = False
    return _DEVICE_DECODING_WORKS[key]


class Batches:
    """The loader of a scorer's pass over image files and the step that finishes each of its
    batches on the scoring device. ``mode``: ``views`` (general), ``pixels`` or ``gpu``."""

    def __init__(self, dataset: ViewsDataset, mode: str, device: torch.device, channels_last: bool) -> None:
        self.dataset, self.mode, self.device, self.channels_last = dataset, mode, device, channels_last
        c = dataset.canonical
        draft = c.resize_target if dataset.draft_decode and c.resize != "none" else None  # as ImageDataset._decode
        self.gpu = DeviceCanonicalizer(c, device, draft) if mode == "gpu" else None

    @classmethod
    def choose(cls, dataset, decode: str, device: torch.device, eager: bool) -> str:
        """``views`` unless the dataset is plain; then ``gpu`` where asked (``decode=gpu``, or
        ``auto`` on CUDA with the eager runtime) and possible (CUDA, or any device when asked),
        else ``pixels``."""
        if not plain(dataset):
            return "views"
        if decode == "gpu" or (decode == "auto" and device.type == "cuda" and eager):
            return "gpu"
        return "pixels"

    def dataset_and_collate(self) -> tuple[Dataset, Callable]:
        from data.dataset import collate_views

        if self.mode == "pixels":
            return PixelViews(self.dataset), collate_pixels
        if self.mode == "gpu":
            return EncodedViews(self.dataset), collate_encoded
        return self.dataset, collate_views

    def finish(self, batch: dict) -> dict:
        """The collated batch with ``image`` float (N, 3, S, S) on the device."""
        if self.mode == "pixels":
            batch["image"] = to_float(batch.pop("pixels"), self.device, self.channels_last)
        elif self.mode == "gpu":
            batch = self._finish_gpu(batch["items"])
        return batch

    def _finish_gpu(self, items: list[dict]) -> dict:
        jpeg = [i for i, item in enumerate(items) if "jpeg" in item]
        finished = self.gpu([items[i]["jpeg"] for i in jpeg])
        images: list[Tensor | None] = [None] * len(items)
        samples = [item["sample"] for item in items]
        for i, image in zip(jpeg, finished):
            if image is None:  # the GPU could not decode it: the CPU path, here, for this file
                index = samples[i]["meta"]["file"]
                log.warning("%s: GPU decoding failed; decoded on the CPU", self.dataset.records[index].path)
                pixels, error = self.dataset.load_pixels(index)
                items[i] = {"pixels": _tensor(pixels)}
                samples[i] = sample_meta(self.dataset, index, error)
            else:
                images[i] = image
        for i, item in enumerate(items):
            if images[i] is None:
                images[i] = item["pixels"].to(self.device, non_blocking=True).permute(2, 0, 1)
        batch = default_collate(samples)
        stacked = torch.stack(images)  # (N, 3, S, S) uint8 on the device
        if self.channels_last:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        batch["image"] = stacked.float().div_(255.0)
        return batch
