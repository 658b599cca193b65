"""UnivFD: the CLIP ViT-L/14 probe (769 trainable parameters, the published probe file),
the open_clip local-weights path, the embedding cache, the k-NN bank and tiny train.py runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_TRAIN_OVERRIDES, compose
from detectors.backbones import MissingWeightsError
from detectors.univfd import CLIP_MEAN, FeatureBank, UnivFD

SHARED = Path(os.environ.get("UNMASK_SHARED", ROOT / ".." / "shared"))
PUBLISHED_PROBE = SHARED / "weights" / "univfd_fc_weights.pth"
TINY_CLIP = "unmask-test-tiny-vit"


@pytest.fixture(scope="module")
def vit_l14() -> UnivFD:
    """A random-init ViT-L-14 (plumbing only: no CLIP weights exist here), built once."""
    if not PUBLISHED_PROBE.is_file():
        pytest.skip(f"{PUBLISHED_PROBE} not found (../shared)")
    return UnivFD(library="open_clip", encoder="ViT-L-14", pretrained="none", probe_weights=str(PUBLISHED_PROBE), crop=224)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """Registers a tiny open_clip architecture so the open_clip path runs in milliseconds."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip_cfg")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    }
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return TINY_CLIP


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_vit_l14_probe_has_exactly_769_trainable_parameters(vit_l14):
    assert vit_l14.encoder.dim == 768  # the projected embedding, not the 1024-d token
    assert _trainable(vit_l14) == 769
    assert _trainable(vit_l14.encoder) == 0
    assert vit_l14.encoder.input_size == (224, 224)
    assert torch.allclose(vit_l14.pixel_mean.flatten(), torch.tensor(CLIP_MEAN))
    vit_l14.train()
    assert not vit_l14.encoder.training and vit_l14.probe.training


def test_published_probe_file_is_loaded_into_the_vit_l14_probe(vit_l14):
    state = torch.load(PUBLISHED_PROBE, map_location="cpu", weights_only=True)
    assert torch.equal(vit_l14.probe.weight, state["weight"]) and torch.equal(vit_l14.probe.bias, state["bias"])
    with pytest.raises(ValueError, match="does not fit"):  # 1280-d Lite2 features: a clear error
        UnivFD(encoder="tf_efficientnet_lite2", pretrained="none", probe_weights=str(PUBLISHED_PROBE))


def test_open_clip_local_weights_file_and_forward(tiny_clip, tmp_path):
    import open_clip

    torch.manual_seed(1)
    source = open_clip.create_model(tiny_clip, pretrained=None)
    file = tmp_path / "clip.pt"
    torch.save(source.state_dict(), file)
    det = UnivFD(library="open_clip", encoder=tiny_clip, weights=str(file)).eval()
    for (k, a), b in zip(det.encoder.visual.state_dict().items(), source.visual.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 48, 48)  # resized to the ViT's fixed 32x32 input
    with torch.inference_mode():
        out = det(x)
    assert out.features.shape == (2, 16) and out.logit.shape == (2,)
    with torch.no_grad():
        expected = source.encode_image(det.normalize(torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)))
    assert torch.allclose(out.features, expected, atol=1e-5)  # projected, not L2-normalised
    with pytest.raises(MissingWeightsError, match="does not exist"):
        UnivFD(library="open_clip", encoder=tiny_clip, weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="no 'imagenet' weights"):
        UnivFD(library="open_clip", encoder=tiny_clip, pretrained="imagenet")
    with pytest.raises(ValueError, match="library"):
        UnivFD(library="keras")


def test_feature_cache_skips_the_encoder_and_is_keyed_by_weights(tmp_path, monkeypatch):
    det = UnivFD(encoder="mobilenetv2_050", pretrained="none", feature_cache=str(tmp_path)).eval()
    x = torch.rand(3, 3, 32, 32)
    first = det(x)
    assert det.feature_cache.misses == 3 and len(list(tmp_path.rglob("*.npy"))) == 3
    monkeypatch.setattr(det, "encode", lambda image: pytest.fail("encoder ran on a cached image"))
    again = det(x)
    assert torch.equal(first.features, again.features) and torch.equal(first.logit, again.logit)
    monkeypatch.undo()
    torch.manual_seed(5)
    other = UnivFD(encoder="mobilenetv2_050", pretrained="none", feature_cache=str(tmp_path))
    assert other.feature_cache.namespace != det.feature_cache.namespace  # other weights, other entries
    # only the probe trains; the cached embedding needs no encoder graph
    assert _trainable(det) == det.encoder.dim + 1


