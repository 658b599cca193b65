"""Method fidelity (issue 12, items 1, 2, 4, 5): what each published method does, held by a test.

1. rgnet: a file's score does not depend on its batch mates (the graph is built per face),
   and a horizontal flip swaps the landmarks' left/right indices with FaceMesh's mirror table.
2. Self-blends (SBI): the ground truth is a binary, never empty region; the blend ratio,
   the source-or-target transform and the mask deformation follow Shiohara & Yamasaki;
   the localisation headline counts forged images only.
4. NPR: the up-sampling statistic reaches training and evaluation alike (canonical=npr),
   and experiment=npr_paper is the paper's recipe.
5. LGrad: the stand-in source's default output is a trained direction, and a custom source
   must declare its normalisation.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose

SHARED = Path(__file__).resolve().parents[2] / "shared"


# ---------------------------------------------------------------------------------------
# 1. rgnet: per-sample graph, mirror-aware flips
# ---------------------------------------------------------------------------------------
def _rgnet_from_config():
    from hydra.utils import instantiate

    cfg = compose("train", ["detector=rgnet", "detector.pretrained=none", "detector.width=32", "detector.depth=2",
                            "paths.output_dir=/tmp/unused"])
    torch.manual_seed(0)
    return instantiate(cfg.detector).eval()


def _face_layouts(n: int, size: int = 64) -> torch.Tensor:
    """(n, 468, 2) landmark layouts that differ in position, scale and pose."""
    g = torch.Generator().manual_seed(7)
    base = torch.rand(468, 2, generator=g)
    out = []
    for i in range(n):
        scale = 0.45 + 0.3 * torch.rand(1, generator=g)
        shift = torch.rand(2, generator=g) * (1 - scale)
        pts = base * scale + shift
        if i % 2:  # every other face mirrored (its layout is not the batch mean's)
            pts[:, 0] = 1 - pts[:, 0]
        out.append(pts * size)
    return torch.stack(out)


def test_rgnet_score_of_a_file_does_not_depend_on_its_batch():
    det = _rgnet_from_config()
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    landmarks = _face_layouts(5)
    with torch.no_grad():
        alone = det(images[:1], {"landmarks": landmarks[:1]}).logit
        first = det(images[[0, 1, 2]], {"landmarks": landmarks[[0, 1, 2]]}).logit[0]
        other = det(images[[3, 0, 4, 1]], {"landmarks": landmarks[[3, 0, 4, 1]]}).logit[1]
    assert torch.allclose(alone[0], first, atol=1e-5, rtol=0), (alone[0].item(), first.item())
    assert torch.allclose(alone[0], other, atol=1e-5, rtol=0), (alone[0].item(), other.item())


def test_rgnet_delaunay_graph_is_per_sample_too():
    from detectors.graph import DelaunayEdges

    pos = _face_layouts(3)[:, :30] / 64
    together = DelaunayEdges()(pos)
    assert together.shape == (3, 30, 30)
    assert torch.equal(together[1], DelaunayEdges()(pos[1:2])[0])


def test_mesh_mirror_table_is_an_involution_with_the_known_pairs():
    from data.faces.facemesh import LEFT_EYE, MESH_MIDLINE, MESH_MIRROR, MOUTH_LEFT, MOUTH_RIGHT, NUM_LANDMARKS, RIGHT_EYE

    mirror = np.asarray(MESH_MIRROR)
    assert sorted(mirror.tolist()) == list(range(NUM_LANDMARKS))  # a permutation
    assert np.array_equal(mirror[mirror], np.arange(NUM_LANDMARKS))  # an involution
    assert sorted(np.flatnonzero(mirror == np.arange(NUM_LANDMARKS)).tolist()) == sorted(MESH_MIDLINE)
    for right, left in zip(RIGHT_EYE, LEFT_EYE):  # the eye contours are listed pair by pair
        assert mirror[right] == left
    assert mirror[MOUTH_RIGHT] == MOUTH_LEFT and mirror[4] == 4 and mirror[152] == 152  # nose tip, chin
    assert mirror[127] == 356 and mirror[234] == 454 and mirror[70] == 300  # jaw ends, brow ends


def _flip_batch(mirror):
    import albumentations as A

    from data.augment import SampleAugment

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    landmarks = rng.uniform(2, 38, (468, 2)).astype(np.float32)
    flip = SampleAugment(pixels=A.Compose([A.HorizontalFlip(p=1.0)]))
    out, _, moved = flip.apply_pixels(image, None, landmarks, mirror=mirror)
    return image, landmarks, out, moved


def test_a_flip_moves_landmarks_and_swaps_their_indices():
    from data.faces.facemesh import MESH_MIRROR

    image, landmarks, out, moved = _flip_batch(MESH_MIRROR)
    assert np.array_equal(out, image[:, ::-1])
    expected = landmarks.copy()
    expected[:, 0] = image.shape[1] - expected[:, 0]  # continuous coordinates: x -> W - x
    expected = expected[list(MESH_MIRROR)]  # then the subject's left is the right
    np.testing.assert_allclose(moved, expected, atol=1e-4)
    # without a mirror table (the template layout) only the positions move
    _, _, _, plain = _flip_batch(None)
    np.testing.assert_allclose(plain[:, 0], image.shape[1] - landmarks[:, 0], atol=1e-4)


def test_a_flipped_training_sample_carries_mirror_permuted_landmarks(tmp_path):
    """Through the data set: the sample's landmarks after augment=light's flip (forced to
    p=1) equal the unflipped sample's, x mirrored, indices permuted."""
    import albumentations as A

    from data.canonical import Canonicalizer
    from data.dataset import ImageDataset
    from data.faces.facemesh import MESH_MIRROR
    from data.faces.pipeline import FacePipeline
    from data.faces.types import TemplateFaceAnalyzer
    from data.records import Record

    class MeshLike(TemplateFaceAnalyzer):  # 468 points that claim FaceMesh's anatomy
        mirror_indices = MESH_MIRROR

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    records = [Record(str(tmp_path / "a.png"), label=0, split="train")]
    canonical = Canonicalizer(size=32, reencode=False, scale_jitter=0.0)
    faces = FacePipeline(MeshLike(), crop=False, whole_image=False, train_whole_image_p=0.0)
    plain = ImageDataset(records, canonical, augment=None, train=True, faces=faces)[0]["landmarks"].numpy()
    flipped = ImageDataset(records, canonical, augment=A.Compose([A.HorizontalFlip(p=1.0)]), train=True, faces=faces)[0]["landmarks"].numpy()
    expected = plain.copy()
    expected[:, 0] = 32 - expected[:, 0]
    np.testing.assert_allclose(flipped, expected[list(MESH_MIRROR)], atol=1e-4)


