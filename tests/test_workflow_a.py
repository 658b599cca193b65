"""The researcher's workflow around training (issue 13, items 1, 2, 7, 9): sweeps ranked by the
selected checkpoint's score with a leaderboard, runs that carry their provenance, DDP that
scores once and sets the memory layout before wrapping, and the console commands.

Tiny settings (32 px, a few steps): these prove the plumbing, not accuracy."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict

import unmask.core.config
from conftest import SUBPROCESS_ENV, TINY_TRAIN_OVERRIDES, compose
from unmask.core import provenance
from unmask.core.checkpoint import load_detector, read_checkpoint
from unmask.core.config import safe_dirname
from unmask.reports.leaderboard import LeaderboardCallback, find_runs, leaderboard_frame, run_summary, write_leaderboard, write_summary

ROOT = Path(unmask.core.config.PROJECT_ROOT)
HAS_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


def hydra_parses_back(value: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"ckpt={value}").value()


# ------------------------------------------------------------------ item 1: sweeps that compare


@pytest.fixture(scope="module")
def run3(tmp_path_factory, cache_dir) -> dict:
    """Three epochs with the CSV logger and the test split, through the task train.py calls."""
    from unmask.tasks.train import train

    out = tmp_path_factory.mktemp("run3")
    overrides = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith(("trainer.max_epochs", "logger", "test"))]
    cfg = compose("train", overrides + ["trainer.max_epochs=3", "logger=csv", "test=true", "callbacks.early_stopping.patience=10",
                                        f"hydra.run.dir={out}", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"])
    metrics = train(cfg)
    return {"dir": out, "metrics": metrics, "cfg": cfg, "best": out / "checkpoints" / "best.ckpt"}


def _per_epoch_val_auc(out: Path) -> pd.Series:
    frame = pd.read_csv(next(out.glob("csv/version_*/metrics.csv")))
    return frame.dropna(subset=["val/auc"]).groupby("epoch")["val/auc"].first()


def test_train_returns_the_selected_checkpoints_score_not_the_last_epochs(run3):
    per_epoch = _per_epoch_val_auc(run3["dir"])
    assert list(per_epoch.index) == [0, 1, 2]
    ckpt = read_checkpoint(run3["best"])
    selected = int(per_epoch.idxmax())  # the first epoch with the highest validation AUC
    assert ckpt["epoch"] == selected and run3["metrics"]["selected_epoch"] == selected
    assert run3["metrics"]["objective"] == pytest.approx(per_epoch.max(), abs=1e-6)
    assert run3["metrics"]["val/auc"] == pytest.approx(per_epoch.iloc[-1], abs=1e-6)  # callback_metrics: the last epoch's
    # the selected checkpoint carries its own epoch's validation metrics
    assert ckpt["unmask"]["validation"]["epoch"] == selected
    assert ckpt["unmask"]["validation"]["val/auc"] == pytest.approx(per_epoch.max(), abs=1e-6)
    summary = json.loads((run3["dir"] / "summary.json").read_text())
    assert summary["objective"] == {"metric": "val/auc", "mode": "max", "value": pytest.approx(per_epoch.max(), abs=1e-6)}
    assert summary["selected"] == {"epoch": selected, "checkpoint": "checkpoints/best.ckpt"}
    test_report = json.loads((run3["dir"] / "test" / "metrics.json").read_text())
    assert summary["test"]["overall"]["auc"] == pytest.approx(test_report["overall"]["auc"], nan_ok=True)
    assert set(summary["test"]["by_source"]) == set(test_report["by_source"])


def test_main_hands_the_sweeper_the_objective(monkeypatch):
    import unmask.tasks.train as task

    monkeypatch.setattr(task, "train", lambda cfg: {"val/auc": 0.260, "objective": 0.675})
    assert task.main(None) == pytest.approx(0.675)
    monkeypatch.setattr(task, "train", lambda cfg: {"val/auc": 0.260})
    assert task.main(None) is None


def _fake_run(folder: Path, value, source: str = "ffhq", status_file: bool = True, mode: str = "max") -> Path:
    folder.mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "best.ckpt").write_bytes(b"")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={folder.name}"]))
    if status_file:
        test = {
            "overall": {"auc": 0.5 + value / 10, "acc": 0.5, "recall_at_90_real_pass": 0.25},
            "by_source": {source: {"auc": 0.7}},
            "by_generator": {"real": {"auc": math.nan}, "sd": {"auc": 0.6}},
        }
        summary = run_summary(folder, {"metric": "val/auc", "mode": mode, "value": value}, folder / "checkpoints" / "best.ckpt", 2,
                              {"val/auc": value, "val/acc": 0.5, "val/recall_at_90_real_pass": 0.1, "epoch": 2}, 0.4, test, 12.5,
                              [f"seed={folder.name}", "+trainer.x=1"])
        write_summary(folder, summary)
    return folder


def test_leaderboard_ranks_runs_by_the_objective(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0_seed-1", 0.6)
    _fake_run(sweep / "1_seed-2", 0.9, source="=cmd|' /C calc'!A0")
    _fake_run(sweep / "2_seed-3", None, status_file=False)  # a job that died
    _fake_run(sweep / "10_seed-4", 0.7)
    assert [p.name for p in find_runs([sweep])] == ["0_seed-1", "1_seed-2", "2_seed-3", "10_seed-4"]  # job order
    frame, text = write_leaderboard(sweep, [sweep])
    assert list(frame["run"]) == ["1_seed-2", "10_seed-4", "0_seed-1", "2_seed-3"]
    assert list(frame["rank"]) == [1, 2, 3, 4]
    assert list(frame["status"]) == ["finished"] * 3 + ["unfinished"]
    assert frame.loc[0, "overrides"] == "seed=1_seed-2 +trainer.x=1"
    assert frame.loc[0, "checkpoint"] == str(sweep / "1_seed-2" / "checkpoints" / "best.ckpt")
    for column in ("objective", "epoch", "val auc", "val acc", "val recall@90", "test auc", "test acc", "test recall@90", "wall s", "checkpoint"):
        assert column in frame.columns, column
    assert "test auc generator:sd" in frame.columns and "test auc generator:real" not in frame.columns  # NaN everywhere: dropped
    assert "test auc source:=cmd|' /C calc'!A0" in frame.columns
    # the files: CSV through reports.safe (formulas neutralised), markdown through the one renderer
    csv_text = (sweep / "leaderboard.csv").read_text()
    back = pd.read_csv(sweep / "leaderboard.csv")
    assert list(back["run"]) == list(frame["run"]) and back.loc[0, "objective"] == pytest.approx(0.9)
    assert "'+trainer.x=1" not in csv_text and ",seed=1_seed-2 +trainer.x=1," in csv_text  # not at a cell's start: kept
    md = (sweep / "leaderboard.md").read_text()
    assert md == text and md.startswith("# Leaderboard")
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and "| 1 | 1_seed-2 |" in rows[1] and "\\|" in rows[0]  # a | in a header is escaped
    # sorting by another column, in the objective's direction
    by_test, _, _ = leaderboard_frame(find_runs([sweep]), sort_by="test auc")
    assert list(by_test["run"][:3]) == ["1_seed-2", "10_seed-4", "0_seed-1"]
    with pytest.raises(KeyError):
        leaderboard_frame(find_runs([sweep]), sort_by="nope")


def test_leaderboard_formula_cells_are_neutralised(tmp_path):
    run = _fake_run(tmp_path / "=run", 0.5)
    frame, text = write_leaderboard(tmp_path / "out", [run])
    assert "| '=run |" in text
    assert "\n1,'=run," in (tmp_path / "out" / "leaderboard.csv").read_text()


def test_leaderboard_of_a_minimised_objective_sorts_ascending(tmp_path):
    _fake_run(tmp_path / "s" / "0", 0.3, mode="min")
    _fake_run(tmp_path / "s" / "1", 0.1, mode="min")
    frame, metric, mode = leaderboard_frame(find_runs([tmp_path / "s"]))
    assert mode == "min" and list(frame["run"]) == ["1", "0"]


def test_python_m_unmask_leaderboard(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", 0.6)
    _fake_run(sweep / "1", 0.8)
    from unmask.leaderboard import main

    assert main([str(sweep), "--out", str(tmp_path / "board")]) == 0
    assert pd.read_csv(tmp_path / "board" / "leaderboard.csv")["run"].astype(str).tolist() == ["1", "0"]
    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    proc = subprocess.run([sys.executable, "-m", "unmask.leaderboard", str(sweep)], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 1 | 1 |" in proc.stdout and not (sweep / "leaderboard.md").exists()  # without --out: printed only


def test_leaderboard_callback_writes_into_the_sweep_folder(tmp_path, capsys):
    _fake_run(tmp_path / "0_a", 0.6)
    LeaderboardCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert (tmp_path / "leaderboard.md").is_file() and (tmp_path / "leaderboard.csv").is_file()
    assert "leaderboard written to" in capsys.readouterr().out
    # a sweep folder without runs (an evaluate.py sweep, a failed start) gets no leaderboard
    (tmp_path / "other").mkdir()
    LeaderboardCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "other")}}}))
    assert not list((tmp_path / "other").iterdir())


def test_leaderboard_of_a_real_run(run3, capsys):
    from unmask.leaderboard import main

    assert main([str(run3["dir"])]) == 0
    out = capsys.readouterr().out
    frame, _, _ = leaderboard_frame([run3["dir"]])
    assert frame.loc[0, "objective"] == pytest.approx(run3["metrics"]["objective"])
    assert frame.loc[0, "val auc"] == pytest.approx(run3["metrics"]["objective"])
    assert frame.loc[0, "test auc"] == pytest.approx(run3["metrics"]["test/auc"], nan_ok=True)
    assert frame.loc[0, "epoch"] == run3["metrics"]["selected_epoch"]
    assert Path(frame.loc[0, "checkpoint"]) == run3["best"] and run3["best"].is_file()
    assert "test auc source:synthetic" in frame.columns and "test auc generator:transposed_conv" in frame.columns
    assert frame.loc[0, "wall s"] > 0
    assert f"| 1 | {run3['dir'].name} |" in out


@pytest.mark.parametrize(
    "overrides",
    ["detector=cnnspot,trainer.max_epochs=2", "data.train_generators=[sd,stylegan2],+x='a b',~y,detector/edges=knn", "a=" + "x" * 300, ""],
)
def test_sweep_folder_names_read_back_as_ckpt(overrides):
    name = safe_dirname(7, overrides)
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name) and ".." not in name and len(name) <= 120
    assert name.startswith("7")
    path = f"multirun/train/2026-11-30_14-00-00/{name}/checkpoints/best.ckpt"
    assert hydra_parses_back(path) == path
    assert compose("evaluate", [f"ckpt={path}"]).ckpt == path  # what evaluate.py ckpt=... composes
    assert safe_dirname(7, overrides) == name  # stable
    assert safe_dirname(7, overrides + "z") != name or not overrides


def test_sweep_subdir_config_uses_the_safe_name(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", [f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = 0
        cfg.hydra.job.override_dirname = "detector=cnnspot,trainer.max_epochs=2"
    assert cfg.hydra.sweep.subdir == "0_detector-cnnspot_trainer.max_epochs-2"
    assert cfg.hydra.job.name == "train"  # the log file is train.log whether train.py or unmask-train started it
    assert cfg.hydra.callbacks.leaderboard._target_ == "unmask.reports.leaderboard.LeaderboardCallback"


@pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper is not installed (scripts/setup.sh installs it)")
def test_hparams_search_config_is_an_optuna_recipe(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", ["hparams_search=cnnspot_optuna", f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.callbacks.model_checkpoint.mode == "max" and sweeper.n_trials > 1
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.detector._target_ == "detectors.cnnspot.CNNSpot"
    for key in sweeper.params:  # every searched key exists in the composed config (a group or a value)
        assert OmegaConf.select(cfg, key) is not None or (Path(unmask.core.config.CONFIG_DIR) / key).is_dir(), key


# ------------------------------------------------------------------ item 2: provenance


def test_run_folder_and_checkpoints_carry_provenance(run3):
    record = json.loads((run3["dir"] / "provenance.json").read_text())
    assert set(record["versions"]) >= {"torch", "lightning", "timm", "open_clip", "albumentations", "numpy", "unmask", "python"}
    assert torch.__version__.startswith(record["versions"]["torch"])
    assert record["versions"]["unmask"] == metadata.version("unmask")
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)
    data = record["data"]
    manifest = Path(data["manifest"])
    assert manifest.name == "MANIFEST.csv" and data["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert data["source"] == "SyntheticSource" and sum(data["files"].values()) == 32
    assert re.fullmatch(r"[0-9a-f]{64}", data["listing_sha256"])
    # the resolved config beside it: what the checkpoint stores as run_config
    config = yaml.safe_load((run3["dir"] / "config.yaml").read_text())
    assert "${" not in (run3["dir"] / "config.yaml").read_text()
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = read_checkpoint(run3["dir"] / "checkpoints" / name)  # weights_only: plain data
        assert ckpt["unmask"]["provenance"] == record
        assert ckpt["unmask"]["run_config"] == config
    assert load_detector(run3["best"]).threshold == pytest.approx(run3["metrics"]["threshold"])  # the loader ignores new keys


def test_csv_logger_receives_config_and_test_metrics(run3):
    version = next(run3["dir"].glob("csv/version_*"))
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["detector"]["_target_"] == "detectors.cnnspot.CNNSpot" and hparams["seed"] == 42
    assert hparams["provenance"]["data"]["listing_sha256"] == json.loads((run3["dir"] / "provenance.json").read_text())["data"]["listing_sha256"]
    frame = pd.read_csv(version / "metrics.csv")
    test_rows = frame.dropna(subset=["test/acc"])
    assert len(test_rows) == 1
    assert test_rows["test/acc"].iloc[0] == pytest.approx(run3["metrics"]["test/acc"])


def _manifest_tree(root: Path, labels=("real", "fake")) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = ["relpath,label,split"]
    for i, label in enumerate(labels):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{label},train")
    (root / "MANIFEST.csv").write_text("\n".join(lines) + "\n")
    return root / "MANIFEST.csv"


def test_data_fingerprint_follows_the_data_not_the_machine(tmp_path):
    from data.records import FolderSource, ManifestSource

    def fingerprint(manifest: Path) -> dict:
        source = ManifestSource(str(manifest))
        return provenance.data_fingerprint(source, {"train": source.records()})

    a = fingerprint(_manifest_tree(tmp_path / "a"))
    assert a["manifest_sha256"] == hashlib.sha256((tmp_path / "a" / "MANIFEST.csv").read_bytes()).hexdigest()
    assert fingerprint(_manifest_tree(tmp_path / "elsewhere" / "b"))["listing_sha256"] == a["listing_sha256"]  # same files, other folder
    changed = fingerprint(_manifest_tree(tmp_path / "c", labels=("fake", "fake")))
    assert changed["listing_sha256"] != a["listing_sha256"] and changed["manifest_sha256"] != a["manifest_sha256"]
    # a folder source has no manifest: the listing is its fingerprint, and it sees a file's bytes change
    for label in ("real", "fake"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        shutil.copy(tmp_path / "a" / "0.png", tmp_path / "tree" / label / "x.png")
    folder = FolderSource(str(tmp_path / "tree"))
    before = provenance.data_fingerprint(folder, {"train": folder.records()})
    assert "manifest_sha256" not in before and before["files"] == {"train": 2}
    (tmp_path / "tree" / "fake" / "x.png").write_bytes((tmp_path / "tree" / "fake" / "x.png").read_bytes() + b"\0")
    assert provenance.data_fingerprint(folder, {"train": folder.records()})["listing_sha256"] != before["listing_sha256"]


def test_git_state_outside_a_repository(tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}


@pytest.mark.slow
def test_wandb_gets_config_test_metrics_and_a_predictions_table(tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("wandb")
    from unmask.tasks.train import train

    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    overrides = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith(("logger", "test"))]
    cfg = compose("train", overrides + ["logger=wandb", "test=true", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    try:
        metrics = train(cfg)
    except Exception as e:  # the wandb service may be unable to start in a sandbox
        if "wandb" in repr(e).lower():
            pytest.skip(f"wandb cannot start here: {e!r}")
        raise
    import wandb

    assert wandb.run is None  # the run was finished: a sweep's next job starts its own
    run = next(tmp_path.rglob("offline-run-*"))
    listing = json.loads((tmp_path / "provenance.json").read_text())["data"]["listing_sha256"]
    # finish() can return a few milliseconds before wandb's service has flushed the offline
    # stream (seen on a loaded machine: the file still held its 7-byte header): wait for it.
    deadline = time.monotonic() + 30
    while True:
        stream = next(run.glob("*.wandb")).read_bytes()
        if all(m in stream for m in (listing.encode(), b"test/auc", b"test/predictions")) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert listing.encode() in stream  # the config with its provenance
    assert b"test/auc" in stream and b"test/predictions" in stream
    n_test = json.loads((tmp_path / "test" / "metrics.json").read_text())["overall"]["n"]
    assert "test/auc" in metrics
    images = set(re.findall(rb"media/images/[0-9a-f]+\.png", stream))
    assert len(images) == n_test  # one thumbnail per test file
    table = json.loads(next(run.glob("files/media/table/test/predictions_*.table.json")).read_text())
    assert table["columns"][:4] == ["thumbnail", "path", "label", "prob"] and len(table["data"]) == n_test


# ------------------------------------------------------------------ item 7: DDP


def test_memory_layout_is_set_before_the_strategy_wraps_the_model():
    from unmask.core.module import DetectionModule

    assert "on_fit_start" not in DetectionModule.__dict__  # after DDP's wrap: a stride mismatch every step
    conv = torch.nn.Conv2d(3, 4, 3)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

    module = DetectionModule(Tiny(), optimizer=torch.optim.SGD)
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    module.configure_model()  # Lightning calls it before strategy.setup wraps the model
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


# Four steps of 16 files per epoch: one process with batches of 16, or two with 8 each (the
# gradients are averaged: the same step size). The two see other orders of the files, and
# batch-norm statistics stay per process (SyncBatchNorm needs a GPU): the runs agree within
# that noise, once both have learnt the synthetic set.
DDP_COMMON = [
    "detector=cnnspot", "augment=none", "optimizer.lr=0.001", "scheduler=none",
    "data.source.n_per_class=80", "data.source.size=32", "data.image_size=32", "data.num_workers=0",
    "trainer.max_epochs=4", "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false", "logger=none",
]


def _train_process(out: Path, cache: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**SUBPROCESS_ENV, "UNMASK_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "train.py", *DDP_COMMON, *overrides, f"hydra.run.dir={out}"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_cpu_processes_give_the_checkpoint_one_process_gives(tmp_path, cache_dir):
    """``trainer.devices=2 trainer.strategy=ddp`` on the CPU (gloo), batches of 8 per process,
    against one process with batches of 16."""
    from hydra.utils import instantiate
    from sklearn.metrics import roc_auc_score

    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.scorer import Scorer

    ddp = _train_process(tmp_path / "ddp", cache_dir, ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=8"])
    one = _train_process(tmp_path / "one", cache_dir, ["data.batch_size=16"])
    assert "Grad strides do not match bucket view strides" not in ddp.stderr  # the layout is set before DDP wraps
    # rank zero alone selects, calibrates and scores the test split
    for proc in (ddp, one):
        assert proc.stdout.count("best checkpoint:") == 1 and proc.stdout.count("report written to") == 1
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("ddp", "one")}
    print({name: (s["objective"]["value"], s["test"]["overall"]["auc"]) for name, s in summaries.items()})
    # validation covers every file of the split, gathered from both processes ...
    assert summaries["ddp"]["validation"]["n"] == summaries["one"]["validation"]["n"] == 24
    assert summaries["ddp"]["test"]["overall"]["n"] == 24  # ... and the test split is scored once, whole
    # ... and is what one process computes for the same checkpoint
    cfg = compose("train", [*DDP_COMMON, "data.batch_size=8", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    datamodule = instantiate(cfg.data, augment=None)
    datamodule.setup()
    scores = Scorer(load_detector(tmp_path / "ddp" / "checkpoints" / "best.ckpt"), ScoringConfig(num_workers=0, device="cpu", progress=False))
    files = scores.score(datamodule.records["val"]).files
    assert summaries["ddp"]["objective"]["value"] == pytest.approx(roc_auc_score(files["label"], files["prob"]), abs=1e-4)
    # two processes train the checkpoint one process trains, within the noise of data order and batch norm
    assert summaries["ddp"]["objective"]["value"] == pytest.approx(summaries["one"]["objective"]["value"], abs=0.1)
    assert summaries["ddp"]["test"]["overall"]["auc"] == pytest.approx(summaries["one"]["test"]["overall"]["auc"], abs=0.15)
    assert json.loads((tmp_path / "ddp" / "provenance.json").read_text())["data"]["files"] == {"train": 112, "val": 24, "test": 24}


# ------------------------------------------------------------------ item 1: real sweeps


@pytest.mark.slow
def test_multirun_writes_a_leaderboard_whose_checkpoints_read_back(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    env = {**SUBPROCESS_ENV, "UNMASK_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    tiny = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith(("detector.", "test"))] + ["test=true"]
    command = [sys.executable, "train.py", "-m", "detector=npr", "seed=1,2", f"hydra.sweep.dir={sweep}", *tiny]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.split("_")[0] for j in jobs] == ["0", "1"] and all("=" not in j and "," not in j for j in jobs)
    board = pd.read_csv(sweep / "leaderboard.csv")
    assert len(board) == 2 and list(board["rank"]) == [1, 2] and (board["status"] == "finished").all()
    assert board["objective"].is_monotonic_decreasing
    assert {next(w for w in o.split() if w.startswith("seed=")) for o in board["overrides"]} == {"seed=1", "seed=2"}
    for path in board["checkpoint"]:
        assert Path(path).is_file() and hydra_parses_back(path) == path
        assert compose("evaluate", [f"ckpt={path}"]).ckpt == path
    assert (sweep / "leaderboard.md").read_text().count("\n| ") == 3
    assert "leaderboard written to" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper is not installed (scripts/setup.sh installs it)")
def test_optuna_search_maximises_the_selected_checkpoints_score(tmp_path, cache_dir):
    sweep = tmp_path / "search"
    env = {**SUBPROCESS_ENV, "UNMASK_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "train.py", "hparams_search=cnnspot_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
               f"hydra.sweep.dir={sweep}", "trainer.max_epochs=2", *[o for o in TINY_TRAIN_OVERRIDES if not o.startswith("trainer.max_epochs")]]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    board = pd.read_csv(sweep / "leaderboard.csv")
    assert len(board) == 2 and (board["status"] == "finished").all()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(board["objective"].max(), abs=1e-6)  # optuna ranked by what the leaderboard shows
    assert any("optimizer.lr=" in o for o in board["overrides"])


# ------------------------------------------------------------------ item 9: console commands


def test_console_commands_resolve_to_the_shared_apps():
    import unmask.cli

    points = {e.name: e for e in metadata.entry_points(group="console_scripts") if e.name.startswith("unmask-")}
    assert {n: e.value for n, e in points.items()}.items() >= {
        "unmask-train": "unmask.cli:train", "unmask-infer": "unmask.cli:infer", "unmask-evaluate": "unmask.cli:evaluate",
    }.items()
    for name in ("train", "infer", "evaluate"):
        assert points[f"unmask-{name}"].load() is getattr(unmask.cli, name)
        # the root script runs the very same app
        spec = importlib.util.spec_from_file_location(f"_root_{name}", ROOT / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        assert script.main is getattr(unmask.cli, name)


def test_unmask_train_help_runs_from_any_folder(tmp_path):
    command = shutil.which("unmask-train", path=str(Path(sys.executable).parent)) or shutil.which("unmask-train")
    if command is None:
        pytest.skip("unmask-train is not installed (pip install -e . puts it beside python)")
    proc = subprocess.run([command, "--help"], cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "detector" in proc.stdout and "hparams_search" in proc.stdout
    assert proc.stdout.startswith("train.py: ") and "_schema" not in proc.stdout and "== Config ==" not in proc.stdout  # not Hydra's dump
    assert not os.listdir(tmp_path)  # --help writes nothing
