"""Issue 18, fast by default: ``scoring.runtime=auto`` (the choice, its exactness, the export
cache), the cheap input pipeline (uint8 pixels from the workers, the torchvision re-encode,
the machine-sized batch and workers) and the GPU decoding path, run on the CPU here and on
CUDA under the ``gpu`` marker."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import badimages
import unmask.scoring.choice as choice
import unmask.scoring.onnx_export as onnx_export
from conftest import compose
from data.canonical import Canonicalizer, _pil_roundtrip, _torchvision_roundtrip
from data.dataset import ViewsDataset, collate_views
from data.records import Record
from data.synthetic import natural_image
from unmask.core.checkpoint import load_detector, store_threshold
from unmask.core.schemas import ScoringConfig
from unmask.scoring.loading import Batches, DeviceCanonicalizer, EncodedViews, PixelViews, collate_pixels, resize_crop, to_float
from unmask.scoring.runtimes import OnnxRuntime
from unmask.scoring.scorer import Scorer, machine_batch_size, machine_workers

AUTO_TOLERANCE = onnx_export.PROB_TOLERANCE  # |P_onnx - P_eager| allowed for auto to choose ONNX


@pytest.fixture(scope="module")
def quick_onnx(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported once with the quick (torchscript) exporter."""
    path = tmp_path_factory.mktemp("quick") / "tiny.onnx"
    return onnx_export.export_onnx(load_detector(tiny_ckpt).detector, path, 32, exporter="torchscript")


@pytest.fixture
def cache(tmp_path, monkeypatch, quick_onnx):
    """A private export cache whose "export" copies ``quick_onnx`` (counted), unmeasured."""
    calls = []

    def fake_export(detector, path, size, exporter="dynamo", opset=None):
        calls.append(path)
        shutil.copy(quick_onnx, path)
        return path

    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    monkeypatch.setattr(choice, "MEASURE_SPEED", False)
    return {"folder": tmp_path / "cache" / "onnx", "calls": calls}


