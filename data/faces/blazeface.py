"""BlazeFace, MediaPipe's front-camera face detector (128x128 input, 896 anchors).

The module mirrors the layer layout of the published PyTorch conversion so its state dict
loads with ``strict=True``; batch norm is folded into the conv weights, so there is none.
``BlazeFaceDetector`` wraps network + anchors: letterbox any image to 128, decode boxes
and 6 keypoints, weighted NMS as MediaPipe does, and map everything back to the original
image's pixels.

Keypoint order (the subject's left/right, so "right eye" is on the image's left in a
frontal photo): 0 right eye, 1 left eye, 2 nose tip, 3 mouth centre, 4 right ear tragion,
5 left ear tragion.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 128
NUM_ANCHORS = 896
NUM_COORDS = 16  # box (4) + 6 keypoints (12)
NUM_KEYPOINTS = 6
SCORE_CLIP = 100.0  # MediaPipe clips raw logits before the sigmoid


class BlazeBlock(nn.Module):
    """Residual depthwise-separable block of BlazeFace and FaceMesh.

    TFLite pads stride-2 convs asymmetrically (right/bottom), so the stride-2 branch pads
    by hand and the skip path max-pools; extra output channels are zero-padded on the skip.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, prelu: bool = False) -> None:
        super().__init__()
        self.stride = stride
        self.channel_pad = out_channels - in_channels
        padding = 0 if stride == 2 else 1
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride, padding, groups=in_channels, bias=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=True),
        )
        self.max_pool = nn.MaxPool2d(2, 2) if stride == 2 else None
        self.act = nn.PReLU(out_channels) if prelu else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_pool is not None:
            h = F.pad(x, (0, 2, 0, 2))
            x = self.max_pool(x)
        else:
            h = x
        if self.channel_pad > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.channel_pad))
        return self.act(self.convs(h) + x)


class BlazeFace(nn.Module):
    """The network: (B, 3, 128, 128) in [-1, 1] -> raw regressors (B, 896, 16) and logits (B, 896, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone1 = nn.Sequential(
            nn.Conv2d(3, 24, 5, 2, 0, bias=True),
            nn.ReLU(inplace=True),
            BlazeBlock(24, 24),
            BlazeBlock(24, 28),
            BlazeBlock(28, 32, stride=2),
            BlazeBlock(32, 36),
            BlazeBlock(36, 42),
            BlazeBlock(42, 48, stride=2),
            BlazeBlock(48, 56),
            BlazeBlock(56, 64),
            BlazeBlock(64, 72),
            BlazeBlock(72, 80),
            BlazeBlock(80, 88),
        )
        self.backbone2 = nn.Sequential(
            BlazeBlock(88, 96, stride=2),
            BlazeBlock(96, 96),
            BlazeBlock(96, 96),
            BlazeBlock(96, 96),
            BlazeBlock(96, 96),
        )
        self.classifier_8 = nn.Conv2d(88, 2, 1, bias=True)  # 16x16 grid, 2 anchors per cell
        self.classifier_16 = nn.Conv2d(96, 6, 1, bias=True)  # 8x8 grid, 6 anchors per cell
        self.regressor_8 = nn.Conv2d(88, 32, 1, bias=True)
        self.regressor_16 = nn.Conv2d(96, 96, 1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(x, (1, 2, 1, 2))  # TFLite "SAME" padding of the 5x5 stride-2 stem
        b = x.shape[0]
        x = self.backbone1(x)  # (b, 88, 16, 16)
        h = self.backbone2(x)  # (b, 96, 8, 8)

        def flat(t: torch.Tensor, last: int) -> torch.Tensor:
            # Anchors are ordered NHWC (TFLite), so channels go last before flattening.
            return t.permute(0, 2, 3, 1).reshape(b, -1, last)

        scores = torch.cat([flat(self.classifier_8(x), 1), flat(self.classifier_16(h), 1)], dim=1)
        boxes = torch.cat([flat(self.regressor_8(x), NUM_COORDS), flat(self.regressor_16(h), NUM_COORDS)], dim=1)
        return boxes, scores


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def decode(raw_boxes: torch.Tensor, raw_scores: torch.Tensor,
           anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw outputs -> (B, 896, 16) [x1, y1, x2, y2, kx0, ky0, ...] in [0, 1] of the 128 input,
    and (B, 896) sigmoid scores. Offsets are in input pixels relative to the anchor centre."""
    scale = float(INPUT_SIZE)
    centre, size = anchors[:, :2], anchors[:, 2:]
    xy = raw_boxes[..., :2] / scale * size + centre
    wh = raw_boxes[..., 2:4] / scale * size
    kps = raw_boxes[..., 4:].reshape(*raw_boxes.shape[:2], NUM_KEYPOINTS, 2) / scale * size[:, None] + centre[:, None]
    boxes = torch.cat([xy - wh / 2, xy + wh / 2, kps.flatten(2)], dim=-1)
    scores = raw_scores.squeeze(-1).clamp(-SCORE_CLIP, SCORE_CLIP).sigmoid()
    return boxes, scores


