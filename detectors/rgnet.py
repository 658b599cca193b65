"""Residual graph network on facial landmarks (after Yu & Deng, "Multi-scale detection of
forged face images based on a residual graph neural network").

image -> CNN feature pyramid (timm, honest weights) -> for every landmark node, features
sampled at its position on each pyramid level and on rings of several radii around it
("scales") -> learned attention over scales, per node -> residual graph convolutions over
k-NN or Delaunay edges of each face's own landmark layout -> mean + max readout -> image logit.
A linear head on the node states scores every node; the scores' mean joins the image
logit (so they are trained) and their Gaussians at the node positions form the heatmap.

Landmarks come from the batch (``batch["landmarks"]``, (B, L, 2) pixels of ``image``),
i.e. from a data set built with ``faces=mesh|mtcnn|template``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.backbones import create_backbone, normalization
from detectors.base import Detector, DetectorOutput
from detectors.graph import KnnEdges, ResidualGraphBlock, splat_node_scores

# 68 of MediaPipe FaceMesh's 468 points laid out like dlib's 68 (same order: jaw from the
# image-left ear to the image-right ear, brows, nose bridge, nostrils, eyes, lips).
# Chosen by hand and checked against the geometry of MediaPipe's canonical face model
# (jaw points spaced evenly by arc length along the face oval, left/right mirror pairs).
MESH68: tuple[int, ...] = (
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,  # jaw 0-16
    70, 63, 105, 66, 107,  # image-left brow 17-21, outer -> inner
    336, 296, 334, 293, 300,  # image-right brow 22-26, inner -> outer
    6, 197, 5, 4,  # nose bridge 27-30, between the eyes -> tip
    98, 97, 2, 326, 327,  # nostrils / base of the nose 31-35
    33, 160, 158, 133, 153, 144,  # image-left eye 36-41 (outer corner first)
    362, 385, 387, 263, 373, 380,  # image-right eye 42-47 (inner corner first)
    61, 39, 37, 0, 267, 269, 291, 321, 314, 17, 84, 91,  # outer lips 48-59
    78, 81, 13, 311, 308, 402, 14, 178,  # inner lips 60-67
)
NODE_PRESETS: dict[str, tuple[int, ...] | None] = {"mesh68": MESH68, "all": None}  # None: every landmark

MISSING_LANDMARKS = (
    "detector=rgnet needs landmarks: batch['landmarks'] (B, L, 2) in pixels of the image; "
    "train with faces=mesh (real faces) or faces=template (synthetic data)"
)


def resolve_node_indices(node_indices: str | Sequence[int]) -> tuple[int, ...] | None:
    """A preset name or an explicit list -> landmark indices (None: all landmarks)."""
    if isinstance(node_indices, str):
        if node_indices not in NODE_PRESETS:
            raise ValueError(f"detector.node_indices must be a list of landmark indices or one of {sorted(NODE_PRESETS)}, got {node_indices!r}")
        return NODE_PRESETS[node_indices]
    indices = tuple(int(i) for i in node_indices)
    if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
        raise ValueError(f"detector.node_indices must be distinct non-negative landmark indices, got {list(node_indices)}")
    return indices


def layout_scale(positions: Tensor) -> Tensor:
    """Per-sample size of a node layout (B, N, 2) -> (B,): the RMS distance of the nodes
    from their centroid, in the positions' unit (about 0.3 face widths for mesh68)."""
    centred = positions - positions.mean(1, keepdim=True)
    return centred.pow(2).sum(-1).mean(1).sqrt().clamp_min(1.0)


