"""The fast inference path: ONNX export + onnxruntime against PyTorch, infer.py scoring.runtime=onnx,
the ONNX file's reuse/refresh beside a checkpoint, and torch.compile's fallback."""
from __future__ import annotations

import csv
import logging
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose
from unmask.core.checkpoint import load_detector
from unmask.core.schemas import ScoringConfig
from unmask.scoring.onnx_export import default_onnx_path, ensure_onnx, export_onnx, max_prob_difference
from unmask.scoring.runtimes import OnnxRuntime, TorchRuntime
from unmask.scoring.scorer import Scorer

# float32 graphs differ from PyTorch only by operation order and fused kernels
PROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint's detector (32 px) exported once with the quick exporter."""
    loaded = load_detector(tiny_ckpt)
    path = export_onnx(loaded.detector, tmp_path_factory.mktemp("onnx") / "tiny.onnx", 32, exporter="torchscript")
    return {"loaded": loaded, "path": path}


def test_onnx_matches_torch_for_any_batch_size(exported):
    detector = exported["loaded"].detector
    torch_rt, onnx_rt = TorchRuntime(detector, device="cpu"), OnnxRuntime(exported["path"])
    gen = torch.Generator().manual_seed(1)
    for n in (1, 5, 16):  # the batch axis is dynamic
        images = torch.rand(n, 3, 32, 32, generator=gen)
        p_torch, p_onnx = torch_rt(images).prob, onnx_rt(images).prob
        assert p_onnx.shape == (n,) and p_onnx.dtype == torch.float32
        assert torch.allclose(p_onnx, p_torch, atol=PROB_TOLERANCE, rtol=0)
    assert p_torch.std() > 0  # not a constant model: the comparison means something


@pytest.mark.slow
def test_default_exporter_matches_torch(exported, tmp_path):
    path = export_onnx(exported["loaded"].detector, tmp_path / "dynamo.onnx", 32)  # the torch.export-based default
    assert max_prob_difference(exported["loaded"].detector, path, 32) < PROB_TOLERANCE


def test_onnx_refuses_other_image_sizes(exported):
    with pytest.raises(ValueError, match="re-export"):
        OnnxRuntime(exported["path"])(torch.rand(2, 3, 48, 48))


def _read(path):
    with open(path, newline="") as f:
        return dict(csv.reader(f))


def test_infer_runtime_onnx_matches_torch(tiny_ckpt, exported, tmp_path):
    from PIL import Image

    from data.synthetic import natural_image
    from unmask.tasks.infer import run_inference

    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(natural_image(rng, 40)).save(root / f"{i:02d}.png")
    common = [f"ckpt={tiny_ckpt}", f"input={root}", "scoring.num_workers=0", "scoring.batch_size=4", "scores=true", "scoring.threshold=prior:0.5"]
    out_torch = run_inference(compose("infer", common + [f"output_dir={tmp_path / 'torch'}"]))
    out_onnx = run_inference(compose("infer", common + [f"output_dir={tmp_path / 'onnx'}", "scoring.runtime=onnx", f"scoring.onnx_model={exported['path']}"]))
    s_torch = pd.read_csv(out_torch.with_suffix(".scores.csv")).set_index("name")["prob"]
    s_onnx = pd.read_csv(out_onnx.with_suffix(".scores.csv")).set_index("name")["prob"]
    assert list(s_onnx.index) == list(s_torch.index) and len(s_onnx) == 10
    assert np.abs(s_onnx - s_torch).max() <= PROB_TOLERANCE + 1e-6  # scores.csv keeps 6 decimals
    assert _read(out_onnx) == _read(out_torch)


def test_ensure_onnx_reuses_a_fresh_file_and_refreshes_a_stale_one(tiny_ckpt, exported, tmp_path, monkeypatch):
    import shutil

    import unmask.scoring.onnx_export as onnx_export

    ckpt = tmp_path / "best.ckpt"
    shutil.copy(tiny_ckpt, ckpt)
    loaded = load_detector(ckpt)
    calls = []

    def fake_export(detector, path, size, exporter="dynamo", opset=None):
        calls.append((path, size))
        shutil.copy(exported["path"], path)
        return path

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    first = ensure_onnx(loaded)  # none yet: exported beside the checkpoint
    assert first == default_onnx_path(ckpt) == tmp_path / "best.onnx" and calls == [(first, 32)]
    assert ensure_onnx(loaded) == first and len(calls) == 1  # fresh: reused
    later = time.time() + 10
    os.utime(ckpt, (later, later))  # the checkpoint changed after the export
    ensure_onnx(loaded)
    assert len(calls) == 2
    with pytest.raises(FileNotFoundError, match="onnx_export"):
        ensure_onnx(loaded, tmp_path / "nope.onnx")
    assert Scorer(loaded, ScoringConfig(runtime="onnx", onnx_model=str(first))).runtime.name == "onnx"
    with pytest.raises(ValueError, match="tensorrt"):
        ScoringConfig(runtime="tensorrt")


def test_compile_failure_falls_back_to_eager(exported, monkeypatch, caplog):
    def broken_compile(module, **kwargs):
        def run(image):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    detector = exported["loaded"].detector
    images = torch.rand(3, 3, 32, 32)
    expected = TorchRuntime(detector, device="cpu")(images).prob
    runtime = TorchRuntime(detector, device="cpu", compile=True)
    with caplog.at_level(logging.WARNING, logger="unmask.scoring.runtimes"):
        got = runtime(images).prob
    assert torch.allclose(got, expected) and runtime.compiled is None
    assert "torch.compile failed" in caplog.text
