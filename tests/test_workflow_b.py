"""Issue 13 ("Researcher workflow"), items 3, 4, 5, 6 and 8:

3. infer.py takes inputs as people give them (one file, a folder, a CSV list), prints a verdict
   per file for a few files, and says how to get a checkpoint when none is given;
4. the hand-set config groups are typed (a bad value fails naming the key) and each entry
   point's ``--help`` lists the groups and keys it reads;
5. report.md opens with what was evaluated, carries bootstrap intervals, flags small groups
   and names its plots;
6. the explanation gallery is a page with the scored image beside its overlay, a legend,
   filters and paging;
8. ``python -m unmask.slim`` writes a weights-only safetensors file that scores as the .ckpt.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from PIL import Image

import badimages as bad
from conftest import ROOT, SUBPROCESS_ENV, compose
from data.records import Record
from unmask.core.checkpoint import CheckpointError, load_detector, read_checkpoint
from unmask.core.schemas import ScoringConfig
from unmask.tasks.infer import MissingCheckpointError, run_inference


def _infer_cfg(ckpt, input_path, out, *extra):
    return compose(
        "infer",
        [f"ckpt={ckpt}", f"input={input_path}", f"output_dir={out}", "scoring.num_workers=0", "scoring.batch_size=8", "scoring.progress=false", *extra],
    )


def _png(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return bad.good_png(path, **kwargs)


def _jpeg(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return bad.good_jpeg(path, **kwargs)


def _rows(result: Path) -> list[list[str]]:
    return [line.split(",") for line in result.read_text().splitlines()]


# ============================================================== 3. inputs as people give them


VERDICT = re.compile(r"^(?P<name>\S+)\s+(?P<verdict>AI-generated|real)\s+p=(?P<p>\d\.\d+)\s+\(threshold (?P<t>\d\.\d\d+)(?P<rest>.*)\)$")


def test_a_single_image_is_scored_and_named_by_its_file_name(tiny_ckpt, tmp_path, capsys):
    photo = _jpeg(tmp_path / "in" / "photo.jpg", seed=3)
    _png(tmp_path / "in" / "other.png", seed=4)  # beside it, not scored
    result = run_inference(_infer_cfg(tiny_ckpt, photo, tmp_path / "out", "scores=true"))
    rows = _rows(result)
    assert [r[0] for r in rows] == ["photo.jpg"] and rows[0][1] in ("0", "1")
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("photo.jpg")]
    match = VERDICT.match(line)
    assert match, line
    scores = pd.read_csv(result.with_suffix(".scores.csv"))
    assert match["verdict"] == ("AI-generated" if rows[0][1] == "1" else "real")
    assert float(match["p"]) == pytest.approx(float(scores["prob"].iloc[0]), abs=0.006)


def test_a_single_video_file_is_one_row_with_its_frames(tiny_ckpt, tmp_path, capsys):
    from test_video import noise_frames, write_video

    (tmp_path / "in").mkdir()
    clip = write_video(tmp_path / "in" / "clip.mp4", noise_frames(12, seed=1))
    result = run_inference(_infer_cfg(tiny_ckpt, clip, tmp_path / "out", "video.sampler.num_frames=4"))
    assert [r[0] for r in _rows(result)] == ["clip.mp4"]
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("clip.mp4")]
    assert VERDICT.match(line) and "4 frames" in line, line


def test_few_files_get_a_verdict_each_many_get_the_summary(tiny_ckpt, tmp_path, capsys):
    root = tmp_path / "in"
    for i in range(3):
        _png(root / f"img_{i}.png", seed=i)
    bad.random_bytes(root / "broken.jpg")
    run_inference(_infer_cfg(tiny_ckpt, root, tmp_path / "a"))
    lines = capsys.readouterr().out.splitlines()
    verdicts = [ln for ln in lines if VERDICT.match(ln)]
    assert sorted(VERDICT.match(ln)["name"] for ln in verdicts) == ["img_0.png", "img_1.png", "img_2.png"]
    (broken,) = [ln for ln in lines if ln.startswith("broken.jpg")]
    assert "undecodable" in broken and "fallback_label=0" in broken
    assert any(ln.startswith("wrote ") for ln in lines)  # the summary too

    run_inference(_infer_cfg(tiny_ckpt, root, tmp_path / "b", "verdicts=3"))  # 4 files > 3: summary only
    lines = capsys.readouterr().out.splitlines()
    assert not [ln for ln in lines if VERDICT.match(ln) or ln.startswith("broken.jpg")]
    assert any(ln.startswith("wrote ") and "4 rows" in ln for ln in lines)


def test_a_verdict_line_never_contradicts_its_numbers():
    """p and the threshold are printed to the digits that tell them apart: ``p=0.499`` is never
    shown beside ``threshold 0.50`` for a file the threshold 0.4957 labels AI-generated."""
    from unmask.reports.tables import verdict_lines

    threshold = 0.4957
    probs = [0.82, 0.499, 0.4941, 0.4957, 0.501, 0.12, 0.49571, 0.495698]
    rows = [{"name": f"f{i}.png", "prob": p, "decision": int(p >= threshold), "ok": True} for i, p in enumerate(probs)]
    lines = verdict_lines(rows, threshold)
    for line, p in zip(lines, probs):
        match = VERDICT.match(line)
        assert match, line
        shown_p, shown_t = float(match["p"]), float(match["t"])
        assert (match["verdict"] == "AI-generated") == (shown_p >= shown_t) == (p >= threshold), line
        assert shown_p == pytest.approx(p, abs=0.005) and shown_t == pytest.approx(threshold, abs=0.005)
    assert lines[0].endswith("p=0.82  (threshold 0.50)")  # two decimals where they suffice
    assert "p=0.499  (threshold 0.496)" in lines[1]


def test_a_missing_input_says_what_input_takes(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="a folder, one image or video file, or a .csv list"):
        run_inference(_infer_cfg(tiny_ckpt, tmp_path / "nope.jpg", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_no_checkpoint_and_no_shipped_model_says_how_to_get_one(tmp_path, monkeypatch):
    from unmask.core import default_model

    monkeypatch.setattr(default_model, "WEIGHTS", tmp_path / "gone.safetensors")  # an install without the shipped file
    cfg = compose("infer", [f"input={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    assert cfg.ckpt is None  # no longer a mandatory '???' that ends in MissingMandatoryValue
    with pytest.raises(MissingCheckpointError) as exc:
        run_inference(cfg)
    message = str(exc.value)
    assert "gone.safetensors is missing" in message
    assert "pass ckpt=" in message and "python train.py hydra.run.dir=outputs/quickstart" in message
    assert "about a minute on 2 CPU cores" in message and "unmask.slim" in message
    assert not (tmp_path / "out").exists()

    from unmask.tasks.evaluate import run_evaluation

    with pytest.raises(MissingCheckpointError, match="python evaluate.py ckpt="):
        run_evaluation(compose("evaluate", [f"output_dir={tmp_path / 'eval'}"]))


@pytest.mark.slow
def test_cli_without_a_checkpoint_scores_one_file_with_the_shipped_model(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "photo.jpg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "input=photo.jpg"], cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MissingMandatoryValue" not in proc.stderr
    assert "shipped default model" in proc.stdout + proc.stderr
    (result,) = tmp_path.glob("result_*.xls")
    assert [row[0] for row in csv.reader(result.open())] == ["photo.jpg"]


# ============================================================== 4. typed configs and --help


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["data.batch_size=abc"], "data.batch_size"),
        (["data.batchsize=8"], "data.batchsize"),  # a misspelt key
        (["optimizer.lr=fast"], "optimizer.lr"),
        (["optimizer=adam", "optimizer.betas=[0.9,x]"], "optimizer.betas"),
        (["canonical.eval_jpeg_quality=high"], "canonical.eval_jpeg_quality"),
        (["faces=mesh", "faces.margin=wide"], "faces.margin"),
        (["faces=mtcnn", "faces.max_faces=some"], "faces.max_faces"),
        (["video.sampler.num_frames=many"], "video.sampler.num_frames"),
        (["video.aggregate.top_k=x"], "video.aggregate.top_k"),
        (["augment.p=often"], "augment.p"),
        (["scoring.batch_size=abc"], "scoring.batch_size"),
    ],
)
def test_a_wrong_type_fails_at_composition_naming_the_key(overrides, key, tmp_path):
    with pytest.raises(ConfigCompositionException) as exc:
        compose("train", [*overrides, f"paths.output_dir={tmp_path}"])
    assert key in str(exc.value) + str(exc.value.__cause__)


@pytest.mark.parametrize(
    "config_name,overrides,key",
    [
        ("evaluate", ["data.batch_size=abc"], "data.batch_size"),
        ("infer", ["video.sampler.fps=fast"], "video.sampler.fps"),
        ("infer", ["explain=gallery", "explain.limit=many"], "explain.limit"),  # explain: infer.py's group
    ],
)
def test_other_entry_points_compose_the_same_schemas(config_name, overrides, key, tmp_path):
    with pytest.raises(ConfigCompositionException) as exc:
        compose(config_name, [*overrides, "ckpt=x.ckpt", f"output_dir={tmp_path}"])
    assert key in str(exc.value) + str(exc.value.__cause__)


@pytest.mark.parametrize(
    "overrides,node,key",
    [
        (["data.batch_size=0"], "data", "data.batch_size"),
        (["faces=mesh", "faces.margin=5"], "faces", "faces.margin"),
        (["video.aggregate.method=median"], "video.aggregate", "video.aggregate.method"),
    ],
)
def test_a_value_out_of_range_fails_at_construction_naming_the_key(overrides, node, key, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose("train", [*overrides, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}"])
    with pytest.raises(Exception) as exc:
        instantiate(OmegaConf.select(cfg, node))
    err = exc.value.__cause__ if isinstance(exc.value, InstantiationException) and exc.value.__cause__ else exc.value
    assert isinstance(err, ValueError) and key in str(err)


def test_the_schemas_keep_what_the_options_set(tmp_path):
    """Typed nodes still instantiate to what the files say (schema defaults are the constructors')."""
    cfg = compose("train", ["optimizer=adamw", f"paths.output_dir={tmp_path}"])
    import torch

    opt = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 0.001 and opt.defaults["weight_decay"] == 0.0001
    assert cfg.data.batch_size == 32 and cfg.canonical.eval_jpeg_quality == 92 and cfg.video.sampler.num_frames == 16


def test_help_text_is_made_from_the_yaml_comments():
    from unmask.core.cli_help import render

    text = render("infer")
    assert re.search(r"scoring\.batch_size=\S+\s+files per batch", text)
    assert "explain" in text and "gallery | none*" in text
    assert re.search(r"input=\./testset\s+a folder .*one image or video file", text)
    for group in ("optimizer", "trainer", "detector", "augment", "osn", "callbacks"):  # training groups infer.py refuses
        assert not re.search(rf"^  {group}\s", text, re.M) and f"{group}." not in text, group
    assert "task_name" not in text
    evaluate = render("evaluate")
    assert "perturb" in evaluate and "data" in evaluate and "split=test" in evaluate
    assert "optimizer" not in evaluate and "trainer" not in evaluate
    train = render("train")  # train.py --help (configs/hydra/help/train.yaml), not Hydra's config dump
    assert "_schema" not in train and "task_name" not in train  # schemas are no options
    assert re.search(r"^  hparams_search\s+cnnspot_optuna$", train, re.M)
    assert re.search(r"experiment=contest\s+The contest recipe", train) and "experiment.task_name" not in train  # recipes: a line each
    assert "augment.transforms=[HorizontalFlip, ColorJitter, GaussianBlur]" in train  # a list of transforms: one line
    assert re.search(r"trainer\.max_epochs=3$", train, re.M) and re.search(r"trainer\.strategy=auto\s+ddp", train)  # cpu extends default
    for group in ("explain", "perturb", "audit"):  # groups train.py does not read
        assert not re.search(rf"^  {group}\s", train, re.M), group


@pytest.mark.slow
@pytest.mark.parametrize("entry,present,absent", [("infer", ["scoring", "explain", "ckpt="], ["optimizer", "trainer"]), ("evaluate", ["scoring", "perturb", "data"], ["optimizer", "augment"])])
def test_cli_help_lists_the_groups_the_entry_point_reads(entry, present, absent, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / f"{entry}.py"), "--help"], cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in present:
        assert word in proc.stdout, word
    for word in absent:
        assert word not in proc.stdout, word