def sample_rings(feature: Tensor, positions: Tensor, radii: Tensor, image_size: tuple[int, int], ring_points: int) -> Tensor:
    """Bilinear samples of ``feature`` (B, C, h, w) around every node, averaged over
    ``ring_points`` points on a circle of each radius: positions (B, N, 2) and radii
    (B, R) in image pixels -> (B, N, R, C). Radius 0 is the node itself.

    The feature map covers the same extent as the image whatever its stride, so pixel
    coordinates (image spans [0, W] x [0, H]) map to grid_sample's [-1, 1] with
    ``align_corners=False``; nodes outside the image read zeros."""
    b, n, _ = positions.shape
    height, width = image_size
    angles = torch.arange(ring_points, device=positions.device, dtype=torch.float32) * (2 * math.pi / ring_points)
    ring = torch.stack([angles.cos(), angles.sin()], -1)  # (P, 2)
    offsets = radii[:, None, :, None, None] * ring  # (B, 1, R, P, 2)
    points = positions[:, :, None, None, :] + offsets  # (B, N, R, P, 2)
    scale = torch.tensor([2.0 / width, 2.0 / height], device=positions.device)
    grid = (points * scale - 1.0).reshape(b, n, -1, 2)
    sampled = F.grid_sample(feature, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, N, R*P)
    sampled = sampled.reshape(b, feature.shape[1], n, radii.shape[1], ring_points).mean(-1)
    return sampled.permute(0, 2, 3, 1)