def test_the_face_analysers_declare_their_mirror_tables():
    from data.faces.analyzers import MeshFaceAnalyzer, MtcnnFaceAnalyzer
    from data.faces.facemesh import MESH_MIRROR
    from data.faces.types import TemplateFaceAnalyzer

    assert tuple(MeshFaceAnalyzer.mirror_indices) == tuple(MESH_MIRROR)
    assert tuple(MtcnnFaceAnalyzer.mirror_indices) == (1, 0, 2, 4, 3)
    assert TemplateFaceAnalyzer.mirror_indices is None


@pytest.mark.skipif(not (SHARED / "weights" / "facemesh_pytorch_468.pth").is_file(), reason="shared FaceMesh weights absent")
def test_mirror_table_agrees_with_facemesh_on_mirrored_faces():
    """FaceMesh run on a face crop and on its exact mirror image: the mirrored crop's
    landmark i, mirrored back, lands on the original's landmark MESH_MIRROR[i]."""
    skimage_data = pytest.importorskip("skimage.data")
    from data.faces.analyzers import MeshFaceAnalyzer, roi_affine, warp_crop
    from data.faces.facemesh import INPUT_SIZE, MESH_MIRROR

    w = SHARED / "weights"
    analyzer = MeshFaceAnalyzer(w / "blazeface_pytorch_front128.pth", w / "blazeface_anchors_front128.npy", w / "facemesh_pytorch_468.pth")
    image = skimage_data.astronaut()
    boxes, keypoints, _ = analyzer.detector.detect(image)
    crop = warp_crop(image, roi_affine(boxes[0], keypoints[0][0], keypoints[0][1], 1.5, INPUT_SIZE), INPUT_SIZE)
    x = torch.from_numpy(np.stack([crop, crop[:, ::-1].copy()])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        points, _ = analyzer.mesh(x)
    a, b = points[0, :, :2].numpy(), points[1, :, :2].numpy().copy()
    b[:, 0] = INPUT_SIZE - b[:, 0]
    spread = np.sqrt(((a - a.mean(0)) ** 2).sum(1).mean())
    err_mirror = np.linalg.norm(b - a[list(MESH_MIRROR)], axis=1).mean() / spread
    err_identity = np.linalg.norm(b - a, axis=1).mean() / spread
    assert err_mirror < 0.06 and err_identity > 10 * err_mirror, (err_mirror, err_identity)


# ---------------------------------------------------------------------------------------
# 2. Self-blends: binary, never-empty ground truth; the paper's recipe; forged-only headline
# ---------------------------------------------------------------------------------------
def _texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 2, yy * 3, (xx + yy) * 1.5], axis=-1).astype(np.float64) + 30
    return np.clip(base + rng.normal(0, 14, base.shape), 0, 255).astype(np.uint8)


