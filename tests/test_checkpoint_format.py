"""The checkpoint format (``unmask.core.checkpoint``): the threshold in one place, and
checkpoints written before the package was split by concern (format 1) still load, score,
infer and resume.

Format 1, as the previous layout wrote it: OSN nested inside ``detector`` (``detector=osn_robust``
with ``detectors.osn.OSNRobust``), the attribution head at ``unmask.attribution``, no
``scoring`` or ``video`` group, ``threshold_policy`` at the top, and the threshold both in
the ``unmask`` section and as a ``threshold`` buffer of the state dict (the buffer won).
"""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from conftest import TINY_TRAIN_OVERRIDES, compose
from detectors.wrappers.attribution import AttributedDetector
from detectors.wrappers.osn import OSNRobust
from unmask.core.checkpoint import FORMAT, alias_targets, load_detector, store_threshold
from unmask.tasks.infer import run_inference
from unmask.tasks.train import train


@pytest.fixture(scope="module")
def wrapped_run(tmp_path_factory, cache_dir):
    """cnnspot inside OSN-robust training with an attribution head: every moved class."""
    out = tmp_path_factory.mktemp("wrapped")
    train(compose("train", TINY_TRAIN_OVERRIDES + ["osn=robust", "attribution=coarse", f"hydra.run.dir={out}",
                                                   f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"]))
    return out / "checkpoints"


def as_format_1(ckpt: dict, threshold: float) -> dict:
    """The same trained checkpoint as the previous layout wrote it."""
    old = copy.deepcopy(ckpt)
    config = old["unmask"]["run_config"]
    osn = config.pop("osn")
    config["detector"] = {**{k: v for k, v in osn.items() if k != "_target_"}, "_target_": "detectors.osn.OSNRobust",
                          "detector": config["detector"]}
    config["attribution"]["_target_"] = "unmask.attribution.AttributedDetector"
    config["threshold_policy"] = config.pop("scoring")["threshold_policy"]
    config.pop("video")
    old["unmask"] = {"run_config": config, "threshold": 0.123}  # the buffer below is the one used
    old["state_dict"]["threshold"] = torch.tensor(threshold)
    return old


def test_the_threshold_has_one_place(wrapped_run):
    ckpt = torch.load(wrapped_run / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["unmask"]["format"] == FORMAT and "threshold" not in ckpt["state_dict"]
    assert load_detector(wrapped_run / "best.ckpt").threshold == pytest.approx(ckpt["unmask"]["threshold"])


def test_store_threshold_rewrites_one_place_atomically(wrapped_run, tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save(as_format_1(torch.load(wrapped_run / "best.ckpt", map_location="cpu", weights_only=False), 0.3), path)
    store_threshold(path, 0.7, "by hand")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert "threshold" not in ckpt["state_dict"] and ckpt["unmask"]["threshold"] == 0.7 and ckpt["unmask"]["format"] == FORMAT
    assert load_detector(path).threshold_from == "by hand"
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_aliases_rename_moved_targets_only():
    node = {"a": {"_target_": "detectors.osn.OSNRobust", "detector": {"_target_": "detectors.npr.NPR"}},
            "b": [{"_target_": "data.perturb.jpeg"}], "c": "detectors.osn.OSNRobust"}
    out = alias_targets(node)
    assert out["a"]["_target_"] == "detectors.wrappers.osn.OSNRobust" and out["a"]["detector"]["_target_"] == "detectors.npr.NPR"
    assert out["b"][0]["_target_"] == "unmask.robustness.perturbations.jpeg"
    assert out["c"] == "detectors.osn.OSNRobust"  # not a target: left alone
    assert node["a"]["_target_"] == "detectors.osn.OSNRobust"  # the input is not modified


def test_a_format_1_checkpoint_loads_scores_and_infers_the_same(wrapped_run, tmp_path):
    from data.synthetic import write_testset

    new = torch.load(wrapped_run / "best.ckpt", map_location="cpu", weights_only=False)
    old_path = tmp_path / "old.ckpt"
    torch.save(as_format_1(new, threshold=0.55), old_path)
    current, old = load_detector(wrapped_run / "best.ckpt"), load_detector(old_path)
    assert isinstance(old.detector, AttributedDetector) and isinstance(old.detector.inner, OSNRobust)
    assert old.threshold == pytest.approx(0.55)  # format 1: the state-dict buffer
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        a, b = current.detector(x), old.detector(x)
    assert torch.equal(a.logit, b.logit) and torch.equal(a.class_logits, b.class_logits)

    testset = tmp_path / "testset"
    write_testset(testset, n=6, size=32)
    outs = [
        run_inference(compose("infer", [f"ckpt={c}", f"input={testset}", f"output_dir={tmp_path / name}", "scoring.num_workers=0",
                                        "scores=true", "scoring.threshold=0.5"]))
        for name, c in (("new", wrapped_run / "best.ckpt"), ("old", old_path))
    ]
    new_scores, old_scores = (pd.read_csv(o.with_suffix(".scores.csv")) for o in outs)
    pd.testing.assert_frame_equal(new_scores, old_scores)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_training_resumes_from_a_format_1_checkpoint(wrapped_run, tmp_path, cache_dir):
    old_last = tmp_path / "old_last.ckpt"
    torch.save(as_format_1(torch.load(wrapped_run / "last.ckpt", map_location="cpu", weights_only=False), 0.4), old_last)
    out = tmp_path / "resumed"
    metrics = train(compose("train", TINY_TRAIN_OVERRIDES + [
        "osn=robust", "attribution=coarse", "trainer.max_epochs=2", f"ckpt_path={old_last}",
        f"hydra.run.dir={out}", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}",
    ]))
    assert (out / "checkpoints" / "last.ckpt").is_file() and "threshold" in metrics
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 1
