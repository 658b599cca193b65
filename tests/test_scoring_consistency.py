"""One scorer: a checkpoint with a face stage gets the same score for a file whichever job
scores it. The robustness grid's clean cell, the evaluation report, infer.py's scores and
the validation threshold all come from ``unmask.scoring.Scorer``.

The checkpoint is the landmark detector (rgnet, which reads the face stage's landmarks) with
the template face stage, whole image plus face crops combined by max: the case where a
loop of its own (top face only, no landmarks) would score differently or not at all.
"""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_TRAIN_OVERRIDES, compose
from unmask.core.checkpoint import load_detector
from unmask.core.metrics import choose_threshold
from unmask.core.schemas import ScoringConfig
from unmask.robustness.attacks import FGSM
from unmask.robustness.grid import PerturbationGrid
from unmask.robustness.perturbations import jpeg
from unmask.scoring.scorer import Scorer
from unmask.tasks.evaluate import evaluate_records
from unmask.tasks.infer import run_inference
from unmask.tasks.train import train

FACES = ["faces=template", "faces.crop=true", "faces.whole_image=true", "faces.max_faces=2"]
SCORING = ScoringConfig(batch_size=4, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def face_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("face_run")
    cfg = compose("train", TINY_TRAIN_OVERRIDES + ["detector=rgnet", "detector.width=32", "detector.depth=2", *FACES,
                                                   f"hydra.run.dir={out}", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"])
    metrics = train(cfg)
    data = instantiate(cfg.data, augment=None)
    data.setup()
    return {"ckpt": out / "checkpoints" / "best.ckpt", "data": data, "metrics": metrics, "dir": out}


def test_every_job_scores_a_file_the_same_way(face_run, tmp_path):
    records = face_run["data"].records["val"] + face_run["data"].records["test"]
    grid = PerturbationGrid({"jpeg": {"make": jpeg, "severities": [50]}, "fgsm": {"make": FGSM, "severities": [2]}})
    report = evaluate_records(face_run["ckpt"], records, tmp_path / "eval", SCORING, perturb=grid)

    evaluated = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("path")["prob"]
    assert len(evaluated) == len(records) and evaluated.notna().all()
    # the face stage was used: every file scored as its whole image plus its face
    assert (pd.read_csv(tmp_path / "eval" / "predictions.csv")["n_faces"] == 1).all()

    cells = pd.read_csv(tmp_path / "eval" / "robustness_scores.csv")
    clean = cells[cells["family"] == "clean"].set_index("path")["prob"]
    pd.testing.assert_series_equal(clean.sort_index(), evaluated.sort_index(), check_names=False, atol=1e-6, rtol=0)
    assert report["robustness"][0]["acc"] == pytest.approx(report["overall"]["acc"])
    assert report["robustness"][0]["auc"] == pytest.approx(report["overall"]["auc"])
    assert {r["family"] for r in report["robustness"]} == {"clean", "jpeg", "fgsm"}  # rgnet enters every cell

    listing = tmp_path / "list.csv"  # infer.py on exactly these files, through a manifest
    listing.write_text("relpath\n" + "".join(f"{os.path.relpath(r.path, tmp_path)}\n" for r in records))
    result = run_inference(compose("infer", [f"ckpt={face_run['ckpt']}", f"input={listing}", f"output_dir={tmp_path / 'infer'}",
                                             "scoring.batch_size=4", "scoring.num_workers=0", "scores=true"]))
    inferred = pd.read_csv(result.with_suffix(".scores.csv"))
    inferred.index = [os.path.normpath(tmp_path / n) for n in inferred["name"]]
    pd.testing.assert_series_equal(inferred["prob"].sort_index(), evaluated.sort_index(), check_names=False, atol=2e-6, rtol=0)


def test_the_stored_threshold_is_the_scorers_on_validation(face_run):
    loaded = load_detector(face_run["ckpt"])
    val = Scorer(loaded, SCORING).score(face_run["data"].records["val"]).usable()
    assert loaded.threshold == pytest.approx(choose_threshold(val["label"], val["prob"], "youden"), abs=1e-6)
    ckpt = torch.load(face_run["ckpt"], map_location="cpu", weights_only=False)
    assert "threshold" not in ckpt["state_dict"] and ckpt["unmask"]["threshold"] == pytest.approx(loaded.threshold)
    assert face_run["metrics"]["threshold"] == pytest.approx(loaded.threshold)


def test_image_only_runtimes_refuse_a_landmark_detector(face_run, tmp_path):
    loaded = load_detector(face_run["ckpt"])
    for options in (ScoringConfig(runtime="onnx", num_workers=0), ScoringConfig(compile=True, num_workers=0)):
        with pytest.raises(ValueError, match="needs landmarks besides the image"):
            Scorer(loaded, options).score(face_run["data"].records["test"])
