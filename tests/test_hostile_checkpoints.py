"""Checkpoints, configs and runs from strangers or bad luck (issue 17, items 1, 2, 4, 11, 12, 14, 15).

A checkpoint is data, never code: nothing in it runs, whatever it holds. A broken one fails with
a message naming the file and what was expected. A killed training run resumes from its last
finished epoch.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SUBPROCESS_ENV, TINY_TRAIN_OVERRIDES, compose
from unmask.core.checkpoint import CheckpointError, load_detector, read_checkpoint
from unmask.core.trusted_targets import ENV, UntrustedTargetError, is_trusted
from unmask.tasks.train import resume_path, train


class RunsCode:
    """Unpickling this touches a file: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def real_ckpt(tiny_ckpt) -> dict:
    return torch.load(tiny_ckpt, map_location="cpu", weights_only=True)


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ---- 1. a checkpoint is data ------------------------------------------------------------------
def test_a_pickled_object_in_a_checkpoint_is_refused_and_never_run(real_ckpt, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = copy.deepcopy(real_ckpt)
    ckpt["unmask"]["payload"] = RunsCode(marker)
    path = _save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt.*refused.*Python objects"):
        load_detector(path)
    assert not marker.exists()


def test_a_crafted_checkpoint_runs_nothing_through_infer(real_ckpt, tmp_path):
    """The whole entry point, as a contest submission would run it."""
    marker = tmp_path / "pwned"
    ckpt = copy.deepcopy(real_ckpt)
    ckpt["unmask"]["payload"] = RunsCode(marker)
    path = _save(ckpt, tmp_path / "evil.ckpt")
    (tmp_path / "in").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), f"ckpt={path}", f"input={tmp_path / 'in'}", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300, cwd=tmp_path,
    )
    assert result.returncode != 0 and "refused" in result.stderr
    assert not marker.exists()


def test_real_checkpoints_load_as_data(tiny_ckpt):
    loaded = load_detector(tiny_ckpt)
    assert 0.0 <= loaded.threshold <= 1.0


@pytest.mark.parametrize("url", ["http://example.com/model.ckpt", "https://x/y.ckpt", "s3://bucket/model.ckpt"])
def test_remote_checkpoints_are_refused(url):
    with pytest.raises(CheckpointError, match="local files only"):
        read_checkpoint(url)
    with pytest.raises(ValueError, match="local file only"):
        resume_path(url)


def test_resume_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resume_path(tmp_path / "gone.ckpt")
    assert resume_path(None) is None


# ---- 2. the stored config is not a second way in ------------------------------------------------
def _with_detector(real_ckpt: dict, node: dict) -> dict:
    ckpt = copy.deepcopy(real_ckpt)
    ckpt["unmask"]["run_config"]["detector"] = node
    return ckpt


def test_a_stored_config_cannot_call_torch_load(real_ckpt, tmp_path):
    second = _save({"x": 1}, tmp_path / "second.pt")
    path = _save(_with_detector(real_ckpt, {"_target_": "torch.load", "f": str(second)}), tmp_path / "a.ckpt")
    with pytest.raises(UntrustedTargetError, match="detector._target_='torch.load'"):
        load_detector(path)