def box_iou(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of one x1y1x2y2 box against (N, 4) boxes."""
    lt = torch.maximum(box[:2], others[:, :2])
    rb = torch.minimum(box[2:4], others[:, 2:4])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = (box[2:4] - box[:2]).clamp(min=0).prod()
    areas = (others[:, 2:4] - others[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area + areas - inter).clamp(min=1e-12)


def weighted_nms(dets: torch.Tensor, scores: torch.Tensor, iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MediaPipe's blending NMS: each cluster (IoU > ``iou`` with its best box) becomes the
    score-weighted mean of its boxes and keypoints and keeps its best score (so a lower
    ``min_score`` adds members to a cluster but never lowers its score). Returns (K, 16),
    (K,) sorted by score, descending."""
    out_dets, out_scores = [], []
    remaining = torch.argsort(scores, descending=True)
    while remaining.numel():
        best = remaining[0]
        overlap = box_iou(dets[best, :4], dets[remaining, :4]) > iou
        members = remaining[overlap]
        remaining = remaining[~overlap]
        w = scores[members]
        out_dets.append((dets[members] * w[:, None]).sum(0) / w.sum())
        out_scores.append(scores[best])
    if not out_dets:
        return dets.new_zeros((0, NUM_COORDS)), scores.new_zeros((0,))
    return torch.stack(out_dets), torch.stack(out_scores)


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float, float, int, int]:
    """Resize (aspect kept) and pad with black to ``size`` x ``size``. Returns the square
    image and the mapping back: original = (square - (pad_x, pad_y)) / (scale_x, scale_y)."""
    h, w = rgb.shape[:2]
    r = size / max(h, w)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    # INTER_AREA anti-aliases the (usual) downscale; linear is right for tiny images.
    interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (nw, nh), interpolation=interp)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    square = np.zeros((size, size, 3), np.uint8)
    square[pad_y:pad_y + nh, pad_x:pad_x + nw] = resized
    return square, nw / w, nh / h, pad_x, pad_y


class BlazeFaceDetector:
    """BlazeFace on images of any size. ``detect`` returns (boxes (K, 4) x1y1x2y2,
    keypoints (K, 6, 2) x, y, scores (K,)), all in the original image's pixels, most
    confident first."""

    def __init__(self, weights: str | Path, anchors: str | Path, min_score: float = 0.75, iou: float = 0.3,
                 device: str = "cpu") -> None:
        self.net = BlazeFace()
        self.net.load_state_dict(load_state_dict(weights), strict=True)
        self.net.eval().to(device)
        a = np.load(Path(anchors))
        if a.shape != (NUM_ANCHORS, 4):
            raise ValueError(f"{anchors}: expected anchors of shape ({NUM_ANCHORS}, 4), got {a.shape}")
        self.anchors = torch.as_tensor(a, dtype=torch.float32, device=device)
        self.min_score, self.iou, self.device = float(min_score), float(iou), device

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        square, sx, sy, pad_x, pad_y = letterbox(rgb, INPUT_SIZE)
        x = torch.from_numpy(square).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        raw_boxes, raw_scores = self.net(x)
        dets, scores = decode(raw_boxes, raw_scores, self.anchors)
        keep = scores[0] >= self.min_score
        dets, scores = weighted_nms(dets[0][keep], scores[0][keep], self.iou)
        pts = dets.reshape(-1, NUM_COORDS // 2, 2).cpu().numpy() * INPUT_SIZE
        pts = (pts - np.array([pad_x, pad_y], np.float32)) / np.array([sx, sy], np.float32)
        boxes = pts[:, :2].reshape(-1, 4).astype(np.float32)
        return boxes, pts[:, 2:].astype(np.float32), scores.cpu().numpy().astype(np.float32)