def _images(root, n=10, size=40, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / f"{i:02d}.jpg"
        Image.fromarray(natural_image(rng, size)).save(path, quality=90)
        paths.append(path)
    return [Record(str(p)) for p in paths]


def _score(ckpt, records, **options):
    options = {"device": "cpu", "num_workers": 0, "batch_size": 4, "progress": False, **options}
    scorer = Scorer(load_detector(ckpt), ScoringConfig(**options))
    return scorer, scorer.score(records).files


# ---- runtime=auto ----------------------------------------------------------------------------
def test_auto_is_the_default_and_picks_onnx_on_the_cpu_within_tolerance(tiny_ckpt, cache, tmp_path, caplog):
    assert ScoringConfig().runtime == "auto" and ScoringConfig().batch_size is None and ScoringConfig().num_workers is None
    records = _images(tmp_path / "in")
    with caplog.at_level(logging.INFO, logger="unmask.scoring.scorer"):
        scorer, auto = _score(tiny_ckpt, records)
    assert scorer.runtime.name == "onnx" and isinstance(scorer.runtime, OnnxRuntime)
    assert scorer.runtime_choice.reason.startswith("auto: cnnspot exports")
    assert "runtime: onnx (auto: cnnspot exports" in caplog.text
    _, eager = _score(tiny_ckpt, records, runtime="torch")
    assert auto["path"].tolist() == eager["path"].tolist()
    assert (auto["prob"] - eager["prob"]).abs().max() <= AUTO_TOLERANCE
    assert eager["prob"].std() > 0  # not a constant model
    # the export is cached: a second scorer (another job) reuses it, verified, without exporting
    assert len(cache["calls"]) == 1
    again, second = _score(tiny_ckpt, records)
    assert again.runtime.name == "onnx" and len(cache["calls"]) == 1
    pd.testing.assert_frame_equal(second, auto)  # every job with the same choice gives the same bits


def test_auto_measures_the_speed_it_prints(tiny_ckpt, cache, monkeypatch):
    monkeypatch.setattr(choice, "MEASURE_SPEED", True)
    picked = choice.choose_runtime(load_detector(tiny_ckpt), ScoringConfig(device="cpu"))
    entry = json.loads(next(cache["folder"].glob("*.json")).read_text())
    assert entry["eager_s"] > 0 and entry["onnx_s"] > 0 and entry["speedup"] == pytest.approx(entry["eager_s"] / entry["onnx_s"])
    if entry["speedup"] >= 1:
        assert picked.name == "onnx" and f"eager would be {entry['speedup']:.1f}x slower on this CPU" in picked.line()
    else:  # a loaded machine can make the probe slow: then eager, and said why
        assert picked.name == "torch" and "onnxruntime was" in picked.line()


@pytest.mark.parametrize("entry, expected", [
    ({"max_prob_diff": 1e-3, "speedup": 5.0}, "differs from eager by 1.0e-03"),
    ({"max_prob_diff": 1e-7, "speedup": 0.5}, "onnxruntime was 0.50x eager on this CPU"),
])
def test_auto_keeps_eager_where_onnx_is_inexact_or_slower(tiny_ckpt, monkeypatch, entry, expected):
    def fake_cached(loaded, measure=True, **kwargs):
        return onnx_export.CachedExport(path=None, key="k", **entry), object()

    monkeypatch.setattr(onnx_export, "cached_export", fake_cached)
    picked = choice.choose_runtime(load_detector(tiny_ckpt), ScoringConfig(device="cpu"))
    assert picked.name == "torch" and expected in picked.reason


def test_auto_explicit_settings_and_a_failed_export(tiny_ckpt, quick_onnx, monkeypatch):
    loaded = load_detector(tiny_ckpt)
    assert choice.choose_runtime(loaded, ScoringConfig(device="cpu", runtime="torch")).name == "torch"
    assert choice.choose_runtime(loaded, ScoringConfig(device="cpu", compile=True)).reason == "auto: scoring.compile=true asks for torch.compile"
    given = choice.choose_runtime(loaded, ScoringConfig(device="cpu", onnx_model=str(quick_onnx)))
    assert given.name == "onnx" and given.runtime.path == quick_onnx

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "cached_export", broken)
    failed = choice.choose_runtime(loaded, ScoringConfig(device="cpu"))
    assert failed.name == "torch" and "failed to export (RuntimeError)" in failed.reason
    with pytest.raises(ValueError, match="compile"):
        ScoringConfig(runtime="onnx", compile=True)


