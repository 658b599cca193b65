"""Issue 12 (method fidelity), items 3, 6, 7, 8, 9: the spec's D_g, the authors' OSN
simulator weights and detectors that pass no gradient to their input, the UnivFD k-NN bank,
DiffJPEG's libjpeg tables below quality 50, and an interpolated EER."""
from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from detectors.backbones import skip_pretrained
from detectors.base import Detector, DetectorOutput
from detectors.diffjpeg import CHROMA_TABLE, LUMA_TABLE, DiffJPEG
from detectors.osn_simulator import NoiseSimulator
from detectors.univfd import UnivFD
from detectors.wrappers.osn import OSNRobust
from unmask.core.metrics import equal_error_rate

# --- item 3: the spec's D_g -----------------------------------------------------------------

# A constructed test split: 10 reals, 10 fakes of seen generator "a", 10 of held-out "b".
# The held-out model (trained without b), threshold 0.5: 8 of 10 reals pass, 9 of a's
# fakes and 3 of b's are caught. The all-generator base model: every real passes, 9 of b's
# fakes are caught.
#   spec:       Acc_base' = (8 + 9) / 20 = 0.85 (seen), Acc' = (8 + 3) / 20 = 0.55 (b)
#               D_g = 0.30 / 0.85
#   two-model:  Acc_base' = (10 + 9) / 20 = 0.95 (base model on b), Acc' = 0.55
#               D_g = 0.40 / 0.95
def _records():
    rows = [("r", 0, "real")] * 10 + [("a", 1, "a")] * 10 + [("b", 1, "b")] * 10
    return [SimpleNamespace(path=f"{p}{i}.png", label=lab, generator=g, source="s") for i, (p, lab, g) in enumerate(rows)]


def _probs(n_right: int, n: int, label: int) -> list[float]:
    right, wrong = (0.9, 0.1) if label == 1 else (0.1, 0.9)
    return [right] * n_right + [wrong] * (n - n_right)


MODEL_PROBS = {
    "heldout_b": _probs(8, 10, 0) + _probs(9, 10, 1) + _probs(3, 10, 1),
    "base": _probs(10, 10, 0) + _probs(5, 10, 1) + _probs(9, 10, 1),
}


def _fake_score(ckpt, records, scoring):
    probs = dict(zip((r.path for r in _records()), MODEL_PROBS[str(ckpt)]))
    rows = [{"path": r.path, "label": r.label, "generator": r.generator, "source": r.source, "prob": probs[r.path]} for r in records]
    return pd.DataFrame(rows), 0.5


def test_logo_reports_the_spec_d_g_beside_the_two_model_figure(monkeypatch, tmp_path):
    from unmask.robustness import generalization as gen

    monkeypatch.setattr(gen, "_score", _fake_score)
    table = gen.logo_table("base", {"b": "heldout_b"}, _records())
    row = table.iloc[0]
    assert row["acc_seen"] == pytest.approx(0.85) and row["acc_heldout"] == pytest.approx(0.55)
    assert row["d_g_spec"] == pytest.approx(0.30 / 0.85)
    assert row["acc_base"] == pytest.approx(0.95)
    assert row["d_g_two_model"] == pytest.approx(0.40 / 0.95)
    assert row["n_real"] == 10 and row["n_fake"] == 10 and row["n_fake_seen"] == 10
    gen.write_logo(tmp_path, table, ["data=x"], {"base": 1.0})
    md = (tmp_path / "logo.md").read_text()
    for name in ("d_g_spec", "d_g_two_model", "acc_seen", "T/ZFIDA"):
        assert name in md
    assert {"d_g_spec", "d_g_two_model"} <= set(pd.read_csv(tmp_path / "logo.csv").columns)
    blob = json.loads((tmp_path / "logo.json").read_text())
    assert {"d_g_spec", "d_g_two_model"} <= set(blob["columns"])  # what each quantity is
    assert blob["rows"][0]["d_g_spec"] == pytest.approx(0.30 / 0.85)


# --- item 6: the authors' OSN simulator weights ---------------------------------------------


