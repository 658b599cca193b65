"""Issue 6: heatmaps for every detector (unmask/explain/gradcam.py) and the explanation files
of infer.py (unmask/explain/gallery.py)."""
from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image
from torch import nn

import badimages as bad
from conftest import compose
from detectors.base import Detector, DetectorOutput
from detectors.cnnspot import CNNSpot
from detectors.npr import NPR
from unmask.explain.gallery import safe_relpath
from unmask.explain.gradcam import default_target_layer, explain_maps, grad_cam
from unmask.tasks.infer import run_inference


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _assert_maps(maps: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert tuple(maps.shape) == shape
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0


class TinyCNN(Detector):
    """Three convolutions, a 16 x 16 feature map, global average pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(32, 1)

    def forward_normalized(self, x: torch.Tensor) -> DetectorOutput:
        return DetectorOutput(logit=self.head(self.features(x).mean((2, 3))).squeeze(1))


class OwnHeatmap(Detector):
    """A test double with its own 4 x 4 heatmap, hottest at row 1, column 2; no conv layer,
    so a Grad-CAM fallback would fail loudly."""

    def forward_normalized(self, x: torch.Tensor) -> DetectorOutput:
        heat = torch.zeros(x.shape[0], 1, 4, 4)
        heat[:, :, 1, 2] = 0.8
        heat[:, :, 0, 0] = 0.2
        return DetectorOutput(logit=x.mean((1, 2, 3)), heatmap=heat)


class OwnMask(Detector):
    """Per-pixel forgery logits at half resolution: 0 (p = 0.5) left half, +10 right half."""

    def forward_normalized(self, x: torch.Tensor) -> DetectorOutput:
        b, _, h, w = x.shape
        mask = torch.zeros(b, 1, h // 2, w // 2)
        mask[..., w // 4 :] = 10.0
        return DetectorOutput(logit=x.mean((1, 2, 3)), mask=mask, heatmap=torch.rand(b, 1, 2, 2))


# --------------------------------------------------------------- maps of real detectors


@pytest.mark.parametrize("make, size", [(lambda: CNNSpot(pretrained="none"), 64), (NPR, 32)], ids=["cnnspot", "npr"])
def test_gradcam_shape_range_and_no_side_effects(make, size):
    torch.manual_seed(0)
    det = make().train()  # explain_maps must switch to eval itself and restore training
    flags = [p.requires_grad for p in det.parameters()]
    with torch.inference_mode():  # as infer.py's tensors; and callers under no_grad
        image = torch.rand(3, 3, size, size)
    with torch.no_grad():
        maps = explain_maps(det, image)
        assert not torch.is_grad_enabled()  # the caller's grad mode survives the call
    _assert_maps(maps, (3, 1, size, size))
    assert det.training
    assert _hook_count(det) == 0
    assert [p.requires_grad for p in det.parameters()] == flags
    assert all(p.grad is None for p in det.parameters())  # gradients of activations only
    assert torch.is_grad_enabled()


def test_default_layer_is_the_last_feature_map_larger_than_one_pixel():
    det = CNNSpot(pretrained="none").eval()
    # 64 px: EfficientNet's last maps are 2 x 2; at 32 px they are 1 x 1 and are skipped
    assert default_target_layer(det, torch.rand(1, 3, 64, 64)) == "backbone.bn2"
    assert default_target_layer(det, torch.rand(1, 3, 32, 32)).startswith("backbone.blocks.")
    assert default_target_layer(NPR().eval(), torch.rand(1, 3, 32, 32)) == "features"


def test_frozen_encoder_under_no_grad_still_gets_gradients():
    """UnivFD's encoder is frozen and runs under @torch.no_grad: Grad-CAM still localises."""
    from detectors.univfd import UnivFD

    torch.manual_seed(0)
    det = UnivFD(encoder="mobilenetv2_050", pretrained="none").eval()
    maps = grad_cam(det, torch.rand(2, 3, 64, 64))
    _assert_maps(maps, (2, 1, 64, 64))
    assert (maps.flatten(1).amax(1) == 1.0).all()  # a real (non-flat) map per image
    assert not any(p.requires_grad for p in det.encoder.parameters())


def test_lgrad_input_gradients_inside_forward_keep_working():
    from detectors.lgrad import LGrad

    torch.manual_seed(0)
    det = LGrad(source="mobilenetv2_050", source_pretrained="none", classifier="resnet18", pretrained="none").eval()
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = det(image).logit
    maps = explain_maps(det, image)
    _assert_maps(maps, (2, 1, 32, 32))
    assert default_target_layer(det, image).startswith("classifier.")
    assert _hook_count(det) == 0
    with torch.no_grad():  # the source is untouched: same scores after explaining
        torch.testing.assert_close(det(image).logit, before)


def test_flat_input_gives_a_finite_map():
    det = NPR().eval()  # a constant image has a zero NPR residual: a flat CAM
    maps = explain_maps(det, torch.full((2, 3, 32, 32), 0.5))
    _assert_maps(maps, (2, 1, 32, 32))
    assert (maps == 0).all()
    _assert_maps(explain_maps(CNNSpot(pretrained="none").eval(), torch.zeros(1, 3, 64, 64)), (1, 1, 64, 64))


def test_wrong_layer_name_lists_candidates_and_leaves_no_hooks():
    det = TinyCNN().eval()
    with pytest.raises(ValueError, match=r"explain.layer='features\.9' is not a module .*features\.4 \[1, 32, 16, 16\]"):
        explain_maps(det, torch.rand(1, 3, 32, 32), method="gradcam", target_layer="features.9")
    with pytest.raises(ValueError, match="not a \\(B, C, H, W\\) feature map"):
        explain_maps(det, torch.rand(1, 3, 32, 32), method="gradcam", target_layer="head")
    assert _hook_count(det) == 0
    _assert_maps(explain_maps(det, torch.rand(2, 3, 32, 32), method="gradcam", target_layer="features.2"), (2, 1, 32, 32))
    with pytest.raises(ValueError, match="explain.method must be one of"):
        explain_maps(det, torch.rand(1, 3, 32, 32), method="saliency")


# --------------------------------------------------------------- the detector's own maps


def test_own_heatmap_is_upsampled_and_keeps_its_scale():
    image = torch.rand(2, 3, 32, 48)
    maps = explain_maps(OwnHeatmap(), image)  # auto: the own map (a Grad-CAM would raise here)
    _assert_maps(maps, (2, 1, 32, 48))
    # DetectorOutput.forgery_map: a heatmap is evidence on the probability scale, never rescaled
    assert 0.5 < maps.amax() <= 0.8 and maps.amin() == 0.0
    peak = np.unravel_index(int(maps[0, 0].argmax()), (32, 48))
    assert 8 <= peak[0] < 16 and 24 <= peak[1] < 36  # inside heatmap cell (1, 2)
    torch.testing.assert_close(explain_maps(OwnHeatmap(), image, method="own"), maps)


def test_own_mask_wins_over_heatmap_and_keeps_probabilities():
    maps = explain_maps(OwnMask(), torch.rand(1, 3, 32, 32))
    _assert_maps(maps, (1, 1, 32, 32))
    torch.testing.assert_close(maps[0, 0, :, :12], torch.full((32, 12), 0.5))  # sigmoid(0), not min-max scaled
    assert (maps[0, 0, :, 20:] > 0.99).all()


def test_own_method_without_a_map_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a mask nor a heatmap"):
        explain_maps(TinyCNN().eval(), torch.rand(1, 3, 32, 32), method="own")


# --------------------------------------------------------------- Grad-CAM finds a planted artefact


def _square_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images; the second half ("fakes") carry a bright 6 x 6 square at a random
    position. Returns images, labels and the squares' top-left corners."""
    images = torch.rand(n, 3, 32, 32, generator=gen) * 0.6
    labels = torch.zeros(n)
    corners = torch.randint(0, 32 - 6 + 1, (n, 2), generator=gen)
    for i in range(n // 2, n):
        y, x = corners[i].tolist()
        images[i, :, y : y + 6, x : x + 6] = 1.0
        labels[i] = 1.0
    return images, labels, corners


def test_gradcam_peak_lies_on_the_planted_square():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    det = TinyCNN()
    opt = torch.optim.Adam(det.parameters(), lr=3e-3)
    for _ in range(120):  # ~5 s on one CPU thread
        images, labels, _ = _square_batch(32, gen)
        loss = nn.functional.binary_cross_entropy_with_logits(det(images).logit, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    images, labels, corners = _square_batch(64, gen)
    with torch.no_grad():
        accuracy = ((det(images).logit > 0).float() == labels).float().mean()
    assert accuracy >= 0.9, f"the tiny CNN did not learn the square (accuracy {accuracy:.2f})"
    fakes = labels == 1
    maps = explain_maps(det, images[fakes])
    _assert_maps(maps, (int(fakes.sum()), 1, 32, 32))
    hits = []
    for m, (y, x) in zip(maps[:, 0], corners[fakes].tolist()):
        py, px = np.unravel_index(int(m.argmax()), m.shape)
        hits.append(y <= py < y + 6 and x <= px < x + 6)
    assert np.mean(hits) >= 0.8, f"Grad-CAM peak on the square for only {np.mean(hits):.0%} of fakes"


# --------------------------------------------------------------- infer.py explain=gallery


class _Cards(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self._depth = 0  # div nesting inside the current card

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self.cards.append({"text": "", "img": None, "links": []})
            self._depth = 1
        elif tag == "div" and self._depth:
            self._depth += 1
        elif self._depth and tag == "img":
            self.cards[-1]["img"] = attrs["src"]
        elif self._depth and tag == "a":
            self.cards[-1]["links"].append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "div" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.cards[-1]["text"] += data


def test_safe_relpath_never_leaves_the_folder():
    assert safe_relpath("a/b.jpg").as_posix() == "a/b.jpg"
    assert safe_relpath("../../etc/passwd").as_posix() == "__/__/etc/passwd"
    assert safe_relpath("/abs//./x.png").as_posix() == "abs/x.png"


def test_infer_explain_writes_masks_overlays_and_index(tiny_ckpt, tmp_path):
    root = tmp_path / "testset"
    (root / "sub").mkdir(parents=True)
    good = [f"img_{i}.png" for i in range(4)] + ["sub/nested <&>.jpg"]
    for i, name in enumerate(good):
        (bad.good_jpeg if name.endswith(".jpg") else bad.good_png)(root / name, seed=i)
    bad.random_bytes(root / "broken.jpg")

    def cfg(out, *extra):
        return compose("infer", [f"ckpt={tiny_ckpt}", f"input={root}", f"output_dir={out}", "scoring.num_workers=0", "scoring.batch_size=4", "scores=true", *extra])

    plain = run_inference(cfg(tmp_path / "plain"))
    result = run_inference(cfg(tmp_path / "explained", "explain=gallery"))
    assert result.read_bytes() == plain.read_bytes()  # the contest file does not change
    out = result.with_suffix(".explain")
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mask.png"))
    overlays = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.overlay.png"))
    assert masks == sorted(f"{n}.mask.png" for n in good)  # sub-folders mirrored; none for broken.jpg
    assert overlays == sorted(f"{n}.overlay.png" for n in good)
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    for name in good:
        mask = np.asarray(Image.open(out / f"{name}.mask.png"))
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(out / f"{name}.overlay.png")).shape == (*mask.shape, 3)

    parser = _Cards()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    assert len(parser.cards) == len(good) + 1
    undecodable = [c for c in parser.cards if "could not decode" in c["text"]]
    assert len(undecodable) == 1 and "broken.jpg" in undecodable[0]["text"] and undecodable[0]["img"] is None
    decoded = [c for c in parser.cards if c not in undecodable]
    assert "sub/nested <&>.jpg" in "".join(c["text"] for c in decoded)  # escaped in the file, intact when parsed
    for c in decoded:  # every thumbnail link resolves relative to index.html
        assert (out / unquote(c["img"])).is_file()
    scores = [float(c["text"].split("score ")[1].split()[0]) for c in decoded]
    assert scores == sorted(scores, reverse=True)
    scores_csv = pd.read_csv(result.with_suffix(".scores.csv"))
    decisions = {n: "AI-generated" if d == 1 else "real" for n, d in zip(scores_csv["name"], scores_csv["decision"])}
    for c in decoded:  # each card: its file's score and decision of the scores file
        (name,) = [n for n in good if n in c["text"]]
        assert f"· {decisions[name]}" in c["text"]

    limited = run_inference(cfg(tmp_path / "limited", "explain=gallery", "explain.limit=2"))
    assert len(list(limited.with_suffix(".explain").rglob("*.mask.png"))) == 2


def test_infer_explain_bad_values_are_clear_errors(tiny_ckpt, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    bad.good_png(root / "a.png")
    base = [f"ckpt={tiny_ckpt}", f"input={root}", "scoring.num_workers=0", "explain=gallery"]
    with pytest.raises(ValueError, match="explain.mask_threshold must be a number in"):
        run_inference(compose("infer", base + [f"output_dir={tmp_path / 'o1'}", "explain.mask_threshold=2"]))
    assert not (tmp_path / "o1").exists()  # refused before any work
    with pytest.raises(ConfigCompositionException, match="explain.method"):
        compose("infer", base + ["explain.method=saliency"])  # a wrong choice fails at composition
    with pytest.raises(ValueError, match="explain.layer='nope' is not a module"):
        run_inference(compose("infer", base + [f"output_dir={tmp_path / 'o2'}", "explain.layer=nope"]))
    assert list((tmp_path / "o2").glob("result_*.xls"))  # the contest file was written first