# ---- the export cache --------------------------------------------------------------------------
def test_export_key_follows_the_weights_not_the_stored_threshold(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "c.ckpt"
    shutil.copy(tiny_ckpt, ckpt)
    key = onnx_export.export_key(load_detector(ckpt))
    store_threshold(ckpt, 0.123, "a test")  # the training run rewrites the file after exporting
    assert onnx_export.export_key(load_detector(ckpt)) == key
    loaded = load_detector(ckpt)
    with torch.no_grad():
        next(loaded.detector.parameters()).add_(1e-3)
    assert onnx_export.export_key(loaded) != key


@pytest.mark.parametrize("damage", ["garbage onnx", "wrong probabilities", "bad json", "missing json"])
def test_a_damaged_cache_entry_is_exported_again(tiny_ckpt, cache, caplog, damage):
    loaded = load_detector(tiny_ckpt)
    first, _ = onnx_export.cached_export(loaded, measure=False)
    assert not first.reused and first.path.parent == cache["folder"] and len(cache["calls"]) == 1
    meta = first.path.with_suffix(".json")
    if damage == "garbage onnx":
        first.path.write_bytes(b"not an onnx graph")
    elif damage == "wrong probabilities":
        info = json.loads(meta.read_text())
        info["probe"]["eager_prob"] = [0.5] * len(info["probe"]["eager_prob"])
        meta.write_text(json.dumps(info))
    elif damage == "bad json":
        meta.write_text("{")
    else:
        meta.unlink()
    with caplog.at_level(logging.WARNING, logger="unmask.scoring.onnx_export"):
        second, runtime = onnx_export.cached_export(loaded, measure=False)
    assert not second.reused and len(cache["calls"]) == 2 and second.path == first.path
    if damage != "missing json":
        assert "is unusable" in caplog.text
    third, _ = onnx_export.cached_export(loaded, measure=False)
    assert third.reused and len(cache["calls"]) == 2
    assert runtime(torch.rand(2, 3, 32, 32)).prob.shape == (2,)


def test_the_cache_keeps_its_most_recent_entries(tmp_path):
    import os

    for i in range(20):
        for suffix in (".onnx", ".json"):
            (tmp_path / f"k{i:02d}{suffix}").write_text("x")
        os.utime(tmp_path / f"k{i:02d}.onnx", (1000 + i, 1000 + i))
    onnx_export._prune(tmp_path, keep=16)
    kept = sorted(p.stem for p in tmp_path.glob("*.onnx"))
    assert kept == [f"k{i:02d}" for i in range(4, 20)] and len(list(tmp_path.glob("*.json"))) == 16


def test_onnx_calls_of_any_size_give_the_same_probabilities(quick_onnx):
    images = torch.rand(13, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    whole = OnnxRuntime(quick_onnx, micro_batch=13)(images).prob
    for step in (1, 4, 5):
        torch.testing.assert_close(OnnxRuntime(quick_onnx, micro_batch=step)(images).prob, whole, rtol=0, atol=1e-6)


# ---- the pipeline ----------------------------------------------------------------------------------
def test_torchvision_reencode_is_pil_bit_for_bit():
    rng = np.random.default_rng(0)
    images = [natural_image(rng, 48), rng.integers(0, 256, (33, 47, 3), dtype=np.uint8), np.full((16, 24, 3), 77, np.uint8)]
    for quality in range(1, 101):
        for img in images:
            np.testing.assert_array_equal(_torchvision_roundtrip(img, quality), _pil_roundtrip(img, quality))


def _mixed_folder(root):
    records = _images(root / "jpg", n=5, size=48) + _images(root / "big", n=2, size=130)  # 130 >= 2 x 32: DCT-scaled on the CPU
    extra = [badimages.good_png(root / "a.png"), badimages.cmyk_jpeg(root / "cmyk.jpg"), badimages.exif_rotated_jpeg(root / "rot.jpg"),
             badimages.truncated_jpeg(root / "cut.jpg"), badimages.random_bytes(root / "junk.jpg"), badimages.empty_file(root / "empty.jpg")]
    return records + [Record(str(p)) for p in extra]


def test_pixels_path_gives_the_views_path_bits_and_meta(tmp_path):
    records = _mixed_folder(tmp_path)
    views = ViewsDataset(records, Canonicalizer(size=32))
    reference = collate_views([views[i] for i in range(len(records))])
    batch = collate_pixels([PixelViews(views)[i] for i in range(len(records))])
    image = to_float(batch.pop("pixels"), torch.device("cpu"), channels_last=False)
    assert torch.equal(image, reference["image"]) and image.dtype == torch.float32 and image.is_contiguous()
    assert torch.equal(to_float(collate_pixels([PixelViews(views)[0]])["pixels"], torch.device("cpu"), True), reference["image"][:1])
    assert torch.equal(batch["label"], reference["label"]) and batch["meta"].keys() == reference["meta"].keys()
    for key, value in reference["meta"].items():
        assert (torch.equal(batch["meta"][key], value) if isinstance(value, torch.Tensor) else batch["meta"][key] == value), key
    assert not all(batch["meta"]["ok"].tolist())  # the bad files are in it


def test_scores_are_the_same_through_the_pixels_path(tiny_ckpt, tmp_path, monkeypatch):
    records = _mixed_folder(tmp_path)
    _, fast = _score(tiny_ckpt, records, runtime="torch", num_workers=1)
    monkeypatch.setattr("unmask.scoring.loading.plain", lambda dataset: False)  # the general path
    _, general = _score(tiny_ckpt, records, runtime="torch", num_workers=1)
    pd.testing.assert_frame_equal(fast, general)


def test_batch_and_workers_come_from_the_machine(tiny_ckpt, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert machine_batch_size(cpu) == 64 and machine_batch_size(cuda) == 256
    assert [machine_workers(cpu, cores=c) for c in (1, 2, 3, 4, 10, 16)] == [0, 0, 1, 1, 2, 4]
    assert [machine_workers(cuda, cores=c) for c in (1, 2, 10, 64)] == [1, 1, 9, 16]
    assert machine_workers(cuda, cores=10, processes=2) == 4
    loaded = load_detector(tiny_ckpt)
    scorer = Scorer(loaded, ScoringConfig(device="cpu"))
    assert scorer.batch_size == 64 and scorer.num_workers == machine_workers(cpu)
    pinned = Scorer(loaded, ScoringConfig(device="cpu", batch_size=8, num_workers=0))
    assert (pinned.batch_size, pinned.num_workers) == (8, 0)


# ---- the GPU path (on the CPU here) ------------------------------------------------------------
@pytest.mark.parametrize("policy", ["short_side", "square", "none"])
def test_device_resize_and_crop_follow_cv2(policy):
    canonical = Canonicalizer(size=32, resize=policy)
    rng = np.random.default_rng(1)
    for h, w in [(100, 77), (64, 64), (33, 90), (20, 25), (257, 129)]:
        img = natural_image(rng, max(h, w))[:h, :w].copy()
        expected = canonical.finish(canonical.resize_stage(img), train=False)
        got = resize_crop(torch.from_numpy(img).permute(2, 0, 1), canonical).permute(1, 2, 0).numpy()
        assert got.shape == expected.shape
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # cv2 rounds with fixed-point weights


def _device_batch(records, device):
    views = ViewsDataset(records, Canonicalizer(size=32))
    encoded = EncodedViews(views)
    return views, Batches(views, "gpu", torch.device(device), channels_last=False).finish({"items": [encoded[i] for i in range(len(records))]})


def test_gpu_decoding_path_on_the_cpu_gives_the_cpu_pixels_within_decoder_differences(tmp_path):
    records = _mixed_folder(tmp_path)
    views, batch = _device_batch(records, "cpu")
    reference = collate_views([views[i] for i in range(len(records))])
    assert batch["meta"]["path"] == reference["meta"]["path"] and torch.equal(batch["meta"]["ok"], reference["meta"]["ok"])
    assert batch["meta"]["error"] == reference["meta"]["error"]
    diff = (batch["image"] - reference["image"]).abs() * 255
    names = [r.path.rsplit("/", 1)[-1] for r in records]
    for i, name in enumerate(names):
        if name.endswith((".png",)) or name in ("cmyk.jpg", "rot.jpg", "cut.jpg", "junk.jpg", "empty.jpg"):
            assert diff[i].max() == 0, name  # not for the GPU: the CPU path's own pixels
        elif "big" in records[i].path:  # block means vs libjpeg's DCT-scaled decode (1.6 levels measured), re-encoded
            assert diff[i].mean() < 2.5 and diff[i].max() <= 32, name
        else:  # the same decoder on the CPU; cv2's +-1 resize rounding carried through the re-encode (0 measured)
            assert diff[i].mean() < 1 and diff[i].max() <= 16, name
    assert [EncodedViews(views)[i].keys() >= {"jpeg"} for i in range(len(records))].count(True) == 7


def test_gpu_decoding_falls_back_to_the_cpu_file_by_file(tmp_path, caplog):
    records = _images(tmp_path, n=3, size=40)
    views = ViewsDataset(records, Canonicalizer(size=32))
    items = [EncodedViews(views)[i] for i in range(3)]
    items[1]["jpeg"] = torch.frombuffer(bytearray(b"\xff\xd8 not really a jpeg \xff\xd9"), dtype=torch.uint8)
    assert DeviceCanonicalizer(views.canonical, "cpu")([items[1]["jpeg"]]) == [None]
    with caplog.at_level(logging.WARNING, logger="unmask.scoring.loading"):
        batch = Batches(views, "gpu", torch.device("cpu"), channels_last=False).finish({"items": items})
    assert "GPU decoding failed; decoded on the CPU" in caplog.text
    reference = collate_views([views[1]])["image"][0]
    assert torch.equal(batch["image"][1], reference) and batch["meta"]["ok"].all()


def test_a_device_that_cannot_decode_leaves_it_to_the_workers(tiny_ckpt, tmp_path, monkeypatch, caplog):
    import unmask.scoring.loading as loading

    assert loading.device_decoding_works(torch.device("cpu"))
    scorer = Scorer(load_detector(tiny_ckpt), ScoringConfig(device="cpu", runtime="torch", decode="gpu"))
    dataset = scorer.dataset(_images(tmp_path, n=2))
    assert scorer.batches(dataset, scorer.runtime).mode == "gpu"
    monkeypatch.setitem(loading._DEVICE_DECODING_WORKS, "cpu", False)
    with caplog.at_level(logging.WARNING, logger="unmask.scoring.scorer"):
        assert scorer.batches(dataset, scorer.runtime).mode == "pixels"
    assert "does not work here" in caplog.text


def test_scoring_with_gpu_decoding_on_the_cpu_stays_close(tiny_ckpt, tmp_path):
    records = _mixed_folder(tmp_path)
    _, cpu = _score(tiny_ckpt, records, runtime="torch")
    _, gpu_path = _score(tiny_ckpt, records, runtime="torch", decode="gpu")
    assert gpu_path["path"].tolist() == cpu["path"].tolist() and gpu_path["ok"].tolist() == cpu["ok"].tolist()
    assert (gpu_path["prob"] - cpu["prob"]).abs().max() < 0.05  # pixel-level decoder differences only


def test_infer_logs_the_choice_and_matches_the_pinned_runtimes(tiny_ckpt, tmp_path, caplog):
    from unmask.tasks.infer import run_inference

    _images(tmp_path / "in", n=6)
    common = [f"ckpt={tiny_ckpt}", f"input={tmp_path / 'in'}", "scoring.num_workers=0", "scores=true", "scoring.device=cpu"]
    with caplog.at_level(logging.INFO, logger="unmask.scoring.scorer"):
        auto = run_inference(compose("infer", common + [f"output_dir={tmp_path / 'auto'}"]))
    assert "runtime: onnx (auto: cnnspot exports" in caplog.text
    eager = run_inference(compose("infer", common + [f"output_dir={tmp_path / 'torch'}", "scoring.runtime=torch"]))
    p_auto = pd.read_csv(auto.with_suffix(".scores.csv"))["prob"]
    p_eager = pd.read_csv(eager.with_suffix(".scores.csv"))["prob"]
    assert np.abs(p_auto - p_eager).max() <= AUTO_TOLERANCE


# ---- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_decoding_on_cuda_matches_the_cpu_path(tmp_path):
    records = _mixed_folder(tmp_path)
    views, batch = _device_batch(records, "cuda")
    reference = collate_views([views[i] for i in range(len(records))])
    assert batch["image"].is_cuda and torch.equal(batch["meta"]["ok"], reference["meta"]["ok"])
    diff = (batch["image"].cpu() - reference["image"]).abs() * 255
    assert diff.mean() < 4  # nvjpeg's IDCT and encoder against libjpeg-turbo's


@pytest.mark.gpu
def test_auto_on_cuda_scores_eagerly_with_amp_and_decodes_on_the_gpu(tiny_ckpt, tmp_path):
    records = _mixed_folder(tmp_path)
    scorer, cuda = _score(tiny_ckpt, records, device="cuda", num_workers=2)
    assert scorer.runtime_choice.reason.startswith("auto: ") and scorer.batches(scorer.dataset(records), scorer.runtime).mode in ("gpu", "pixels")
    if scorer.runtime.name == "torch":
        assert "AMP fp16" in scorer.runtime_choice.reason and scorer.batches(scorer.dataset(records), scorer.runtime).mode == "gpu"
    _, cpu = _score(tiny_ckpt, records, runtime="torch")
    assert cuda["ok"].tolist() == cpu["ok"].tolist()
    assert (cuda["prob"] - cpu["prob"]).abs().max() < 0.05  # fp16 autocast + GPU decoding
