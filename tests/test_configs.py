"""Every Hydra config composes and instantiates; bad choices and values fail clearly.

Composition goes through ``hydra.compose`` exactly as ``python train.py group=option`` would
(no CLI, no run directory: ``paths.output_dir`` is set to a tmp dir because its default is
the ``${hydra:runtime.output_dir}`` interpolation that only a running Hydra app resolves).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import unmask.core.config
from unmask.core.config import instantiate_group, is_empty

ROOT = Path(unmask.core.config.PROJECT_ROOT)
CONFIG_DIR = Path(unmask.core.config.CONFIG_DIR)
GROUPS = (
    "detector", "data", "augment", "canonical", "faces", "osn", "attribution", "optimizer", "scheduler", "trainer", "logger",
    "callbacks", "scoring", "video", "experiment",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_cfg(overrides: list[str], config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ has no options"
    # the required choices
    assert {"cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"csv", "wandb", "none"} <= set(options("logger"))
    assert {"none", "light", "jpeg_blur"} <= set(options("augment"))
    assert {"cnnspot", "npr"} <= set(options("detector"))
    assert {"synthetic", "faces_dev", "manifest", "folder"} <= set(options("data"))


def _data_values(option: str, tmp: Path) -> list[str]:
    """The ``???`` values a data option needs before it can be instantiated."""
    return {
        "manifest": [f"data.source.manifest={tmp / 'MANIFEST.csv'}"],
        "folder": [f"data.source.root={tmp}"],
    }.get(option, [])


def _check_instantiates(group: str, option: str, cfg: DictConfig, tmp: Path) -> None:
    """Instantiate the group's node (where that needs no data and no GPU) and check the object works."""
    node = cfg.get(group)
    if group == "detector":
        det = instantiate(node)
        det.eval()
        with torch.no_grad():
            # landmarks as faces=mesh gives them: landmark detectors (rgnet) need them, others ignore the batch
            out = det(torch.rand(2, 3, 32, 32), {"landmarks": torch.rand(2, 468, 2) * 32})
        assert out.logit.shape == (2,)
    elif group in ("data", "experiment"):
        dm = instantiate(cfg.data, augment=None)  # construction reads no files
        assert dm.batch_size == cfg.data.batch_size and dm.canonical.size == cfg.data.image_size
    elif group == "augment":
        from data.augment import as_sample_augment

        augment = as_sample_augment(instantiate(node))
        img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        if augment.forgery is not None:  # a forgery synthesiser turns a real into a fake with a mask
            forged, label, mask, _ = augment.forgery(img, 0, None, np.random.default_rng(0), donor=None)
            assert forged.shape == img.shape and label in (0, 1) and mask.shape == (32, 32)
        out, _, points = augment.apply_pixels(img, np.zeros((32, 32), np.float32), np.array([[5.0, 6.0]]))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and points.shape == (1, 2)
    elif group == "faces":
        if is_empty(node):
            assert option == "none"
            return
        from data.faces.pipeline import FacePipeline

        faces = instantiate(node)
        assert isinstance(faces, FacePipeline) and faces.num_landmarks >= 1
        found = faces.analyzer.detect(np.full((64, 64, 3), 128, np.uint8))
        assert isinstance(found, list)  # a flat grey image: no face, or the template's one
    elif group == "osn":
        from detectors.wrappers.osn import OSNRobust
        from unmask.core.build import build_detector

        det = build_detector(OmegaConf.merge(cfg, {"detector": {"pretrained": "none"}}))
        assert isinstance(det, OSNRobust) == (option != "none")
        det.train()
        out = det(torch.rand(2, 3, 32, 32))  # training: resize, DiffJPEG and xi act on the pixels
        assert out.logit.shape == (2,)
    elif group == "scoring":
        from unmask.core.schemas import ScoringConfig, options

        scoring = options(node)
        assert isinstance(scoring, ScoringConfig) and scoring.runtime in ("auto", "torch", "onnx")
    elif group == "video":
        from unmask.scoring.combine import VideoOptions

        video = VideoOptions.from_config(node)
        assert video.aggregator([0.2, 0.4]) == pytest.approx(0.3) and video.sampler.timestamps(2.0)
    elif group == "attribution":
        from unmask.core.build import build_detector

        det = build_detector(OmegaConf.merge(cfg, {"detector": {"pretrained": "none"}}))
        det.eval()
        with torch.no_grad():
            out = det(torch.rand(2, 3, 32, 32))
        assert out.logit.shape == (2,)
        assert (out.class_logits is None) == (option == "none")
    elif group == "canonical":
        canon = instantiate(node)
        img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        out = canon.encode(canon.finish(canon.resize_stage(img), train=False), train=False)
        assert out.shape == (cfg.data.image_size, cfg.data.image_size, 3)
    elif group == "optimizer":
        opt = instantiate(node)(params=[torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(opt, torch.optim.Optimizer)
    elif group == "scheduler":
        if is_empty(node):
            assert option == "none"
            return
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        assert isinstance(instantiate(node)(optimizer=opt), torch.optim.lr_scheduler.LRScheduler)
    elif group == "trainer":
        if node.accelerator == "gpu" and not torch.cuda.is_available():
            assert option in ("gpu", "ddp")  # composes; instantiating needs a GPU
            return
        import pytorch_lightning as pl

        trainer = instantiate(node, logger=False, callbacks=[], enable_checkpointing=False)
        assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == node.max_epochs
    elif group == "logger":
        loggers = instantiate_group(node)
        expected = {"none": 0, "csv": 1, "wandb": 2}[option]
        assert len(loggers) == expected
    elif group == "callbacks":
        from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

        cbs = instantiate_group(node)
        ckpt = [c for c in cbs if isinstance(c, ModelCheckpoint)]
        stop = [c for c in cbs if isinstance(c, EarlyStopping)]
        assert ckpt and ckpt[0].monitor == "val/auc" and ckpt[0].mode == "max"
        assert stop and stop[0].monitor == "val/auc"
    else:  # pragma: no cover - a new group needs a check here
        raise AssertionError(f"no instantiation check for group {group}")


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS for o in options(g)],
)
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    if group == "data":
        overrides += _data_values(option, tmp_path)
    cfg = compose_cfg(overrides)
    assert cfg.paths.output_dir == str(tmp_path)
    _check_instantiates(group, option, cfg, tmp_path)


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_overrides_the_base(option, tmp_path):
    """Every value an experiment file sets is what the composed config holds."""
    import yaml

    spec = yaml.safe_load((CONFIG_DIR / "experiment" / f"{option}.yaml").read_text())
    spec.pop("defaults", None)
    cfg = compose_cfg([f"experiment={option}", f"paths.output_dir={tmp_path}"])
    leaves = [(k, v) for k, v in _leaves(spec) if not (isinstance(v, str) and "${" in v)]
    assert leaves, f"experiment {option} sets nothing"
    for key, value in leaves:
        if value == "???":  # a value the user must give stays mandatory
            parent, _, leaf = key.rpartition(".")
            assert OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, leaf), key
            continue
        assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}), resolve=True)["v"] == value, key
    if OmegaConf.select(cfg, "scheduler.T_max") is not None:  # follows the experiment's epochs
        assert cfg.scheduler.T_max == cfg.trainer.max_epochs


