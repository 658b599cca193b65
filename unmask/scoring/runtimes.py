"""Runtimes: the model call of the scoring loop, behind one interface.

A runtime takes a batch of images (float RGB in [0, 1], Bx3xHxW, as the data sets give them)
and the rest of the collated batch, and returns a ``RuntimeOutput``: P(fake) per image and,
when the detector has an attribution head, the per-class probabilities. ``TorchRuntime``
runs the detector (channels-last, inference mode, fp16 autocast on CUDA, optionally
``torch.compile``); ``OnnxRuntime`` runs an exported graph with onnxruntime.

Runtimes that are handed the image alone (ONNX, compiled graphs) refuse a detector that
reads more of the batch (``Detector.requires``): it would be scored wrongly, not slowly.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from detectors.base import Detector, DetectorOutput

log = logging.getLogger(__name__)


@dataclass
class RuntimeOutput:
    prob: Tensor  # (B,) float32 CPU: P(AI-generated)
    class_prob: Tensor | None = None  # (B, C) float32 CPU: forgery-type probabilities, with a head
    output: DetectorOutput | None = None  # the eager forward's full output (maps), eager runtime only


class ImageOnlyGraph(nn.Module):
    """``image -> logit`` (and ``class_logits`` when the detector has an attribution head): the
    part of a detector that is compiled or exported."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        self.with_classes = detector.class_names is not None

    def forward(self, image: Tensor):
        out = self.detector(image)
        return (out.logit, out.class_logits) if self.with_classes else out.logit


def refuse_image_only(detector: Detector, runtime: str) -> None:
    """A clear error when ``detector`` cannot be scored from the image alone."""
    if detector.requires:
        raise ValueError(
            f"{type(detector).__name__} needs {', '.join(detector.requires)} besides the image, which {runtime} "
            "cannot pass; score it with scoring.runtime=torch scoring.compile=false"
        )


def pick_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _probabilities(logit: Tensor, class_logits: Tensor | None) -> RuntimeOutput:
    class_prob = None if class_logits is None else torch.softmax(class_logits.float(), dim=1).cpu()
    return RuntimeOutput(torch.sigmoid(logit.float()).reshape(-1).cpu(), class_prob)


class TorchRuntime:
    """Eager (or compiled) PyTorch. ``compile=True`` compiles ``image -> logit`` on the first
    batch; a compilation failure (no C++ compiler, an unsupported op) is said once, then
    scoring goes on eager, which gives the same numbers."""

    name = "torch"

    def __init__(
        self, detector: Detector, device: str | torch.device = "auto", amp: bool = True, compile: bool = False, channels_last: bool = True
    ) -> None:
        self.device = pick_device(device)
        self.channels_last = channels_last
        self.detector = detector.to(self.device).eval()
        if channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and on tensor cores
            self.detector = self.detector.to(memory_format=torch.channels_last)
        use_amp = amp and self.device.type == "cuda"
        self._autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext
        self.compiled = None
        if compile:
            refuse_image_only(detector, "torch.compile")
            self.compiled = torch.compile(ImageOnlyGraph(self.detector))
            self.name = "torch.compile"

    def _forward(self, image: Tensor, batch: Mapping | None) -> RuntimeOutput:
        if self.compiled is not None:
            try:
                out = self.compiled(image)
                logit, class_logits = out if isinstance(out, tuple) else (out, None)
                return _probabilities(logit, class_logits)
            except Exception as e:  # compile errors surface on the first call
                log.warning("torch.compile failed (%s: %s); scoring eagerly", type(e).__name__, str(e).splitlines()[0][:200])
                self.compiled, self.name = None, "torch"
        out = self.detector(image, batch)
        result = _probabilities(out.logit, out.class_logits)
        result.output = out
        return result

    def __call__(self, image: Tensor, batch: Mapping | None = None) -> RuntimeOutput:
        image = image.to(self.device, non_blocking=True)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            return self._forward(image, batch)


# Pixels per onnxruntime call on the CPU: 8 images of 128x128. Smaller calls keep a CNN's
# activations in the CPU caches: EfficientNet-Lite0 at 128 px ran 1.3-1.6x faster per image in
# calls of 4-8 images than of 64 on the development machine (bench/README.md, issue 18).
CPU_PIXELS_PER_CALL = 8 * 128 * 128


def cpu_micro_batch(height: int, width: int) -> int:
    """Images per onnxruntime call on the CPU for ``height`` x ``width`` inputs."""
    return max(1, CPU_PIXELS_PER_CALL // max(1, int(height) * int(width)))


def gpu_providers(available: list[str] | None = None) -> list[str]:
    """onnxruntime's GPU execution providers installed here, fastest first."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]


class OnnxRuntime:
    """An exported detector (``unmask.scoring.onnx_export``) in onnxruntime, all graph
    optimisations on. ``threads``: intra-op threads (default: PyTorch's, i.e. the cores it
    would use). ``spin``: let idle intra-op threads busy-wait; off by default, because the
    DataLoader workers decoding beside the model need those cores (off was ~20 % faster end
    to end and no slower forward-only on the 2-core development machine). On the CPU a batch
    runs in calls of ``micro_batch`` images (default ``cpu_micro_batch``: cache-sized); every
    job splits its batches the same way, so jobs with the same batches give the same bits.
    ``device`` cuda uses ``providers`` (default: TensorRT, then CUDA, when installed)."""

    name = "onnx"

    def __init__(
        self, model_path: str | Path, threads: int | None = None, device: str = "cpu", spin: bool = False,
        micro_batch: int | None = None, providers: list[str] | None = None, cache_dir: str | Path | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found; export one with `python -m unmask.scoring.onnx_export CKPT`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        on_gpu = pick_device(device).type == "cuda"
        chosen: list = list(providers) if providers is not None else (gpu_providers() if on_gpu else [])
        if "TensorrtExecutionProvider" in chosen:  # engines take minutes to build: keep them
            engines = Path(cache_dir or path.parent) / "trt_engines"
            engines.mkdir(parents=True, exist_ok=True)
            i = chosen.index("TensorrtExecutionProvider")
            chosen[i] = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(engines)})
        self.session = ort.InferenceSession(str(path), options, providers=[*chosen, "CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.input = self.session.get_inputs()[0]
        self.path = path
        self.on_cpu = self.providers[0] == "CPUExecutionProvider"
        self.micro_batch = micro_batch
        self.device = torch.device("cpu")  # inputs are handed over as host arrays

    def _run(self, array: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input.name: array})

    def __call__(self, image: Tensor, batch: Mapping | None = None) -> RuntimeOutput:
        expected = self.input.shape[-2:]
        if all(isinstance(s, int) for s in expected) and tuple(image.shape[-2:]) != tuple(expected):
            raise ValueError(
                f"{self.path} was exported for {expected[0]}x{expected[1]} images, the data gives "
                f"{image.shape[-2]}x{image.shape[-1]}; re-export it from the checkpoint"
            )
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.micro_batch or (cpu_micro_batch(*array.shape[-2:]) if self.on_cpu else len(array))
        if len(array) <= step:
            outputs = self._run(array)
        else:
            parts = [self._run(array[i : i + step]) for i in range(0, len(array), step)]
            outputs = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
        class_logits = torch.from_numpy(outputs[1]) if len(outputs) > 1 else None
        return _probabilities(torch.from_numpy(outputs[0]), class_logits)
