"""LGrad: per-sample input gradients in one pass, min-max maps, frozen source, gradient
cache, custom sources (state-dict file, TorchScript) and a tiny train.py run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_TRAIN_OVERRIDES, compose
from detectors.backbones import MissingWeightsError
from detectors.input_gradients import batch_coupling, input_gradients, minmax_normalize
from detectors.lgrad import LGrad


class MinibatchStdDev(nn.Module):
    """StyleGAN's layer: appends the std of each feature over a group of batch mates, so
    an image's output depends on the other images of its batch."""

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        y = x.reshape(g, -1, c, h, w)
        y = (y - y.mean(0, keepdim=True)).square().mean(0).add(1e-8).sqrt()
        y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class ToyDiscriminator(nn.Module):
    """A tiny StyleGAN-like discriminator: convs, eval-mode BatchNorm, minibatch-stddev, one logit."""

    def __init__(self, minibatch_std: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2)
        )
        self.mbstd = MinibatchStdDev(4) if minibatch_std else nn.Identity()
        self.out = nn.Sequential(nn.Conv2d(9 if minibatch_std else 8, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mbstd(self.features(x)))


def _toy(minibatch_std: bool = True, seed: int = 0) -> ToyDiscriminator:
    torch.manual_seed(seed)
    d = ToyDiscriminator(minibatch_std)
    with torch.no_grad():  # non-trivial running statistics for the eval-mode BatchNorm
        d.features[1].running_mean.uniform_(-0.2, 0.2)
        d.features[1].running_var.uniform_(0.5, 2.0)
    return d.eval()


def _lgrad(source, **kw) -> LGrad:
    defaults = dict(classifier="resnet18", pretrained="none", source_size=None, train_crop=None, source_mean=(0.5,) * 3, source_std=(0.5,) * 3)
    return LGrad(source=source, **{**defaults, **kw})


def _one_by_one(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = []
    for img in x:
        xi = img.unsqueeze(0).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi).sum(), xi)
        out.append(g)
    return torch.cat(out)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max().clamp_min(1e-12))


def test_batched_gradients_equal_batch_of_one_for_an_imagenet_cnn():
    torch.manual_seed(0)
    import timm

    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=10).eval()  # eval BN: no coupling
    x = torch.rand(6, 3, 32, 32)
    assert not batch_coupling(model, (3, 32, 32))
    batched = input_gradients(model, x, "sum", "batched")
    ref = _one_by_one(model, x)
    assert batched.shape == x.shape and batched.abs().sum() > 0
    for b in range(len(x)):  # every sample's gradient is its own batch-of-one gradient
        assert _close(batched[b], ref[b]), f"sample {b}"


def test_minibatch_stddev_source_gets_per_sample_gradients():
    d = _toy(minibatch_std=True)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    ref = _one_by_one(d, x)
    naive = input_gradients(d, x, "sum", "batched")
    # the layer really couples the batch: one naive backward gives the wrong gradients
    assert batch_coupling(d, (3, 16, 16))
    assert not _close(naive, ref, rel=1e-2)
    for mode in ("vmap", "loop"):
        g = input_gradients(d, x, "sum", mode)
        for b in range(len(x)):
            assert _close(g[b], ref[b]), f"{mode}: sample {b}"
    # LGrad notices the coupling by itself and its maps are the per-image maps
    det = _lgrad(_toy(minibatch_std=True)).eval()
    maps = det.compute_gradient_maps(x * 0.5 + 0.5)
    assert det._resolved_mode == "vmap"
    assert torch.equal(maps, minmax_normalize(ref, quantize=True))
    assert _lgrad(_toy(minibatch_std=False)).resolve_batch_mode((3, 16, 16), torch.device("cpu")) == "batched"


def test_gradients_are_computed_under_inference_mode_and_no_grad():
    det = _lgrad(_toy(minibatch_std=False)).eval()
    x = torch.rand(4, 3, 16, 16)
    plain = det.compute_gradient_maps(x)
    with torch.inference_mode():
        inf = det.compute_gradient_maps(torch.rand(4, 3, 16, 16).copy_(x))  # an inference tensor input
        out = det(x)
    with torch.no_grad():
        nog = det.compute_gradient_maps(x)
    assert torch.equal(plain, inf) and torch.equal(plain, nog)
    assert out.logit.shape == (4,) and torch.isfinite(out.logit).all()


def test_minmax_normalisation_per_image_over_all_channels():
    g = torch.randn(3, 3, 8, 8)
    g[1] *= 1000.0  # scale of one image must not affect the others
    g[2] = 0.7  # constant gradient: max(g - min) = 0, stays 0
    m = minmax_normalize(g, quantize=True)
    assert torch.equal(m, m.round()) and m.min() >= 0 and m.max() <= 255
    for b in (0, 1):
        assert m[b].min() == 0 and m[b].max() == 255  # joint over channels, not per channel
    assert torch.equal(m[2], torch.zeros_like(m[2]))
    exact = minmax_normalize(g, quantize=False)
    assert torch.allclose(exact[0], (g[0] - g[0].min()) / (g[0] - g[0].min()).max() * 255)


