"""The GPU path: what CPU CI cannot run (``gpu`` marker: skipped without CUDA). Run on a GPU
machine with ``pytest -m gpu``.

- scoring on CUDA (fp16 autocast, channels-last, pinned memory) gives the CPU's decisions;
- a training step under ``trainer=gpu`` (16-mixed AMP) writes a checkpoint that loads and
  scores on the CPU;
- Grad-CAM maps work under the GPU runtime.
"""
from __future__ import annotations

import pytest

from conftest import TINY_TRAIN_OVERRIDES, compose
from unmask.core.checkpoint import load_detector
from unmask.core.schemas import ScoringConfig
from unmask.explain.gradcam import ForgeryMaps
from unmask.scoring.scorer import Scorer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def records(tiny_run):
    from hydra.utils import instantiate

    cfg = compose("train", TINY_TRAIN_OVERRIDES + [f"paths.cache_dir={tiny_run['cache_dir']}", f"paths.output_dir={tiny_run['dir']}"])
    data = instantiate(cfg.data, augment=None)
    data.setup()
    return data.records["val"] + data.records["test"]


def test_cuda_scoring_with_amp_matches_cpu(tiny_ckpt, records):
    cpu = Scorer(load_detector(tiny_ckpt), ScoringConfig(device="cpu", num_workers=0, progress=False)).score(records).files
    # decode=cpu: this compares fp16 autocast alone (GPU decoding: tests/test_fast_default.py)
    cuda = Scorer(load_detector(tiny_ckpt), ScoringConfig(device="cuda", amp=True, num_workers=2, decode="cpu", progress=False)).score(records).files
    assert cuda["path"].tolist() == cpu["path"].tolist()
    assert (cuda["prob"] - cpu["prob"]).abs().max() < 5e-3  # fp16 autocast against float32
    assert next(Scorer(load_detector(tiny_ckpt), ScoringConfig(device="cuda")).runtime.detector.parameters()).is_cuda


def test_amp_training_on_gpu_writes_a_checkpoint_that_scores_on_cpu(tmp_path, cache_dir, records):
    from unmask.tasks.train import train

    out = tmp_path / "run"
    overrides = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith("trainer.max_epochs")]
    metrics = train(compose("train", overrides + ["trainer=gpu", "trainer.max_epochs=1", f"hydra.run.dir={out}",
                                                  f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"]))
    assert "threshold" in metrics  # chosen on validation by the scorer, on the GPU
    files = Scorer(load_detector(out / "checkpoints" / "best.ckpt"), ScoringConfig(device="cpu", num_workers=0)).score(records).files
    assert files["ok"].all() and files["prob"].between(0, 1).all()


def test_gradcam_maps_on_the_gpu(tiny_ckpt, records):
    scorer = Scorer(load_detector(tiny_ckpt), ScoringConfig(device="cuda", num_workers=0, progress=False))
    maps = ForgeryMaps("gradcam")
    seen = []

    class Keep:
        def update(self, scored):
            seen.append(scored.maps)

    scorer.score(records[:4], evaluators=[Keep()], explainer=maps)
    assert seen and all(m.shape[1] == 1 and m.min() >= 0 and m.max() <= 1 for m in seen)
