"""UnivFD (Ojha, Li, Lee, CVPR 2023, "Towards Universal Fake Image Detectors").

A frozen image encoder and, on its image embedding, either
- ``mode=probe``: a linear probe Linear(D, 1), weight N(0, 0.02), default bias (the paper:
  CLIP ViT-L/14's 768-d projected embedding, 769 trainable parameters), or
- ``mode=knn``: the paper's nearest-neighbour variant: cosine similarity against a bank
  of real and fake training embeddings. The bank fills itself from the training batches
  with one entry per training image, keyed by its file (``meta.path``, with the view and
  label when a face stage or self-blending gives one file several): a later epoch replaces
  the image's entry with its newest embedding instead of adding an augmented near-copy,
  so after training the bank holds each image's last-epoch view (the un-augmented image
  with ``augment=none``). Batches without paths fall back to a hash of the pixels. The
  bank lives in buffers, so the checkpoint carries it. The score is ``mean top-k
  similarity to fakes - mean top-k similarity to reals`` (k = 1: the nearest neighbour's
  class decides, as in the paper); ``logit = scale * score + bias`` with those two numbers
  trained by BCE (a Platt calibration; the Lightning loop needs something to optimise).
  During training every image is scored with its own entry left out of the bank
  (leave-one-out), so the calibration never sees an image matched with itself.

Encoders: ``library=open_clip`` (``ViT-L-14`` as in the paper; weights from a local file
or a hub tag such as ``openai`` where a hub is reachable) or ``library=timm`` (any timm
backbone, e.g. ``tf_efficientnet_lite2`` with the offline ImageNet weight package).
Embeddings can be cached on disk by image content + encoder weights + preprocessing
(``feature_cache=DIR``): after the first epoch only the probe runs.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.sample import usable
from detectors.backbones import _SKIP_PRETRAINED, MissingWeightsError, create_backbone
from detectors.base import IMAGENET_MEAN, IMAGENET_STD, Detector, DetectorOutput
from detectors.feature_cache import FeatureCache, content_keys, module_fingerprint

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TimmEncoder(nn.Module):
    """Any timm backbone's pooled features (``num_classes=0``)."""

    def __init__(self, name: str, pretrained: str | None = "imagenet", weights: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.model = create_backbone(name, pretrained=pretrained, weights=weights)
        self.dim = int(self.model.num_features)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.default_mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.default_std = tuple(cfg.get("std", IMAGENET_STD))
        self.input_size: tuple[int, int] | None = None  # convolutional: any size

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def load_open_clip_weights(model: nn.Module, file: str | Path) -> None:
    """An open_clip checkpoint (state dict, safetensors) or OpenAI's original TorchScript
    archive (``ViT-L-14.pt``) into a full open_clip CLIP model, strictly."""
    import open_clip

    path = Path(file).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"CLIP weights file {path} does not exist")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
    except Exception as first:  # noqa: BLE001 (try OpenAI's TorchScript format before failing)
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:  # noqa: BLE001
            raise MissingWeightsError(f"{path} does not fit this open_clip architecture: {first}") from first
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        model.load_state_dict(state, strict=True)
    log.info("CLIP weights loaded from %s", path)


