"""Forgery-type attribution: which kind of forgery an image is, next to whether it is one.

``AttributedDetector`` wraps any detector whose ``DetectorOutput`` carries ``features`` and
adds a small head on them producing ``class_logits`` (B, C); the binary logit, heatmap,
mask, extra losses and preprocessing stay the inner detector's. Training adds
``weight * cross-entropy`` on class indices taken from the manifest's ``generator`` column
through ``AttributionClasses`` (configs/attribution/*.yaml). Scores and reports of the
predicted type: ``unmask.evaluation.attribution``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.sample import usable
from detectors.base import Detector, DetectorOutput, DetectorWrapper

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # cross-entropy's default ignore_index: no attribution target


class AttributionClasses:
    """The ordered class list and the generator -> class mapping of one config.

    A generator absent from ``map`` maps to itself when it is a class name (the ``fine``
    option needs no map at all). Target rules: label 0 -> ``real_class`` whatever the
    generator column says; label 1 -> its generator's class, ignored when that is unknown
    (one warning per name) or is the real class (a contradictory row); label -1 and
    undecodable samples (``meta.ok`` False) -> ignored."""

    def __init__(self, classes: Sequence[str], map: Mapping[str, str] | None = None, real_class: str = "real") -> None:
        names = [str(c) for c in (classes or [])]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"attribution.classes must list at least 2 distinct class names, got {names}")
        if real_class not in names:
            raise ValueError(f"attribution.real_class {real_class!r} is not one of attribution.classes {names}")
        mapping = {str(k): str(v) for k, v in (map or {}).items()}
        wrong = {k: v for k, v in mapping.items() if v not in names}
        if wrong:
            raise ValueError(f"attribution.map sends {wrong} to classes not in attribution.classes {names}")
        self.names: tuple[str, ...] = tuple(names)
        self.map = mapping
        self.real_class = real_class
        self.real_index = names.index(real_class)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.names)

    def class_of(self, generator: str, label: int, ok: bool = True) -> str | None:
        """The class name a sample is trained and scored against, or None (ignored)."""
        label = int(label)
        if not ok or label not in (0, 1):
            return None
        if label == 0:
            return self.real_class
        generator = str(generator)
        name = self.map.get(generator, generator if generator in self.names else None)
        if name is None:
            if generator not in self._warned:
                self._warned.add(generator)
                log.warning(
                    "attribution: generator %r is in no class of %s; its samples get no attribution target "
                    "(add it to attribution.map)", generator, list(self.names),
                )
            return None
        return None if name == self.real_class else name

    def targets(self, batch: Mapping, device: torch.device | str = "cpu") -> Tensor:
        """Class indices (``IGNORE_INDEX`` where there is no target) for a collated batch."""
        labels = torch.as_tensor(batch["label"]).view(-1).tolist()
        generators = (batch.get("meta") or {}).get("generator") or ["real"] * len(labels)
        oks = usable(batch).tolist()
        idx = [
            IGNORE_INDEX if (c := self.class_of(g, lab, ok)) is None else self.names.index(c)
            for g, lab, ok in zip(generators, labels, oks)
        ]
        return torch.tensor(idx, dtype=torch.long, device=device)


def _probe_feature_dim(detector: Detector, size: int) -> int:
    """Width of ``detector``'s features, from one forward of a blank image (eval mode, so
    no BatchNorm statistics or training-only state change)."""
    was_training = detector.training
    detector.eval()
    try:
        out = detector(torch.zeros(1, 3, size, size))
    finally:
        detector.train(was_training)
    if out.features is None:
        raise ValueError(
            f"attribution needs the detector's features, but {type(detector).__name__} returns none "
            "(DetectorOutput.features); pick another detector or attribution=none"
        )
    return int(out.features.shape[-1])


class AttributedDetector(DetectorWrapper):
    """``inner`` plus a forgery-type head on its features.

    ``hidden``: 0 = a linear head; > 0 = Linear -> ReLU -> Linear with that width.
    ``in_features``: the feature width; null = found with one forward of a blank
    ``probe_size`` image at construction."""

    def __init__(
        self,
        detector: Detector,
        classes: Sequence[str],
        map: Mapping[str, str] | None = None,
        real_class: str = "real",
        weight: float = 0.5,
        hidden: int = 0,
        in_features: int | None = None,
        probe_size: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(detector, Detector):
            raise TypeError(f"AttributedDetector wraps a Detector, got {type(detector).__name__}")
        if not float(weight) >= 0:
            raise ValueError(f"attribution.weight must be >= 0, got {weight}")
        if int(hidden) < 0:
            raise ValueError(f"attribution.hidden must be >= 0 (0 = linear head), got {hidden}")
        self.classes = AttributionClasses(classes, map, real_class)
        self.weight = float(weight)
        self.inner = detector
        dim = int(in_features or detector.feature_dim or _probe_feature_dim(detector, int(probe_size)))
        n = len(self.classes)
        self.head = (
            nn.Linear(dim, n) if not hidden else nn.Sequential(nn.Linear(dim, int(hidden)), nn.ReLU(inplace=True), nn.Linear(int(hidden), n))
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.names

    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        out = self.inner(image, batch)  # the inner detector normalises; the wrapper never does
        if out.features is None:
            raise ValueError(f"attribution needs features, but {type(self.inner).__name__} returned none")
        return dataclasses.replace(out, class_logits=self.head(out.features))

    def loss_terms(self, out: DetectorOutput, batch: Mapping) -> dict[str, Tensor]:
        terms = self.inner.loss_terms(out, batch)
        logits = out.class_logits
        target = self.classes.targets(batch, logits.device)
        if (target != IGNORE_INDEX).any():
            ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        else:  # keep the head in the graph (DDP, AMP) with a zero loss
            ce = logits.sum() * 0.0
        return {**terms, "attribution": self.weight * ce}