# ============================================================== 5. reports people would rather look at


def test_bootstrap_intervals_agree_with_a_plain_resampling_loop():
    from sklearn.metrics import roc_auc_score

    from unmask.evaluation.intervals import bootstrap_intervals

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)  # ties, as real scores have
    ci = bootstrap_intervals(y, p, 0.5)
    assert ci == bootstrap_intervals(y, p, 0.5)  # seeded
    fakes, reals = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    loop = np.random.default_rng(7)
    accs, aucs = [], []
    for _ in range(1000):
        anyone = loop.integers(0, len(y), len(y))  # accuracy: files drawn from the whole group
        accs.append(((p[anyone] >= 0.5) == y[anyone]).mean())
        idx = np.concatenate([loop.choice(fakes, len(fakes)), loop.choice(reals, len(reals))])  # AUC: within each class
        aucs.append(roc_auc_score(y[idx], p[idx]))
    assert [ci["acc_ci_low"], ci["acc_ci_high"]] == pytest.approx(np.percentile(accs, [2.5, 97.5]), abs=0.015)
    assert [ci["auc_ci_low"], ci["auc_ci_high"]] == pytest.approx(np.percentile(aucs, [2.5, 97.5]), abs=0.015)
    assert ci["acc_ci_low"] < ((p >= 0.5) == y).mean() < ci["acc_ci_high"]
    assert ci["auc_ci_low"] < roc_auc_score(y, p) < ci["auc_ci_high"]


