"""The residual graph network (detector=rgnet): node features are read at the landmarks,
the graph is symmetric and normalised, gradients reach the first block and the backbone,
the heatmap marks the suspicious node, and it trains through train.py with faces=template."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TRAIN_OVERRIDES, compose
from detectors.graph import DelaunayEdges, KnnEdges, delaunay_adjacency, knn_adjacency, splat_node_scores
from detectors.rgnet import MESH68, RGNet

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def tiny(**kwargs) -> RGNet:
    torch.manual_seed(0)
    defaults = dict(pretrained="none", width=32, depth=2, dropout=0.0)
    return RGNet(**{**defaults, **kwargs})


def mesh_landmarks(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(B, 468, 2) pixel landmarks inside the image; the mesh68 nodes on a jittered grid."""
    g = torch.Generator().manual_seed(seed)
    lm = torch.rand(batch, 468, 2, generator=g) * (size - 16) + 8
    grid = torch.stack(torch.meshgrid(torch.arange(9.0), torch.arange(8.0), indexing="xy"), -1).reshape(-1, 2)[:68]
    lm[:, list(MESH68)] = 6 + grid * (size - 12) / 8 + torch.rand(batch, 68, 2, generator=g)
    return lm


@pytest.fixture(scope="module")
def batch() -> dict:
    return {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "landmarks": mesh_landmarks()}


def test_forward_shapes_and_heatmap_range(batch):
    det = tiny().eval()
    with torch.no_grad():
        out = det(batch["image"], batch)
    assert out.logit.shape == (2,) and torch.isfinite(out.logit).all()
    assert out.heatmap.shape == (2, 1, 16, 16)  # heatmap_stride 4
    assert out.heatmap.min() >= 0 and out.heatmap.max() <= 1 and out.heatmap.max() > 0
    assert out.features.shape == (2, 64)  # mean + max readout of width 32


def test_mesh68_is_a_68_point_subset_of_the_mesh():
    assert len(MESH68) == 68 == len(set(MESH68)) and max(MESH68) < 468
    # anchors of the dlib layout: eye corners, mouth corners, chin, nose tip
    assert (MESH68[36], MESH68[45], MESH68[48], MESH68[54], MESH68[8], MESH68[30]) == (33, 263, 61, 291, 152, 4)