def test_only_the_classifier_trains_and_the_source_stays_in_eval_mode():
    from unmask.core.module import DetectionModule

    det = _lgrad(_toy(minibatch_std=False))
    det.train()
    assert not det.source.training and det.classifier.training
    assert not any(p.requires_grad for p in det.source.parameters())
    module = DetectionModule(det, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    module.train()
    assert not det.source.training
    optimizer = module.configure_optimizers()
    opt_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in [*det.classifier.parameters(), *det.head.parameters()]}
    assert opt_params == expected
    source_before = [p.clone() for p in det.source.parameters()]
    x = torch.rand(4, 3, 32, 32)
    out = det(x)
    det.loss_terms(out, {"label": torch.tensor([0, 1, 0, 1])})["bce"].backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(source_before, det.source.parameters()))


def test_training_crops_and_flips_the_gradient_map_only():
    det = _lgrad(_toy(minibatch_std=False), train_crop=12)
    seen = []
    det.classifier.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[-1]))
    det.train()(torch.rand(2, 3, 16, 16))
    det.eval()(torch.rand(2, 3, 16, 16))
    assert seen == [12, 16]  # random crop in training, the full map in evaluation


def test_grad_cache_reuses_maps_and_is_keyed_by_content_and_source(tmp_path, monkeypatch):
    det = _lgrad(_toy(minibatch_std=False), grad_cache=str(tmp_path)).eval()
    x = torch.rand(4, 3, 16, 16)
    first = det.gradient_maps(x)
    assert det.grad_cache.misses == 4 and len(list(tmp_path.rglob("*.npy"))) == 4
    monkeypatch.setattr(det, "compute_gradient_maps", lambda image: pytest.fail("cache miss on a cached image"))
    again = det.gradient_maps(x)
    assert torch.equal(first, again) and det.grad_cache.hits == 4
    assert torch.equal(first, minmax_normalize(input_gradients(det.source, det._source_input(x)), True))
    monkeypatch.undo()
    x2 = x.clone()
    x2[1, 0, 0, 0] = 1.0 - x2[1, 0, 0, 0]  # one pixel of one image changed: only it is recomputed
    det.gradient_maps(x2)
    assert det.grad_cache.misses == 5
    # another source (other weights) or another transform never shares entries
    other = _lgrad(_toy(minibatch_std=False, seed=1), grad_cache=str(tmp_path))
    resized = _lgrad(_toy(minibatch_std=False), grad_cache=str(tmp_path), source_size=24)
    names = {det.grad_cache.namespace, other.grad_cache.namespace, resized.grad_cache.namespace}
    assert len(names) == 3
    assert (tmp_path / det.grad_cache.namespace / "identity.json").is_file()


def test_custom_source_from_a_state_dict_file_and_torchscript(tmp_path):
    from hydra.utils import instantiate

    trained = _toy(minibatch_std=True, seed=3)
    file = tmp_path / "D.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, file)
    det = _lgrad(_toy(minibatch_std=True, seed=4), source_weights=str(file))
    for (k, a), b in zip(det.source.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(MissingWeightsError, match="does not exist"):
        _lgrad(_toy(), source_weights=str(tmp_path / "missing.pth"))
    # A TorchScript export of a discriminator, through Hydra as the README documents (a
    # non-timm source declares its normalisation: issue 12 made that mandatory).
    scripted = tmp_path / "D_ts.pt"
    torch.jit.script(_toy(minibatch_std=False, seed=3)).save(str(scripted))
    det = instantiate(
        {"_target_": "detectors.lgrad.LGrad", "source": {"_target_": "torch.jit.load", "f": str(scripted)}, "classifier": "resnet18", "pretrained": "none",
         "source_mean": [0.5, 0.5, 0.5], "source_std": [0.5, 0.5, 0.5]}
    ).eval()
    x = torch.rand(3, 3, 16, 16)
    ref = _one_by_one(torch.jit.load(str(scripted)), det._source_input(x))
    assert torch.equal(det.compute_gradient_maps(x), minmax_normalize(ref, True))


def test_offline_imagenet_source_keeps_its_head_and_bad_names_fail_clearly():
    det = LGrad(source="mobilenetv2_100", source_pretrained="imagenet", classifier="resnet18", pretrained="none")
    assert det.source.num_classes == 1000
    assert det.source.classifier.weight.abs().sum() > 0 and det.source.classifier.weight.std() < 0.2  # ImageNet, not init
    with pytest.raises(MissingWeightsError, match="no offline ImageNet weights"):
        LGrad(source="resnet18", source_pretrained="imagenet", classifier="resnet18", pretrained="none")
    with pytest.raises(ValueError, match="source_output"):
        _lgrad(_toy(), source_output="median")
    with pytest.raises(ValueError, match="batch_mode"):
        _lgrad(_toy(), batch_mode="parallel")


def test_train_py_detector_lgrad_and_reload(tmp_path):
    from unmask.core.checkpoint import load_detector
    from unmask.tasks.train import train

    cache = tmp_path / "grads"
    cfg = compose(
        "train",
        TINY_TRAIN_OVERRIDES
        + [
            "detector=lgrad",
            "detector.classifier=resnet18",
            f"detector.grad_cache={cache}",
            "detector.train_crop=28",
            f"hydra.run.dir={tmp_path}",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'data'}",
        ],
    )
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    assert len(list(cache.rglob("*.npy"))) > 0
    loaded = load_detector(ckpt)
    det = loaded.detector
    assert isinstance(det, LGrad) and not det.source.training
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():  # as infer.py / predict() call it
        out = det(x)
    assert out.logit.shape == (2,) and torch.isfinite(out.prob).all()
