"""The shipped default model (unmask/model_zoo/default/): the file the card describes, within
its budget, loadable as data, used when no ckpt= is given, and right on a real photo no
training set of ours contains (scikit-image's astronaut, a NASA portrait)."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import ROOT, SUBPROCESS_ENV, compose
from data.io import file_digest
from unmask.core import default_model
from unmask.core.checkpoint import CheckpointError, load_detector
from unmask.core.default_model import CARD, MAX_BYTES, WEIGHTS, card_sha256, default_checkpoint
from unmask.tasks.infer import MissingCheckpointError, run_inference


@pytest.fixture(scope="module")
def astronaut_jpeg(tmp_path_factory) -> Path:
    from skimage import data as skimage_data

    folder = tmp_path_factory.mktemp("astronaut")
    path = folder / "astronaut.jpg"
    Image.fromarray(np.ascontiguousarray(skimage_data.astronaut())).save(path, quality=90)
    return path


def test_shipped_weights_are_the_file_the_card_describes():
    assert WEIGHTS.is_file() and CARD.is_file()
    assert WEIGHTS.stat().st_size <= MAX_BYTES
    assert file_digest(WEIGHTS, "sha256") == card_sha256()
    with safe_open(str(WEIGHTS), framework="pt") as f:
        meta = f.metadata()
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert meta["dtype"] == "float16" and "F16" in dtypes  # weights only, in half precision
    card = CARD.read_text(encoding="utf-8")
    for must in ("experiment=contest", "non-commercial", "Known weaknesses", "held out"):
        assert must in card


def test_shipped_weights_load_as_the_contest_detector():
    loaded = load_detector(default_checkpoint())
    assert loaded.config["detector"]["_target_"] == "detectors.cnnspot.CNNSpot"
    assert 0.0 < loaded.threshold < 1.0
    assert not any(str(v).startswith("/") for v in loaded.config.get("paths", {}).values())  # no machine paths shipped


def test_a_changed_file_is_refused_not_scored_with(tmp_path):
    weights, card = tmp_path / "model.safetensors", tmp_path / "README.md"
    shutil.copy(WEIGHTS, weights)
    shutil.copy(CARD, card)
    assert default_checkpoint(weights, card) == weights
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="differs from the one its model card"):
        default_checkpoint(weights, card)


def test_without_the_shipped_file_the_error_says_how_to_get_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "WEIGHTS", tmp_path / "gone.safetensors")
    cfg = compose("infer", [f"input={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(MissingCheckpointError, match="python train.py hydra.run.dir=outputs/quickstart"):
        run_inference(cfg)
    assert not (tmp_path / "out").exists()


def test_no_ckpt_scores_a_real_photo_as_real_with_the_shipped_model(astronaut_jpeg, tmp_path, caplog):
    cfg = compose("infer", [f"input={astronaut_jpeg}", f"output_dir={tmp_path}", "scores=true", "scoring.runtime=torch"])
    with caplog.at_level("INFO"):
        result = run_inference(cfg)
    assert "shipped default model" in caplog.text
    rows = list(csv.reader(result.open()))
    assert rows == [["astronaut.jpg", "0"]]


@pytest.mark.slow
def test_contest_entry_needs_no_training(astronaut_jpeg, tmp_path):
    """src/main.py with no src/model.ckpt and no $UNMASK_CKPT scores ./testset with the shipped
    model (the runtime it picks: auto)."""
    (tmp_path / "testset").mkdir()
    shutil.copy(astronaut_jpeg, tmp_path / "testset" / "a.jpg")
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "UNMASK_CKPT"}
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "main.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shipped default model" in proc.stdout + proc.stderr
    (result,) = tmp_path.glob("result_*.xls")
    assert list(csv.reader(result.open())) == [["a.jpg", "0"]]


def test_the_service_without_ckpt_serves_the_shipped_model(tmp_path):
    from unmask.tasks.serve import build_server

    cfg = compose("serve", [f"upload_dir={tmp_path}"])
    assert cfg.ckpt is None
    server, _ = build_server(cfg)
    assert cfg.ckpt == str(WEIGHTS) and server is not None