class OpenClipEncoder(nn.Module):
    """The image tower of an open_clip model; its output is the projected image embedding
    (``ln_post(CLS) @ proj``, not L2-normalised), as UnivFD uses. The text tower is dropped.

    ``pretrained``: a hub tag (``openai``; needs internet) or ``none``; ``weights``: a local
    file, which wins over ``pretrained``. OpenAI's CLIP weights were trained with QuickGELU: with a local OpenAI file use the
    ``-quickgelu`` architecture (``ViT-L-14-quickgelu``); the ``openai`` tag does it itself."""

    def __init__(self, name: str = "ViT-L-14", pretrained: str | None = "none", weights: str | None = None) -> None:
        super().__init__()
        import open_clip

        self.name = name
        tag = None if pretrained in (None, False, "none", "random") else str(pretrained)
        if tag == "imagenet" and not weights:
            raise ValueError("open_clip encoders have no 'imagenet' weights: pass detector.weights=/path/to/clip.pt or a hub tag (openai)")
        if _SKIP_PRETRAINED.get():  # restoring a checkpoint: its state dict holds the encoder
            model = open_clip.create_model(name, pretrained=None)
        elif weights:
            model = open_clip.create_model(name, pretrained=None)
            load_open_clip_weights(model, weights)
        elif tag:
            try:
                model = open_clip.create_model(name, pretrained=tag)
            except Exception as e:  # noqa: BLE001 (offline: say what to do instead)
                raise MissingWeightsError(
                    f"could not get open_clip weights {name}/{tag} ({e}). No CLIP weights exist on offline machines: "
                    f"download them where a hub is reachable and pass detector.weights=/path/to/file"
                ) from e
        else:
            log.warning("open_clip encoder %s has random weights (pretrained=none): a plumbing check, not a detector", name)
            model = open_clip.create_model(name, pretrained=None)
        self.visual = model.visual
        self.dim = int(self.visual.output_dim)
        cfg = getattr(self.visual, "preprocess_cfg", None) or {}
        self.default_mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.default_std = tuple(cfg.get("std", CLIP_STD))
        size = getattr(self.visual, "image_size", 224)
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))

    def forward(self, x: Tensor) -> Tensor:
        return self.visual(x)


ENCODER_LIBRARIES: dict[str, type[nn.Module]] = {"timm": TimmEncoder, "open_clip": OpenClipEncoder}
MODES = ("probe", "knn")


def _key_to_int(key: str) -> int:
    return int(key[:15], 16)  # 60 bits of the content hash: fits an int64 buffer


def _bank_keys(batch: Mapping, x: Tensor) -> Tensor:
    """One int64 key per sample naming the training image: its path (with the view and the
    label, which a face stage or self-blending can vary per file), else its pixels."""
    meta = batch.get("meta") or {}
    paths = meta.get("path")
    n = x.shape[0]
    if paths is None or len(paths) != n:
        return torch.tensor([_key_to_int(k) for k in content_keys(x)], dtype=torch.int64)
    views = meta.get("face_index")
    views = [-1] * n if views is None else torch.as_tensor(views).view(-1).tolist()
    labels = torch.as_tensor(batch["label"]).view(-1).tolist()
    names = (f"{p}\x00{v}\x00{lab}" for p, v, lab in zip(paths, views, labels))
    return torch.tensor([_key_to_int(hashlib.blake2b(s.encode(), digest_size=8).hexdigest()) for s in names], dtype=torch.int64)


