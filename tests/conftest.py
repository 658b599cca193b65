"""Shared fixtures: a tiny trained checkpoint and config composition without a CLI.

The checkpoint is trained once per session on the framework's synthetic smoke set
(32 px, 16 images per class, 2 steps, random init): it proves the plumbing, not accuracy.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):  # data/, detectors/, unmask/ and test helpers (badimages)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import unmask.core.config  # noqa: E402  (the ${unmask_root:} resolver and the config schemas)

# Tests run tiny tensors on a few shared cores: a second intra-op thread only adds
# contention (a 32 px EfficientNet batch measured 25x slower with 2 threads under load).
torch.set_num_threads(1)
# scoring.runtime=auto exports every new checkpoint to ONNX on the CPU: with the tracing
# exporter (0.5 s against 6-15 s for dynamo's on 2 loaded cores; the graphs score alike),
# here and in the subprocesses.
os.environ.setdefault("UNMASK_ONNX_EXPORTER", "torchscript")
# Subprocesses started by tests (python infer.py ...) inherit this.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

TINY_TRAIN_OVERRIDES = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.enable_progress_bar=false",
    "++trainer.num_sanity_val_steps=0",
    "data.source.n_per_class=16",
    "data.source.size=32",
    "data.image_size=32",
    "data.num_workers=0",
    "data.batch_size=8",
    "logger=none",
    "detector.pretrained=none",
    "test=false",
]


def pytest_collection_modifyitems(config, items) -> None:
    """``gpu`` tests need CUDA: skipped (and said so) where there is none, as on CPU CI."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose(config_name: str, overrides: list[str] | None = None):
    """A Hydra config as ``python <entry>.py overrides...`` would see it (no ``hydra:``
    resolver: callers set every ``${hydra:...}`` value, e.g. ``paths.output_dir``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where the synthetic smoke set is generated (shared by every test of the session)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> dict:
    """Train once with tiny settings; returns ``{"dir", "ckpt", "cache_dir", "metrics"}``."""
    from unmask.tasks.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose(
        "train",
        TINY_TRAIN_OVERRIDES + [f"hydra.run.dir={out}", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"],
    )
    metrics = train(cfg)
    ckpt = out / "checkpoints" / "best.ckpt"
    assert ckpt.is_file(), f"tiny training wrote no {ckpt}"
    return {"dir": out, "ckpt": ckpt, "cache_dir": cache_dir, "metrics": metrics}


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run) -> Path:
    return tiny_run["ckpt"]