def test_a_group_all_right_gets_a_wide_interval_not_certainty():
    from unmask.evaluation.intervals import bootstrap_intervals

    two = bootstrap_intervals([0, 0], [0.1, 0.2], 0.5)
    assert two["acc_ci_high"] == 1.0 and two["acc_ci_low"] == pytest.approx(0.342, abs=0.01)  # Wilson, 2 of 2
    assert np.isnan(two["auc_ci_low"])  # one class: no AUC


def _metrics_csv(path: Path) -> Path:
    """A CSV log as Lightning's CSVLogger writes it (train rows per step, val rows per epoch)."""
    rows = ["epoch,step,train/loss,val/loss,val/auc,val/acc,val/balanced_acc,val/recall_at_90_real_pass"]
    for epoch in range(3):
        for step in range(epoch * 4 + 1, epoch * 4 + 4):
            rows.append(f"{epoch},{step},{0.7 - 0.1 * epoch - 0.01 * step},,,,,")
        rows.append(f"{epoch},{epoch * 4 + 3},,{0.65 - 0.05 * epoch},{0.6 + 0.1 * epoch},{0.55 + 0.1 * epoch},{0.55 + 0.1 * epoch},{0.2 * epoch}")
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def report_run(tiny_ckpt, tmp_path_factory):
    """evaluate_records on 3 sources (one of 2 files) and 2 generators, with a checkpoint in a
    run folder that has a CSV log."""
    from unmask.tasks.evaluate import evaluate_records

    tmp = tmp_path_factory.mktemp("report")
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = shutil.copy(tiny_ckpt, run / "checkpoints" / "best.ckpt")
    _metrics_csv(run / "csv" / "version_0" / "metrics.csv")
    records = []
    for i in range(24):
        label = i % 2
        path = (_png if label == 0 else _jpeg)(tmp / "data" / f"f{i:02d}.{'png' if label == 0 else 'jpg'}", seed=i, size=32)
        source = "tiny" if i >= 22 else ("srcA" if i < 12 else "srcB")
        records.append(Record(str(path), label, None, source, "real" if label == 0 else ("ganA" if i % 4 == 1 else "ganB")))
    out = tmp / "eval"
    report = evaluate_records(str(ckpt), records, out, ScoringConfig(num_workers=0, batch_size=8, progress=False), split="test")
    return {"out": out, "report": report, "ckpt": ckpt, "text": (out / "report.md").read_text(encoding="utf-8")}


