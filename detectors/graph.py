"""Graph parts of the residual graph network (detectors/rgnet.py): which nodes touch
(k-nearest-neighbour or Delaunay edges on the landmark layout), the normalised adjacency,
residual graph-convolution blocks, and the splat of per-node scores into a heatmap.

Positions here are node layouts in any consistent unit (RGNet passes image-normalised
coordinates); adjacencies are dense (N, N) or per-sample (B, N, N) float tensors.

Edges are built on each face's own layout by default, so a file's graph, and so its score,
never depends on the other files of its batch. (A graph on the batch-mean layout did: and a
horizontal flip, which moved the landmarks, dragged the mean layout toward the midline.)
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.spatial import Delaunay
from torch import Tensor, nn

log = logging.getLogger(__name__)


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """Kipf & Welling's renormalisation D^-1/2 (A + I) D^-1/2 of a symmetric 0/1
    adjacency without self-loops, (N, N) or (B, N, N): every node also keeps its own
    state, and repeated propagation neither blows up nor vanishes."""
    eye = torch.eye(adjacency.shape[-1], device=adjacency.device, dtype=adjacency.dtype)
    a = adjacency + eye
    d = a.sum(-1).rsqrt()
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


def knn_adjacency(positions: Tensor, k: int) -> Tensor:
    """Symmetric 0/1 adjacency linking each node to its ``k`` nearest neighbours (an edge
    when either end chose the other), positions (..., N, 2) -> (..., N, N)."""
    n = positions.shape[-2]
    k = min(int(k), n - 1)
    dist = torch.cdist(positions.float(), positions.float())
    dist = dist + torch.diag(torch.full((n,), float("inf"), device=dist.device))  # never your own neighbour
    nearest = dist.topk(k, dim=-1, largest=False).indices
    adjacency = torch.zeros_like(dist).scatter_(-1, nearest, 1.0)
    return torch.maximum(adjacency, adjacency.transpose(-1, -2))


def delaunay_adjacency(positions: Tensor) -> Tensor:
    """Symmetric 0/1 adjacency of the Delaunay triangulation of one layout (N, 2).

    scipy's Qhull on the CPU; ``QJ`` joggles the input so that collinear or repeated
    points (a degenerate template layout) still triangulate instead of raising."""
    points = positions.detach().float().cpu().numpy().astype(np.float64)
    n = points.shape[0]
    if n < 3:
        raise ValueError(f"Delaunay edges need at least 3 nodes, got {n} (detector.node_indices)")
    simplices = Delaunay(points, qhull_options="QJ").simplices
    rows = np.concatenate([simplices[:, [0, 1]], simplices[:, [1, 2]], simplices[:, [0, 2]]])
    adjacency = np.zeros((n, n), np.float32)
    adjacency[rows[:, 0], rows[:, 1]] = 1.0
    adjacency[rows[:, 1], rows[:, 0]] = 1.0
    return torch.from_numpy(adjacency).to(positions.device)


BATCH_MEAN_WARNING = (
    "detector.edges.per_sample=false: one graph from the batch-mean landmark layout, so a file's score "
    "depends on the other files of its batch (kept only to score checkpoints trained that way)"
)


class KnnEdges:
    """``k`` nearest neighbours on each face's own layout (``per_sample``, the default), or,
    for checkpoints trained before issue 12 only, on the batch-mean layout (one graph per
    batch: a file's score then depends on its batch mates)."""

    def __init__(self, k: int = 8, per_sample: bool = True) -> None:
        if int(k) < 1:
            raise ValueError(f"detector.edges.k must be >= 1, got {k}")
        self.k, self.per_sample = int(k), bool(per_sample)
        if not self.per_sample:
            log.warning(BATCH_MEAN_WARNING)

    def __call__(self, positions: Tensor) -> Tensor:
        """positions (B, N, 2) -> normalised adjacency (B, N, N) (or (N, N) on the batch mean)."""
        layout = positions if self.per_sample else positions.mean(0)
        return normalized_adjacency(knn_adjacency(layout, self.k))


class DelaunayEdges:
    """Delaunay triangulation of each face's layout (``per_sample``, the default; false: of
    the batch-mean layout, as before issue 12). MediaPipe's own mesh triangles are not
    shipped with this project, so the triangulation is recomputed from the nodes."""

    def __init__(self, per_sample: bool = True) -> None:
        self.per_sample = bool(per_sample)
        if not self.per_sample:
            log.warning(BATCH_MEAN_WARNING)

    def __call__(self, positions: Tensor) -> Tensor:
        if not self.per_sample:
            return normalized_adjacency(delaunay_adjacency(positions.mean(0)))
        return normalized_adjacency(torch.stack([delaunay_adjacency(p) for p in positions]))


class ResidualGraphBlock(nn.Module):
    """h + Dropout(GELU(A · LayerNorm(h) · W)): a pre-norm graph convolution with an
    identity skip, so gradients reach the first block and the backbone undiminished."""

    def __init__(self, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, adjacency: Tensor) -> Tensor:
        return h + self.dropout(self.act(torch.matmul(adjacency, self.linear(self.norm(h)))))


def splat_node_scores(positions: Tensor, scores: Tensor, size: tuple[int, int], sigma: Tensor, stride: int = 1) -> Tensor:
    """Per-node scores in [0, 1] drawn as Gaussians at their positions: positions (B, N, 2)
    in image pixels (x, y), scores (B, N), sigma (B,) in image pixels; returns a map
    (B, 1, ceil(H / stride), ceil(W / stride)) in [0, 1], the max over nodes at each cell
    (so one suspicious node stands out and the map keeps the scores' absolute level)."""
    height, width = (int(np.ceil(s / stride)) for s in size)
    ys = (torch.arange(height, device=positions.device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=positions.device, dtype=torch.float32) + 0.5) * stride
    px, py = positions[..., 0].float(), positions[..., 1].float()
    s2 = (2.0 * sigma.float().clamp_min(1e-3) ** 2).view(-1, 1, 1, 1)
    gy = torch.exp(-((ys.view(1, 1, -1, 1) - py[..., None, None]) ** 2) / s2)  # (B, N, h, 1)
    gx = torch.exp(-((xs.view(1, 1, 1, -1) - px[..., None, None]) ** 2) / s2)  # (B, N, 1, w)
    heat = (scores.float()[..., None, None] * gy * gx).amax(dim=1, keepdim=True)
    return heat.clamp_(0.0, 1.0)