def test_experiment_switches_groups(tmp_path):
    cfg = compose_cfg(["experiment=cnnspot_faces_dev", f"paths.output_dir={tmp_path}"])
    assert cfg.data.source._target_ == "data.records.ManifestSource"
    assert cfg.data.source.manifest.endswith("faces-dev/MANIFEST.csv")
    assert cfg.detector._target_ == "detectors.cnnspot.CNNSpot"
    assert cfg.task_name == "cnnspot_faces_dev"


def test_contest_experiment_is_the_benchmark_recipe_under_its_own_name(tmp_path):
    contest = OmegaConf.to_container(compose_cfg(["experiment=contest", f"paths.output_dir={tmp_path}"]))
    bench = OmegaConf.to_container(compose_cfg(["experiment=cnnspot_faces_dev", f"paths.output_dir={tmp_path}"]))
    assert (contest.pop("task_name"), bench.pop("task_name")) == ("contest", "cnnspot_faces_dev")
    assert contest == bench


@pytest.mark.parametrize("config_name,extra", [("infer", ["ckpt=x.ckpt"]), ("evaluate", ["ckpt=x.ckpt"])])
def test_entry_configs_compose(config_name, extra, tmp_path):
    cfg = compose_cfg(extra + [f"output_dir={tmp_path}"], config_name=config_name)
    assert cfg.ckpt == "x.ckpt" and cfg.output_dir == str(tmp_path)
    if config_name == "evaluate":
        assert cfg.split == "test" and cfg.data.canonical.reencode is True