def test_report_opens_with_what_was_evaluated(report_run):
    text, report = report_run["text"], report_run["report"]
    head = text.split("## Overall")[0]
    assert text.startswith("# Evaluation on split 'test'\n\n## What was evaluated")
    assert str(report_run["ckpt"]) in head
    assert "CNNSpot" in head and "SyntheticSource" in head  # the detector and the data it was trained on
    assert "split `test`: 24 files" in head
    stored = read_checkpoint(report_run["ckpt"])["unmask"]
    assert f"{stored['threshold']:.4f}" in head and stored["threshold_from"] in head  # the threshold and how it was chosen
    evaluated = report["evaluated"]
    assert evaluated["detector"] == "CNNSpot" and evaluated["n_real"] == 12 and evaluated["sources"] == ["srcA", "srcB", "tiny"]


def test_report_has_intervals_and_flags_small_groups(report_run):
    text, report = report_run["text"], report_run["report"]
    o = report["overall"]
    assert o["acc_ci_low"] <= o["acc"] <= o["acc_ci_high"] and o["auc_ci_low"] <= o["auc"] <= o["auc_ci_high"]
    assert "| acc 95 % CI | auc 95 % CI |" in text
    assert f"[{o['acc_ci_low']:.3f}, {o['acc_ci_high']:.3f}]" in text.split("## Overall")[1].split("## By source")[0]
    assert re.search(r"\*\*Accuracy \d\.\d{4}\*\* \(95 % CI \[", text)
    tiny_row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in tiny_row.strip("|").split("|")]
    assert cells[1] == "2 †"  # n = 2, flagged
    assert cells[-2].startswith("[") and cells[-2] != "[1.000, 1.000]" and cells[-2] != "[0.000, 0.000]"
    assert "†: fewer than 30 files" in text
    tiny = report["by_source"]["tiny"]
    assert tiny["n"] == 2 and tiny["acc_ci_low"] < tiny["acc_ci_high"]