class ScaleAttention(nn.Module):
    """Additive attention over scales, per node: (B, N, S, D) -> (B, N, D), weights (B, N, S)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.key = nn.Linear(width, width)
        self.score = nn.Linear(width, 1, bias=False)

    def forward(self, values: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.score(torch.tanh(self.key(values))).squeeze(-1).softmax(dim=-1)
        return (weights.unsqueeze(-1) * values).sum(2), weights


class RGNet(Detector):
    requires = ("landmarks",)  # node positions come from the face stage

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str | None = "imagenet",
        weights: str | None = None,
        levels: Sequence[int] = (1, 2, 3, 4),
        radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
        ring_points: int = 4,
        node_indices: str | Sequence[int] = "mesh68",
        num_landmarks: int = 468,
        edges: Callable[[Tensor], Tensor] | None = None,
        width: int = 128,
        depth: int = 4,
        dropout: float = 0.1,
        heatmap_stride: int = 4,
        heatmap_sigma: float = 0.15,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.node_indices = resolve_node_indices(node_indices)
        self.num_landmarks = int(num_landmarks)
        num_nodes = len(self.node_indices) if self.node_indices is not None else self.num_landmarks
        if num_nodes < 2:
            raise ValueError(f"detector.node_indices: a graph needs at least 2 nodes, got {num_nodes}")
        if not radii or any(float(r) < 0 for r in radii):
            raise ValueError(f"detector.radii must be a non-empty list of radii >= 0, got {list(radii)}")
        if int(ring_points) < 1 or int(width) < 1 or int(depth) < 0 or int(heatmap_stride) < 1:
            raise ValueError("detector.ring_points, detector.width and detector.heatmap_stride must be >= 1, detector.depth >= 0")
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.set_normalization(*normalization(self.backbone, mean, std))
        if not hasattr(self.backbone, "forward_intermediates"):
            raise ValueError(f"detector.backbone {backbone!r} has no timm forward_intermediates (multi-scale feature maps)")
        info = self.backbone.feature_info
        self.levels = [int(i) for i in levels]
        if not self.levels or any(not 0 <= i < len(info) for i in self.levels):
            raise ValueError(f"detector.levels must be indices into the backbone's {len(info)} feature levels "
                             f"(strides {[f['reduction'] for f in info]}), got {list(levels)}")
        # The pooled classifier head of the backbone is never used: drop it (no unused
        # parameters for DDP, less compute). Weights were loaded before, so nothing is lost.
        self.backbone.prune_intermediate_layers(indices=self.levels, prune_head=True)
        self.register_buffer("radii", torch.tensor([float(r) for r in radii]), persistent=False)
        self.ring_points = int(ring_points)
        self.edges = edges if edges is not None else KnnEdges(k=8)
        self.heatmap_stride, self.heatmap_sigma = int(heatmap_stride), float(heatmap_sigma)

        width = int(width)
        num_scales = len(self.levels) * len(radii)
        self.project = nn.ModuleList(nn.Linear(info[i]["num_chs"], width) for i in self.levels)
        self.scale_embedding = nn.Parameter(torch.zeros(num_scales, width))
        self.node_embedding = nn.Parameter(torch.zeros(num_nodes, width))  # which landmark a node is
        nn.init.normal_(self.scale_embedding, std=0.02)
        nn.init.normal_(self.node_embedding, std=0.02)
        self.scale_attention = ScaleAttention(width)
        self.input_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(ResidualGraphBlock(width, dropout) for _ in range(int(depth)))
        self.output_norm = nn.LayerNorm(width)
        self.node_head = nn.Linear(width, 1)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = 2 * width
        self.head = nn.Linear(self.feature_dim, 1)
        for layer in (self.node_head, self.head):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ nodes
    def node_positions(self, image: Tensor, batch: Mapping | None) -> Tensor:
        """The batch's landmarks at the configured nodes, (B, N, 2) float32 pixels."""
        if batch is None or not isinstance(batch, Mapping) or batch.get("landmarks") is None:
            raise ValueError(MISSING_LANDMARKS)
        landmarks = torch.as_tensor(batch["landmarks"], device=image.device, dtype=torch.float32)
        if landmarks.ndim != 3 or landmarks.shape[-1] != 2 or landmarks.shape[0] != image.shape[0]:
            raise ValueError(f"batch['landmarks'] must be (B, L, 2) with B = {image.shape[0]}, got {tuple(landmarks.shape)}")
        count = landmarks.shape[1]
        if self.node_indices is None:
            if count != self.num_landmarks:
                raise ValueError(f"detector.node_indices=all expects detector.num_landmarks={self.num_landmarks} landmarks, the batch has {count}")
            return landmarks
        if max(self.node_indices) >= count:
            raise ValueError(f"detector.node_indices reaches landmark {max(self.node_indices)}, but the batch has only {count} "
                             f"landmarks per face (e.g. mtcnn gives 5: use detector.node_indices=all detector.num_landmarks=5)")
        return landmarks[:, list(self.node_indices)]

    def node_features(self, image: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Fused multi-scale features per node (B, N, D) and the scale attention (B, N, S)."""
        maps = self.backbone.forward_intermediates(self.normalize(image), indices=self.levels, intermediates_only=True)
        size = (image.shape[-2], image.shape[-1])
        with torch.autocast(device_type=image.device.type, enabled=False):  # sampling and the graph in float32
            radii = self.radii[None, :] * layout_scale(positions)[:, None]  # (B, R) pixels
            values = torch.cat(
                [proj(sample_rings(m.float(), positions, radii, size, self.ring_points)) for proj, m in zip(self.project, maps)],
                dim=2,
            )  # (B, N, S, D), scales ordered level-major
            fused, weights = self.scale_attention(values + self.scale_embedding)
        return fused, weights

    # ------------------------------------------------------------------ forward
    def forward(self, image: Tensor, batch: Mapping | None = None) -> DetectorOutput:
        positions = self.node_positions(image, batch)
        fused, _ = self.node_features(image, positions)
        height, width = image.shape[-2], image.shape[-1]
        with torch.autocast(device_type=image.device.type, enabled=False):
            unit = torch.tensor([1.0 / width, 1.0 / height], device=image.device)
            adjacency = self.edges(positions * unit).to(fused.dtype)  # layout in image fractions
            h = self.input_norm(fused) + self.node_embedding
            for block in self.blocks:
                h = block(h, adjacency)
            h = self.output_norm(h)
            node_logits = self.node_head(h).squeeze(-1)  # (B, N) per-node forgery scores
            readout = torch.cat([h.mean(1), h.amax(1)], dim=-1)
            logit = self.head(self.dropout(readout)).squeeze(1) + node_logits.mean(1)
            with torch.no_grad():  # an explanation: no gradient, no activation memory
                heatmap = splat_node_scores(positions, node_logits.sigmoid(), (height, width),
                                            self.heatmap_sigma * layout_scale(positions), self.heatmap_stride)
        return DetectorOutput(logit=logit, heatmap=heatmap, features=readout)

    def forward_normalized(self, x: Tensor) -> DetectorOutput:
        raise ValueError(MISSING_LANDMARKS)
