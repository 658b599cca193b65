"""Issue 4: differentiable JPEG, OSN noise simulator, xi memory and OSN-robust training."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.canonical import jpeg_roundtrip
from data.synthetic import natural_image
from detectors.backbones import MissingWeightsError, skip_pretrained
from detectors.diffjpeg import CHROMA_TABLE, LUMA_TABLE, DiffJPEG
from detectors.osn_simulator import NoiseSimulator
from detectors.wrappers.osn import OSNRobust, SignGradientMemory
from tests.conftest import TINY_TRAIN_OVERRIDES, compose
from tests.test_robustness import TinyDetector

EPS = 4 / 255


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255


# --- DiffJPEG -------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [95, 75, 50, 30])
def test_diffjpeg_matches_pil_jpeg(q):
    """Stated tolerance: PSNR >= 38 dB to PIL's output and a mean absolute error below
    2.5 grey levels and below half of what the JPEG itself changes."""
    img = natural_image(np.random.default_rng(q), 64)
    ref = jpeg_roundtrip(img, q).astype(np.float64)
    out = DiffJPEG()(to_tensor(img), q)[0].permute(1, 2, 0).numpy() * 255
    mae = np.abs(out - ref).mean()
    psnr = 10 * math.log10(255**2 / ((out - ref) ** 2).mean())
    assert psnr >= 38 and mae < 2.5
    assert mae < 0.5 * np.abs(img - ref).mean()


def test_diffjpeg_tables_follow_libjpeg_scaling():
    luma, chroma = DiffJPEG().tables(torch.tensor([50.0, 100.0, 10.0]))
    assert torch.equal(luma[0].flatten(), torch.tensor(LUMA_TABLE, dtype=torch.float32))
    assert torch.equal(chroma[0].flatten(), torch.tensor(CHROMA_TABLE, dtype=torch.float32))
    assert torch.all(luma[1] == 1)  # q100: every step 1
    assert luma[2, 0, 0] == 80  # q10: scale 500 % -> 16 * 5


def test_diffjpeg_passes_gradients_any_size_and_per_image_quality():
    x = torch.rand(2, 3, 37, 45, requires_grad=True)
    y = DiffJPEG()(x, torch.tensor([60, 90]))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.5


# --- xi memory ------------------------------------------------------------------------------


def test_xi_memory_is_bounded_and_clamped_to_eps():
    mem = SignGradientMemory(eps=EPS, capacity=4, combine=5)
    like = torch.zeros(3, 3, 8, 8)
    assert torch.equal(mem.sample(like), like)  # empty: no perturbation yet
    for _ in range(10):
        mem.push(torch.randn(4, 3, 8, 8))
    assert len(mem) == 4  # the authors' list grows without bound; this one does not
    xi = mem.sample(like)
    assert xi.shape == like.shape and xi.abs().max() <= EPS + 1e-9
    assert xi.abs().max() == pytest.approx(EPS)
    assert torch.equal(mem.sample(torch.zeros(3, 3, 16, 16)), torch.zeros(3, 3, 16, 16))  # other size: skipped


# --- simulator ------------------------------------------------------------------------------


def test_simulator_is_a_small_residual_and_needs_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="pretrain_osn"):
        NoiseSimulator(base_channels=4)
    sim = NoiseSimulator(base_channels=4, random_init=True).eval()
    x = torch.rand(2, 3, 36, 36) * 2 - 1  # not a multiple of 16: padded inside
    y = sim(x)
    assert y.shape == x.shape and (y - 0.98 * x).abs().max() <= 0.02 + 1e-6
    path = tmp_path / "sim.pt"
    torch.save(sim.state_blob(), path)
    again = NoiseSimulator(base_channels=4, weights=str(path)).eval()
    assert torch.equal(again(x), y)
    with pytest.raises(MissingWeightsError, match="trained as"):
        NoiseSimulator(base_channels=8, weights=str(path))
    with skip_pretrained():  # restoring a checkpoint: no weights file needed
        NoiseSimulator(base_channels=4)


# --- the wrapper ----------------------------------------------------------------------------


def test_osn_wrapper_eval_passthrough_train_noise_and_xi_update():
    inner = TinyDetector()
    sim = NoiseSimulator(base_channels=4, random_init=True)
    det = OSNRobust(inner, simulator=sim, xi_capacity=3)
    x = torch.rand(4, 3, 32, 32)
    batch = {"label": torch.tensor([0, 1, 0, 1])}
    det.eval()
    assert torch.equal(det(x, batch).logit, inner(x, batch).logit)
    det.train()
    assert not sim.training and not any(p.requires_grad for p in sim.parameters())
    for step in range(5):
        out = det(x, batch)
        loss = sum(det.loss_terms(out, batch).values())
        loss.backward()
        assert det._xi is not None and det._xi.grad is not None
        det.after_backward()
        assert len(det.memory) == min(step + 1, 3)
    assert not torch.equal(det(x, batch).logit, inner.eval()(x, batch).logit)


def test_pretrain_then_short_osn_training_run(tmp_path, cache_dir):
    """The whole path on tiny synthetic data: pretrain g, train cnnspot wrapped in OSN
    with it, check xi maps were collected, reload the checkpoint for evaluation."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from unmask.core.checkpoint import load_detector
    from unmask.tasks.osn_pretrain import pretrain_simulator
    from unmask.tasks.train import build_module, train

    data = ["data.source.n_per_class=16", "data.source.size=32", "data.image_size=32", "data.num_workers=0", f"paths.cache_dir={cache_dir}"]
    pre = compose("osn_pretrain", data + ["simulator.base_channels=4", "steps=3", "batch_size=8", "num_workers=0", "limit_val=8", f"paths.output_dir={tmp_path / 'pre'}"])
    result = pretrain_simulator(pre)
    weights = tmp_path / "pre" / "simulator.pt"
    assert weights.is_file() and set(result["val_psnr_db_after"]) == {"identity", "jpeg_only", "simulator"}

    sim = f"osn.simulator={{_target_:detectors.osn_simulator.NoiseSimulator,base_channels:4,weights:{weights}}}"
    overrides = TINY_TRAIN_OVERRIDES + ["osn=robust", sim, f"paths.cache_dir={cache_dir}"]
    cfg = compose("train", overrides + [f"paths.output_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'run'}"])

    module = build_module(cfg)  # the xi hook runs inside DetectionModule.training_step's backward
    dm = instantiate(cfg.data, augment=None)
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=dm)
    assert len(module.detector.memory) == 2

    train(cfg)
    loaded = load_detector(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert isinstance(loaded.detector, OSNRobust) and not loaded.detector.training
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.detector(x).logit, loaded.detector.detector(x).logit)
