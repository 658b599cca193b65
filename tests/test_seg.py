"""The localising detector (detectors/seg.py): shapes, loss terms, and it learns masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detectors.seg import SegDetector, soft_dice_loss
from unmask.evaluation.localization import mask_scores

TINY = dict(backbone="tf_efficientnet_lite0", pretrained="none", decoder_channels=(32, 16, 16, 8), dropout=0.0)


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> dict:
    """Textured images; odd samples carry a planted square of flat, brighter pixels."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, size, size, generator=g) * 0.6
    mask = torch.zeros(n, 1, size, size)
    for i in range(1, n, 2):
        s = int(torch.randint(8, 14, (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
        mask[i, :, y : y + s, x : x + s] = 1.0
    image = torch.where(mask.bool().expand_as(image), 0.85 + 0.05 * torch.rand_like(image), image)
    label = torch.tensor([i % 2 for i in range(n)])
    meta = {"ok": torch.ones(n, dtype=torch.bool), "mask_ok": torch.ones(n, dtype=torch.bool)}
    return {"image": image, "label": label, "mask": mask, "meta": meta}


def test_forward_shapes():
    det = SegDetector(**TINY).eval()
    with torch.no_grad():
        out = det(torch.rand(2, 3, 32, 32))
    assert out.logit.shape == (2,)
    assert out.mask.shape == (2, 1, 32, 32) and out.heatmap.shape == (2, 1, 32, 32)
    assert torch.allclose(out.heatmap, torch.sigmoid(out.mask))
    assert out.features.ndim == 2


def test_loss_has_image_and_pixel_terms_and_skips_samples_without_masks():
    det = SegDetector(**TINY, pixel_weight=2.0)
    batch = _batch()
    out = det(batch["image"], batch)
    terms = det.loss_terms(out, batch)
    assert {"bce", "pixel_bce", "pixel_dice"} <= set(terms)
    assert terms["pixel_bce"] > 0 and terms["pixel_dice"] > 0
    # no sample with a mask: the pixel terms are 0 but still on the graph
    batch["meta"]["mask_ok"] = torch.zeros(8, dtype=torch.bool)
    terms = det.loss_terms(out, batch)
    assert terms["pixel_bce"].item() == 0 and terms["pixel_bce"].requires_grad
    # a batch without masks at all (a data set without masks)
    plain = {"image": batch["image"], "label": batch["label"], "meta": {"ok": batch["meta"]["ok"]}}
    terms = det.loss_terms(out, plain)
    assert terms["pixel_dice"].item() == 0 and terms["pixel_dice"].requires_grad
    # only the masked samples count: corrupting an unmasked sample's mask changes nothing
    batch["meta"]["mask_ok"] = torch.tensor([True] * 4 + [False] * 4)
    ref = det.loss_terms(out, batch)["pixel_bce"]
    batch["mask"][6] = 1.0
    assert torch.allclose(det.loss_terms(out, batch)["pixel_bce"], ref)


def test_soft_dice_is_zero_for_a_perfect_mask():
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2, :2] = 1
    assert soft_dice_loss(target, target).item() < 1e-6
    assert soft_dice_loss(1 - target, target).item() > 0.5


@pytest.mark.slow
def test_training_improves_mask_iou_on_planted_squares():
    torch.manual_seed(0)
    det = SegDetector(**TINY)
    opt = torch.optim.Adam(det.parameters(), lr=1e-2)
    held_out = _batch(16, seed=99)

    def iou() -> float:
        det.eval()
        with torch.no_grad():
            prob = det(held_out["image"]).heatmap
        det.train()
        fakes = held_out["label"] == 1
        return float(mask_scores(prob[fakes].numpy(), held_out["mask"][fakes].numpy())["iou"].mean())

    before = iou()
    for step in range(40):
        batch = _batch(8, seed=step)
        out = det(batch["image"], batch)
        loss = torch.stack(list(det.loss_terms(out, batch).values())).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = iou()
    assert after > max(before + 0.3, 0.5), (before, after)


def test_topk_fusion_adds_the_mask_to_the_image_logit():
    det = SegDetector(**TINY, mask_topk=0.05).eval()
    with torch.no_grad():
        det.topk_scale.fill_(1.0)
        out = det(torch.rand(2, 3, 32, 32))
        base = det.head(out.features).squeeze(1)
        topk = out.mask.flatten(1).topk(max(1, round(0.05 * 32 * 32)), dim=1).values.mean(1)
    assert torch.allclose(out.logit, base + topk, atol=1e-5)


def test_bad_decoder_channels_name_the_key():
    import pytest

    with pytest.raises(ValueError, match="detector.decoder_channels"):
        SegDetector(backbone="tf_efficientnet_lite0", pretrained="none", decoder_channels=(8, 8))


def test_imagenet_weights_load_before_pruning():
    """The offline ImageNet weights reach the encoder (not a silent random init)."""
    from detectors.backbones import create_backbone

    full = create_backbone("tf_efficientnet_lite0", pretrained="imagenet")
    det = SegDetector(backbone="tf_efficientnet_lite0", pretrained="imagenet")
    assert torch.equal(det.encoder.conv_stem.weight, full.conv_stem.weight)
    assert not hasattr(det.encoder, "conv_head") or det.encoder.conv_head is None or isinstance(det.encoder.conv_head, torch.nn.Identity)


def _masked_manifest(root) -> str:
    """6 images (3 real, 3 forged with a planted square) with mask files, all in 'test'."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = ["relpath,label,split,generator,source,mask"]
    for i in range(6):
        img = (rng.random((40, 40, 3)) * 160).astype(np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        if i % 2:
            img[8:24, 10:26] = 230
            mask[8:24, 10:26] = 255
        Image.fromarray(img).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / f"{i}_mask.png")
        lines.append(f"{i}.png,{'fake' if i % 2 else 'real'},test,{'planted' if i % 2 else 'real'},toy,{i}_mask.png")
    (root / "MANIFEST.csv").write_text("\n".join(lines) + "\n")
    return str(root / "MANIFEST.csv")


@pytest.mark.slow
def test_train_with_sbi_then_evaluate_reports_localisation(tmp_path, cache_dir):
    """train.py's path with detector=seg augment=sbi (pixel losses from self-blended reals),
    then evaluate.py's path on a split with mask files: report["localization"] and the CSV."""

    from conftest import TINY_TRAIN_OVERRIDES, compose
    from data.records import ManifestSource
    from unmask.core.schemas import ScoringConfig
    from unmask.tasks.evaluate import evaluate_records
    from unmask.tasks.train import train

    run = tmp_path / "run"
    cfg = compose("train", TINY_TRAIN_OVERRIDES + [
        "detector=seg", "augment=sbi", "augment.forgery.p=1.0", "detector.decoder_channels=[16,16,8,8]",
        f"hydra.run.dir={run}", f"paths.output_dir={run}", f"paths.cache_dir={cache_dir}",
    ])
    metrics = train(cfg)
    assert metrics["train/loss_pixel_bce"] > 0 and metrics["train/loss_pixel_dice"] > 0

    data_dir = tmp_path / "masked"
    data_dir.mkdir()
    records = ManifestSource(_masked_manifest(data_dir)).records()  # all six in one split
    report = evaluate_records(str(run / "checkpoints" / "best.ckpt"), records, tmp_path / "eval",
                              ScoringConfig(batch_size=4, num_workers=0, device="cpu", progress=False))
    loc = report["localization"]
    # the headline counts the 3 forged images (issue 12); the 3 reals are reported apart
    assert loc["n"] == 3 and loc["reals"]["n"] == 3 and loc["all"]["n"] == 6
    assert loc["mask_from"] == "mask" and 0.0 <= loc["score"] <= 2.0
    assert set(loc["by_label"]) == {"real", "fake"}
    assert (tmp_path / "eval" / "localization.csv").is_file()
    assert "## Localisation" in (tmp_path / "eval" / "report.md").read_text()