def test_every_plot_is_named_in_the_report_and_written(report_run):
    out, text, report = report_run["out"], report_run["text"], report_run["report"]
    expected = {"roc.png", "det.png", "groups.png", "scores.png", "reliability.png", "training.png"}
    assert set(report["plots"]) == expected
    plots = text.split("## Plots")[1]
    for name in expected:
        assert f"`{name}`" in plots and f"]({name})" in plots, name
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 200, name
    with Image.open(out / "training.png") as img:
        assert img.size[0] > img.size[1]  # two panels side by side: loss, validation
    assert report["training_log"].endswith("csv/version_0/metrics.csv")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_no_training_log_means_no_training_plot(tmp_path):
    from unmask.evaluation.detection import training_log

    assert training_log(tmp_path / "model.ckpt") is None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert training_log(tmp_path / "run" / "checkpoints" / "best.ckpt") is None
    _metrics_csv(tmp_path / "run" / "csv" / "version_0" / "metrics.csv")
    newer = _metrics_csv(tmp_path / "run" / "csv" / "version_10" / "metrics.csv")
    assert training_log(tmp_path / "run" / "checkpoints" / "best.ckpt") == newer


def test_plot_text_survives_hostile_names(tmp_path):
    from unmask.reports.plots import plot_group_bars, plot_score_histograms

    rows = {"$\\frac{": {"n": 3, "acc": 0.5, "auc": float("nan"), "acc_ci_low": 0.1, "acc_ci_high": 0.9}}
    plot_group_bars({"By source": rows}, tmp_path / "g.png")  # '$' would start mathtext
    df = pd.DataFrame({"path": ["a", "b"], "prob": [0.2, 0.8], "label": [0, 1], "ok": True, "source": ["$x", "$y$"], "generator": "g"})
    plot_score_histograms(df, 0.5, tmp_path / "s.png")
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


