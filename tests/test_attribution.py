"""Issue 6: forgery-type attribution heads (configs/attribution/, detectors/wrappers/attribution.py, unmask/evaluation/attribution.py).

Class mapping from the ``generator`` column, the wrapper detector, its loss, config
composition, and one tiny train -> load -> evaluate -> infer run on the synthetic set."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_TRAIN_OVERRIDES, compose
from detectors.base import Detector, DetectorOutput
from detectors.wrappers.attribution import IGNORE_INDEX, AttributedDetector, AttributionClasses
from unmask.core.build import build_detector
from unmask.core.schemas import ScoringConfig
from unmask.evaluation.attribution import attribution_report, render_attribution_markdown
from unmask.reports.plots import plot_confusion
from unmask.scoring.runtimes import TorchRuntime
from unmask.scoring.scorer import ScoredBatch, view_rows

COARSE = ["real", "gan", "diffusion", "face_swap", "manual_edit"]


def _classes(option: str, tmp_path) -> AttributionClasses:
    node = compose("train", [f"attribution={option}", f"paths.output_dir={tmp_path}"]).attribution
    return AttributionClasses(node.classes, node.map, node.real_class)


# ------------------------------------------------------------------------ mapping


def test_coarse_mapping(tmp_path):
    c = _classes("coarse", tmp_path)
    assert list(c.names) == COARSE
    expected = {"stylegan2": "gan", "generated_photos": "gan", "sd": "diffusion", "deepfake": "face_swap",
                "self_blend": "face_swap", "splice": "face_swap", "transposed_conv": "gan"}
    for generator, name in expected.items():
        assert c.class_of(generator, 1) == name, generator


def test_fine_mapping_is_one_class_per_generator(tmp_path):
    c = _classes("fine", tmp_path)
    for generator in ("stylegan2", "generated_photos", "sd", "deepfake", "self_blend", "splice"):
        assert c.class_of(generator, 1) == generator
    assert c.class_of("real", 0) == "real"


def test_label_zero_is_real_and_unusable_rows_are_ignored(caplog):
    c = AttributionClasses(COARSE, {"sd": "diffusion"})
    assert c.class_of("sd", 0) == "real"  # a real photo is real whatever its generator column says
    assert c.class_of("sd", -1) is None  # unknown label
    assert c.class_of("sd", 1, ok=False) is None  # undecodable
    assert c.class_of("real", 1) is None  # a fake named 'real': contradictory, no target
    with caplog.at_level(logging.WARNING, logger="detectors.wrappers.attribution"):
        assert c.class_of("midjourney", 1) is None
        assert c.class_of("midjourney", 1) is None
    assert sum("midjourney" in r.getMessage() for r in caplog.records) == 1  # warned once
    batch = {"label": torch.tensor([0, 1, 1, 1, -1]),
             "meta": {"generator": ["sd", "sd", "midjourney", "sd", "sd"], "ok": [True, True, True, False, True]}}
    assert c.targets(batch).tolist() == [0, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"classes": COARSE, "map": {"sd": "difusion"}}, "attribution.map"),
        ({"classes": COARSE, "real_class": "genuine"}, "attribution.real_class"),
        ({"classes": ["real"]}, "attribution.classes"),
        ({"classes": COARSE, "weight": -1.0}, "attribution.weight"),
        ({"classes": COARSE, "hidden": -3}, "attribution.hidden"),
    ],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        AttributedDetector(_Recorder(), in_features=4, **kwargs)


# ------------------------------------------------------------------------ wrapper


class _Recorder(Detector):
    """A detector that records what it was given and returns every optional output."""

    def __init__(self, features: bool = True) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.with_features = features
        self.seen: list = []
        self.backwards = 0

    def forward(self, image, batch=None):
        self.seen.append((image, batch))
        x = self.normalize(image)
        feats = x.mean(dim=(2, 3)).repeat(1, 2) * self.scale  # (B, 6)
        return DetectorOutput(
            logit=x.mean(dim=(1, 2, 3)) * self.scale,
            heatmap=x[:, :1, ::4, ::4],
            mask=x[:, :1],
            features=feats if self.with_features else None,
            losses={"extra": self.scale.sum() * 0.1},
        )

    def after_backward(self) -> None:
        self.backwards += 1


def test_wrapper_forwards_everything_and_adds_class_logits():
    inner = _Recorder()
    det = AttributedDetector(inner, COARSE, hidden=8)
    image, batch = torch.rand(3, 3, 16, 16), {"label": torch.tensor([0, 1, 1])}
    ref = inner(image, batch)
    out = det(image, batch)
    got_image, got_batch = inner.seen[-1]
    assert got_image is image and got_batch is batch  # raw pixels: normalised once, by the inner detector
    for name in ("logit", "heatmap", "mask", "features"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert set(out.losses) == {"extra"}
    assert out.class_logits.shape == (3, len(COARSE))
    assert det.class_names == tuple(COARSE)
    det.after_backward()
    assert inner.backwards == 1


def test_wrapper_on_cnnspot_keeps_its_logit():
    cfg = compose("train", ["attribution=coarse", "detector.pretrained=none", "paths.output_dir=."])
    torch.manual_seed(0)
    det = build_detector(cfg).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = det(x), det.inner(x)
    assert torch.equal(out.logit, ref.logit)
    assert out.class_logits.shape == (2, 5)


def test_detector_without_features_is_refused():
    with pytest.raises(ValueError, match="features"):
        AttributedDetector(_Recorder(features=False), COARSE)


def test_cross_entropy_only_on_known_classes_and_reaches_the_head():
    det = AttributedDetector(_Recorder(), COARSE, map={"sd": "diffusion", "stylegan2": "gan"}, weight=0.5)
    image = torch.rand(4, 3, 16, 16)
    batch = {"label": torch.tensor([0, 1, 1, 1]), "meta": {"generator": ["real", "sd", "stylegan2", "unseen"], "ok": [True] * 4}}
    out = det(image, batch)
    terms = det.loss_terms(out, batch)
    assert {"bce", "extra", "attribution"} <= set(terms)
    expected = 0.5 * torch.nn.functional.cross_entropy(out.class_logits[:3], torch.tensor([0, 2, 1]))
    assert torch.allclose(terms["attribution"], expected)
    # the ignored row's logits do not matter
    shifted = DetectorOutput(**{**out.__dict__, "class_logits": out.class_logits + torch.tensor([0, 0, 0, 5.0]).view(4, 1) * torch.arange(5)})
    assert torch.allclose(det.loss_terms(shifted, batch)["attribution"], expected)
    terms["attribution"].backward()
    head = det.head
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # no usable target at all: a zero loss that still backpropagates
    none = {"label": torch.tensor([1, -1, 1, 1]), "meta": {"generator": ["x", "sd", "x", "x"], "ok": [True] * 4}}
    zero = det.loss_terms(det(image, none), none)["attribution"]
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("detector", ["cnnspot", "npr"])
@pytest.mark.parametrize("option", ["none", "coarse", "fine"])
def test_every_option_builds_with_the_detectors(detector, option, tmp_path):
    overrides = [f"detector={detector}", f"attribution={option}", f"paths.output_dir={tmp_path}"]
    if detector == "cnnspot":
        overrides.append("detector.pretrained=none")
    det = build_detector(compose("train", overrides)).eval()
    with torch.no_grad():
        out = det(torch.rand(2, 3, 32, 32))
    assert out.logit.shape == (2,)
    if option == "none":
        assert out.class_logits is None and not isinstance(det, AttributedDetector)
    else:
        assert out.class_logits.shape == (2, len(det.class_names))


def test_config_without_attribution_key_builds_the_bare_detector():
    # the run config of a checkpoint written before attribution existed
    config = {"detector": {"_target_": "detectors.npr.NPR"}}
    assert type(build_detector(config)).__name__ == "NPR"


def test_runtime_returns_class_probabilities_beside_the_score():
    det = AttributedDetector(_Recorder(), COARSE)
    out = TorchRuntime(det, device="cpu", channels_last=False)(torch.rand(3, 3, 16, 16))
    assert out.prob.shape == (3,)
    assert out.class_prob.shape == (3, 5) and torch.allclose(out.class_prob.sum(1), torch.ones(3))
    bare = TorchRuntime(_Recorder(), device="cpu", channels_last=False)(torch.rand(2, 3, 16, 16))
    assert bare.class_prob is None
    meta = {"path": ["a", "b", "c"], "ok": [True, False, True], "error": ["", "broken", ""], "source": ["s"] * 3,
            "generator": ["g"] * 3, "group": ["a", "b", "c"]}
    rows = view_rows(ScoredBatch({"label": torch.tensor([0, 1, 1]), "meta": meta}, out.prob, out.class_prob), det.class_names)
    assert rows[0]["type"] in COARSE and rows[0]["type_prob"] == pytest.approx(max(rows[0][f"p_{c}"] for c in COARSE))
    assert rows[1]["type"] == "" and math.isnan(rows[1]["type_prob"])
    assert "type" not in view_rows(ScoredBatch({"label": torch.tensor([0, 1, 1]), "meta": meta}, out.prob), None)[0]


# ------------------------------------------------------------------------ report


def test_confusion_report_matches_hand_counts(tmp_path):
    c = AttributionClasses(COARSE, {"stylegan2": "gan", "sd": "diffusion", "deepfake": "face_swap"})
    rows = [  # generator, label, ok, predicted type
        ("real", 0, True, "real"), ("real", 0, True, "real"), ("real", 0, True, "gan"),
        ("stylegan2", 1, True, "gan"), ("stylegan2", 1, True, "gan"), ("stylegan2", 1, True, "diffusion"),
        ("sd", 1, True, "diffusion"), ("sd", 1, True, "real"),
        ("deepfake", 1, True, "face_swap"),
        ("midjourney", 1, True, "gan"),  # unknown generator: left out
        ("sd", 1, False, ""),  # undecodable: left out
    ]
    df = pd.DataFrame(rows, columns=["generator", "label", "ok", "type"])
    report = attribution_report(df, c)
    assert report["classes"] == COARSE and report["n"] == 9 and report["n_ignored"] == 2
    expected = np.array([
        [2, 1, 0, 0, 0],  # real
        [0, 2, 1, 0, 0],  # gan
        [1, 0, 1, 0, 0],  # diffusion
        [0, 0, 0, 1, 0],  # face_swap
        [0, 0, 0, 0, 0],  # manual_edit: absent, row kept
    ])
    assert np.array_equal(np.array(report["confusion"]), expected)
    assert report["accuracy"] == pytest.approx(6 / 9)
    gan = report["per_class"]["gan"]
    assert gan["precision"] == pytest.approx(2 / 3) and gan["recall"] == pytest.approx(2 / 3) and gan["support"] == 3
    f1 = {"real": 2 * (2 / 3 * 2 / 3) / (4 / 3), "gan": 2 / 3, "diffusion": 0.5, "face_swap": 1.0}
    assert report["macro_f1"] == pytest.approx(sum(f1.values()) / 4)  # over the 4 types present
    assert report["per_class"]["manual_edit"]["support"] == 0
    md = render_attribution_markdown(report)
    assert "| true \\ predicted | real | gan | diffusion | face_swap | manual_edit |" in md
    assert "| gan | 0 | 2 | 1 | 0 | 0 |" in md
    # metrics.json sorts keys; the per-class table keeps the class order
    md = render_attribution_markdown(json.loads(json.dumps(report, sort_keys=True)))
    per_class_rows = [line.split(" | ")[0][2:] for line in md.splitlines()[-len(COARSE):]]
    assert per_class_rows == COARSE
    png = plot_confusion(report, tmp_path / "confusion.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ end to end


def test_train_load_evaluate_infer(tmp_path, cache_dir):
    from data.synthetic import write_testset
    from unmask.core.checkpoint import load_detector
    from unmask.tasks.evaluate import evaluate_records
    from unmask.tasks.infer import run_inference
    from unmask.tasks.train import train

    run = tmp_path / "run"
    cfg = compose(
        "train",
        TINY_TRAIN_OVERRIDES
        + ["attribution=coarse", "attribution.map.transposed_conv=diffusion", f"hydra.run.dir={run}",
           f"paths.output_dir={run}", f"paths.cache_dir={cache_dir}"],
    )
    train(cfg)
    ckpt = run / "checkpoints" / "best.ckpt"
    loaded = load_detector(ckpt)
    assert isinstance(loaded.detector, AttributedDetector) and loaded.detector.class_names == tuple(COARSE)
    assert loaded.detector.classes.class_of("transposed_conv", 1) == "diffusion"  # the override travels in the checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "detector.head.weight" in state and any(k.startswith("detector.inner.") for k in state)

    ev = compose("evaluate", ["data.source.n_per_class=16", "data.source.size=32", "data.image_size=32", "data.num_workers=0",
                              f"ckpt={ckpt}", f"paths.cache_dir={cache_dir}", f"output_dir={tmp_path / 'eval'}"])
    data = instantiate(ev.data)
    data.setup()
    report = evaluate_records(str(ckpt), data.records["test"], tmp_path / "eval", ScoringConfig(num_workers=0, batch_size=8))
    att = report["attribution"]
    assert att["n"] == report["overall"]["n"]  # every synthetic sample has a type
    assert sum(map(sum, att["confusion"])) == att["n"]
    assert att["per_class"]["real"]["support"] == report["overall"]["n_real"]
    assert att["per_class"]["diffusion"]["support"] == report["overall"]["n_fake"]
    assert (tmp_path / "eval" / "confusion.png").is_file()
    assert "## Attribution" in (tmp_path / "eval" / "report.md").read_text()
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert {"type", "type_prob", *(f"p_{c}" for c in COARSE)} <= set(preds.columns)

    testset = tmp_path / "testset"
    write_testset(testset, n=6, size=32)
    out = run_inference(compose("infer", [f"ckpt={ckpt}", f"input={testset}", f"output_dir={tmp_path / 'out'}",
                                          "scoring.num_workers=0", "scoring.batch_size=8", "scores=true"]))
    scores = pd.read_csv(out.with_suffix(".scores.csv"))
    assert {"name", "prob", "decision", "type", "type_prob"} <= set(scores.columns)
    assert scores["type"].isin(COARSE).all() and scores["type_prob"].between(1 / 5, 1).all()
    lines = out.read_text().splitlines()  # the contest file keeps its two columns
    assert len(lines) == 6 and all(len(line.split(",")) == 2 for line in lines)