def _ring(size: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 30, endpoint=False)
    return np.stack([size / 2 + 16 * np.cos(t), size / 2 + 20 * np.sin(t)], axis=1).astype(np.float32)


def _sbi_from_config(**overrides):
    from hydra.utils import instantiate

    cfg = compose("train", ["augment=sbi", "paths.output_dir=/tmp/unused"])
    return instantiate(cfg.augment.forgery, **overrides)


def test_sbi_masks_are_binary_and_never_empty_over_200_seeded_blends():
    blend = _sbi_from_config(p=1.0)
    forged = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        image = _texture(rng)
        out, label, mask, generator = blend(image, 0, _ring() if seed % 2 else None, rng)
        if label == 0:  # left alone: the untouched real and an all-zero mask
            assert np.array_equal(out, image) and not mask.any()
            continue
        forged += 1
        assert generator == "self_blend"
        assert set(np.unique(mask).tolist()) <= {0.0, 1.0}, f"seed {seed}: soft mask"
        assert mask.mean() >= blend.min_mask_area, f"seed {seed}: empty or tiny mask"
        assert (out != image).any(axis=2)[mask > 0].any(), f"seed {seed}: nothing blended inside the mask"
    assert forged >= 190


def test_sbi_follows_the_papers_ratio_set_and_source_or_target_transform():
    blend = _sbi_from_config()
    assert list(blend.blend_ratios) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # SBI's dynamic_blend
    assert blend.transform_target_p == 0.5
    image = _texture(np.random.default_rng(0))
    # transforms on the source: outside the blended region the image is untouched
    out, label, mask, _ = _sbi_from_config(p=1.0, transform_target_p=0.0)(image, 0, _ring(), np.random.default_rng(1))
    assert label == 1 and np.array_equal(out[mask == 0], image[mask == 0])
    # transforms on the target: the background carries them too
    out, label, mask, _ = _sbi_from_config(p=1.0, transform_target_p=1.0)(image, 0, _ring(), np.random.default_rng(1))
    assert label == 1 and (out[mask == 0] != image[mask == 0]).any()


def test_sbi_deforms_the_region_as_the_papers_blend_mask():
    """SBI's get_blend_mask and random affine: the region is resized to a random 192-256 working
    size per side, wobbled elastically (alpha 50, sigma 7), eroded (a blur with an odd 5-25
    kernel kept where it peaks) and given a soft edge (odd 5-25 kernel, sigma 5-45). So the
    ground truth departs from the landmark hull, differently per forgery, and the blend weight
    has a soft edge; with every deformation off it is the hull itself."""
    import cv2

    exact = {"p": 1.0, "hull_morph": 0.0, "scale_jitter": 0.0, "translate_jitter": 0.0, "transform_target_p": 0.0,
             "blend_ratios": [1.0]}
    blend = _sbi_from_config(**exact)
    assert tuple(blend.mask_work_size) == (192, 256) and (blend.elastic_alpha, blend.elastic_sigma) == (50.0, 7.0)
    assert tuple(blend.mask_erode_kernel) == (5, 25) and tuple(blend.mask_edge_kernel) == (5, 25)
    assert tuple(blend.mask_edge_sigma) == (5.0, 45.0)
    hull = np.zeros((64, 64), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.round(_ring()).astype(np.int32)), 1)
    image = _texture(np.random.default_rng(0))
    truths, ious = [], []
    for seed in range(8):
        _, label, mask, _ = blend(image, 0, _ring(), np.random.default_rng(seed))
        assert label == 1
        truth = mask > 0
        truths.append(truth)
        ious.append((truth & (hull > 0)).sum() / (truth | (hull > 0)).sum())
        soft = blend._soft_region(hull.astype(np.float32), np.random.default_rng(seed))
        assert soft.max() == 1.0 and ((soft > 0) & (soft < 1)).mean() > 0.02, f"seed {seed}: no soft edge"
    assert min(ious) < 0.9 and np.mean(ious) < 0.95, ious  # deformed ...
    assert all(not np.array_equal(truths[0], t) for t in truths[1:])  # ... differently per forgery
    off = _sbi_from_config(**exact, mask_work_size=None, elastic_alpha=0.0, mask_erode_kernel=[0, 0], mask_edge_kernel=[0, 0])
    _, _, mask, _ = off(image, 0, _ring(), np.random.default_rng(0))
    assert np.array_equal(mask > 0, hull > 0)


