"""Issue 2, section 7: evaluation (``unmask.tasks.evaluate``) writes metrics.json, report.md,
predictions.csv and roc.png, and its numbers are scikit-learn's on its own predictions."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, roc_auc_score

import badimages as bad
from conftest import compose
from unmask.core.checkpoint import load_detector
from unmask.core.schemas import ScoringConfig
from unmask.tasks.evaluate import evaluate_records, run_evaluation

TINY_DATA = [
    "data.source.n_per_class=16",
    "data.source.size=32",
    "data.image_size=32",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def evaluated(tiny_ckpt, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    cfg = compose("evaluate", TINY_DATA + [f"ckpt={tiny_ckpt}", f"paths.cache_dir={cache_dir}", f"output_dir={out}"])
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    report = evaluate_records(str(tiny_ckpt), datamodule.records["test"], out, ScoringConfig(num_workers=0, batch_size=8, progress=False))
    return {"out": out, "report": report, "datamodule": datamodule}


def test_all_outputs_exist(evaluated):
    out = evaluated["out"]
    for name in ("metrics.json", "report.md", "predictions.csv", "roc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with Image.open(out / "roc.png") as img:
        assert img.format == "PNG" and min(img.size) > 100
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files


def test_predictions_cover_the_split(evaluated):
    df = pd.read_csv(evaluated["out"] / "predictions.csv")
    test_records = evaluated["datamodule"].records["test"]
    assert {"path", "prob", "label", "ok", "source", "generator", "group"} <= set(df.columns)
    assert df["path"].tolist() == [r.path for r in test_records]
    assert df["label"].tolist() == [r.label for r in test_records]
    assert set(df["label"]) == {0, 1} and df["ok"].all() and df["prob"].between(0, 1).all()


def test_metrics_json_equals_sklearn_on_predictions(evaluated, tiny_ckpt):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    df = pd.read_csv(evaluated["out"] / "predictions.csv")
    y, p = df["label"].to_numpy(), df["prob"].to_numpy()
    thr = load_detector(tiny_ckpt).threshold
    assert metrics["threshold"] == pytest.approx(thr)  # the stored (validation) threshold
    o = metrics["overall"]
    preds = (p >= thr).astype(int)
    assert o["n"] == len(df) and o["n_real"] == int((y == 0).sum()) and o["n_fake"] == int((y == 1).sum())
    assert o["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert o["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-9)
    assert o["acc"] == pytest.approx(accuracy_score(y, preds), abs=1e-9)
    assert o["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, preds), abs=1e-9)
    assert o["real_acc"] == pytest.approx(np.mean(preds[y == 0] == 0))
    assert o["fake_acc"] == pytest.approx(np.mean(preds[y == 1] == 1))
    assert 0.0 <= o["eer"] <= 1.0 and 0.0 <= o["recall_at_90_real_pass"] <= 1.0
    assert metrics["split"] == "test" and metrics["n_undecodable"] == 0
    # what the function returned is what it wrote
    assert metrics["overall"] == pytest.approx(evaluated["report"]["overall"])


def test_breakdowns_per_source_and_generator(evaluated):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    df = pd.read_csv(evaluated["out"] / "predictions.csv")
    assert list(metrics["by_source"]) == ["synthetic"]
    assert metrics["by_source"]["synthetic"]["auc"] == pytest.approx(metrics["overall"]["auc"])
    gens = metrics["by_generator"]
    assert set(gens) == {"real", "transposed_conv"}
    # a generator's fakes are scored against all reals of the split
    assert gens["transposed_conv"]["n"] == len(df)
    assert gens["transposed_conv"]["auc"] == pytest.approx(roc_auc_score(df["label"], df["prob"]))
    assert gens["real"]["n"] == int((df["label"] == 0).sum()) and math.isnan(gens["real"]["auc"])


def test_report_md_has_the_tables(evaluated):
    text = (evaluated["out"] / "report.md").read_text()
    for heading in ("## Overall", "## By source", "## By generator"):
        assert heading in text
    header = "| n | acc | balanced_acc | real_acc | fake_acc | auc | ap | eer | recall_at_90_real_pass |"
    assert text.count(header) == 3
    by_source = text.split("## By source")[1].split("## By generator")[0]
    by_gen = text.split("## By generator")[1]
    assert "| synthetic |" in by_source
    assert "| transposed_conv |" in by_gen and "| real |" in by_gen
    auc = json.loads((evaluated["out"] / "metrics.json").read_text())["overall"]["auc"]
    assert f"{auc:.4f}" in text.split("## Overall")[1].split("## By source")[0]


def _tiny_manifest(root):
    """Both classes in every split, one undecodable file and one missing file in test."""
    rows = ["relpath,label,split,generator,source"]
    for split in ("train", "val", "test"):
        for i in range(2):
            bad.good_png(root / f"{split}_r{i}.png", seed=i, size=16)
            bad.good_jpeg(root / f"{split}_f{i}.jpg", seed=10 + i, size=16)
            rows += [f"{split}_r{i}.png,real,{split},,srcA", f"{split}_f{i}.jpg,fake,{split},gan{i},srcB"]
    bad.random_bytes(root / "broken.jpg")
    rows += ["broken.jpg,fake,test,gan0,srcB", "missing.jpg,fake,test,gan0,srcB"]
    (root / "MANIFEST.csv").write_text("\n".join(rows) + "\n")
    return root / "MANIFEST.csv"


def test_undecodable_files_are_counted_not_scored_and_threshold_override(tiny_ckpt, tmp_path):
    manifest = _tiny_manifest(tmp_path)
    cfg = compose("evaluate", ["data=manifest", f"data.source.manifest={manifest}", "data.image_size=32", "data.num_workers=0", f"ckpt={tiny_ckpt}", f"output_dir={tmp_path / 'out'}"])
    data = instantiate(cfg.data)
    data.setup()
    report = evaluate_records(str(tiny_ckpt), data.records["test"], tmp_path / "out", ScoringConfig(threshold="0.0", num_workers=0, progress=False))
    assert report["n_undecodable"] == 1 and report["threshold"] == 0.0
    assert report["threshold_from"] == "set by scoring.threshold"
    o = report["overall"]
    assert (o["n"], o["n_real"], o["n_fake"]) == (4, 2, 2)  # broken.jpg left out, missing.jpg skipped
    assert o["real_acc"] == 0.0 and o["fake_acc"] == 1.0  # threshold 0: everything flagged
    assert set(report["by_source"]) == {"srcA", "srcB"} and set(report["by_generator"]) == {"real", "gan0", "gan1"}
    assert report["by_generator"]["gan0"]["n"] == 3  # its one decodable fake + both reals
    df = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(df) == 5 and df.loc[df["path"].str.endswith("broken.jpg"), "ok"].tolist() == [False]
    assert "1 undecodable files left out" in (tmp_path / "out" / "report.md").read_text()


def test_unknown_split_is_a_clear_error(tiny_ckpt, cache_dir, tmp_path):
    cfg = compose("evaluate", TINY_DATA + [f"ckpt={tiny_ckpt}", f"paths.cache_dir={cache_dir}", f"output_dir={tmp_path}", "split=holdout"])
    with pytest.raises(ValueError, match="split must be one of"):
        run_evaluation(cfg)


def test_an_empty_split_gives_an_empty_report_not_a_crash(tiny_ckpt, tmp_path):
    report = evaluate_records(str(tiny_ckpt), [], tmp_path, ScoringConfig(num_workers=0, progress=False))
    assert report["overall"]["n"] == 0 and report["n_undecodable"] == 0
    assert (tmp_path / "report.md").is_file() and pd.read_csv(tmp_path / "predictions.csv").empty