# ============================================================== 6. the explanation gallery


class _Page(HTMLParser):
    """Cards (decision, images), every src/href, the controls and the scripts of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.refs: list[str] = []
        self.inputs: list[dict] = []
        self.ids: set[str] = set()
        self.scripts: list[dict] = []
        self.styles = ""
        self._in_style = False
        self.links: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        classes = (attrs.get("class") or "").split()
        if tag == "div" and "card" in classes:
            self.cards.append({"decision": attrs.get("data-decision"), "imgs": []})
        if tag == "img":
            self.refs.append(attrs["src"])
            self.cards[-1]["imgs"].append(attrs["src"])
        if tag == "a":
            self.refs.append(attrs["href"])
        if tag == "input":
            self.inputs.append(attrs)
        if tag == "script":
            self.scripts.append(attrs)
        if tag == "link":
            self.links.append(attrs)
        self._in_style = tag == "style"

    def handle_data(self, data):
        if self._in_style:
            self.styles += data


@pytest.fixture(scope="module")
def gallery(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery") / "in"
    names = [f"img_{i}.png" for i in range(5)] + ['odd "<name>" & co.jpg']
    for i, name in enumerate(names):
        (_jpeg if name.endswith(".jpg") else _png)(root / name, seed=i)
    bad.random_bytes(root / "broken.jpg")
    result = run_inference(_infer_cfg(tiny_ckpt, root, root.parent / "out", "explain=gallery", "scores=true"))
    out = result.with_suffix(".explain")
    page = _Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    return {"out": out, "page": page, "names": names, "result": result}


def test_gallery_shows_the_scored_image_beside_its_overlay(gallery):
    out, page = gallery["out"], gallery["page"]
    decoded = [c for c in page.cards if c["decision"] != "bad"]
    assert len(decoded) == len(gallery["names"]) and len(page.cards) == len(gallery["names"]) + 1
    for card in decoded:
        image, overlay = card["imgs"]
        assert image.endswith(".image.png") and overlay.endswith(".overlay.png")
        with Image.open(out / unquote(image)) as a, Image.open(out / unquote(overlay)) as b:
            assert a.size == b.size and a.mode == "RGB"
    (broken,) = [c for c in page.cards if c["decision"] == "bad"]
    assert broken["imgs"] == []


def test_gallery_every_reference_resolves_and_nothing_is_external(gallery):
    out, page = gallery["out"], gallery["page"]
    assert page.refs
    for ref in page.refs:
        assert not re.match(r"^[a-z]+:", ref), ref  # no http:, file:, javascript:
        assert (out / unquote(ref)).is_file(), ref
    assert any(unquote(ref) == 'odd "<name>" & co.jpg.overlay.png' for ref in page.refs)  # quoted in the link, intact on disk
    assert not page.links and all("src" not in s for s in page.scripts)  # inline CSS and JS only
    html_text = (out / "index.html").read_text(encoding="utf-8")
    assert 'odd "<name>"' not in html_text and "odd &quot;&lt;name&gt;&quot; &amp; co.jpg" in html_text


def test_gallery_has_filters_paging_and_a_legend(gallery):
    page = gallery["page"]
    filters = {i["value"] for i in page.inputs if "filter" in (i.get("class") or "")}
    assert filters == {"ai", "real", "bad"}
    assert {"per-page", "prev", "next", "page-info", "controls", "size"} <= page.ids
    assert {c["decision"] for c in page.cards} <= {"ai", "real", "bad"}
    assert "linear-gradient" in page.styles  # the colour legend of the map
    scores = pd.read_csv(gallery["result"].with_suffix(".scores.csv"))
    ok = scores["ok"].astype(bool)
    ai, real = int((scores.loc[ok, "decision"] == 1).sum()), int((scores.loc[ok, "decision"] == 0).sum())
    html_text = (gallery["out"] / "index.html").read_text(encoding="utf-8")
    assert f"> AI-generated ({ai})</label>" in html_text and f"> real ({real})</label>" in html_text
    assert "> undecodable (1)</label>" in html_text
    assert [c["decision"] for c in page.cards].count("ai") == ai


def _browser() -> list[str] | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def test_gallery_in_a_headless_browser(gallery):
    """Render the page in a real browser: the script ran (controls shown, page counter set) and
    every image of the first page loaded."""
    out = gallery["out"]
    url = (out / "index.html").resolve().as_uri()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is not None:
        with sync_playwright() as p:
            try:
                browser = p.chromium.launch()
            except Exception as e:  # noqa: BLE001 - playwright without its browser download
                pytest.skip(f"playwright is installed but its chromium is not ({e})")
            page = browser.new_page(viewport={"width": 1600, "height": 4000})
            page.goto(url)
            page.wait_for_load_state("load")
            dom = page.content()
            browser.close()
    else:
        browser = _browser()
        if browser is None:
            pytest.skip("no headless browser here: install chromium (or `pip install playwright && playwright install chromium`); "
                        "test_gallery_every_reference_resolves_and_nothing_is_external checks the page without one")
        proc = subprocess.run(
            [*browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,4000", "--virtual-time-budget=5000",
             "--allow-file-access-from-files", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = proc.stdout
    assert re.search(r'id="page-info"[^>]*>page 1 of 1 \(7 of 7 files\)<', dom), dom[:2000]
    assert 'id="controls" hidden' not in dom
    states = re.findall(r'data-state="(\w+)"', dom)
    assert states and set(states) == {"loaded"}, states


# ============================================================== 8. checkpoints people can ship


@pytest.fixture(scope="module")
def slim_files(tiny_ckpt, tmp_path_factory):
    from unmask.core.slim import write_slim

    tmp = tmp_path_factory.mktemp("slim")
    return {"fp32": write_slim(tiny_ckpt, tmp / "model.safetensors"), "fp16": write_slim(tiny_ckpt, tmp / "model16.safetensors", fp16=True), "tmp": tmp}


def test_slim_file_is_smaller_and_carries_config_and_threshold(tiny_ckpt, slim_files):
    from safetensors import safe_open

    full = read_checkpoint(tiny_ckpt)
    assert slim_files["fp32"].stat().st_size < tiny_ckpt.stat().st_size * 0.6  # no optimizer state
    assert slim_files["fp16"].stat().st_size < slim_files["fp32"].stat().st_size * 0.6
    with safe_open(str(slim_files["fp32"]), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["run_config"]) == full["unmask"]["run_config"]
    assert json.loads(meta["threshold"]) == full["unmask"]["threshold"]
    assert json.loads(meta["threshold_from"]) == full["unmask"]["threshold_from"]
    assert keys == {k for k in full["state_dict"] if k.startswith("detector.")}
    slim = read_checkpoint(slim_files["fp32"])  # the same dict shape as a .ckpt
    assert set(slim) == {"state_dict", "unmask"} and slim["unmask"]["run_config"] == full["unmask"]["run_config"]


def test_portable_config_replaces_folders_only_where_a_path_component_ends():
    from unmask.core.slim import portable_config

    config = {"paths": {"root_dir": "/work/main", "output_dir": "/work/main/outputs/run"},
              "data": {"manifest": "/work/main/data.csv", "other": "/work/main2/x.csv", "runs": ["/work/main/outputs/run/a"]}}  # fmt: skip
    out = portable_config(config)
    assert out["data"] == {"manifest": "<root_dir>/data.csv", "other": "/work/main2/x.csv", "runs": ["<output_dir>/a"]}
    assert out["paths"] == {"root_dir": "<root_dir>", "output_dir": "<output_dir>"}


def test_a_portable_slim_file_names_no_folder_of_this_machine(tiny_ckpt, slim_files):
    from unmask.core.slim import write_slim

    full = read_checkpoint(tiny_ckpt)["unmask"]["run_config"]
    folders = [v for v in full["paths"].values() if str(v).startswith("/")]
    assert folders and any(f in json.dumps(full) for f in folders)
    out = write_slim(tiny_ckpt, slim_files["tmp"] / "portable.safetensors", fp16=True, portable=True)
    config = read_checkpoint(out)["unmask"]["run_config"]
    text = json.dumps(config)
    assert not any(f in text for f in folders)
    assert config["paths"] == {k: f"<{k}>" for k in full["paths"]}
    assert config["detector"] == full["detector"] and config["canonical"] == full["canonical"]
    assert load_detector(out).threshold == pytest.approx(load_detector(tiny_ckpt).threshold)


def test_slim_file_scores_as_the_checkpoint(tiny_ckpt, slim_files, tmp_path, monkeypatch):
    root = tmp_path / "in"
    for i in range(6):
        (_jpeg if i % 2 else _png)(root / f"x{i}.{'jpg' if i % 2 else 'png'}", seed=20 + i)

    def probs(ckpt, out):
        result = run_inference(_infer_cfg(ckpt, root, tmp_path / out, "scores=true"))
        return pd.read_csv(result.with_suffix(".scores.csv")).set_index("name"), result

    full, full_result = probs(tiny_ckpt, "ckpt")

    import torch

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a .safetensors must load without torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    slim, slim_result = probs(slim_files["fp32"], "fp32")
    half, _ = probs(slim_files["fp16"], "fp16")
    assert np.array_equal(full["prob"].to_numpy(), slim["prob"].to_numpy())  # fp32: identical
    assert slim_result.read_bytes() == full_result.read_bytes()
    assert np.abs(full["prob"].to_numpy() - half["prob"].to_numpy()).max() < 0.02  # fp16: within tolerance
    assert load_detector(slim_files["fp32"]).threshold == load_detector(slim_files["fp16"]).threshold


@pytest.mark.parametrize("kind", ["truncated", "random", "no_metadata", "bad_json"])
def test_a_corrupt_safetensors_file_is_a_clear_error_naming_it(slim_files, tmp_path, kind):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / f"{kind}.safetensors"
    good = slim_files["fp32"].read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "no_metadata":
        save_file({"detector.w": torch.zeros(2)}, str(path))
    else:
        save_file({"detector.w": torch.zeros(2)}, str(path), metadata={"unmask_format": "2", "run_config": "{not json", "threshold": "0.5", "threshold_from": '""'})
    with pytest.raises(CheckpointError) as exc:
        load_detector(path)
    assert str(path) in str(exc.value) and "unmask.slim" in str(exc.value)


def test_a_slim_file_obeys_the_target_allowlist(slim_files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from unmask.core.trusted_targets import UntrustedTargetError

    with safe_open(str(slim_files["fp32"]), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["run_config"])
    config["detector"] = {"_target_": "os.system", "command": "echo pwned"}
    meta["run_config"] = json.dumps(config)
    crafted = tmp_path / "crafted.safetensors"
    save_file(tensors, str(crafted), metadata=meta)
    with pytest.raises(UntrustedTargetError, match="os.system"):
        load_detector(crafted)


@pytest.mark.slow
def test_slim_command_line(tiny_ckpt, tmp_path):
    out = tmp_path / "shipped.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "unmask.slim", str(tiny_ckpt), str(out), "--fp16"], cwd=ROOT, env=SUBPROCESS_ENV,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "wrote" in proc.stdout and "fp16" in proc.stdout
    bad_name = subprocess.run(
        [sys.executable, "-m", "unmask.slim", str(tiny_ckpt), str(tmp_path / "x.ckpt")], cwd=ROOT, env=SUBPROCESS_ENV,
        capture_output=True, text=True, timeout=300,
    )
    assert bad_name.returncode != 0 and ".safetensors" in bad_name.stderr


def test_gallery_script_is_valid_javascript(tmp_path):
    """The page's inline script parses (node --check); the browser test above runs it."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no node.js here to check the gallery's script")
    from unmask.explain.gallery import SCRIPT

    script = tmp_path / "gallery.js"
    script.write_text(SCRIPT)
    proc = subprocess.run([node, "--check", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
