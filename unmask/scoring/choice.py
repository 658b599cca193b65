"""``scoring.runtime=auto``: the fastest runtime that scores a detector exactly, and why.

- On the CPU: ONNX Runtime when the detector exports (``Detector.requires`` empty, no
  ``export_note``), its graph gives eager's probabilities within ``PROB_TOLERANCE`` on probe
  images, and it was faster than eager when measured at export (the export and both checks
  are cached, ``onnx_export.cached_export``). Otherwise eager PyTorch, with the reason.
- On a GPU: eager PyTorch with AMP fp16 and channels-last; ONNX Runtime's TensorRT or CUDA
  provider instead when one is installed, the detector exports, and it was faster and within
  AMP's tolerance on probe images here.
- ``scoring.compile=true`` means eager (compiled); ``scoring.onnx_model`` means that file.

``runtime=torch`` and ``runtime=onnx`` force one runtime (onnx: ``<ckpt>.onnx`` beside the
checkpoint, as before). Every choice comes with a sentence: ``runtime: onnx (auto: cnnspot
exports; eager would be 4.2x slower on this CPU)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from unmask.core.schemas import ScoringConfig
from unmask.scoring.runtimes import OnnxRuntime, TorchRuntime, gpu_providers, pick_device

log = logging.getLogger(__name__)

# Time eager against onnxruntime when an export is written (about a second on the default
# detector, once per export); tests turn it off for deterministic choices.
MEASURE_SPEED = True
# fp16 autocast moves probabilities by up to ~1e-3 (tests/test_gpu.py allows 5e-3 against the
# CPU); a GPU ONNX provider running float32 must stay within that of eager AMP.
GPU_PROB_TOLERANCE = 5e-3


@dataclass
class RuntimeChoice:
    runtime: object  # TorchRuntime | OnnxRuntime
    reason: str

    @property
    def name(self) -> str:
        return self.runtime.name

    def line(self) -> str:
        return f"runtime: {self.name} ({self.reason})"


def detector_name(loaded) -> str:
    """The detector's config name as a user types it (``cnnspot``), from its ``_target_``."""
    target = ((loaded.config or {}).get("detector") or {}).get("_target_", "")
    parts = str(target).split(".")
    return parts[-2] if len(parts) >= 2 else type(loaded.detector).__name__


def export_refusal(detector) -> str | None:
    """Why ``detector`` cannot be an image-only ONNX graph, in a few words; None if it can."""
    if detector.requires:
        return f"needs {', '.join(detector.requires)}"
    return detector.export_note


def eager(loaded, options: ScoringConfig) -> TorchRuntime:
    return TorchRuntime(loaded.detector, device=options.device, amp=options.amp, compile=options.compile)


def choose_runtime(loaded, options: ScoringConfig) -> RuntimeChoice:
    """The runtime ``options`` ask for, built, with the sentence that says why."""
    o = options
    if o.runtime == "onnx":
        from unmask.scoring.onnx_export import ensure_onnx, refuse_export

        refuse_export(loaded.detector)
        return RuntimeChoice(OnnxRuntime(ensure_onnx(loaded, o.onnx_model), device=o.device), "scoring.runtime=onnx")
    if o.runtime == "torch":
        return RuntimeChoice(eager(loaded, o), "scoring.runtime=torch" + (", compiled" if o.compile else ""))
    return _auto(loaded, o)


