"""The data-set audit (audit.py, unmask/audit): each measure on images whose answer is known by
construction, the attack-capability bands, per-file failures, the cache, and one end-to-end
run of the entry point's task on the synthetic smoke set with the tiny checkpoint.

Face measures need FaceMesh landmarks on a real face: skimage's astronaut through the mesh
analyser (weights from the shared folder; those tests skip where it is absent)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import unmask.core.config
from conftest import ROOT, SUBPROCESS_ENV, compose
from data.faces.pipeline import FacePipeline
from data.faces.types import Face, FaceAnalyzer, TemplateFaceAnalyzer
from data.records import Record
from data.synthetic import natural_image
from unmask.audit import attack, consistency, diversity, identity, image_quality, measures, regions, video
from unmask.audit.cache import AuditCache
from unmask.audit.measures import MeasureContext, measure_file
from unmask.audit.run import audit

SHARED = Path(os.environ.get("UNMASK_SHARED", unmask.core.config.PROJECT_ROOT / ".." / "shared"))
WEIGHTS = SHARED / "weights"
needs_mesh = pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"shared weights folder {WEIGHTS} is absent")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data as skimage_data

    return np.ascontiguousarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def astro_face(astronaut) -> Face:
    if not WEIGHTS.is_dir():
        pytest.skip(f"shared weights folder {WEIGHTS} is absent")
    from data.faces.analyzers import MeshFaceAnalyzer

    analyzer = MeshFaceAnalyzer(WEIGHTS / "blazeface_pytorch_front128.pth", WEIGHTS / "blazeface_anchors_front128.npy",
                                WEIGHTS / "facemesh_pytorch_468.pth")
    faces = analyzer.detect(astronaut)
    assert len(faces) == 1
    return faces[0]


def face_row(rgb: np.ndarray, face: Face, grey: bool = False) -> dict:
    """The face measures of ``rgb`` with the given face (working size = the image)."""
    return measures.face_measures(rgb, rgb, 1.0, face, MeasureContext(), grey)


def shift_lab(rgb: np.ndarray, mask: np.ndarray, delta) -> np.ndarray:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.int32)
    lab[mask] += np.asarray(delta, np.int32)
    return cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


# ---------------------------------------------------------------- known by construction: images


@needs_mesh
def test_blurring_lowers_sharpness_face_quality_and_every_local_quality(astronaut, astro_face):
    blurred = cv2.GaussianBlur(astronaut, (0, 0), 2.0)
    sharp, soft = face_row(astronaut, astro_face), face_row(blurred, astro_face)
    gray = image_quality.to_gray
    assert image_quality.sharpness(gray(blurred)) < 0.2 * image_quality.sharpness(gray(astronaut))
    assert soft["q_sharpness"] < sharp["q_sharpness"] and soft["face_quality"] < sharp["face_quality"]
    for part in ("eyes", "brows", "nose", "mouth", "hair"):
        assert soft[f"local_quality_{part}"] < sharp[f"local_quality_{part}"] - 10, part
    # the astronaut looks at the camera: a near-frontal pose; turning the image turns the roll
    assert abs(sharp["yaw"]) < 15 and abs(sharp["pitch"]) < 15 and abs(sharp["roll"]) < 5
    m = cv2.getRotationMatrix2D((256, 256), 20, 1.0)  # 20 degrees counter-clockwise
    turned = Face(astro_face.box, 1.0, (astro_face.landmarks @ m[:, :2].T + m[:, 2]).astype(np.float32))
    assert face_row(cv2.warpAffine(astronaut, m, (512, 512)), turned)["roll"] == pytest.approx(sharp["roll"] - 20, abs=1.0)
    assert 0.0 < sharp["face_quality"] <= 100.0 and sharp["completeness"] == 1.0
    cut = np.ascontiguousarray(astronaut[:, : int(astro_face.landmarks[:, 0].mean())])  # half the face out of the frame
    half = face_row(cut, astro_face)
    assert 0.3 < half["completeness"] < 0.7 and half["face_quality"] < sharp["face_quality"] - 20


@needs_mesh
def test_colour_shifted_face_region_lowers_fg_bg_and_skin_tone_consistency(astronaut, astro_face):
    lm = astro_face.landmarks
    lower = regions.region_mask(astronaut.shape[:2], lm, regions.FACE_OVAL)
    lower[: int(lm[:, 1].min() + 0.45 * np.ptp(lm[:, 1]))] = False  # the face below the eyes: cheeks, not forehead
    before, after = face_row(astronaut, astro_face), face_row(shift_lab(astronaut, lower, (0, 35, -35)), astro_face)
    assert after["skin_tone_consistency"] < before["skin_tone_consistency"] - 0.2
    assert after["fg_bg_colour_consistency"] < before["fg_bg_colour_consistency"] - 0.05


@needs_mesh
def test_hard_paste_seam_lowers_contour_blending(astronaut, astro_face):
    oval = regions.region_mask(astronaut.shape[:2], astro_face.landmarks, regions.FACE_OVAL)
    brighter = shift_lab(astronaut, np.ones(oval.shape, bool), (60, 0, 0))
    hard = astronaut.copy()
    hard[oval] = brighter[oval]
    alpha = cv2.GaussianBlur(oval.astype(np.float32), (0, 0), 6.0)[..., None]
    feathered = (astronaut * (1 - alpha) + brighter * alpha).astype(np.uint8)
    original, seam, blended = (face_row(x, astro_face)["contour_blending"] for x in (astronaut, hard, feathered))
    assert seam < original - 15 and seam < blended - 15
    assert 0 < seam < 100 and original <= 100


@needs_mesh
def test_spliced_high_frequency_patch_lowers_spectrum_consistency(astronaut, astro_face):
    oval = regions.region_mask(astronaut.shape[:2], astro_face.landmarks, regions.FACE_OVAL)
    noisy = astronaut.astype(np.float64)
    noisy[oval] += np.random.default_rng(0).normal(0, 40, (int(oval.sum()), 3))
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    before, after = face_row(astronaut, astro_face), face_row(noisy, astro_face)
    assert after["spectrum_consistency"] < before["spectrum_consistency"] - 0.2
    assert after["face_high_band"] > 3 * before["face_high_band"]


@needs_mesh
def test_grey_images_have_no_skin_tone(astronaut, astro_face):
    colour = face_row(astronaut, astro_face)
    assert colour["skin_tone"] in ("light", "medium", "dark") and math.isfinite(colour["skin_tone_ita"])
    grey = cv2.cvtColor(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    assert diversity.is_grey(grey) and not diversity.is_grey(astronaut)
    row = face_row(grey, astro_face, grey=True)
    assert math.isnan(row["skin_tone_ita"]) and row["skin_tone"] == "" and math.isnan(row["skin_tone_consistency"])


def test_upscaled_image_reports_its_original_resolution_class(astronaut, tmp_path):
    small = cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA)
    for name, img in (("small", small), ("up4", cv2.resize(small, (512, 512), interpolation=cv2.INTER_CUBIC)),
                      ("up2", cv2.resize(small, (256, 256), interpolation=cv2.INTER_LINEAR)), ("native", astronaut)):
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    rows = {n: measure_file(Record(str(tmp_path / f"{n}.png"), 0), MeasureContext()) for n in ("small", "up4", "up2", "native")}
    assert rows["small"]["resolution_class"] == rows["up4"]["resolution_class"] == rows["up2"]["resolution_class"] == "low (128-255 px)"
    assert rows["up4"]["upscale_factor"] == 4 and rows["up2"]["upscale_factor"] == 2 and rows["up4"]["effective_short_side"] == 128
    assert rows["up4"]["nominal_resolution_class"] == rows["native"]["resolution_class"] == "high (512-1023 px)"
    assert rows["native"]["upscale_factor"] == 1 and rows["small"]["upscale_factor"] == 1
    assert all(r["ok"] and "no face stage" in r["note"] for r in rows.values())


def test_jpeg_quality_comes_from_the_quantisation_tables(astronaut, tmp_path):
    for q in (40, 75, 92):
        Image.fromarray(astronaut).save(tmp_path / f"q{q}.jpg", quality=q)
        assert image_quality.jpeg_quality(tmp_path / f"q{q}.jpg") == q
    Image.fromarray(astronaut).save(tmp_path / "lossless.png")
    assert math.isnan(image_quality.jpeg_quality(tmp_path / "lossless.png"))


def test_reference_scores_and_noise_level(astronaut):
    same = image_quality.reference_scores(astronaut, astronaut)
    noise = np.random.default_rng(0).normal(0, 10, (*astronaut.shape[:2], 1))  # the same in every channel: grey noise of sigma 10
    noisy = np.clip(astronaut + noise, 0, 255).astype(np.uint8)
    worse = image_quality.reference_scores(noisy, astronaut)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] == 100.0
    assert worse["ssim"] < 0.8 and 25 < worse["psnr"] < 30  # sigma 10 noise: about 28 dB
    gray = image_quality.to_gray
    assert image_quality.noise_sigma(gray(astronaut)) < 3 and 8.5 < image_quality.noise_sigma(gray(noisy)) < 11.5


def test_tampered_region_with_a_hard_seam_blends_worse():
    rgb = natural_image(np.random.default_rng(0), 160)
    mask = np.zeros((160, 160), bool)
    mask[40:120, 50:110] = True
    brighter = shift_lab(rgb, np.ones_like(mask), (50, 0, 0))
    hard = rgb.copy()
    hard[mask] = brighter[mask]
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 5.0)[..., None]
    soft = (rgb * (1 - alpha) + brighter * alpha).astype(np.uint8)
    untouched, seam, blended = (consistency.mask_blending(x, mask) for x in (rgb, hard, soft))
    assert seam["mask_blending"] < untouched["mask_blending"] - 20 and seam["mask_blending"] < blended["mask_blending"] - 20
    assert seam["mask_colour_consistency"] < untouched["mask_colour_consistency"]


# ---------------------------------------------------------------- video


def sliding_frames(jump_at: int | None = None, n: int = 16) -> list[np.ndarray]:
    """A camera panning 2 px per frame over a texture; ``jump_at``: one 60-px jump (a cut)."""
    texture = natural_image(np.random.default_rng(0), 400)
    frames, x = [], 0
    for i in range(n):
        x += 60 if i == jump_at else 2
        frames.append(texture[50:178, x:x + 128].copy())
    return frames


def test_frame_jump_lowers_motion_continuity_and_a_flash_lowers_lighting_consistency():
    smooth, jump = video.motion_continuity(sliding_frames()), video.motion_continuity(sliding_frames(jump_at=8))
    assert smooth["motion_continuity"] > 0.9 and jump["motion_continuity"] < 0.3
    frames = sliding_frames()
    flash = [f.copy() for f in frames]
    flash[8] = (flash[8] * 0.5).astype(np.uint8)
    assert video.lighting_consistency(flash)["lighting_consistency"] < video.lighting_consistency(frames)["lighting_consistency"] - 0.1


def test_akd_is_zero_for_a_rigid_face_and_grows_with_jitter():
    base = np.random.default_rng(0).uniform(0, 100, (30, 2)).astype(np.float32)
    moved = [base * s + t for s, t in ((1.0, 0), (1.1, 5), (0.9, -3))]  # one face moving and scaling: coherent
    assert video.average_keypoint_distance(moved) < 1e-3
    jitter = [m + np.random.default_rng(i).normal(0, 2, m.shape).astype(np.float32) for i, m in enumerate(moved)]
    assert video.average_keypoint_distance(jitter) > 0.01


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for arr in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_video_file_gets_video_measures(tmp_path):
    ctx = MeasureContext(video_frames=12)
    smooth = measure_file(Record(str(write_video(tmp_path / "smooth.mp4", sliding_frames(n=12))), 1), ctx)
    cut = measure_file(Record(str(write_video(tmp_path / "cut.mp4", sliding_frames(jump_at=6, n=12))), 1), ctx)
    assert smooth["ok"] and smooth["kind"] == "video" and smooth["n_frames"] == 12
    assert cut["motion_continuity"] < smooth["motion_continuity"] - 0.3
    assert math.isnan(smooth["akd"])  # no face stage: no landmarks


@pytest.fixture(scope="module")
def identity_weights(tmp_path_factory) -> Path:
    """A local InceptionResnetV1 state dict as the user supplies it (facenet-pytorch's layout,
    with the ``logits.`` head the loader drops), randomly initialised and stored in fp16: it
    proves the loading and the plumbing, not what the embeddings mean."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    state = {k: v.half() if v.is_floating_point() else v for k, v in InceptionResnetV1(classify=False).state_dict().items()}
    state |= {"logits.weight": torch.zeros(2, 512, dtype=torch.half), "logits.bias": torch.zeros(2, dtype=torch.half)}
    path = tmp_path_factory.mktemp("identity") / "inception_resnet_v1.pt"
    torch.save(state, path)
    return path


