"""The face stage of the data pipeline: cache, crops, landmarks through augmentation, masks,
several faces per image and the whole-image fallback. Analysers here are test doubles with
known faces, so every expected position is exact; the real networks are in test_face_models."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data.augment import SampleAugment
from data.canonical import Canonicalizer
from data.dataset import WHOLE_IMAGE, ImageDataset, ViewsDataset, collate_views
from data.faces.crop import apply_affine, crop_face
from data.faces.pipeline import FacePipeline
from data.faces.types import Face, FaceAnalyzer
from data.records import ManifestSource, Record
from unmask.core.schemas import ScoringConfig
from unmask.scoring.combine import combine_views
from unmask.scoring.scorer import Scorer

SIZE = 64


class DotAnalyzer(FaceAnalyzer):
    """Faces are wherever the test painted them: one per (box, dots) given, landmarks = dots."""

    name = "dots"

    def __init__(self, faces: list[tuple[list[float], list[tuple[float, float]]]], num_landmarks: int = 3) -> None:
        self.fixed = faces
        self.num_landmarks = num_landmarks
        self.calls = 0

    def settings(self) -> dict:
        return {"faces": repr(self.fixed)}

    def detect(self, rgb):
        self.calls += 1
        return [Face(np.array(box, np.float32), 0.9 - 0.1 * i, np.array(dots, np.float32)) for i, (box, dots) in enumerate(self.fixed)]


DOTS = [(40.5, 50.5), (80.5, 60.5), (60.5, 100.5)]  # pixel centres (continuous coordinates)
BOX = [30.0, 40.0, 100.0, 110.0]


def dotted_image(path: Path, size=(160, 128)) -> Path:
    """A dark image with a bright 3x3 dot centred on each of ``DOTS``."""
    arr = np.full((size[1], size[0], 3), 30, np.uint8)
    for x, y in DOTS:
        arr[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = 255
    Image.fromarray(arr).save(path)
    return path


def pipeline(analyzer, tmp_path: Path | None = None, **kw) -> FacePipeline:
    return FacePipeline(analyzer, cache_dir=str(tmp_path / "faces") if tmp_path else None, **kw)


def brightness_at(image, xy) -> float:
    """Image (3xHxW tensor) brightness at a continuous-coordinate point (nearest pixel)."""
    x, y = int(math.floor(xy[0])), int(math.floor(xy[1]))
    h, w = image.shape[1:]
    if not (0 <= x < w and 0 <= y < h):
        return float("nan")
    return float(image[:, y, x].mean())


def brightness_near(image, xy) -> float:
    """The brightest pixel within one pixel of ``xy``: a rotation spreads a 1-2 px dot over
    its neighbours (sub-pixel), while a misplaced landmark is many pixels off its dot."""
    x, y = int(math.floor(xy[0])), int(math.floor(xy[1]))
    h, w = image.shape[1:]
    if not (0 <= x < w and 0 <= y < h):
        return float("nan")
    return float(image[:, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].mean(0).max())


def test_cache_detects_once_and_keys_by_content(tmp_path):
    img = dotted_image(tmp_path / "a.png")
    first = DotAnalyzer([(BOX, DOTS)])
    p = pipeline(first, tmp_path)
    stats = p.prepare([str(img)], progress=False)
    assert stats == {"images": 1, "with_face": 1, "no_face": 0, "undecodable": 0, "cached": 0}
    assert first.calls == 1 and list((tmp_path / "faces").glob("faces-dots-*.json.gz"))

    again = DotAnalyzer([(BOX, DOTS)])  # a new process: same analyser settings, cache from disk
    copy = tmp_path / "renamed.png"
    shutil.copy(img, copy)
    stats = pipeline(again, tmp_path).prepare([str(img), str(copy)], progress=False)
    assert again.calls == 0 and stats["cached"] == 2  # a renamed copy is the same content: a hit
    faces = pipeline(again, tmp_path).faces(str(copy))
    np.testing.assert_allclose(faces[0].landmarks, np.array(DOTS, np.float32), atol=0.01)

    other = DotAnalyzer([(BOX, DOTS[:2] + [(1.0, 1.0)])])  # other settings: another cache key
    pipeline(other, tmp_path).prepare([str(img)], progress=False)
    assert other.calls == 1 and other.key != first.key


def test_prepare_counts_undecodable_and_faceless(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    empty = DotAnalyzer([])
    good = dotted_image(tmp_path / "a.png")
    stats = pipeline(empty, tmp_path).prepare([str(bad), str(good), str(tmp_path / "missing.png")], progress=False)
    assert stats["undecodable"] == 2 and stats["no_face"] == 1


def test_crop_maps_landmarks_and_aligns_eyes(tmp_path):
    rgb = np.asarray(Image.open(dotted_image(tmp_path / "a.png")))
    face = Face(np.array(BOX, np.float32), 1.0, np.array(DOTS, np.float32))
    crop, affine = crop_face(rgb, face, margin=0.25)
    assert crop.shape[:2] == (105, 105)  # 70 * (1 + 2 * 0.25)
    for xy in apply_affine(face.landmarks, affine):
        assert crop[int(xy[1]), int(xy[0])].mean() == 255
    # align: the two "eyes" (dots 0 and 1, 11 degrees apart) come out level
    crop, affine = crop_face(rgb, face, margin=0.25, align=True, eye_indices=([0], [1]))
    eyes = apply_affine(face.landmarks[:2], affine)
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1e-3
    for xy in apply_affine(face.landmarks, affine):
        assert crop[int(xy[1]), int(xy[0])].mean() > 150  # bilinear rotation blurs the dot a little


@pytest.mark.parametrize("crop", [True, False])
def test_landmarks_follow_crop_resize_flip_and_rotation(tmp_path, crop):
    import random

    # Seeded: the five random rescales and crops are the same every run (unseeded, a dot cut
    # by the crop edge or a point rotated into the black fill made this test fail now and then).
    random.seed(0)
    img = dotted_image(tmp_path / "a.png")
    faces = pipeline(DotAnalyzer([(BOX, DOTS)]), crop=crop, train_whole_image_p=0.0)
    pixels = A.Compose([A.HorizontalFlip(p=1.0), A.Rotate(limit=(25, 25), p=1.0)])
    canon = Canonicalizer(size=SIZE, reencode=False, scale_jitter=0.15)
    ds = ImageDataset([Record(str(img), 0)], canon, augment=SampleAugment(pixels=pixels), train=True, faces=faces)
    for _ in range(5):  # random rescale and crop positions
        sample = ds[0]
        assert sample["landmarks"].shape == (3, 2) and sample["meta"]["face_found"]
        points = sample["landmarks"].numpy()
        lit = [brightness_near(sample["image"], xy) for xy in points]
        at = [brightness_at(sample["image"], xy) for xy in points]
        # Every visible landmark sits on its dot. The one exception is exact: a dot the random
        # crop cut away lies outside the frame, and the rotation can carry that point into a
        # corner it fills with black (0.0; the background is 0.12, a misplaced landmark reads that).
        assert all(v > 0.45 or a == 0.0 for v, a in zip(lit, at) if not math.isnan(v)), (lit, at)
        assert sum(v > 0.45 for v in lit) >= 2
    # a flip alone moves the first dot (left of the third) to the right of it
    flip = ImageDataset([Record(str(img), 0)], canon, augment=SampleAugment(pixels=A.Compose([A.HorizontalFlip(p=1.0)])), train=True, faces=faces)
    sample = flip[0]
    assert sample["landmarks"][0, 0] > sample["landmarks"][2, 0]
    assert all(brightness_at(sample["image"], xy) > 0.45 for xy in sample["landmarks"].numpy())


def test_no_face_gives_template_landmarks_and_whole_image(tmp_path):
    img = dotted_image(tmp_path / "a.png")
    ds = ImageDataset([Record(str(img), 1)], Canonicalizer(size=SIZE), faces=pipeline(DotAnalyzer([], num_landmarks=3)))
    sample = ds[0]
    assert not sample["meta"]["face_found"] and sample["meta"]["face_index"] == WHOLE_IMAGE
    assert sample["landmarks"].shape == (3, 2)
    assert (sample["landmarks"] >= 0).all() and (sample["landmarks"] <= SIZE).all()


def test_several_faces_expand_and_combine(tmp_path):
    two = dotted_image(tmp_path / "two.png")
    other = tmp_path / "sub"
    other.mkdir()
    none = dotted_image(other / "none.png", size=(128, 128))  # other content: its own cache entry
    analyzer = DotAnalyzer([(BOX, DOTS), ([100.0, 10.0, 150.0, 60.0], DOTS)])
    faces = pipeline(analyzer, tmp_path)
    faces.prepare([str(two)], progress=False)
    faces.cache.put(faces._digest(str(none)), [])  # the second file has no face
    records = [Record(str(two), 1), Record(str(none), 0)]
    ds = ViewsDataset(records, Canonicalizer(size=SIZE), faces=faces)
    assert len(ds) == 2  # one item per file, each the list of its views
    assert [v["meta"]["view"] for v in ds[0]] == [WHOLE_IMAGE, 0, 1] and [v["meta"]["view"] for v in ds[1]] == [WHOLE_IMAGE]
    assert [v["meta"]["face_index"] for v in ds[0]] == [WHOLE_IMAGE, 0, 1]
    batch = collate_views([ds[0], ds[1]])  # a batch of files is the batch of all their views
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["meta"]["file"].tolist() == [0, 0, 0, 1]

    rows = pd.DataFrame(
        {
            "path": [str(two)] * 3 + [str(none)],
            "prob": [0.2, 0.9, 0.4, 0.3],
            "label": [1, 1, 1, 0],
            "ok": [True] * 4,
            "error": [""] * 4,
            "file": [0, 0, 0, 1],
            "view": [WHOLE_IMAGE, 0, 1, WHOLE_IMAGE],
            "type": ["a", "b", "c", "d"],  # a per-view extra: the deciding view's is kept
        }
    )
    combined = combine_views(rows, faces).set_index("path")
    assert combined.loc[str(two), "type"] == "b"
    assert combined.loc[str(two), "prob"] == pytest.approx(0.9)  # max over faces, then max with the whole image
    assert combined.loc[str(two), "n_faces"] == 2 and not combined.loc[str(two), "face_fallback"]
    assert combined.loc[str(none), "prob"] == pytest.approx(0.3) and combined.loc[str(none), "face_fallback"]
    # an AI-generated background alone: the whole image outscores every face
    assert faces.combine(np.array([0.1, 0.2]), 0.95) == pytest.approx(0.95)
    mean_faces = pipeline(analyzer, face_combine="mean", image_combine="faces")
    assert mean_faces.combine(np.array([0.1, 0.3]), 0.95) == pytest.approx(0.2)


def test_bad_face_config_values_fail_clearly():
    with pytest.raises(ValueError, match="faces.face_combine"):
        pipeline(DotAnalyzer([]), face_combine="median")
    with pytest.raises(ValueError, match="faces.image_combine"):
        pipeline(DotAnalyzer([]), image_combine="min")
    with pytest.raises(ValueError, match="faces.margin"):
        pipeline(DotAnalyzer([]), margin=-1)


def test_manifest_masks_follow_the_pixels(tmp_path):
    """A mask column rides through resize, random crop and a flip, aligned with the image."""
    arr = np.full((96, 128, 3), 20, np.uint8)
    arr[20:60, 10:50] = 250  # the "forged" region, bright
    Image.fromarray(arr).save(tmp_path / "fake.png")
    mask = np.zeros((96, 128), np.uint8)
    mask[20:60, 10:50] = 255
    Image.fromarray(mask).save(tmp_path / "fake_mask.png")
    Image.fromarray(np.full((96, 128, 3), 20, np.uint8)).save(tmp_path / "real.png")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["relpath", "label", "mask"])
        w.writerow(["fake.png", "fake", "fake_mask.png"])
        w.writerow(["real.png", "real", ""])
    records = ManifestSource(str(tmp_path / "m.csv")).records()
    assert records[0].mask and records[1].mask is None
    pixels = A.Compose([A.HorizontalFlip(p=1.0)])
    ds = ImageDataset(records, Canonicalizer(size=SIZE, reencode=False), augment=SampleAugment(pixels=pixels), train=True)
    assert ds.has_masks
    fake, real = ds[0], ds[1]
    assert fake["mask"].shape == (1, SIZE, SIZE) and fake["meta"]["mask_ok"]
    inside = fake["mask"][0] > 0.99  # the edge row is blurred by the resize, in the mask and in the image alike
    assert inside.any() and (fake["image"].mean(0)[inside] > 0.8).float().mean() > 0.95
    assert (fake["image"].mean(0)[fake["mask"][0] < 0.01] < 0.2).float().mean() > 0.95
    assert real["mask"].sum() == 0 and real["meta"]["mask_ok"]


def test_relocated_weight_paths(tmp_path, monkeypatch):
    from unmask.core.checkpoint import relocate_machine_paths

    weights = tmp_path / "shared" / "weights"
    weights.mkdir(parents=True)
    (weights / "model.pth").write_bytes(b"x")
    monkeypatch.setenv("UNMASK_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    node = {"analyzer": {"weights": "/elsewhere/shared/weights/model.pth", "other": "/elsewhere/x.npy"}, "cache_dir": "/nowhere/at/all/faces"}
    out = relocate_machine_paths(node)
    assert out["analyzer"]["weights"] == str(weights / "model.pth")
    assert out["analyzer"]["other"] == "/elsewhere/x.npy"  # not found anywhere: left for the analyser's error
    assert out["cache_dir"] == str(tmp_path / "cache" / "faces")
    shipped = tmp_path / "src"  # a submission ships the weight beside its checkpoint: that copy wins
    shipped.mkdir()
    (shipped / "model.pth").write_bytes(b"y")
    assert relocate_machine_paths(node, beside=shipped)["analyzer"]["weights"] == str(shipped / "model.pth")


def test_face_stage_travels_with_the_checkpoint_to_infer(tmp_path, cache_dir):
    """Train the landmark detector with a face stage (the template analyser), then infer.py
    with explanations on a folder with bad files: every file gets a row, the scores say how
    many faces each had, and rgnet's own heatmap (which needs the landmarks) is drawn."""
    from test_infer import _cfg, _make_testset, _read_result

    from conftest import TINY_TRAIN_OVERRIDES, compose
    from unmask.core.checkpoint import load_detector
    from unmask.tasks.infer import run_inference
    from unmask.tasks.train import train

    out = tmp_path / "run"
    train(compose("train", TINY_TRAIN_OVERRIDES + [f"hydra.run.dir={out}", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", "faces=template", "detector=rgnet"]))
    ckpt = out / "checkpoints" / "best.ckpt"
    loaded = load_detector(ckpt)
    assert isinstance(loaded.faces, FacePipeline) and loaded.faces.analyzer.name == "template"

    names, undecodable = _make_testset(tmp_path / "testset")
    result = run_inference(_cfg(ckpt, tmp_path / "testset", tmp_path / "res", "scores=true", "explain=gallery"))
    rows = _read_result(result)
    assert [r[0] for r in rows] == names
    scores = pd.read_csv(result.with_suffix(".scores.csv"), keep_default_na=False, encoding_errors="surrogateescape")
    assert {"n_faces", "face_fallback", "whole_prob", "face_probs"} <= set(scores.columns)
    good = scores[scores["ok"].astype(str) == "True"].set_index("name")
    # the template "finds" one face filling 80 % of each image; below faces.min_face_px (tiny
    # files) it is ignored and the whole image stands in
    assert (good.loc[[n for n in good.index if n.startswith("good_")], "n_faces"].astype(int) == 1).all()
    assert good.loc["one_pixel.png", "n_faces"] == 0 and str(good.loc["one_pixel.png", "face_fallback"]) == "True"
    assert ((good["n_faces"].astype(int) == 0) == (good["face_fallback"].astype(str) == "True")).all()
    assert set(scores.loc[scores["ok"].astype(str) == "False", "name"]) == undecodable
    masks = list(result.with_suffix(".explain").rglob("*.mask.png"))
    assert len(masks) == len(names) - len(undecodable)


def test_threshold_is_chosen_again_on_validation_with_per_file_scores(tmp_path, cache_dir):
    """With faces and the whole image combined by max, a file's score is at least its top
    face's: the stored threshold must come from validation scored that way, not per face."""
    from conftest import TINY_TRAIN_OVERRIDES, compose
    from unmask.core.checkpoint import load_detector
    from unmask.core.metrics import choose_threshold
    from unmask.tasks.train import train

    out = tmp_path / "run"
    faces = ["faces=template", "faces.crop=true", "faces.whole_image=true", "faces.max_faces=2"]
    cfg = compose("train", TINY_TRAIN_OVERRIDES + [f"hydra.run.dir={out}", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *faces])
    metrics = train(cfg)
    loaded = load_detector(out / "checkpoints" / "best.ckpt")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, augment=None)
    dm.setup()
    df = Scorer(loaded, ScoringConfig(num_workers=0, progress=False)).score(dm.records["val"]).files
    assert (df["n_faces"] == 1).all() and df["whole_prob"].notna().all()  # two samples per file
    expected = choose_threshold(df["label"].to_numpy(), df["prob"].to_numpy(), "youden")
    assert loaded.threshold == pytest.approx(expected, abs=1e-6)
    assert metrics["threshold"] == pytest.approx(expected, abs=1e-6)
    assert "validation split" in loaded.threshold_from and "whole image" in loaded.threshold_from


def test_augmentation_follows_the_run_seed(tmp_path):
    """albumentations' own generator is seeded from torch's seed: one seed, one augmentation."""
    import torch

    img = dotted_image(tmp_path / "a.png")

    def first_sample(seed: int):
        import random

        random.seed(seed)  # the canonical crop position (Lightning seeds python, numpy and torch alike)
        torch.manual_seed(seed)
        pixels = A.Compose([A.Rotate(limit=40, p=1.0), A.ColorJitter(p=1.0)])
        ds = ImageDataset([Record(str(img), 0)], Canonicalizer(size=SIZE, reencode=False, scale_jitter=0.0), augment=pixels, train=True)
        return ds[0]["image"]

    assert torch.equal(first_sample(0), first_sample(0))
    assert not torch.equal(first_sample(0), first_sample(1))


def test_views_of_a_perturbed_image_come_from_its_own_faces(tmp_path):
    """Robustness grids perturb the image as received: the face stage then runs on the
    perturbed pixels (as a service would), not on the clean file's cached faces."""
    img = dotted_image(tmp_path / "a.png")
    analyzer = DotAnalyzer([(BOX, DOTS)])
    faces = pipeline(analyzer, tmp_path)
    faces.prepare([str(img)], progress=False)
    calls = analyzer.calls
    seen = []

    def darken(rgb, index):
        seen.append(rgb.shape)
        return (rgb // 2).astype(np.uint8)

    ds = ViewsDataset([Record(str(img), 1)], Canonicalizer(size=SIZE, reencode=False), faces=faces, decoded_hook=darken)
    views = ds[0]
    assert analyzer.calls == calls + 1  # detected again, on the perturbed pixels
    assert seen == [(128, 160, 3)]  # at full resolution, before any resize
    assert [v["meta"]["view"] for v in views] == [WHOLE_IMAGE, 0]
    clean = ViewsDataset([Record(str(img), 1)], Canonicalizer(size=SIZE, reencode=False), faces=faces)[0]
    assert analyzer.calls == calls + 1  # the clean views use the cache
    for a, b in zip(views, clean):
        assert torch.allclose(a["image"], (b["image"] * 255 // 2) / 255, atol=1.5 / 255)
    touched = []
    ViewsDataset([Record(str(img), 1)], Canonicalizer(size=SIZE, reencode=False), faces=faces,
                 canonical_hook=lambda px, i: touched.append(px.shape) or px)[0]
    assert touched == [(SIZE, SIZE, 3)] * 2  # every view's model-size pixels
