"""Scorers: the model call of the inference hot path, behind one interface.

A scorer takes a batch of images (float RGB in [0, 1], Bx3xHxW, as the data sets give them)
and returns P(fake) per image as a float32 CPU tensor. ``TorchRuntime`` runs the detector
(channels-last, inference mode, fp16 autocast on CUDA, optionally ``torch.compile``);
``OnnxRuntime`` runs an exported ONNX graph with onnxruntime. ``build_runtime`` picks one by
name (``runtime=torch|onnx`` in infer.yaml / evaluate.yaml).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from detectors.base import Detector

log = logging.getLogger(__name__)


class DetectorLogit(nn.Module):
    """``image -> logit``: the part of a detector that is compiled or exported (the batch
    dict and the auxiliary outputs are not needed to score)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> Tensor:
        return self.detector(image).logit


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchRuntime:
    """Eager (or compiled) PyTorch. ``compile=True`` compiles on the first batch; when
    compilation fails (no C++ compiler, an unsupported op) it says so once and goes on eager."""

    name = "torch"

    def __init__(
        self,
        detector: Detector,
        device: str | torch.device = "auto",
        amp: bool = True,
        compile: bool = False,
        channels_last: bool = True,
    ) -> None:
        self.device = pick_device(device) if isinstance(device, str) else device
        self.channels_last = channels_last
        self.detector = detector.to(self.device).eval()
        if channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and on tensor cores
            self.detector = self.detector.to(memory_format=torch.channels_last)
        use_amp = amp and self.device.type == "cuda"
        self._autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext
        self.compiled: Callable[[Tensor], Tensor] | None = None
        # Per-class probabilities of the last batch when the detector has an attribution
        # head (``{"class_prob": (B, C)}``); empty when compiled (the graph returns logits only).
        self.last_extras: dict[str, Tensor] = {}
        if compile:
            self.compiled = torch.compile(DetectorLogit(self.detector))

    def _logit(self, image: Tensor, batch: Mapping | None) -> Tensor:
        self.last_extras = {}
        if self.compiled is not None:
            try:
                return self.compiled(image)
            except Exception as e:  # compile errors surface on the first call
                log.warning("torch.compile failed (%s: %s); scoring eagerly", type(e).__name__, str(e).splitlines()[0][:200])
                self.compiled = None
        out = self.detector(image, batch)
        if out.class_logits is not None:
            self.last_extras = {"class_prob": torch.softmax(out.class_logits.float(), dim=1).cpu()}
        return out.logit

    def __call__(self, image: Tensor, batch: Mapping | None = None) -> Tensor:
        image = image.to(self.device, non_blocking=True)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            logit = self._logit(image, batch)
        return torch.sigmoid(logit.float()).cpu()


class OnnxRuntime:
    """An exported detector (``unmask.onnx_export``) in onnxruntime, all graph optimisations
    on. ``threads``: intra-op threads (default: PyTorch's, i.e. the cores it would use).
    ``spin``: let idle intra-op threads busy-wait; off by default, because the DataLoader
    workers decoding beside the model need those cores (off was ~20 % faster end to end and
    no slower forward-only on the 2-core development machine)."""

    name = "onnx"

    def __init__(self, model_path: str | Path, threads: int | None = None, device: str = "cpu", spin: bool = False) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found; export one with `python -m unmask.onnx_export CKPT`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers = ["CPUExecutionProvider"]
        if pick_device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0]
        self.path = path
        self.device = torch.device("cpu")  # inputs are handed over as host arrays

    def __call__(self, image: Tensor, batch: Mapping | None = None) -> Tensor:
        expected = self.input.shape[-2:]
        if all(isinstance(s, int) for s in expected) and tuple(image.shape[-2:]) != tuple(expected):
            raise ValueError(
                f"{self.path} was exported for {expected[0]}x{expected[1]} images, the data gives "
                f"{image.shape[-2]}x{image.shape[-1]}; re-export it from the checkpoint"
            )
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        (logit,) = self.session.run(None, {self.input.name: array})
        return torch.sigmoid(torch.from_numpy(logit).float().reshape(-1))


def _torch_runtime(loaded, device: str, amp: bool, compile: bool, onnx_model: str | None, threads: int | None):
    return TorchRuntime(loaded.detector, device=device, amp=amp, compile=compile)


def _onnx_runtime(loaded, device: str, amp: bool, compile: bool, onnx_model: str | None, threads: int | None):
    from unmask.onnx_export import ensure_onnx

    return OnnxRuntime(ensure_onnx(loaded, onnx_model), threads=threads, device=device)


RUNTIMES: dict[str, Callable] = {"torch": _torch_runtime, "onnx": _onnx_runtime}


def build_runtime(
    name: str,
    loaded,
    device: str = "auto",
    amp: bool = True,
    compile: bool = False,
    onnx_model: str | None = None,
    threads: int | None = None,
):
    """The scorer for ``runtime=name`` from a ``unmask.checkpoint.LoadedDetector``."""
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {sorted(RUNTIMES)}, got {name!r}")
    return RUNTIMES[name](loaded, device, amp, compile, onnx_model, threads)
