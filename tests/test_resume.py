"""Resume with ``ckpt_path=``: the global step, the epoch counter and the optimiser state
continue from the checkpoint instead of starting again."""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import unmask.core.config
from unmask.tasks.train import train

STEPS_PER_EPOCH = 2
TINY = [
    "detector=npr",  # small and from scratch: the fastest detector to train
    "optimizer=adamw",
    "optimizer.lr=0.001",
    "scheduler=cosine",  # T_max follows trainer.max_epochs
    "data.source.n_per_class=16",
    "data.source.size=32",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "test=false",
]


def _train(out: Path, cache: Path, overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=TINY + [f"paths.output_dir={out}", f"paths.cache_dir={cache}"] + overrides)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train(cfg)
    return stdout.getvalue()


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _adam_steps(ckpt: dict) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    first, resumed = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("resumed")
    _train(first, cache, ["trainer.max_epochs=1"])
    last = first / "checkpoints" / "last.ckpt"
    before = _load(last)  # read now: nothing may change the first run's files
    _train(resumed, cache, ["trainer.max_epochs=2", f"ckpt_path={last}"])
    return {"first": first, "resumed": resumed, "before": before, "after": _load(resumed / "checkpoints" / "last.ckpt")}


def test_first_run_state(runs):
    before = runs["before"]
    assert before["global_step"] == STEPS_PER_EPOCH
    assert before["epoch"] == 0
    assert _adam_steps(before) == {STEPS_PER_EPOCH}


def test_resume_continues_global_step_and_epoch(runs):
    after = runs["after"]
    assert after["global_step"] == 2 * STEPS_PER_EPOCH  # not STEPS_PER_EPOCH: it did not restart
    assert after["epoch"] == 1
    assert _adam_steps(after) == {2 * STEPS_PER_EPOCH}  # the optimiser state came along


def test_resumed_run_trains_only_the_missing_epoch(runs):
    frame = pd.read_csv(next((runs["resumed"] / "csv").glob("version_*/metrics.csv")))
    train_rows = frame.dropna(subset=["train/loss"])
    assert sorted(train_rows["step"].astype(int)) == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1]
    assert set(train_rows["epoch"].astype(int)) == {1}
    assert set(frame.dropna(subset=["val/auc"])["epoch"].astype(int)) == {1}


def test_resumed_weights_start_from_the_checkpoint_and_move(runs):
    before, after = runs["before"]["state_dict"], runs["after"]["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked", "threshold")  # move without learning
    changed = [k for k, v in before.items() if not k.endswith(buffers) and not torch.equal(v, after[k])]
    assert changed, "the resumed epoch did not update any weight"
    assert (runs["resumed"] / "checkpoints" / "best.ckpt").is_file()


def test_extended_run_follows_the_configured_schedule(runs):
    """Resumed with max_epochs 1 -> 2, the cosine schedule spans 2 epochs (T_max from the
    config), not the checkpoint's finished 1-epoch schedule that sits at lr 0."""
    assert runs["before"]["lr_schedulers"][0]["T_max"] == 1
    assert runs["before"]["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0)
    assert runs["after"]["lr_schedulers"][0]["T_max"] == 2
    frame = pd.read_csv(next((runs["resumed"] / "csv").glob("version_*/metrics.csv")))
    lr = frame["lr-AdamW"].dropna().tolist()
    assert lr == [pytest.approx(0.001 * (1 + math.cos(math.pi * 1 / 2)) / 2)]  # = 0.0005 in epoch 1 of 2