def test_localisation_headline_counts_forged_images_only():
    import pandas as pd

    from unmask.evaluation.localization import mask_scores, summarise

    gt = np.zeros((2, 8, 8))
    gt[0, :4, :4] = 1.0  # a forged image ...
    pred = np.zeros((2, 8, 8))  # ... the model marks nothing, on it or on the real
    rows = pd.DataFrame({"label": [1, 0], "generator": ["self_blend", "real"], **mask_scores(pred, gt)})
    summary = summarise(rows, auc=float("nan"), threshold=0.5, mask_from="mask")
    assert summary["n"] == 1 and summary["f1"] == 0.0 and summary["iou"] == 0.0 and summary["score"] == 0.0
    assert summary["reals"]["n"] == 1 and summary["reals"]["clean_rate"] == 1.0


# ---------------------------------------------------------------------------------------
# 4. NPR: one canonical policy for training and evaluation; experiment=npr_paper
# ---------------------------------------------------------------------------------------
def _npr_per_image(images: list[np.ndarray]) -> np.ndarray:
    """Each image's mean |x - up(down(x))| after ImageNet normalisation (NPR's input), as detectors/npr.py computes it."""
    from detectors.base import IMAGENET_MEAN, IMAGENET_STD
    from detectors.npr import npr_residual

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return npr_residual(x).abs().mean((1, 2, 3)).numpy()