def test_heatmap_peaks_at_the_node_forced_suspicious(batch):
    det = tiny().eval()
    node = 40
    forced = torch.full((2, 68, 1), -30.0)
    forced[:, node] = 30.0
    handle = det.node_head.register_forward_hook(lambda module, inputs, output: forced)
    with torch.no_grad():
        heat = det(batch["image"], batch).heatmap
    handle.remove()
    for b in range(2):
        cell = int(heat[b, 0].argmax())
        y, x = (cell // heat.shape[-1] + 0.5) * 4, (cell % heat.shape[-1] + 0.5) * 4
        nx, ny = batch["landmarks"][b, MESH68[node]]
        assert math.hypot(x - nx, y - ny) <= 4.0
        assert heat[b].max() > 0.5  # absolute level kept (the map is sampled at 4 px cell centres)


def test_splat_is_max_of_gaussians_in_unit_range():
    pos = torch.tensor([[[10.0, 10.0], [30.0, 20.0]]])
    heat = splat_node_scores(pos, torch.tensor([[0.2, 0.9]]), (32, 40), torch.tensor([2.0]), stride=1)
    assert heat.shape == (1, 1, 32, 40)
    assert heat[0, 0, 20, 30] == pytest.approx(0.9 * math.exp(-0.25 / 4), rel=1e-4)  # pixel centre 30.5, 20.5
    assert heat[0, 0, 10, 10] == pytest.approx(0.2 * math.exp(-0.25 / 4), rel=1e-3)
    assert heat.max() <= 1 and heat.min() >= 0


def test_node_features_follow_the_landmarks(batch):
    det = tiny().eval()
    with torch.no_grad():
        before = det(batch["image"], batch).logit
        moved = {**batch, "landmarks": batch["landmarks"].flip(-1)}  # swap x and y
        after = det(batch["image"], moved).logit
    assert not torch.allclose(before, after)


def test_planted_patch_changes_the_node_under_it_most():
    # 8 nodes on a circle, one of them sits on a bright patch in sample 0 only. Levels of
    # stride 4 and 8: at 64 px a stride-16 cell already spans a quarter of the image.
    det = tiny(node_indices=list(range(8)), levels=[1, 2], radii=[0.0, 0.25]).eval()
    angles = torch.arange(8) * (2 * math.pi / 8)
    layout = torch.stack([32 + 22 * angles.cos(), 32 + 22 * angles.sin()], -1)
    landmarks = layout.expand(2, 8, 2).clone()
    clean = torch.full((2, 3, 64, 64), 0.5)
    patched = clean.clone()
    x, y = (int(v) for v in layout[3])
    patched[0, :, y - 3 : y + 3, x - 3 : x + 3] = 1.0
    with torch.no_grad():
        f_clean, _ = det.node_features(clean, landmarks)
        f_patched, _ = det.node_features(patched, landmarks)
    change = (f_patched - f_clean).norm(dim=-1)  # (B, N)
    assert int(change[0].argmax()) == 3
    assert change[0, 3] > 2 * change[0, [0, 1, 5, 6, 7]].max()  # the far side of the face barely moves
    assert change[1].max() == 0  # another sample's nodes never see it


def test_gradient_reaches_backbone_and_first_graph_block(batch):
    det = tiny(depth=4).train()
    out = det(batch["image"], batch)
    F.binary_cross_entropy_with_logits(out.logit, torch.tensor([0.0, 1.0])).backward()
    first_conv = next(p for p in det.backbone.parameters() if p.ndim == 4)
    for name, param in [("backbone", first_conv), ("block 0", det.blocks[0].linear.weight),
                        ("scale attention", det.scale_attention.key.weight), ("node head", det.node_head.weight)]:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # every parameter is used (DDP needs no find_unused_parameters)
    assert all(p.grad is not None for p in det.parameters() if p.requires_grad)


def test_runs_under_autocast(batch):
    det = tiny().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = det(batch["image"], batch)
    assert out.logit.dtype == torch.float32 and torch.isfinite(out.logit).all()
    assert out.heatmap.dtype == torch.float32


@pytest.mark.parametrize("bad_batch", [None, {}, {"landmarks": None}, {"image": 0}])
def test_missing_landmarks_say_which_faces_config(bad_batch, batch):
    det = tiny().eval()
    with pytest.raises(ValueError) as exc:
        det(batch["image"], bad_batch)
    assert "detector=rgnet needs landmarks" in str(exc.value)
    assert "faces=mesh" in str(exc.value) and "faces=template" in str(exc.value)


def test_bad_node_indices_fail_clearly(batch):
    with pytest.raises(ValueError, match="detector.node_indices"):
        tiny(node_indices="dlib68")
    with pytest.raises(ValueError, match="detector.node_indices"):
        tiny(node_indices=[0, -1])
    det = tiny(node_indices=[0, 1, 500]).eval()
    with pytest.raises(ValueError, match="detector.node_indices.*500.*468"):
        det(batch["image"], batch)
    five = {"landmarks": torch.rand(2, 5, 2) * 64}
    with pytest.raises(ValueError, match="detector.node_indices"):
        tiny()(batch["image"], five)  # mesh68 on mtcnn's 5 points
    with pytest.raises(ValueError, match="detector.levels"):
        tiny(levels=[1, 9])


def test_all_landmarks_as_nodes():
    det = tiny(node_indices="all", num_landmarks=5).eval()
    with torch.no_grad():
        out = det(torch.rand(2, 3, 32, 32), {"landmarks": torch.rand(2, 5, 2) * 32})
    assert out.logit.shape == (2,)


def _assert_normalised(adj: torch.Tensor) -> None:
    assert torch.allclose(adj, adj.transpose(-1, -2))
    assert (adj.diagonal(dim1=-2, dim2=-1) > 0).all()  # self-loops
    # D^-1/2 (A + I) D^-1/2 has spectral radius 1: propagation neither explodes nor vanishes
    assert torch.linalg.eigvalsh(adj).abs().max().item() == pytest.approx(1.0, abs=1e-4)


def test_knn_and_delaunay_adjacency_are_symmetric_and_normalised():
    pos = torch.rand(3, 20, 2, generator=torch.Generator().manual_seed(0))
    binary = knn_adjacency(pos[0], k=4)
    assert (binary.sum(-1) >= 4).all() and binary.diagonal().sum() == 0
    assert torch.equal(binary, binary.T)
    _assert_normalised(KnnEdges(k=4)(pos))
    per_sample = KnnEdges(k=4, per_sample=True)(pos)
    assert per_sample.shape == (3, 20, 20)
    _assert_normalised(per_sample)
    _assert_normalised(DelaunayEdges()(pos))
    # a square triangulates into its 4 sides and one diagonal
    square = delaunay_adjacency(torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.1]]))
    assert square.sum() == 2 * 5 and torch.equal(square, square.T)


def test_delaunay_edges_in_the_detector(batch):
    det = tiny(edges=DelaunayEdges()).eval()
    with torch.no_grad():
        assert det(batch["image"], batch).logit.shape == (2,)


@pytest.mark.skipif(not (CONFIG_DIR / "faces" / "template.yaml").is_file(), reason="configs/faces/template.yaml (the lead's data side) is missing")
def test_trains_through_train_py_with_template_faces(tmp_path, cache_dir):
    from unmask.core.checkpoint import load_detector
    from unmask.tasks.train import train

    cfg = compose(
        "train",
        TINY_TRAIN_OVERRIDES
        + ["detector=rgnet", "faces=template", "detector.width=16", "detector.depth=2",
           "test=true",  # evaluation scores the test split with the checkpoint's face stage
           f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"],
    )
    metrics = train(cfg)
    assert "val/auc" in metrics and "train/loss" in metrics and "test/auc" in metrics
    assert (tmp_path / "test" / "metrics.json").is_file()
    loaded = load_detector(tmp_path / "checkpoints" / "best.ckpt")
    assert isinstance(loaded.detector, RGNet) and loaded.faces is not None
    with torch.no_grad():
        out = loaded.detector(torch.rand(1, 3, 32, 32), {"landmarks": torch.rand(1, 468, 2) * 32})
    assert out.heatmap.shape == (1, 1, 8, 8)
