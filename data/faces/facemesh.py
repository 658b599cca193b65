"""MediaPipe FaceMesh: 468 3-D landmarks from a 192x192 face crop.

Layer layout mirrors the published PyTorch conversion so its state dict loads with
``strict=True``. Input (B, 3, 192, 192) RGB in [-1, 1]; output landmarks (B, 468, 3) with
x, y in crop pixels (0..192) and z in the same units (relative depth, smaller = nearer),
and a face-presence confidence (B,) in [0, 1].

Useful indices (subject's left/right; verified on skimage's astronaut, see
tests/test_face_models.py): 4 nose tip (its highlight), 1 just below it (lower edge of
the tip), 61 / 291 mouth corners (image left / right), 33 / 133 right-eye outer / inner
corner, 159 / 145 its upper / lower lid, 362 / 263 left-eye inner / outer corner,
386 / 374 its upper / lower lid, 152 chin, 10 forehead top.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.faces.blazeface import BlazeBlock

INPUT_SIZE = 192
NUM_LANDMARKS = 468

# Eye contours (upper + lower lid), used to place eye centres for alignment and tests.
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
NOSE_TIP = 4
MOUTH_RIGHT, MOUTH_LEFT = 61, 291  # subject's right corner (image left), subject's left

# The mesh's left/right symmetry: landmark i of a mirrored face is landmark MESH_MIRROR[i] of
# the face (a permutation and an involution). Derived from the network itself, once: FaceMesh
# run on 396 faces-dev real face crops (MediaPipe's ROI, 192 px) and on their exact mirror
# images; the mirrored run's points mirrored back (x -> 192 - x); the (x, y, z) distance
# between point i of one and point j of the other, in units of the face's landmark spread,
# averaged over the faces; the symmetrised matrix solved as an assignment (Hungarian,
# scipy.optimize.linear_sum_assignment). The result is an involution with 28 fixed points
# (the midline below), and it has a closed form: the i-th non-midline index below 248 pairs
# with 248 + i (mean matched distance 0.035 spreads; the identity's is 1.12). It agrees with
# every pair the canonical face model is known for (eye contours RIGHT_EYE/LEFT_EYE pairwise,
# mouth corners 61/291, jaw ends 127/356 and 234/454, brow ends 70/300).
# tests/test_fidelity_a.py checks it on FaceMesh's output for a mirrored face.
MESH_MIDLINE = (0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 94, 151, 152, 164, 168, 175, 195, 197, 199, 200)


def _mirror_table() -> tuple[int, ...]:
    first_half = [i for i in range(248) if i not in MESH_MIDLINE]  # 220 points on one side
    table = list(range(NUM_LANDMARKS))
    for i, partner in zip(first_half, range(248, NUM_LANDMARKS), strict=True):
        table[i], table[partner] = partner, i
    return tuple(table)


MESH_MIRROR: tuple[int, ...] = _mirror_table()


def _block(cin: int, cout: int, stride: int = 1) -> BlazeBlock:
    return BlazeBlock(cin, cout, stride=stride, prelu=True)


class FaceMesh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 0, bias=True),
            nn.PReLU(16),
            _block(16, 16), _block(16, 16),
            _block(16, 32, 2), _block(32, 32), _block(32, 32),
            _block(32, 64, 2), _block(64, 64), _block(64, 64),
            _block(64, 128, 2), _block(128, 128), _block(128, 128),
            _block(128, 128, 2), _block(128, 128), _block(128, 128),
        )
        self.coord_head = nn.Sequential(
            _block(128, 128, 2), _block(128, 128), _block(128, 128),
            nn.Conv2d(128, 32, 1),
            nn.PReLU(32),
            _block(32, 32),
            nn.Conv2d(32, NUM_LANDMARKS * 3, 3),
        )
        self.conf_head = nn.Sequential(
            _block(128, 128, 2),
            nn.Conv2d(128, 32, 1),
            nn.PReLU(32),
            _block(32, 32),
            nn.Conv2d(32, 1, 3),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The stem's padding as the reference conversion does it (one reflected row/column
        # on top/left), which its authors matched against the TFLite graph.
        x = F.pad(x, (1, 0, 1, 0), mode="reflect")
        b = x.shape[0]
        feats = self.backbone(x)  # (b, 128, 6, 6)
        landmarks = self.coord_head(feats).reshape(b, NUM_LANDMARKS, 3)
        presence = self.conf_head(feats).reshape(b).sigmoid()
        return landmarks, presence