def test_identity_measures_with_a_local_inception_resnet_v1_file(tmp_path, astronaut, identity_weights):
    with pytest.raises(FileNotFoundError, match="audit.identity_weights"):
        identity.IdentityModel(tmp_path / "missing.pt")
    model = identity.IdentityModel(identity_weights)
    chip = identity.face_chip(astronaut, Face(np.array([150, 20, 330, 230], np.float32), 1.0, np.zeros((0, 2), np.float32)))
    e = model.embed([chip, chip, np.ascontiguousarray(chip[::-1])])
    assert e.shape == (3, 512) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    assert identity.cosine(e[0], e[1]) == pytest.approx(1.0, abs=1e-5) and identity.consistency(e[:2]) == pytest.approx(1.0, abs=1e-5)
    ctx = MeasureContext(faces=FacePipeline(TemplateFaceAnalyzer(), cache_dir=None), identity=model, video_frames=8)
    Image.fromarray(astronaut).save(tmp_path / "a.png")
    image = measure_file(Record(str(tmp_path / "a.png"), 1), ctx, reference=str(tmp_path / "a.png"))
    assert image["ok"] and image["identity_similarity"] == pytest.approx(1.0, abs=1e-4)  # 7.1.14: the file is its own reference
    clip = measure_file(Record(str(write_video(tmp_path / "v.mp4", sliding_frames(n=8))), 1), ctx)
    assert clip["ok"] and -1.0 <= clip["identity_consistency"] <= 1.0 + 1e-6  # 7.1.17
    assert clip["akd"] < 1e-3  # the template "face" is rigid: geometric coherence (7.1.16) is perfect