def _auto(loaded, o: ScoringConfig) -> RuntimeChoice:
    name = detector_name(loaded)
    device = pick_device(o.device)
    if o.compile:
        return RuntimeChoice(eager(loaded, o), "auto: scoring.compile=true asks for torch.compile")
    if o.onnx_model:
        from unmask.scoring.onnx_export import refuse_export

        refuse_export(loaded.detector)
        return RuntimeChoice(OnnxRuntime(o.onnx_model, device=o.device), f"auto: scoring.onnx_model={o.onnx_model}")
    refusal = export_refusal(loaded.detector)
    if device.type == "cuda":
        return _auto_gpu(loaded, o, name, device, refusal)
    if device.type != "cpu":
        return RuntimeChoice(eager(loaded, o), f"auto: eager on {device.type}")
    if refusal:
        return RuntimeChoice(eager(loaded, o), f"auto: {name} cannot export: {refusal}")
    from unmask.scoring.onnx_export import PROB_TOLERANCE, cached_export

    try:
        entry, runtime = cached_export(loaded, measure=MEASURE_SPEED)
    except Exception as e:  # noqa: BLE001 (an export that fails leaves eager, said once)
        first = str(e).splitlines()[0][:160] if str(e) else ""
        log.warning("ONNX export of %s failed (%s: %s); scoring eagerly", loaded.path, type(e).__name__, first)
        return RuntimeChoice(eager(loaded, o), f"auto: {name} failed to export ({type(e).__name__}); eager")
    if not entry.max_prob_diff <= PROB_TOLERANCE:
        return RuntimeChoice(eager(loaded, o), f"auto: {name}'s ONNX graph differs from eager by {entry.max_prob_diff:.1e} > {PROB_TOLERANCE:g}")
    if entry.speedup < 1.0:  # NaN (not measured) keeps ONNX
        return RuntimeChoice(eager(loaded, o), f"auto: {name} exports, but onnxruntime was {entry.speedup:.2f}x eager on this CPU")
    speed = f"eager would be {entry.speedup:.1f}x slower on this CPU" if entry.speedup == entry.speedup else "speed not measured"
    # (measured on onnx_export.SPEED_IMAGES probe images when the export was written)
    return RuntimeChoice(runtime, f"auto: {name} exports; {speed}")


def _auto_gpu(loaded, o: ScoringConfig, name: str, device: torch.device, refusal: str | None) -> RuntimeChoice:
    amp = "AMP fp16, " if o.amp else ""
    label = torch.cuda.get_device_name(device)
    providers = gpu_providers()
    if refusal or not providers:
        why = f"{name} cannot export: {refusal}" if refusal else "no onnxruntime GPU provider installed"
        return RuntimeChoice(eager(loaded, o), f"auto: eager with {amp}channels-last on {label}; {why}")
    try:
        return _probe_gpu(loaded, o, name, label, providers)
    except Exception as e:  # noqa: BLE001
        log.warning("onnxruntime on the GPU could not be measured (%s: %s); scoring eagerly", type(e).__name__, str(e)[:160])
        return RuntimeChoice(eager(loaded, o), f"auto: eager with {amp}channels-last on {label}; onnxruntime GPU failed ({type(e).__name__})")


def _probe_gpu(loaded, o: ScoringConfig, name: str, label: str, providers: list[str]) -> RuntimeChoice:
    from unmask.scoring.onnx_export import _best_seconds, _max_diff, cache_root, cached_export, probe_images

    entry, _ = cached_export(loaded, measure=False)  # on the CPU: the detector moves there and back
    runtime = eager(loaded, o)
    onnx = OnnxRuntime(entry.path, device=o.device, providers=providers, cache_dir=cache_root())
    images = probe_images(int(loaded.canonical.size), n=16)
    ref, got = runtime(images), onnx(images)
    diff = max(_max_diff(got.prob, ref.prob), _max_diff(got.class_prob, ref.class_prob))

    def timed(rt):
        def run():
            rt(images)
            torch.cuda.synchronize()

        return _best_seconds(run, repeats=3)

    t_eager, t_onnx = timed(runtime), timed(onnx)
    provider = onnx.providers[0].replace("ExecutionProvider", "")
    if diff <= GPU_PROB_TOLERANCE and t_onnx < t_eager:
        return RuntimeChoice(onnx, f"auto: {name} exports; onnxruntime {provider} {t_eager / t_onnx:.1f}x eager AMP on {label}")
    why = f"onnxruntime {provider} differs by {diff:.1e}" if diff > GPU_PROB_TOLERANCE else f"onnxruntime {provider} was {t_eager / t_onnx:.2f}x"
    return RuntimeChoice(runtime, f"auto: eager with AMP fp16 and channels-last on {label}; {why}")
