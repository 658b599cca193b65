"""Export a checkpoint's detector to ONNX for onnxruntime inference.

    python -m unmask.scoring.onnx_export outputs/train/<run>/checkpoints/best.ckpt [--out best.onnx]

The graph takes float RGB in [0, 1] (``image``: Bx3xSxS, S = the checkpoint's canonical
size, any batch) and returns one logit per image (``logit``: B) and, when the detector has an
attribution head, the forgery-type logits (``class_logits``: BxC); normalisation is inside,
as in the PyTorch detector. A detector that reads more than the image (``requires``) or
cannot be a static graph (``export_note``) is refused with the reason. After export the
outputs are compared with PyTorch on random images and the largest probability difference
is printed.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data.io import atomic_path
from detectors.base import Detector
from unmask.scoring.runtimes import ImageOnlyGraph, OnnxRuntime, refuse_image_only

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAMES = "image", ("logit", "class_logits")
EXPORT_VERSION = "2"  # 2: class_logits exported with an attribution head


def _output_names(module: ImageOnlyGraph) -> list[str]:
    return list(OUTPUT_NAMES[: 2 if module.with_classes else 1])


def _export_dynamo(module: ImageOnlyGraph, example: torch.Tensor, path: Path, opset: int | None) -> None:
    # torch.export-based exporter (needs onnxscript); its graphs ran ~20 % faster in
    # onnxruntime than the TorchScript exporter's on EfficientNet-Lite0 here.
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        module, (example,), str(path), dynamo=True, input_names=[INPUT_NAME], output_names=_output_names(module),
        dynamic_shapes=({0: batch},), opset_version=opset or 18, external_data=False, optimize=True, verbose=False,
    )


def _export_torchscript(module: ImageOnlyGraph, example: torch.Tensor, path: Path, opset: int | None) -> None:
    # The older tracing exporter: about 4x quicker to export, deprecated upstream.
    names = _output_names(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]}, opset_version=opset or 17,
        )


def refuse_export(detector: Detector) -> None:
    """A clear error when ``detector`` cannot become an ``image -> logit`` graph."""
    refuse_image_only(detector, "an exported ONNX graph")
    if detector.export_note:
        raise ValueError(f"{type(detector).__name__} cannot be exported to ONNX: {detector.export_note}; use scoring.runtime=torch")


EXPORTERS: dict[str, Callable] = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def export_onnx(
    detector: Detector, path: str | Path, image_size: int, exporter: str = "dynamo", opset: int | None = None
) -> Path:
    """Write ``detector`` as ONNX to ``path`` (atomically: a failed export leaves nothing)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {sorted(EXPORTERS)}, got {exporter!r}")
    refuse_export(detector)
    import onnx

    path = Path(path)
    module = ImageOnlyGraph(detector.to("cpu").to(memory_format=torch.contiguous_format)).eval()
    example = torch.rand(2, 3, int(image_size), int(image_size))
    with atomic_path(path) as tmp:
        with torch.no_grad():
            EXPORTERS[exporter](module, example, tmp, opset)
        model = onnx.load(str(tmp))
        props = {"unmask.image_size": str(int(image_size)), "unmask.exporter": exporter, "unmask.export_version": EXPORT_VERSION}
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(tmp))
    log.info("exported %s (%s exporter, %dx%d input)", path, exporter, image_size, image_size)
    return path


def max_prob_difference(detector: Detector, onnx_path: str | Path, image_size: int, n: int = 8, seed: int = 0) -> float:
    """Largest |P_onnx - P_torch| on ``n`` random images (eager PyTorch, float32, CPU)."""
    images = torch.rand(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        reference = detector.to("cpu").eval()(images).prob
    onnx_prob = OnnxRuntime(onnx_path)(images).prob
    return float(np.max(np.abs(onnx_prob.numpy() - reference.numpy())))


def default_onnx_path(ckpt: str | Path) -> Path:
    return Path(ckpt).with_suffix(".onnx")


def ensure_onnx(loaded, onnx_model: str | Path | None = None, exporter: str = "dynamo") -> Path:
    """The ONNX file for a loaded checkpoint: ``onnx_model`` when given (it must exist);
    else ``<checkpoint>.onnx`` beside it, exported now when missing or older than the
    checkpoint (into a temporary folder when the checkpoint's folder is read-only)."""
    if onnx_model:
        path = Path(onnx_model)
        if not path.is_file():
            raise FileNotFoundError(f"scoring.onnx_model={path} not found; export it with `python -m unmask.scoring.onnx_export {loaded.path}`")
        return path
    path = default_onnx_path(loaded.path)
    if path.is_file() and path.stat().st_mtime >= Path(loaded.path).stat().st_mtime and _export_version(path) == EXPORT_VERSION:
        return path
    size = int(loaded.canonical.size)
    if not os.access(path.parent, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="unmask_onnx_")) / path.name
    log.info("exporting %s to ONNX at %s", loaded.path, path)
    return export_onnx(loaded.detector, path, size, exporter=exporter)


def _export_version(path: Path) -> str | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (an unreadable file is re-exported)
        return None
    return {p.key: p.value for p in model.metadata_props}.get("unmask.export_version")


def main(argv: list[str] | None = None) -> None:
    from unmask.core.checkpoint import load_detector

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a checkpoint written by train.py")
    parser.add_argument("--out", default=None, help="output .onnx (default: beside the checkpoint)")
    parser.add_argument("--exporter", default="dynamo", choices=sorted(EXPORTERS))
    parser.add_argument("--opset", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = load_detector(args.ckpt)
    size = int(loaded.canonical.size)
    out = export_onnx(loaded.detector, args.out or default_onnx_path(args.ckpt), size, args.exporter, args.opset)
    diff = max_prob_difference(loaded.detector, out, size)
    print(f"wrote {out} ({size}x{size} input, {args.exporter} exporter); max |P_onnx - P_torch| on 8 random images: {diff:.2e}")


if __name__ == "__main__":
    main()