# ---------------------------------------------------------------- attack capability, failures, cache


def test_attack_bands_need_80_percent_of_the_detectors_and_shares_sum_to_one():
    scores = np.array([
        [0.9, 0.95, 0.85, 0.9, 0.1],  # 4 of 5 above 0.8: enough
        [0.9, 0.95, 0.5, 0.5, 0.1],  # no agreement
        [0.5, 0.4, 0.6, 0.35, 0.69],
        [0.1, 0.05, 0.0, 0.15, np.nan],  # 4 scored, all below 0.2
        [np.nan] * 5,
        [0.75, 0.75, 0.75, 0.75, 0.75],  # in the gap between the bands
    ])
    bands = attack.attack_band(scores)
    assert bands == ["above_0.8", "mixed", "0.3-0.7", "below_0.2", "unscored", "mixed"]
    shares = attack.profile(pd.Series(bands))
    assert sum(shares[b] for b in attack.BANDS) == pytest.approx(1.0) and shares["n"] == 6
    assert attack.verdict({**shares, "above_0.8": 0.6}) == "easy"
    assert attack.verdict({"above_0.8": 0.3, "0.3-0.7": 0.45, "below_0.2": 0.2, "mixed": 0.05, "unscored": 0.0, "n": 20}) == "on profile"
    assert attack.detector_names(["a/run1/checkpoints/best.ckpt", "b/run1/checkpoints/best.ckpt", "x.ckpt"]) == ["run1", "run1_2", "x"]