def test_a_stored_config_cannot_open_files(real_ckpt, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    node = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    path = _save(_with_detector(real_ckpt, node), tmp_path / "b.ckpt")
    with pytest.raises(UntrustedTargetError, match="builtins.open"):
        load_detector(path)
    assert victim.read_text() == "precious"


def test_nested_targets_and_project_functions_are_checked(real_ckpt, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    detector = copy.deepcopy(real_ckpt["unmask"]["run_config"]["detector"])
    # data.io is the project's own code, but a function that writes files.
    detector["head"] = {"_target_": "data.io.atomic_write_text", "path": str(victim), "text": ""}
    path = _save(_with_detector(real_ckpt, detector), tmp_path / "c.ckpt")
    with pytest.raises(UntrustedTargetError, match=r"detector\.head\._target_"):
        load_detector(path)
    assert victim.read_text() == "precious"


def test_the_face_stage_and_canonical_nodes_are_checked_too(real_ckpt, tmp_path):
    ckpt = copy.deepcopy(real_ckpt)
    ckpt["unmask"]["run_config"]["canonical"] = {"_target_": "os.system", "command": "true"}
    with pytest.raises(UntrustedTargetError, match="canonical"):
        load_detector(_save(ckpt, tmp_path / "d.ckpt"))


def test_the_allowlist(monkeypatch):
    assert is_trusted("detectors.cnnspot.CNNSpot") and is_trusted("data.canonical.Canonicalizer")
    assert is_trusted("torch.nn.Linear") and is_trusted("timm.create_model")
    for target in ("torch.load", "torch.jit.load", "os.system", "builtins.eval", "data.io.atomic_write_text", "my_pkg.D"):
        assert not is_trusted(target), target
    monkeypatch.setenv(ENV, "torch.jit.load, my_pkg.")
    assert is_trusted("torch.jit.load") and is_trusted("my_pkg.D") and not is_trusted("torch.load")


def test_a_class_only_reachable_through_an_allowed_module_is_refused(real_ckpt, tmp_path):
    """``data.canonical.io.FileIO`` is ``io.FileIO`` (data.canonical imports io): with mode w
    it emptied a file, as ``builtins.open`` did (audit of issue 17)."""
    assert not is_trusted("data.canonical.io.FileIO") and not is_trusted("torch.nn.modules.module.torch.jit.ScriptModule")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    detector = copy.deepcopy(real_ckpt["unmask"]["run_config"]["detector"])
    detector["x"] = {"_target_": "data.canonical.io.FileIO", "file": str(victim), "mode": "w"}
    with pytest.raises(UntrustedTargetError, match=r"detector\.x\._target_='data\.canonical\.io\.FileIO'"):
        load_detector(_save(_with_detector(real_ckpt, detector), tmp_path / "e.ckpt"))
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(
    "node, why",
    [
        ({"weights_only": False, "pretrained": "{second}"}, "weights_only=False"),
        ({"_args_": ["ViT-B-32", "{second}"]}, "positional arguments"),
        ({"pretrained": "{second}"}, "pretrained="),
        ({"pretrained_image_path": "{second}"}, "pretrained_image_path="),
    ],
    ids=["weights_only_false", "positional", "pretrained_file", "tower_file"],
)
def test_a_factory_in_a_stored_config_builds_an_architecture_only(real_ckpt, tmp_path, node, why):
    """``open_clip.create_model(pretrained=FILE, weights_only=False)`` unpickled a second file
    (its __reduce__ ran) though the factory is allowlisted (audit of issue 17)."""
    marker = tmp_path / "pwned"
    second = _save({"x": RunsCode(marker)}, tmp_path / "second.pt")
    node = {k: ([a.format(second=second) for a in v] if isinstance(v, list) else v.format(second=second) if isinstance(v, str) else v) for k, v in node.items()}
    detector = copy.deepcopy(real_ckpt["unmask"]["run_config"]["detector"])
    detector["x"] = {"_target_": "open_clip.create_model", "model_name": "ViT-B-32", **node}
    with pytest.raises(UntrustedTargetError, match=rf"detector\.x\._target_='open_clip\.create_model' with {why}"):
        load_detector(_save(_with_detector(real_ckpt, detector), tmp_path / "f.ckpt"))
    assert not marker.exists()


@pytest.mark.parametrize("value, why", [("hf-hub:someone/model", "names a model hub"), ("${oc.env:HOME}", "interpolation")])
def test_hub_names_and_interpolations_in_a_stored_config_are_refused(real_ckpt, tmp_path, value, why):
    detector = copy.deepcopy(real_ckpt["unmask"]["run_config"]["detector"])
    detector["backbone"] = value
    with pytest.raises(UntrustedTargetError, match=rf"detector\.backbone: .*{why}"):
        load_detector(_save(_with_detector(real_ckpt, detector), tmp_path / "g.ckpt"))


def test_a_pickled_call_of_a_blocked_module_is_refused_without_torchs_advice(real_ckpt, tmp_path):
    """``os.system`` in the pickle: torch's message had no "WeightsUnpickler error:" part and
    the error quoted its advice to re-run with weights_only=False (audit of issue 17)."""

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt = copy.deepcopy(real_ckpt)
    ckpt["unmask"]["payload"] = System()
    with pytest.raises(CheckpointError, match=r"refused.*Python objects.*unsupported GLOBAL") as info:
        load_detector(_save(ckpt, tmp_path / "h.ckpt"))
    assert "weights_only" not in str(info.value) and not (tmp_path / "pwned").exists()


def test_a_url_given_to_load_detector_is_refused_as_remote():
    """``Path("http://x")`` reads ``http:/x``: the check comes before (infer.py passes a string)."""
    with pytest.raises(CheckpointError, match="local files only"):
        load_detector("http://example.com/model.ckpt")


# ---- 4. no traffic at run time -----------------------------------------------------------------
def test_importing_the_package_turns_off_the_albumentations_update_check():
    """Any connection attempt while albumentations is imported after the package is recorded."""
    code = textwrap.dedent(
        """
        import socket, sys, time
        attempts = []
        def refuse(self, address, *a, **k):
            attempts.append(address)
            raise OSError("no network in this test")
        socket.socket.connect = refuse
        socket.create_connection = lambda address, *a, **k: refuse(None, address)
        import data
        import albumentations
        time.sleep(1.0)  # the check may run in a thread
        print("ATTEMPTS", len(attempts))
        """
    )
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert "ATTEMPTS 0" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("package", ["data", "detectors", "unmask"])
def test_every_package_sets_the_switch(package):
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    code = f"import os, {package}; print(os.environ.get('NO_ALBUMENTATIONS_UPDATE'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "1", result.stderr


# ---- 11. the stored threshold ------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.1, float("inf"), "abc", None])
def test_a_bad_stored_threshold_is_refused(real_ckpt, tmp_path, value):
    ckpt = copy.deepcopy(real_ckpt)
    ckpt["unmask"]["threshold"] = value
    with pytest.raises(CheckpointError, match="threshold .* not a probability"):
        load_detector(_save(ckpt, tmp_path / "t.ckpt"))


# ---- 14. broken checkpoints say what they are ---------------------------------------------------
@pytest.mark.parametrize(
    "kind, expected",
    [
        ("empty", "empty file"),
        ("random", "not a readable checkpoint"),
        ("truncated", "not a readable checkpoint"),
        ("tensor", "not an unmask checkpoint"),
        ("lightning_only", "not an unmask checkpoint"),
        ("no_run_config", "no run_config"),
        ("wrong_weights", "weights do not fit"),
        ("text", "not a readable checkpoint"),
    ],
)
def test_a_broken_checkpoint_names_the_file_and_what_was_expected(tiny_ckpt, real_ckpt, tmp_path, kind, expected):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = tiny_ckpt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "lightning_only":
        torch.save({"state_dict": real_ckpt["state_dict"], "epoch": 0}, path)
    elif kind == "no_run_config":
        torch.save({"state_dict": {}, "unmask": {"format": 2}}, path)
    elif kind == "wrong_weights":
        ckpt = copy.deepcopy(real_ckpt)
        ckpt["state_dict"] = {"detector.nonsense": torch.zeros(1)}
        torch.save(ckpt, path)
    elif kind == "text":
        path.write_text("this is not a model\n")
    with pytest.raises(CheckpointError, match=expected) as info:
        load_detector(path)
    assert path.name in str(info.value)
    if kind != "wrong_weights":
        assert "expected a .ckpt written by train.py" in str(info.value)


# ---- 12. an empty test split -------------------------------------------------------------------
def test_an_empty_test_split_finishes_cleanly(tmp_path, cache_dir, capsys):
    overrides = [o for o in TINY_TRAIN_OVERRIDES if o != "test=false"] + [
        "test=true",
        "+data.test_sources=[nowhere]",  # no test record passes the filter
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
    ]
    metrics = train(compose("train", overrides))
    assert not any(k.startswith("test/") for k in metrics), sorted(metrics)
    assert "threshold" in metrics and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert "test split empty" in capsys.readouterr().out


# ---- 15. kill -9, then resume ------------------------------------------------------------------
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir
    import unmask.core.config
    from unmask.tasks.train import train

    class KillMidEpoch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.current_epoch == {kill_epoch} and trainer.global_step >= {kill_epoch} * 2 + 1:
                os.kill(os.getpid(), signal.SIGKILL)

    import unmask.tasks.train as task
    real = task.instantiate_group
    task.instantiate_group = lambda node: real(node) + ([KillMidEpoch()] if node is not None and "early_stopping" in node else [])
    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides={overrides!r})
    train(cfg)
    """
)


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_continues_from_the_last_finished_epoch(tmp_path, cache_dir):
    common = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith(("trainer.max_epochs", "logger"))] + [
        "optimizer.lr=0.0",  # validation AUC never improves after epoch 0: best.ckpt stays at epoch 0
        "logger=csv",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
    ]
    script = KILLER.format(root=str(ROOT), kill_epoch=2, overrides=common + ["trainer.max_epochs=4"])
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(last, weights_only=True)["epoch"] == 1  # epochs 0 and 1 finished; 2 was killed

    resumed = tmp_path / "resumed"
    train(compose("train", [o.replace(str(tmp_path), str(resumed)) for o in common] + ["trainer.max_epochs=4", f"ckpt_path={last}"]))
    after = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["epoch"] == 3 and after["global_step"] == 4 * 2  # two batches per epoch, nothing redone or lost