def _photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour content with fine texture (what an up-sampler would copy)."""
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)


def npr_pipeline_statistics(overrides: list[str], n: int = 32, seed: int = 0) -> dict:
    """The NPR statistic of n 2x-nearest-up-sampled images and n plain images, through the
    configured data pipeline in training (canonical + augment) and in evaluation: the mean
    (``<kind>_<stage>``, a float) and each image's (``<kind>_<stage>_each``, in image order)."""
    import random

    from hydra.utils import instantiate

    cfg = compose("train", overrides + ["paths.output_dir=/tmp/unused"])
    canonical = instantiate(cfg.data.canonical)
    augment = instantiate(cfg.augment)
    resize_to = int(getattr(canonical, "resize_size", None) or canonical.size)
    rng = np.random.default_rng(seed)
    random.seed(seed)
    stats = {}
    for kind in ("upsampled", "plain"):
        train, evaluation = [], []
        for _ in range(n):
            if kind == "upsampled":
                small = _photo_like(rng, resize_to // 2)
                image = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # nearest x2: each 2x2 block one pixel
            else:
                image = _photo_like(rng, resize_to)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            decoded = np.asarray(Image.open(buf).convert("RGB"))
            resized = canonical.resize_stage(decoded)
            arr = canonical.finish(resized, train=True)
            arr = augment(image=arr)["image"] if augment is not None else arr
            train.append(canonical.encode(arr, train=True))
            evaluation.append(canonical.encode(canonical.finish(resized, train=False), train=False))
        for stage, images in (("train", train), ("eval", evaluation)):
            each = _npr_per_image(images)
            stats[f"{kind}_{stage}"], stats[f"{kind}_{stage}_each"] = float(each.mean()), each
    return stats


def test_npr_statistic_is_the_same_in_training_and_evaluation():
    s = npr_pipeline_statistics(["experiment=npr_paper"])
    assert abs(s["upsampled_train"] - s["upsampled_eval"]) <= 0.10 * s["upsampled_eval"], s
    # and the statistic still tells up-sampled images from plain ones in both pipelines
    assert s["plain_train"] > 2 * s["upsampled_train"] and s["plain_eval"] > 2 * s["upsampled_eval"], s
    # the distribution, not only the mean: each image's statistic is the same in both pipelines
    # (the default canonicalisation: 2-28 % higher in training), and the up-sampled and plain
    # images' ranges do not overlap in either
    ratio = s["upsampled_train_each"] / s["upsampled_eval_each"]
    assert np.all(np.abs(ratio - 1) <= 0.05), ratio
    for stage in ("train", "eval"):
        assert s[f"upsampled_{stage}_each"].max() < s[f"plain_{stage}_each"].min(), stage


def test_npr_paper_experiment_is_the_papers_recipe():
    cfg = compose("train", ["experiment=npr_paper", "paths.output_dir=/tmp/unused"])
    assert cfg.detector._target_ == "detectors.npr.NPR" and cfg.detector.mean is None  # ImageNet mean/std
    assert cfg.data.image_size == 224 and cfg.canonical.resize_size == 256 and cfg.canonical.crop_align == 2
    assert cfg.canonical.scale_jitter == 0.0 and list(cfg.canonical.train_jpeg_quality) == [cfg.canonical.eval_jpeg_quality] * 2
    assert [t._target_ for t in cfg.augment.transforms] == ["albumentations.HorizontalFlip"]
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 2e-4
    assert cfg.data.batch_size == 32
    assert cfg.scheduler._target_.endswith("StepLR") and cfg.scheduler.step_size == 10 and cfg.scheduler.gamma == 0.9
    assert float(cfg.scoring.threshold) == 0.5


# ---------------------------------------------------------------------------------------
# 5. LGrad: a trained gradient direction by default; custom sources declare normalisation
# ---------------------------------------------------------------------------------------
def test_lgrad_default_output_is_not_the_untrained_sum():
    import inspect

    from detectors.lgrad import LGrad

    cfg = compose("train", ["detector=lgrad", "paths.output_dir=/tmp/unused"])
    assert cfg.detector.source_output != "sum"
    assert inspect.signature(LGrad).parameters["source_output"].default == cfg.detector.source_output


def test_lgrad_default_direction_gives_non_degenerate_gradients():
    """For the shipped MobileNetV2 the summed classifier rows are ~0.002 of the matrix norm:
    the 'sum' gradient is a direction cross-entropy never trained. The default's raw input
    gradients are more than 10x larger on the same images."""
    skimage_data = pytest.importorskip("skimage.data")
    import torch.nn.functional as F

    from detectors.input_gradients import input_gradients
    from detectors.lgrad import LGrad

    cfg = compose("train", ["detector=lgrad", "paths.output_dir=/tmp/unused"])
    det = LGrad(source="mobilenetv2_100", source_pretrained="imagenet", classifier="resnet18", pretrained="none",
                source_output=cfg.detector.source_output)
    w = det.source.classifier.weight
    assert w.sum(0).norm() < 0.01 * w.norm()  # the premise: the summed rows nearly cancel
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    x = torch.stack([F.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255, size=(96, 96), mode="bilinear",
                                   antialias=True)[0] for p in photos])
    x = det._source_input(x)
    trained = input_gradients(det.source, x, det.source_output).flatten(1).norm(dim=1)
    summed = input_gradients(det.source, x, "sum").flatten(1).norm(dim=1)
    assert (trained > 10 * summed).all(), (trained, summed)
    # the configurable alternative (detector.source_output=logsumexp, a smooth max) is a trained direction too
    smooth = input_gradients(det.source, x, "logsumexp").flatten(1).norm(dim=1)
    assert (smooth > 10 * summed).all(), (smooth, summed)


def test_lgrad_custom_source_without_normalisation_is_an_error():
    from torch import nn

    from detectors.lgrad import LGrad

    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"detector\.source_mean.*detector\.source_std"):
        LGrad(source=source, classifier="resnet18", pretrained="none")
    LGrad(source=source, classifier="resnet18", pretrained="none", source_mean=[0.5] * 3, source_std=[0.5] * 3)
