"""One contract, checked on every detector and every wrapper combination (as timm's
test_models.py checks every model): what ``detectors.base.Detector`` promises.

For each ``detector=`` option x ``osn=`` x ``attribution=``: the output's types and shapes,
the forgery map, finite loss terms, a backward that reaches every trainable parameter, a
checkpoint round trip that rebuilds the same scores, and the runtimes: eager always, ONNX
accepted (same probabilities) or refused with the detector's reason, torch.compile refused
for detectors that read more than the image, and ``scoring.runtime=auto`` on the CPU: ONNX
within its tolerance of eager where the detector exports, eager with the reason where not.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose
from detectors.base import Detector, DetectorOutput
from unmask.core.build import WRAPPERS, build_detector
from unmask.core.checkpoint import load_detector
from unmask.core.config import CONFIG_DIR, to_plain
from unmask.core.module import DetectionModule
from unmask.core.schemas import ScoringConfig
from unmask.scoring import choice
from unmask.scoring.onnx_export import PROB_TOLERANCE, export_onnx, refuse_export
from unmask.scoring.runtimes import OnnxRuntime, TorchRuntime

SIZE, BATCH = 32, 4
DETECTORS = sorted(p.stem for p in (Path(CONFIG_DIR) / "detector").glob("*.yaml"))
# Small, offline, quick: random init where a detector would load ImageNet weights.
LIGHT = {
    "cnnspot": ["detector.pretrained=none"],
    "npr": [],
    "lgrad": ["detector.source_pretrained=none", "detector.classifier=resnet18"],
    "univfd": ["detector.pretrained=none", "detector.encoder=tf_efficientnet_lite0"],
    "univfd_knn": ["detector.pretrained=none", "detector.encoder=tf_efficientnet_lite0"],
    "rgnet": ["detector.pretrained=none", "detector.width=32", "detector.depth=2"],
    "seg": ["detector.pretrained=none", "detector.decoder_channels=[16,16,8,8]"],
}
COMBINATIONS = [(d, o, a) for d in DETECTORS for o in ("none", "robust") for a in ("none", "coarse")]
# Detectors whose loss passes no gradient to the input (``input_gradients = False``): OSN's
# adversarial xi cannot work there, so osn=robust refuses them unless osn.xi_eps=0.
NO_INPUT_GRADIENTS = {"lgrad", "univfd", "univfd_knn"}


def test_every_detector_option_is_covered():
    assert set(DETECTORS) == set(LIGHT), "a new detector= option needs its light overrides here"
    assert WRAPPERS == ("osn", "attribution")


def _config(detector: str, osn: str, attribution: str, tmp_path, *extra: str):
    return compose("train", [f"detector={detector}", f"osn={osn}", f"attribution={attribution}", f"paths.output_dir={tmp_path}",
                             f"data.image_size={SIZE}", *LIGHT[detector], *extra])


def _batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(BATCH, 1, SIZE, SIZE)
    mask[1, :, 4:12, 4:12] = 1.0
    return {
        "image": torch.rand(BATCH, 3, SIZE, SIZE, generator=gen),
        "label": torch.tensor([0, 1, 0, 1]),
        "landmarks": torch.rand(BATCH, 468, 2, generator=gen) * (SIZE - 4) + 2,  # what a face stage gives
        "mask": mask,
        "meta": {
            "path": [f"{i}.png" for i in range(BATCH)], "source": ["s"] * BATCH, "generator": ["real", "stylegan2", "real", "sd"],
            "group": [f"{i}.png" for i in range(BATCH)], "ok": torch.tensor([True] * BATCH), "error": [""] * BATCH,
            "mask_ok": torch.tensor([True, True, True, False]),
        },
    }


def _check_output(det: Detector, out: DetectorOutput) -> None:
    assert isinstance(out, DetectorOutput)
    assert out.logit.shape == (BATCH,) and torch.isfinite(out.logit).all()
    if out.heatmap is not None:
        assert out.heatmap.dim() == 4 and out.heatmap.shape[:2] == (BATCH, 1)
    if out.mask is not None:
        assert out.mask.shape == (BATCH, 1, SIZE, SIZE)
    if det.feature_dim is not None:
        assert out.features.shape == (BATCH, det.feature_dim)
    if det.class_names is None:
        assert out.class_logits is None
    else:
        assert out.class_logits.shape == (BATCH, len(det.class_names))
    maps = out.forgery_map((SIZE, SIZE))
    if maps is not None:
        assert maps.shape == (BATCH, 1, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("detector,osn,attribution", COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_detector_contract(detector, osn, attribution, tmp_path, monkeypatch):
    extra = []
    if osn == "robust" and detector in NO_INPUT_GRADIENTS:
        with pytest.raises(Exception, match="passes no gradient to its input"):  # hydra wraps the ValueError
            build_detector(_config(detector, osn, attribution, tmp_path))
        extra = ["osn.xi_eps=0"]  # predictable noise only
    cfg = _config(detector, osn, attribution, tmp_path, *extra)
    torch.manual_seed(0)
    det = build_detector(cfg)
    assert isinstance(det, Detector)
    assert det.input_gradients == (detector not in NO_INPUT_GRADIENTS)
    batch = _batch()

    # training step: finite loss terms, and the backward reaches every trainable parameter
    det.train()
    out = det(batch["image"], batch)
    _check_output(det, out)
    terms = det.loss_terms(out, batch)
    assert terms and all(t.dim() == 0 and bool(torch.isfinite(t.detach())) for t in terms.values()), terms
    if attribution != "none":
        assert "attribution" in terms
    torch.stack([t.float() for t in terms.values()]).sum().backward()
    det.after_backward()
    trainable = {n: p for n, p in det.named_parameters() if p.requires_grad}
    assert trainable, "a detector with nothing to train"
    missing = sorted(n for n, p in trainable.items() if p.grad is None)
    assert not missing, f"no gradient reaches {missing[:5]}"

    # evaluation scores, then a checkpoint round trip rebuilds the same scores
    det.eval()
    with torch.no_grad():
        reference = det(batch["image"], batch)
    _check_output(det, reference)
    module = DetectionModule(det, optimizer=torch.optim.SGD, run_config=to_plain(cfg))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = load_detector(tmp_path / "c.ckpt")
    assert type(loaded.detector) is type(det)
    with torch.no_grad():
        again = loaded.detector(batch["image"], batch)
    torch.testing.assert_close(again.logit, reference.logit, rtol=0, atol=1e-6)
    if reference.class_logits is not None:
        torch.testing.assert_close(again.class_logits, reference.class_logits, rtol=0, atol=1e-6)

    # runtimes: eager gives the detector's scores; image-only runtimes accept it or say why not
    eager = TorchRuntime(loaded.detector, device="cpu")(batch["image"], batch)
    torch.testing.assert_close(eager.prob, reference.prob, rtol=0, atol=1e-5)
    assert (eager.class_prob is None) == (det.class_names is None)
    if det.requires:
        with pytest.raises(ValueError, match="scoring.runtime=torch"):
            TorchRuntime(loaded.detector, device="cpu", compile=True)
    # scoring.runtime=auto on the CPU (the quick exporter, a private cache, no speed probe)
    monkeypatch.setenv("UNMASK_ONNX_EXPORTER", "torchscript")
    monkeypatch.setattr(choice, "MEASURE_SPEED", False)
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    auto = choice.choose_runtime(loaded, ScoringConfig(device="cpu"))
    if det.requires or det.export_note:
        with pytest.raises(ValueError, match="needs landmarks" if det.requires else "cannot be exported to ONNX"):
            refuse_export(loaded.detector)
        with pytest.raises(ValueError):
            export_onnx(loaded.detector, tmp_path / "m.onnx", SIZE, exporter="torchscript")
        assert not (tmp_path / "m.onnx").exists()
        assert auto.name == "torch" and auto.reason.startswith(f"auto: {detector} cannot export: ")
        assert ("needs landmarks" in auto.reason) if det.requires else (det.export_note in auto.reason)
        return
    assert auto.name == "onnx" and isinstance(auto.runtime, OnnxRuntime), auto.line()
    onnx = auto.runtime(batch["image"])
    torch.testing.assert_close(onnx.prob, reference.prob, rtol=0, atol=PROB_TOLERANCE)
    if det.class_names is not None:
        torch.testing.assert_close(onnx.class_prob, eager.class_prob, rtol=0, atol=PROB_TOLERANCE)