class NoFaces(FaceAnalyzer):
    name, num_landmarks = "nofaces", 468

    def detect(self, rgb):
        return []


def test_bad_files_and_faceless_files_get_rows_not_crashes(tmp_path, astronaut):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.fromarray(astronaut).save(tmp_path / "ok.png")
    ctx = MeasureContext(faces=FacePipeline(NoFaces(), cache_dir=None))
    broken = measure_file(Record(str(tmp_path / "broken.jpg"), 1), ctx)
    assert broken["ok"] is False and "broken.jpg" in broken["error"]
    faceless = measure_file(Record(str(tmp_path / "ok.png"), 0), ctx)
    assert faceless["ok"] and faceless["note"] == "no face found" and faceless["n_faces"] == 0
    assert math.isfinite(faceless["sharpness"]) and "face_quality" not in faceless


def test_manifest_reference_and_mask_columns_add_their_measures(tmp_path, astronaut):
    """A swap's source image (``reference``) gives SSIM / PSNR (and the identity measure with
    a face-recognition model: a stand-in here); a mask gives the tampered-region blending."""
    Image.fromarray(astronaut).save(tmp_path / "source.png")
    edited = astronaut.copy()
    edited[100:200, 150:300] = 255 - edited[100:200, 150:300]
    Image.fromarray(edited).save(tmp_path / "edit.png")
    mask = np.zeros(astronaut.shape[:2], np.uint8)
    mask[100:200, 150:300] = 255
    Image.fromarray(mask).save(tmp_path / "edit.mask.png")
    with open(tmp_path / "MANIFEST.csv", "w", newline="") as f:
        csv.writer(f).writerows([["relpath", "label", "reference", "mask"], ["source.png", "real", "", ""],
                                 ["edit.png", "fake", "source.png", "edit.mask.png"]])

    class StandIn:  # the identity model's interface: digest and embed
        digest = "stand-in"

        def embed(self, chips):
            return np.stack([c.reshape(-1)[:8].astype(np.float32) + 1 for c in chips])

    from data.records import ManifestSource

    template = FacePipeline(TemplateFaceAnalyzer(), cache_dir=None)
    records = ManifestSource(str(tmp_path / "MANIFEST.csv")).records()
    summary = audit(records, MeasureContext(faces=template, identity=StandIn()), tmp_path / "out", root=tmp_path, progress=False)
    table = pd.read_csv(tmp_path / "out" / "audit.csv")
    edit = table[table["label"] == 1].iloc[0]
    assert 0 < edit["ssim"] < 0.95 and edit["psnr"] < 30 and math.isfinite(edit["identity_similarity"])
    assert 0 < edit["mask_blending"] < 100 and math.isnan(table[table["label"] == 0].iloc[0]["ssim"])
    assert "7.1.20" in (tmp_path / "out" / "report.md").read_text() and summary["n_files"] == 2