def test_paths_are_relative_to_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("UNMASK_SHARED", raising=False)
    monkeypatch.delenv("UNMASK_CACHE", raising=False)
    cfg = compose_cfg([f"paths.output_dir={tmp_path}"])
    assert Path(cfg.paths.root_dir) == ROOT
    assert Path(cfg.paths.shared_dir).resolve() == (ROOT / ".." / "shared").resolve()
    assert Path(cfg.paths.cache_dir) == ROOT / ".cache"
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "c"))
    assert compose_cfg([f"paths.output_dir={tmp_path}"]).paths.cache_dir == str(tmp_path / "c")


def test_unknown_option_names_the_available_ones():
    with pytest.raises(ConfigCompositionException) as exc:
        compose_cfg(["detector=nope"])
    message = str(exc.value)
    assert "detector/nope" in message
    assert "Available options in 'detector'" in message
    for option in options("detector"):
        assert option in message


@pytest.mark.slow
def test_unknown_option_on_the_command_line_fails_cleanly():
    # train.py fails while composing, before any training import: cheap to run for real.
    proc = subprocess.run(
        [sys.executable, "train.py", "detector=nope"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "Could not find 'detector/nope'" in proc.stderr
    assert "cnnspot" in proc.stderr and "npr" in proc.stderr
    assert "Traceback" not in proc.stderr  # Hydra's message, not a stack trace


def _looks_absolute(value: str) -> bool:
    return bool(re.match(r"^(/|~|[A-Za-z]:[\\/])", value.strip()))


def _string_values(node) -> list[str]:
    """Every string *value* of a parsed YAML document, outside Hydra defaults lists (whose
    ``override /data`` and ``/detector/npr`` name config groups, not files)."""
    if isinstance(node, dict):  # a defaults list names configs (/detector/npr@_here_), not files
        return [s for k, v in node.items() if k != "defaults" for s in _string_values(v)]
    if isinstance(node, list):
        return [s for v in node for s in _string_values(v)]
    return [node] if isinstance(node, str) else []


def test_no_config_contains_an_absolute_path():
    import yaml

    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) >= 20
    offenders = [
        f"{f.relative_to(ROOT)}: {value}"
        for f in files
        for value in _string_values(yaml.safe_load(f.read_text()))
        if _looks_absolute(value)
    ]
    assert not offenders, "absolute paths in configs:\n" + "\n".join(offenders)


def test_absolute_path_scan_catches_one():
    # guards against a scan that can never fail
    doc = {"root": "/data/x", "ws": ["C:\\x", "~/w"], "ok": "${paths.output_dir}/ckpt", "m": "val/auc", "defaults": ["/d/x", {"override /data": "x"}]}
    assert sorted(v for v in _string_values(doc) if _looks_absolute(v)) == ["/data/x", "C:\\x", "~/w"]


def _instantiate_error(overrides: list[str], node: str, tmp_path: Path) -> BaseException:
    cfg = compose_cfg(overrides + [f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}"])
    with pytest.raises(Exception) as exc:
        instantiate(OmegaConf.select(cfg, node))
    err = exc.value
    # Hydra wraps the constructor's error; the cause is the project's own error
    return err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err


@pytest.mark.parametrize(
    "override,node,key",
    [
        ("data.batch_size=0", "data", "data.batch_size"),
        ("data.num_workers=-1", "data", "data.num_workers"),
        ("canonical.resize=zigzag", "canonical", "canonical.resize"),
        ("canonical.train_jpeg_quality=[0,300]", "canonical", "canonical.train_jpeg_quality"),
        ("canonical.train_jpeg_quality=[95,60]", "canonical", "canonical.train_jpeg_quality"),
        ("canonical.train_jpeg_quality=[70]", "canonical", "canonical.train_jpeg_quality"),
        ("canonical.eval_jpeg_quality=101", "canonical", "canonical.eval_jpeg_quality"),
        ("canonical.grayscale_p=2", "canonical", "canonical.grayscale_p"),
        ("data.image_size=4", "canonical", "data.image_size"),
        ("detector.pretrained=imagenett", "detector", "pretrained"),
        ("data.source.n_per_class=1", "data.source", "data.source.n_per_class"),
    ],
)
def test_wrong_value_names_the_key(override, node, key, tmp_path):
    err = _instantiate_error([override], node, tmp_path)
    assert isinstance(err, ValueError), repr(err)
    assert key in str(err)


def test_missing_imagenet_weights_say_what_to_pass(tmp_path):
    from detectors.backbones import MissingWeightsError

    err = _instantiate_error(["detector.pretrained=imagenet", "detector.backbone=resnet18"], "detector", tmp_path)
    assert isinstance(err, MissingWeightsError)
    message = str(err)
    assert "resnet18" in message
    for hint in ("weights=", "pretrained=none", "pretrained=hub"):
        assert hint in message


def test_wrong_threshold_policy_fails_at_composition(tmp_path):
    from unmask.core.module import DetectionModule

    with pytest.raises(ConfigCompositionException, match="scoring.threshold_policy"):
        compose_cfg(["scoring.threshold_policy=best", f"paths.output_dir={tmp_path}"])
    cfg = compose_cfg([f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="threshold_policy"):  # the module checks what it is given too
        DetectionModule(detector=torch.nn.Linear(1, 1), optimizer=instantiate(cfg.optimizer), threshold_policy="best")


# --------------------------------------------------------------- the scoring group and its schema


@pytest.mark.parametrize("config_name", ["train", "infer", "evaluate", "serve"])
def test_every_entry_point_composes_the_same_scoring_group(config_name, tmp_path):
    from unmask.core.schemas import ScoringConfig

    extra = {"train": [f"paths.output_dir={tmp_path}"], "serve": ["ckpt=x.ckpt", f"paths.output_dir={tmp_path}"]}
    cfg = compose_cfg(extra.get(config_name, ["ckpt=x.ckpt", f"output_dir={tmp_path}"]), config_name)
    assert OmegaConf.get_type(cfg.scoring) is ScoringConfig
    assert OmegaConf.to_container(cfg.scoring) == OmegaConf.to_container(compose_cfg([f"paths.output_dir={tmp_path}"]).scoring)


@pytest.mark.parametrize("config_name", ["train", "infer"])
@pytest.mark.parametrize(
    "override,key",
    [
        ("scoring.batch_size=abc", "scoring.batch_size"),
        ("scoring.num_workers=two", "scoring.num_workers"),
        ("scoring.amp=maybe", "scoring.amp"),
        ("scoring.runtime=tensorrt", "scoring.runtime"),
        ("scoring.threshold_policy=best", "scoring.threshold_policy"),
        ("scoring.batchsize=8", "scoring.batchsize"),  # a typo of a key
    ],
)
def test_scoring_type_and_choice_errors_fail_at_composition(config_name, override, key, tmp_path):
    extra = ["ckpt=x.ckpt"] if config_name == "infer" else [f"paths.output_dir={tmp_path}"]
    with pytest.raises(ConfigCompositionException) as exc:
        compose_cfg([*extra, override], config_name)
    assert key in str(exc.value) + str(exc.value.__cause__)


@pytest.mark.parametrize(
    "override,key",
    [
        ("scoring.batch_size=0", "scoring.batch_size"),
        ("scoring.num_workers=-1", "scoring.num_workers"),
        ("scoring.device=gpu9", "scoring.device"),
        ("scoring.threshold=1.5", "scoring.threshold"),
        ("scoring.threshold=prior:x", "scoring.threshold"),
    ],
)
def test_scoring_range_errors_name_the_key_before_any_work(override, key, tmp_path):
    from unmask.core.schemas import options
    from unmask.tasks.train import train

    cfg = compose_cfg([override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        options(cfg.scoring)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train(cfg)  # the task checks first: nothing was trained
    assert not (tmp_path / "checkpoints").exists()