class FeatureBank(nn.Module):
    """L2-normalised embeddings with their labels and keys (one per training image, see
    ``_bank_keys``), in buffers that grow (and are restored at whatever size a checkpoint
    holds)."""

    def __init__(self, dim: int, limit: int = 200_000) -> None:
        super().__init__()
        self.limit = int(limit)
        self.register_buffer("features", torch.zeros(0, dim))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("keys", torch.zeros(0, dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.labels.numel())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("features", "labels", "keys"):
            incoming = state_dict.get(prefix + name)
            if incoming is not None:  # take the checkpoint's size, then let torch copy values
                setattr(self, name, torch.empty_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def add(self, features: Tensor, labels: Tensor, keys: Tensor) -> int:
        """One entry per key, the latest winning: a known key's entry is overwritten in place
        (embedding and label), a new key is appended (the last of a batch's duplicates
        wins). Returns how many keys were new. Past ``limit`` the oldest entries go."""
        keys = keys.to(self.keys.device)
        feats = F.normalize(features.float(), dim=1).to(self.features.device)
        labels = labels.to(self.labels.device, torch.uint8)
        position = {k: i for i, k in enumerate(self.keys.tolist())}
        last = {k: i for i, k in enumerate(keys.tolist())}  # the batch's last sample per key
        old = [(position[k], i) for k, i in last.items() if k in position]
        fresh = [i for k, i in last.items() if k not in position]
        if old:
            at, src = (torch.tensor(v, device=self.keys.device) for v in zip(*old))
            self.features[at] = feats[src.to(feats.device)]
            self.labels[at] = labels[src.to(labels.device)]
        if fresh:
            idx = torch.tensor(fresh, device=self.keys.device)
            self.features = torch.cat([self.features, feats[idx.to(feats.device)]])[-self.limit :]
            self.labels = torch.cat([self.labels, labels[idx.to(labels.device)]])[-self.limit :]
            self.keys = torch.cat([self.keys, keys[idx]])[-self.limit :]
        return len(fresh)

    @torch.no_grad()
    def score(self, features: Tensor, k: int = 1, exclude_keys: Tensor | None = None) -> Tensor:
        """``mean top-k cosine to fakes - mean top-k cosine to reals`` per query (0 while the
        bank lacks a class). ``exclude_keys`` leaves each query's own entry out."""
        out = torch.zeros(features.shape[0], device=features.device)
        if len(self) == 0:
            return out
        sims = F.normalize(features.float(), dim=1) @ self.features.to(features.device).T  # (B, N)
        if exclude_keys is not None:
            same = exclude_keys.to(features.device).view(-1, 1) == self.keys.to(features.device).view(1, -1)
            sims = sims.masked_fill(same, float("-inf"))
        labels = self.labels.to(features.device)
        per_class = []
        for cls in (1, 0):
            members = sims[:, labels == cls]
            if members.shape[1] == 0:
                return out
            top = members.topk(min(k, members.shape[1]), dim=1).values
            # -inf marks a query's own (excluded) entry: average the others only
            finite = torch.isfinite(top)
            per_class.append(torch.where(finite, top, torch.zeros_like(top)).sum(1) / finite.sum(1).clamp_min(1))
        return per_class[0] - per_class[1]


class UnivFD(Detector):
    input_gradients = False  # the frozen encoder runs under no_grad: no gradient reaches the image

    def __init__(
        self,
        encoder: str = "tf_efficientnet_lite2",
        library: str = "timm",
        pretrained: str | None = "imagenet",
        weights: str | None = None,
        mode: str = "probe",
        probe_weights: str | None = None,
        knn_k: int = 1,
        bank_limit: int = 200_000,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop: int | None = None,
        feature_cache: str | None = None,
        cache_memory_mb: float = 512.0,
    ) -> None:
        if library not in ENCODER_LIBRARIES:
            raise ValueError(f"detector.library must be one of {sorted(ENCODER_LIBRARIES)}, got {library!r}")
        if mode not in MODES:
            raise ValueError(f"detector.mode must be one of {MODES}, got {mode!r}")
        if int(knn_k) < 1:
            raise ValueError(f"detector.knn_k must be >= 1, got {knn_k}")
        enc = ENCODER_LIBRARIES[library](encoder, pretrained, weights)
        super().__init__(mean or enc.default_mean, std or enc.default_std)
        self.library, self.mode, self.knn_k = library, mode, int(knn_k)
        self.encoder = enc
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.crop = int(crop) if crop else None
        dim = self.feature_dim = int(enc.dim)
        if mode == "probe":
            self.probe = nn.Linear(dim, 1)
            nn.init.normal_(self.probe.weight, 0.0, 0.02)  # the paper's init_gain; default bias
            if probe_weights and not _SKIP_PRETRAINED.get():
                self.load_probe(probe_weights)
        else:
            if probe_weights:
                raise ValueError("detector.probe_weights is for mode=probe; mode=knn has no probe")
            self.bank = FeatureBank(dim, bank_limit)
            self.knn_scale = nn.Parameter(torch.tensor(10.0))
            self.knn_bias = nn.Parameter(torch.tensor(0.0))
        self.feature_cache_dir = feature_cache
        self.cache_memory_mb = cache_memory_mb
        self._cache: FeatureCache | None = None
        self._resize_logged = False

    def load_probe(self, file: str | Path) -> None:
        """A released probe state dict ``{"weight": (1, D), "bias": (1,)}`` (e.g. the
        paper's ``fc_weights.pth``, saved on CUDA: loaded on the CPU first)."""
        path = Path(file).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"probe weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("fc.").removeprefix("module."): v for k, v in state.items()}
        if state.get("weight") is None or tuple(state["weight"].shape) != tuple(self.probe.weight.shape):
            shape = tuple(state["weight"].shape) if "weight" in state else None
            raise ValueError(f"{path}: probe weight {shape} does not fit Linear({self.encoder.dim}, 1) of encoder {self.encoder.name}")
        self.probe.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        log.info("UnivFD probe loaded from %s", path)

    def train(self, mode: bool = True) -> UnivFD:
        super().train(mode)
        self.encoder.eval()  # frozen: eval-mode BatchNorm / dropout whatever Lightning asks
        return self

    # ---- embeddings ----------------------------------------------------------------
    def _geometry(self, image: Tensor) -> Tensor:
        """``crop``: random crop in training, centre crop in evaluation (the paper: 224).
        Encoders with a fixed input size (ViT) get the crop resized to it."""
        if self.crop and min(image.shape[-2:]) > self.crop:
            c, (h, w) = self.crop, image.shape[-2:]
            if self.training:  # a position per image, as the paper's RandomCrop
                tops = torch.randint(0, h - c + 1, (image.shape[0],)).tolist()
                lefts = torch.randint(0, w - c + 1, (image.shape[0],)).tolist()
                image = torch.stack([im[:, t : t + c, left : left + c] for im, t, left in zip(image, tops, lefts)])
            else:
                top, left = (h - c) // 2, (w - c) // 2
                image = image[..., top : top + c, left : left + c]
        size = self.encoder.input_size
        if size and tuple(image.shape[-2:]) != tuple(size):
            if not self._resize_logged:
                log.info("UnivFD: %s input resized from %s to %s", self.encoder.name, tuple(image.shape[-2:]), tuple(size))
                self._resize_logged = True
            image = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return image

    @torch.no_grad()
    def encode(self, image: Tensor) -> Tensor:
        """Embeddings of images already through ``_geometry`` (never from the cache)."""
        return self.encoder(self.normalize(image)).float()

    def cache_identity(self) -> dict:
        return {
            "kind": "univfd-embedding",
            "version": 1,
            "library": self.library,
            "encoder": self.encoder.name,
            "encoder_weights": module_fingerprint(self.encoder),
            "mean": self.pixel_mean.flatten().tolist(),
            "std": self.pixel_std.flatten().tolist(),
            "input_size": list(self.encoder.input_size) if self.encoder.input_size else None,
            "resize": "bicubic-antialias",
        }

    @property
    def feature_cache(self) -> FeatureCache | None:
        if self.feature_cache_dir and self._cache is None:
            self._cache = FeatureCache(self.feature_cache_dir, self.cache_identity(), store_dtype="float32", memory_mb=self.cache_memory_mb)
        return self._cache

    def embed(self, image: Tensor, keys: list[str] | None = None) -> Tensor:
        cache = self.feature_cache
        if cache is None:
            return self.encode(image)
        return cache.lookup_or_compute(image, self.encode, keys)

    # ---- forward -------------------------------------------------------------------
    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        x = self._geometry(image)
        fill_bank = self.mode == "knn" and self.training and batch is not None
        keys = content_keys(x) if self.feature_cache is not None else None
        emb = self.embed(x, keys).to(image.device)
        if self.mode == "probe":
            return DetectorOutput(logit=self.probe(emb).squeeze(1), features=emb)
        key_ints = _bank_keys(batch, x) if fill_bank else None
        # leave-one-out: an image in training is never matched with its own entry
        score = self.bank.score(emb, self.knn_k, exclude_keys=key_ints)
        if fill_bank:
            labels = torch.as_tensor(batch["label"]).to(emb.device)
            valid = usable(batch, emb.device)
            if valid.any():
                self.bank.add(emb[valid], labels[valid], key_ints[valid.cpu()])
        return DetectorOutput(logit=self.knn_scale * score + self.knn_bias, features=emb)