def _authors_layout(n1: int = 64, seed: int = 0) -> OrderedDict:
    """The state dict of ImageForensicsOSN's ``U_Net(in_ch=3, out_ch=3)`` (osn.py): every
    name and shape of its network definition, random values. ``conv_block`` is
    Sequential(conv3x3+bias, BN, ReLU, conv3x3+bias, BN, ReLU) under ``.conv``; ``up_conv``
    is Sequential(Upsample, conv3x3+bias, BN, ReLU) under ``.up``; the 1x1 ``Conv`` has a
    bias; ``diff_jpeg`` holds its DiffJPEG's tables as parameters."""
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict = OrderedDict()
    filters = [n1 * 2**i for i in range(5)]

    def conv(name, cin, cout, k=3):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2 / (cin * k * k)) ** 0.5
        state[f"{name}.bias"] = torch.randn(cout, generator=gen) * 0.1

    def bn(name, c):
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=gen)
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
        state[f"{name}.running_var"] = 1 + 0.1 * torch.rand(c, generator=gen)
        state[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    def conv_block(name, cin, cout):
        conv(f"{name}.conv.0", cin, cout)
        bn(f"{name}.conv.1", cout)
        conv(f"{name}.conv.3", cout, cout)
        bn(f"{name}.conv.4", cout)

    conv_block("Conv1", 3, filters[0])
    for i in range(1, 5):
        conv_block(f"Conv{i + 1}", filters[i - 1], filters[i])
    for i in (5, 4, 3, 2):
        conv(f"Up{i}.up.1", filters[i - 1], filters[i - 2])
        bn(f"Up{i}.up.2", filters[i - 2])
        conv_block(f"Up_conv{i}", filters[i - 1], filters[i - 2])
    conv("Conv", filters[0], 3, k=1)
    table = torch.tensor(LUMA_TABLE, dtype=torch.float32).view(8, 8).T
    for part in ("compress.y_quantize.y_table", "decompress.y_dequantize.y_table"):
        state[f"diff_jpeg.{part}"] = table
    for part in ("compress.c_quantize.c_table", "decompress.c_dequantize.c_table"):
        state[f"diff_jpeg.{part}"] = torch.tensor(CHROMA_TABLE, dtype=torch.float32).view(8, 8).T
    for part, shape in (("compress.l1.0.shift", (3,)), ("compress.l1.0.matrix", (3, 3)), ("compress.l2.1.tensor", (8, 8, 8, 8)),
                        ("compress.l2.1.scale", (8, 8)), ("decompress.idct.alpha", (8, 8)), ("decompress.idct.tensor", (8, 8, 8, 8)),
                        ("decompress.colors.shift", (3,)), ("decompress.colors.matrix", (3, 3))):  # fmt: skip
        state[f"diff_jpeg.{part}"] = torch.zeros(shape)
    return state


def _authors_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """Their ``U_Net.forward`` up to the residual mix (isResidual, without their DiffJPEG),
    in eval mode, written out with torch.nn.functional on their state dict."""

    def cbr(name, t):
        t = F.conv2d(t, state[f"{name[0]}.weight"], state[f"{name[0]}.bias"], padding=1)
        t = F.batch_norm(t, state[f"{name[1]}.running_mean"], state[f"{name[1]}.running_var"], state[f"{name[1]}.weight"],
                         state[f"{name[1]}.bias"], training=False, eps=1e-5)  # fmt: skip
        return F.relu(t)

    def block(name, t):
        return cbr((f"{name}.conv.3", f"{name}.conv.4"), cbr((f"{name}.conv.0", f"{name}.conv.1"), t))

    e = [block("Conv1", x)]
    for i in range(2, 6):
        e.append(block(f"Conv{i}", F.max_pool2d(e[-1], 2)))
    d = e[-1]
    for i in (5, 4, 3, 2):
        up = cbr((f"Up{i}.up.1", f"Up{i}.up.2"), F.interpolate(d, scale_factor=2.0, mode="nearest"))
        d = block(f"Up_conv{i}", torch.cat([e[i - 2], up], dim=1))
    out = F.conv2d(d, state["Conv.weight"], state["Conv.bias"])
    return 0.02 * torch.tanh(out) + 0.98 * x


def _as_old_project_layout(state: dict) -> dict:
    """The same weights under this project's former simulator layout (``inc``, ``down``,
    ``up[*].reduce/fuse``, ``out``; convolutions without bias)."""
    names = {"Conv1.conv": "inc", "Conv": "out"}
    names.update({f"Conv{i + 2}.conv": f"down.{i}" for i in range(4)})
    names.update({f"Up{5 - j}.up": f"up.{j}.reduce" for j in range(4)})
    names.update({f"Up_conv{5 - j}.conv": f"up.{j}.fuse" for j in range(4)})
    out = {}
    for key, value in state.items():
        if key.startswith("diff_jpeg.") or (key.endswith(".bias") and value.dim() == 1 and f"{key[:-5]}.running_mean" not in state
                                             and key != "Conv.bias"):  # fmt: skip
            continue
        prefix, _, leaf = key.rpartition(".")
        module, _, index = prefix.rpartition(".")
        if module in names:
            idx = int(index)
            if names[module].endswith("reduce"):
                idx -= 1  # their Sequential starts with the (parameter-free) Upsample
            out[f"{names[module]}.{idx}.{leaf}"] = value
        else:
            out[f"{names[prefix]}.{leaf}"] = value
    return out


def test_authors_simulator_weights_load_strictly_and_compute_their_network(tmp_path):
    state = _authors_layout()
    path = tmp_path / "OSN_UNet_weights.pth"
    torch.save(state, path)  # as their osn.py loads it: a bare state dict
    sim = NoiseSimulator(base_channels=64, weights=str(path)).eval()
    own = sim.state_dict()
    wanted = {k: v for k, v in state.items() if not k.startswith("diff_jpeg.")}
    assert set(own) == set(wanted)  # their layout, name for name
    assert all(own[k].shape == v.shape and torch.equal(own[k], v) for k, v in wanted.items())
    sim.load_state_dict(wanted, strict=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(sim(x), _authors_forward(state, x), rtol=1e-4, atol=1e-5)

    # a DataParallel-wrapped copy (``module.`` prefix) loads too
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pth")
    again = NoiseSimulator(base_channels=64, weights=str(tmp_path / "dp.pth")).eval()
    with torch.no_grad():
        assert torch.equal(again(x), sim(x))


def test_authors_and_former_project_layouts_give_the_same_simulator(tmp_path):
    state = _authors_layout(seed=1)
    for key in list(state):  # the former layout had no conv biases: the same network with zero biases
        if key.endswith(".bias") and f"{key[:-5]}.running_mean" not in state:
            state[key] = torch.zeros_like(state[key])
    torch.save(state, tmp_path / "authors.pth")
    old = {"config": {"base_channels": 64, "depth": 4, "residual_scale": 0.02}, "state_dict": _as_old_project_layout(state)}
    torch.save(old, tmp_path / "simulator.pt")
    a = NoiseSimulator(base_channels=64, weights=str(tmp_path / "authors.pth")).eval()
    b = NoiseSimulator(base_channels=64, weights=str(tmp_path / "simulator.pt")).eval()
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(Exception, match="base_channels"):
        NoiseSimulator(base_channels=8, weights=str(tmp_path / "authors.pth"))


# --- item 6: detectors that pass no gradient to their input ---------------------------------


def test_osn_refuses_detectors_without_input_gradients():
    from detectors.lgrad import LGrad

    univfd = UnivFD(encoder="mobilenetv2_050", pretrained="none")
    lgrad = LGrad(source="mobilenetv2_050", source_pretrained="none", classifier="resnet18")
    for det in (univfd, UnivFD(encoder="mobilenetv2_050", pretrained="none", mode="knn"), lgrad):
        assert det.input_gradients is False
        with pytest.raises(ValueError, match=r"no gradient.*xi_eps=0"):
            OSNRobust(det)
        OSNRobust(det, xi_eps=0)  # predictable noise only: allowed, said so
        with skip_pretrained():  # a checkpoint written before the rule still loads and scores
            OSNRobust(det)


class _Detaching(Detector):
    """Claims input gradients but detaches its input: caught at the first training step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward_normalized(self, x):
        return DetectorOutput(logit=self.fc(x.detach().mean((2, 3))).squeeze(1))


def test_osn_says_so_when_xi_gets_no_gradient_at_the_first_step():
    det = OSNRobust(_Detaching(), jpeg_quality=None, resize_scale=None).train()
    batch = {"label": torch.tensor([0, 1])}
    out = det(torch.rand(2, 3, 16, 16), batch)
    sum(det.loss_terms(out, batch).values()).backward()
    with pytest.raises(RuntimeError, match="input_gradients"):
        det.after_backward()


# --- item 7: the UnivFD k-NN bank -----------------------------------------------------------


def test_knn_bank_keeps_one_entry_per_training_image_and_leaves_its_own_out():
    torch.manual_seed(0)
    det = UnivFD(encoder="mobilenetv2_050", pretrained="none", mode="knn", knn_k=1).train()
    n = 6
    images = torch.rand(n, 3, 32, 32)
    batch = {"label": torch.tensor([0, 1, 0, 1, 0, 1]), "meta": {"path": [f"img{i}.png" for i in range(n)], "ok": [True] * n}}

    def augmented():  # each epoch sees another augmented view of the same files
        return (images + 0.03 * torch.randn_like(images)).clamp(0, 1)

    for _ in range(3):
        det(augmented(), batch)
    assert len(det.bank) == n  # one entry per training image, not one per epoch

    # leave-one-out: each image is scored against the other images' entries only
    bank_before = {k: v.clone() for k, v in det.bank.state_dict().items()}
    x = augmented()
    logit = det(x, batch).logit.detach()
    emb = det.encode(det._geometry(x))
    feats, labels = bank_before["features"], bank_before["labels"]
    for i in range(n):
        others = torch.ones(len(labels), dtype=torch.bool)
        others[i] = False  # the bank holds the images in batch order
        sims = F.normalize(emb[i : i + 1], dim=1) @ feats[others].T
        lab = labels[others]
        expected = sims[:, lab == 1].max() - sims[:, lab == 0].max()
        assert logit[i] == pytest.approx(float((det.knn_scale * expected + det.knn_bias).detach()), abs=1e-5)
    # and the latest view replaced each image's entry
    assert torch.allclose(det.bank.features, F.normalize(emb, dim=1), atol=1e-6)


# --- item 8: DiffJPEG's tables are libjpeg's ------------------------------------------------

ZIGZAG = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
]  # fmt: skip  (position k of the zigzag scan -> row-major index)


def _pil_tables(q: int) -> tuple[list[int], list[int]]:
    """PIL's (libjpeg's) luma and chroma tables at quality q, row-major."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "JPEG", quality=q)
    tables = Image.open(io.BytesIO(buf.getvalue())).quantization
    luma, chroma = list(tables[0]), list(tables[1])
    reference = list(Image.open(io.BytesIO(_q50())).quantization[0])
    if reference != LUMA_TABLE:  # an older Pillow hands tables in zigzag order
        assert [reference[ZIGZAG.index(i)] for i in range(64)] == LUMA_TABLE
        luma, chroma = ([t[ZIGZAG.index(i)] for i in range(64)] for t in (luma, chroma))
    return luma, chroma


def _q50() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def test_diffjpeg_tables_equal_pil_for_every_quality_10_to_100():
    qualities = list(range(10, 101))
    luma, chroma = DiffJPEG().tables(torch.tensor(qualities, dtype=torch.float32))
    wrong = []
    for i, q in enumerate(qualities):
        pl, pc = _pil_tables(q)
        if luma[i].flatten().int().tolist() != pl or chroma[i].flatten().int().tolist() != pc:
            wrong.append(q)
    assert not wrong, f"tables differ from PIL's at qualities {wrong}"


# --- item 9: EER between ROC vertices --------------------------------------------------------


def _brute_force_eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """Every operating point by counting (flag ``score >= t`` for t over every distinct
    score, plus flag-nothing), the ROC as the polyline through them (a randomised threshold
    reaches every point between two operating points), sampled densely: the point where
    FPR and FNR are closest."""
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    fpr = np.array([(scores[labels == 0] >= t).mean() for t in thresholds])
    fnr = np.array([(scores[labels == 1] < t).mean() for t in thresholds])
    t = np.linspace(0.0, 1.0, 20001)[:, None]
    f = fpr[:-1] + t * np.diff(fpr)
    m = fnr[:-1] + t * np.diff(fnr)
    i = np.unravel_index(np.argmin(np.abs(f - m)), f.shape)
    return float((f[i] + m[i]) / 2)


@pytest.mark.parametrize("seed", range(20))
def test_eer_interpolates_between_roc_points(seed):
    rng = np.random.default_rng(seed)
    n = 100
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = rng.normal(labels * rng.uniform(0.3, 2.0), 1.0)
    if seed % 2:
        scores = np.round(scores, 1)  # ties
    assert equal_error_rate(labels, scores) == pytest.approx(_brute_force_eer(labels, scores), abs=1e-3)


def test_eer_known_crossing_between_vertices():
    # reals 0.1 0.3 0.5, fakes 0.2 0.4. Operating points (FPR, FNR), flag score >= t:
    # t=0.5 (1/3, 1), t=0.4 (1/3, 1/2), t=0.3 (2/3, 1/2), t=0.2 (2/3, 0). FPR and FNR cross
    # halfway between (1/3, 1/2) and (2/3, 1/2): EER 1/2 (the nearest vertex says 5/12).
    assert equal_error_rate([0, 0, 0, 1, 1], [0.1, 0.3, 0.5, 0.2, 0.4]) == pytest.approx(0.5)
    # a crossing on a vertex stays that vertex
    assert equal_error_rate([0, 0, 0, 0, 1, 1, 1, 1], [0.1, 0.2, 0.3, 0.55, 0.5, 0.6, 0.7, 0.8]) == pytest.approx(0.25)
    assert equal_error_rate([0, 1], [0.1, 0.2]) == 0.0 and equal_error_rate([0, 1], [0.2, 0.1]) == 1.0
    assert math.isnan(equal_error_rate([1, 1], [0.2, 0.1]))