def test_feature_bank_dedups_scores_and_leaves_one_out():
    bank = FeatureBank(dim=2)
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([1, 1, 0, 0])
    keys = torch.tensor([10, 11, 20, 21])
    assert bank.add(feats, labels, keys) == 4
    assert bank.add(feats, labels, keys) == 0  # the same images in a later epoch add nothing
    assert len(bank) == 4
    score = bank.score(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), k=1)
    assert score[0] > 0 > score[1]  # near the fakes -> positive, near the reals -> negative
    # leave-one-out: the query's own entry is ignored, its class mate decides
    own = bank.score(feats[:1], k=1, exclude_keys=keys[:1])
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(own, cos(feats[:1], feats[1:2]) - cos(feats[:1], feats[3:4]), atol=1e-6)
    own_k2 = bank.score(feats[:1], k=2, exclude_keys=keys[:1])  # k=2: the excluded entry is not averaged in
    reals_k2 = (cos(feats[:1], feats[2:3]) + cos(feats[:1], feats[3:4])) / 2
    assert torch.allclose(own_k2, cos(feats[:1], feats[1:2]) - reals_k2, atol=1e-6)
    assert FeatureBank(dim=2).score(feats, k=1).eq(0).all()  # empty bank: no opinion
    limited = FeatureBank(dim=2, limit=3)
    limited.add(feats, labels, keys)
    assert limited.keys.tolist() == [11, 20, 21]  # oldest dropped


def test_knn_fills_its_bank_in_training_only_and_restores_it_from_a_state_dict():
    det = UnivFD(encoder="mobilenetv2_050", pretrained="none", mode="knn", knn_k=1)
    assert _trainable(det) == 2  # the calibration scale and bias
    x = torch.rand(4, 3, 32, 32)
    batch = {"label": torch.tensor([0, 1, 0, 1]), "meta": {"ok": [True, True, True, False]}}
    det.train()(x, batch)
    assert len(det.bank) == 3  # the undecodable sample is left out
    det.train()(x, batch)
    assert len(det.bank) == 3  # no duplicates across epochs
    det.eval()(torch.rand(2, 3, 32, 32), {"label": torch.tensor([0, 1])})
    assert len(det.bank) == 3  # evaluation never adds
    fresh = UnivFD(encoder="mobilenetv2_050", pretrained="none", mode="knn")
    fresh.load_state_dict(det.state_dict())
    assert torch.equal(fresh.bank.features, det.bank.features) and torch.equal(fresh.bank.keys, det.bank.keys)
    with pytest.raises(ValueError, match="mode=knn has no probe"):
        UnivFD(encoder="mobilenetv2_050", pretrained="none", mode="knn", probe_weights="x.pth")


def test_crop_is_random_per_image_in_training_and_centred_in_evaluation():
    det = UnivFD(encoder="mobilenetv2_050", pretrained="none", crop=24)
    image = torch.rand(1, 3, 32, 32).expand(8, 3, 32, 32).contiguous()
    assert torch.equal(det.eval()._geometry(image), image[..., 4:28, 4:28])
    torch.manual_seed(0)
    crops = det.train()._geometry(image)
    assert crops.shape == (8, 3, 24, 24)
    assert len({c.numpy().tobytes() for c in crops}) > 1  # not one position for the whole batch


@pytest.mark.parametrize("detector", ["univfd", "univfd_knn"])
def test_train_py_univfd_probe_and_knn_with_cache(detector, tmp_path):
    from unmask.core.checkpoint import load_detector
    from unmask.tasks.train import train

    cache = tmp_path / "emb"
    cfg = compose(
        "train",
        TINY_TRAIN_OVERRIDES
        + [
            f"detector={detector}",
            "detector.encoder=mobilenetv2_050",
            f"detector.feature_cache={cache}",
            "canonical=deterministic",
            "augment=none",
            f"hydra.run.dir={tmp_path}",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'data'}",
        ],
    )
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    assert ckpt.is_file() and len(list(cache.rglob("*.npy"))) > 0
    det = load_detector(ckpt).detector
    assert isinstance(det, UnivFD) and det.mode == cfg.detector.mode
    if det.mode == "knn":
        assert len(det.bank) == 16  # 2 batches of 8 distinct training images
        assert set(det.bank.labels.tolist()) <= {0, 1}
    with torch.inference_mode():
        out = det(torch.rand(2, 3, 32, 32))
    assert out.logit.shape == (2,) and torch.isfinite(out.logit).all()
