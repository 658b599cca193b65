"""Export a checkpoint's detector to ONNX for onnxruntime inference.

    python -m unmask.scoring.onnx_export outputs/train/<run>/checkpoints/best.ckpt [--out best.onnx]

The graph takes float RGB in [0, 1] (``image``: Bx3xSxS, S = the checkpoint's canonical
size, any batch) and returns one logit per image (``logit``: B) and, when the detector has an
attribution head, the forgery-type logits (``class_logits``: BxC); normalisation is inside,
as in the PyTorch detector. A detector that reads more than the image (``requires``) or
cannot be a static graph (``export_note``) is refused with the reason. After export the
outputs are compared with PyTorch on random images and the largest probability difference
is printed.

``cached_export`` is the export ``scoring.runtime=auto`` uses: one file per detector in the
project cache (``$UNMASK_CACHE`` or ``.cache``, under ``onnx/``), keyed by a hash of what
decides the graph (the detector's weights and config, the input size, the exporter, opset and
library versions; not the whole checkpoint file, whose stored threshold is rewritten after the
training run exported it), written atomically, verified against eager PyTorch on probe images
when it is written and again when it is reused (a corrupt or foreign file is exported afresh).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.io import atomic_path, atomic_write_json
from detectors.base import Detector
from unmask.scoring.runtimes import ImageOnlyGraph, OnnxRuntime, TorchRuntime, refuse_image_only

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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters' optimiser passes log every rewrite at INFO: warnings only, for the block."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
        # inference_mode(False): the exporters trace with autograd tensors, and scale-out
        # scoring builds its runtime inside Lightning's predict (an inference-mode block)
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
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


# ---- the export cache of scoring.runtime=auto -------------------------------------------------
# The exporter of runtime=auto: dynamo's graphs ran 1.3-1.6x faster in onnxruntime than the
# torchscript exporter's, which exports ~10x quicker (0.5 s against 6 s for cnnspot on 2 cores;
# bench/README.md). $UNMASK_ONNX_EXPORTER picks the other one (the test suite: torchscript).
AUTO_EXPORTER = "dynamo"


def auto_exporter() -> str:
    name = os.environ.get("UNMASK_ONNX_EXPORTER", "") or AUTO_EXPORTER
    if name not in EXPORTERS:
        raise ValueError(f"UNMASK_ONNX_EXPORTER must be one of {sorted(EXPORTERS)}, got {name!r}")
    return name
PROB_TOLERANCE = 1e-4  # |P_onnx - P_eager| allowed for auto to choose ONNX (float32 graphs differ by ~1e-6)
CACHE_ENTRIES = 16  # exports kept in the cache (least recently used go first)
PROBE_IMAGES = 4  # the exactness check, written with the export and repeated on every reuse
# The speed check: eager PyTorch once (after a warm-up), onnxruntime best of two, on a batch
# of this many images, the batch scoring uses on a CPU. Smaller batches flatter onnxruntime:
# eager's per-call costs dominate them (16 images read 65x on a loaded 2-core machine where
# 64 read 18x, as bench/throughput.py measures it). About 4 s for cnnspot, once per export.
SPEED_IMAGES = 64


def cache_root() -> Path:
    """``$UNMASK_CACHE/onnx`` (the project's ``.cache/onnx`` by default), as ``paths.cache_dir``."""
    from unmask.core.config import PROJECT_ROOT

    return Path(os.environ.get("UNMASK_CACHE", str(PROJECT_ROOT / ".cache"))) / "onnx"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def export_key(loaded, exporter: str | None = None, opset: int | None = None) -> str:
    """The cache key of ``loaded``'s export: a hash of the detector's tensors and config (its
    wrappers too), the input size, the exporter, opset and the library versions."""
    import onnx

    from unmask.core.build import WRAPPERS

    config = loaded.config or {}
    exporter = exporter or auto_exporter()
    settings = {
        "export_version": EXPORT_VERSION, "exporter": exporter, "opset": opset, "dynamic_batch": True,
        "image_size": int(loaded.canonical.size), "torch": torch.__version__, "onnx": onnx.__version__,
        "detector": {g: config.get(g) for g in ("detector", *WRAPPERS)}, "class": type(loaded.detector).__qualname__,
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(loaded.detector.state_dict().items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()[:24]


def probe_images(size: int, n: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """Fixed images for the checks: half uniform noise, half smooth (bilinear from 8x8)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(n - n // 2, 3, size, size, generator=gen)
    smooth = torch.nn.functional.interpolate(torch.rand(n // 2, 3, 8, 8, generator=gen), size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([noise, smooth]).clamp_(0, 1)


@dataclass
class CachedExport:
    """An export of the cache and what was measured when it was written: the largest
    probability difference to eager PyTorch on the probe images, and how much faster
    onnxruntime was than eager on this machine (``speedup``; NaN when not measured)."""

    path: Path
    key: str
    max_prob_diff: float
    speedup: float = float("nan")
    reused: bool = False
    info: dict = field(default_factory=dict)


def _best_seconds(fn: Callable[[], object], repeats: int = 2) -> float:
    fn()  # warm-up: allocators, oneDNN primitives, onnxruntime arenas
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX ``flock``), so two processes wanting the same
    export (scale-out ranks, parallel jobs) export it once; without fcntl no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _writable_cache(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"unmask_onnx_{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(parents=True, exist_ok=True)
    log.warning("ONNX cache %s is not writable: exports go to %s", folder, fallback)
    return fallback


def _verify(path: Path, info: dict, threads: int | None) -> OnnxRuntime:
    """The cached file as a runtime, once it loads and reproduces the eager probabilities
    stored with it; raises otherwise."""
    if info.get("export_version") != EXPORT_VERSION:
        raise ValueError(f"export version {info.get('export_version')!r}, expected {EXPORT_VERSION}")
    probe = info["probe"]
    runtime = OnnxRuntime(path, threads=threads)
    out = runtime(probe_images(int(info["image_size"]), int(probe["n"]), int(probe["seed"])))
    diff = _max_diff(out.prob, torch.tensor(probe["eager_prob"]))
    if probe.get("eager_class_prob") is not None:
        diff = max(diff, _max_diff(out.class_prob, torch.tensor(probe["eager_class_prob"])))
    if not diff <= max(PROB_TOLERANCE, 2 * float(info["max_prob_diff"])):
        raise ValueError(f"its probabilities differ from the ones stored with it by {diff:.1e}")
    return runtime


def _prune(folder: Path, keep: int = CACHE_ENTRIES) -> None:
    entries = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime if p.exists() else 0.0, reverse=True)
    for old in entries[keep:]:
        for stale in (old, old.with_suffix(".json"), old.with_suffix(".lock")):
            with contextlib.suppress(OSError):
                stale.unlink()


def cached_export(loaded, threads: int | None = None, folder: str | Path | None = None, measure: bool = True) -> tuple[CachedExport, OnnxRuntime]:
    """``loaded``'s detector exported for onnxruntime (CPU), from the cache when a verified
    entry exists, else exported now (the ``dynamo`` exporter, ``torchscript`` when it fails),
    checked against eager PyTorch on ``PROBE_IMAGES`` probe images and, with ``measure``,
    timed against it. Returns the entry and a ready runtime. Raises ``ValueError`` for a
    detector that cannot be exported (``refuse_export``) and the exporters' errors."""
    refuse_export(loaded.detector)
    key = export_key(loaded)
    folder = _writable_cache(Path(folder) if folder else cache_root())
    path, meta = folder / f"{key}.onnx", folder / f"{key}.json"
    with _locked(folder / f"{key}.lock"):
        if path.is_file() and meta.is_file():
            try:
                info = json.loads(meta.read_text())
                runtime = _verify(path, info, threads)
                os.utime(path)  # recently used: pruned last
                if measure and not float(info.get("speedup", float("nan"))) == float(info.get("speedup", float("nan"))):
                    info.update(_timings(loaded, runtime))  # written unmeasured: measured now, once
                    atomic_write_json(meta, info)
                return CachedExport(path, key, float(info["max_prob_diff"]), float(info.get("speedup", float("nan"))), True, info), runtime
            except Exception as e:  # noqa: BLE001 (any failure: the entry is rebuilt, never trusted)
                log.warning("ONNX cache entry %s is unusable (%s: %s); exporting again", path, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        entry, runtime = _export_entry(loaded, path, meta, key, threads, measure)
    _prune(folder)
    return entry, runtime


def _export_entry(loaded, path: Path, meta: Path, key: str, threads: int | None, measure: bool) -> tuple[CachedExport, OnnxRuntime]:
    size = int(loaded.canonical.size)
    start = time.perf_counter()
    exporter = auto_exporter()
    try:
        export_onnx(loaded.detector, path, size, exporter=exporter)
    except Exception as e:  # noqa: BLE001 (the other exporter is the fallback)
        if exporter == "torchscript":
            raise
        log.warning("the %s ONNX exporter failed (%s: %s); trying torchscript", exporter, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        exporter = "torchscript"
        export_onnx(loaded.detector, path, size, exporter=exporter)
    export_seconds = time.perf_counter() - start
    images = probe_images(size)
    eager = TorchRuntime(loaded.detector, device="cpu", amp=False)
    runtime = OnnxRuntime(path, threads=threads)
    ref, got = eager(images), runtime(images)
    diff = max(_max_diff(got.prob, ref.prob), _max_diff(got.class_prob, ref.class_prob))
    timings = _timings(loaded, runtime, eager) if measure else {"speedup": float("nan")}
    info = {
        "key": key, "export_version": EXPORT_VERSION, "exporter": exporter, "image_size": size, "export_seconds": round(export_seconds, 3),
        "max_prob_diff": diff, **timings, "threads": threads or torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "checkpoint": str(loaded.path), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "probe": {
            "n": PROBE_IMAGES, "seed": 0, "eager_prob": ref.prob.tolist(),
            "eager_class_prob": None if ref.class_prob is None else ref.class_prob.tolist(),
        },
    }
    atomic_write_json(meta, info)
    log.info("exported %s to %s in %.1f s (%s); max |P_onnx - P_eager| %.1e on %d probe images; onnxruntime %.1fx eager",
             loaded.path, path, export_seconds, exporter, diff, PROBE_IMAGES, info["speedup"])
    return CachedExport(path, key, diff, info["speedup"], False, info), runtime


def _timings(loaded, runtime: OnnxRuntime, eager: TorchRuntime | None = None) -> dict:
    """Seconds of eager PyTorch (one run after a warm-up) and of ``runtime`` (best of two) on
    ``SPEED_IMAGES`` probe images, and their ratio ``speedup``."""
    images = probe_images(int(loaded.canonical.size), SPEED_IMAGES, seed=1)
    eager = eager or TorchRuntime(loaded.detector, device="cpu", amp=False)
    out = {"eager_s": _best_seconds(lambda: eager(images), repeats=1), "onnx_s": _best_seconds(lambda: runtime(images)),
           "speed_images": SPEED_IMAGES}
    out["speedup"] = out["eager_s"] / max(out["onnx_s"], 1e-9)
    return out


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