def test_cache_survives_a_save_and_reload(tmp_path):
    cache = AuditCache(tmp_path, "measures-x")
    cache.put("k", {"a": float("nan"), "b": 1})
    cache.save()
    again = AuditCache(tmp_path, "measures-x")
    assert math.isnan(again.get("k")["a"]) and again.get("k")["b"] == 1 and again.get("other") is None


# ---------------------------------------------------------------- the entry point


AUDIT_OVERRIDES = ["data.source.n_per_class=8", "data.source.size=32", "data.image_size=32", "faces=template",
                   "audit.progress=false", "scoring.progress=false", "scoring.num_workers=0"]


def test_audit_end_to_end_writes_three_files_and_a_second_run_is_instant(tiny_ckpt, tmp_path, monkeypatch):
    from unmask.tasks.audit import run_audit

    common = AUDIT_OVERRIDES + [f"paths.cache_dir={tmp_path / 'cache'}", f"audit.detectors=[{tiny_ckpt}]"]
    first = run_audit(compose("audit", common + [f"audit.output_dir={tmp_path / 'o1'}"]))
    out = tmp_path / "o1"
    table = pd.read_csv(out / "audit.csv")
    assert len(table) == 16 and table["ok"].all()
    for column in ("path", "label", "split", "source", "generator", "ok", "error", "sharpness", "noise_sigma", "resolution_class",
                   "face_quality", "local_quality_eyes", "skin_tone_consistency", "contour_blending", "attack_band"):
        assert column in table, column
    assert [c for c in table if c.startswith("score_")] == [f"score_{Path(tiny_ckpt).parent.parent.name}"]
    assert (table.loc[table["label"] == 1, "attack_band"].isin(attack.BANDS)).all()
    summary = json.loads((out / "audit.json").read_text())
    for key in ("by_class", "by_source", "by_generator", "attack_capability", "tertiles", "measures"):
        assert summary[key], key
    a = summary["attack_capability"]
    for group in [a["overall"], *a["by_generator"].values()]:
        assert sum(group[b] for b in attack.BANDS) == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    for clause in ("7.1.3", "7.1.4", "7.1.5", "7.1.6", "7.1.7", "7.1.8", "7.1.9", "7.1.10", "7.1.11", "7.1.12", "7.1.13"):
        assert clause in report, clause
    assert "audit.identity_weights" in report  # the report says why the identity measures are absent
    assert not {"identity_similarity", "identity_consistency"} & set(table)  # and their columns are
    assert (out / "hist_by_class.png").is_file() and (out / "attack_capability.png").is_file()
    assert first["measured"] == 16 and first["detector_scores"]["scored"] == 8

    calls = []
    monkeypatch.setattr("unmask.audit.run.measure_file", lambda *a, **k: calls.append(a) or {})
    second = run_audit(compose("audit", common + [f"audit.output_dir={tmp_path / 'o2'}"]))
    assert not calls and second["measured"] == 0 and second["cached"] == 16 and second["detector_scores"]["cached"] == 8
    assert pd.read_csv(tmp_path / "o2" / "audit.csv").equals(table)
    with pytest.raises(FileExistsError, match="audit.overwrite"):  # an earlier audit is never overwritten silently
        run_audit(compose("audit", common + [f"audit.output_dir={out}"]))


@pytest.mark.parametrize("override,key", [("audit.detector=[x]", "audit.detector"), ("audit.limit=many", "audit.limit"),
                                          ("audit.cache=perhaps", "audit.cache")])
def test_audit_config_errors_fail_at_composition(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as exc:
        compose("audit", [override])
    assert key in str(exc.value) + str(exc.value.__cause__)


@pytest.mark.parametrize("override,key", [("audit.limit=0", "audit.limit"), ("audit.splits=[tset]", "audit.splits")])
def test_audit_range_errors_name_the_key(override, key):
    from unmask.core.schemas import options

    cfg = compose("audit", [override, "audit.output_dir=."])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        options(cfg.audit)


@pytest.mark.slow
def test_audit_py_runs_as_a_script(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "audit.py", *AUDIT_OVERRIDES, "faces=none", "audit.limit=2", "audit.splits=[train]",
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out / "audit.csv")
    assert len(table) == 4 and set(table["split"]) == {"train"} and "face_quality" not in table
    assert "no face stage" in table["note"].iloc[0] and (out / "report.md").is_file() and (out / "audit.json").is_file()
