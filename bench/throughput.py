"""Throughput of every detector config: end to end (decode, canonicalise, model) against the
model's forward pass alone on the same batch, on a fixed generated image set; the forward's
achieved FLOP/s against a matrix-multiply peak measured on the same machine; and the ONNX
Runtime path against eager PyTorch.

    python bench/throughput.py [--detectors cnnspot npr] [--size 128] [--images 256]
                               [--batch-size 64] [--workers 2] [--repeats 3] [--compile]

Detectors are built with random weights (speed does not depend on them). The image set is
``--images`` JPEGs of 256x256 (natural-statistics images from data/synthetic.py, seed 0),
written once under .cache/bench_throughput. Every figure is the median of ``--repeats``
runs (best in brackets); the machine's load average is printed next to each detector, as
the figures move with it. Results: bench/results/throughput/results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import ROOT  # noqa: E402
from unmask.reports.tables import fmt, markdown_table  # noqa: E402

TARGET_E2E_RATIO = 0.8  # issue 7: end-to-end >= 0.8 x forward-only (default detector)
TARGET_ONNX_SPEEDUP = 1.3  # issue 7: ONNX >= 1.3 x eager PyTorch on CPU


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 8) -> float:
    """Best FLOP/s of an n x n matrix multiply (2 n^3 FLOPs) over ``repeats`` timings."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_set(n: int, size: int = 256, seed: int = 0) -> list:
    from PIL import Image

    from data.records import Record
    from data.synthetic import natural_image

    folder = ROOT / ".cache" / "bench_throughput" / f"jpeg_n{n}_s{size}_seed{seed}"
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for i in range(n):
            Image.fromarray(natural_image(rng, size)).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / "done").write_text("ok")
    return [Record(str(p)) for p in sorted(folder.glob("*.jpg"))]


def detector_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "detector").glob("*.yaml"))


def build(name: str, size: int):
    """(detector, canonicalizer) from the project configs, as train.py would build them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import unmask.core.config
    from detectors.backbones import skip_pretrained
    from unmask.core.build import build_detector

    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [f"detector={name}", f"data.image_size={size}", "paths.output_dir=/tmp", "hydra.run.dir=/tmp"])
    with skip_pretrained():
        detector = build_detector(cfg)  # the detector and its wrapper groups (none by default)
    return detector.eval(), instantiate(cfg.canonical)


def time_it(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def rate(n: int, seconds: list[float]) -> tuple[float, float]:
    """(median, best) items per second."""
    return n / statistics.median(seconds), n / min(seconds)


def forward_flops(detector, batch: torch.Tensor) -> float:
    """FLOPs of one forward (convolutions and matrix products, a multiply-add = 2), or NaN
    when the counter cannot follow the forward (a detector that runs autograd inside)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            detector(batch)
    except RuntimeError as e:
        print(f"FLOP counter failed ({str(e).splitlines()[0][:120]}); FLOP/s left out", flush=True)
        return float("nan")
    return float(counter.get_total_flops())


def onnx_computes(path: Path) -> bool:
    """False for a graph with no convolution or matrix product left: its output does not
    depend on the image (e.g. a k-NN detector with an empty bank, constant-folded away), so
    timing it says nothing."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    return bool(ops & {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})


def bench_detector(name: str, args, records, device: torch.device, peak: float) -> dict:
    from unmask.core.checkpoint import LoadedDetector
    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.runtimes import OnnxRuntime, TorchRuntime
    from unmask.scoring.scorer import Scorer

    detector, canonical = build(name, args.size)
    # End to end = the one scoring loop (decode, canonicalise, model, per-file rows) with the
    # runtime under test; a random-weight detector with no face stage and a nominal threshold.
    loaded = LoadedDetector(detector, 0.5, canonical, config={}, path=f"<random {name}>")
    options = ScoringConfig(batch_size=args.batch_size, num_workers=args.workers, device=str(device), progress=False)
    scorer = Scorer(loaded, options)
    dataset = scorer.dataset(records)
    batch = torch.stack([dataset[i][0]["image"] for i in range(args.batch_size)])  # one view per file
    result: dict = {"detector": name, "load_before": load_average()}
    flops = forward_flops(detector, batch)
    result["gflops_per_image"] = flops / args.batch_size / 1e9

    def end_to_end(runtime):
        scorer.score(dataset, runtime=runtime, progress=False)

    n_batches = max(1, len(records) // args.batch_size)  # as many images as one end-to-end pass

    def forward(runtime, times: int = n_batches):
        def run():
            for _ in range(times):
                runtime(batch)
            sync(device)

        return run

    runtimes = {}
    if device.type == "cpu" and not args.no_onnx:  # first: the export leaves the weights contiguous
        from unmask.scoring.onnx_export import export_onnx

        try:
            path = Path(tempfile.mkdtemp(prefix="bench_onnx_")) / f"{name}.onnx"
            t0 = time.perf_counter()
            export_onnx(detector, path, args.size)
            result["onnx_export_seconds"] = time.perf_counter() - t0
            onnx = OnnxRuntime(path)
            with torch.inference_mode():
                ref = torch.sigmoid(detector(batch).logit.float()).reshape(-1)
            result["onnx_max_prob_diff"] = float((onnx(batch).prob - ref).abs().max())
            if onnx_computes(path):
                runtimes["onnx"] = onnx
            else:
                result["onnx_error"] = "exported graph does not depend on the image (constant output at random init); not timed"
        except Exception as e:  # a detector the exporter cannot trace (e.g. input gradients)
            first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0] if str(e) else "")  # no terminal colours
            result["onnx_error"] = f"{type(e).__name__}: {first_line[:200]}"
    runtimes["eager"] = TorchRuntime(detector, device=device)
    if args.compile:
        runtimes["compiled"] = TorchRuntime(detector, device=device, compile=True)
        t0 = time.perf_counter()
        forward(runtimes["compiled"], 1)()
        result["compile_seconds"] = time.perf_counter() - t0
    for runtime in runtimes.values():
        forward(runtime, 1)()  # warm-up (allocator, oneDNN primitive cache, ORT arenas)
    # Interleave the measurements so that load changes hit every runtime alike.
    times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "end_to_end": []} for k in runtimes}
    for _ in range(args.repeats):
        for key, runtime in runtimes.items():
            times[key]["forward"] += time_it(forward(runtime), 1)
            times[key]["end_to_end"] += time_it(lambda runtime=runtime: end_to_end(runtime), 1)
    for key in runtimes:
        fwd, fwd_best = rate(args.batch_size * n_batches, times[key]["forward"])
        e2e, e2e_best = rate(len(records), times[key]["end_to_end"])
        result[key] = {
            "forward_images_per_s": fwd,
            "forward_images_per_s_best": fwd_best,
            "end_to_end_images_per_s": e2e,
            "end_to_end_images_per_s_best": e2e_best,
            "ratio_end_to_end_over_forward": e2e / fwd,
            "forward_flops_per_s": flops / args.batch_size * fwd,
            "forward_share_of_matmul_peak": flops / args.batch_size * fwd / peak,
        }
    if "onnx" in runtimes:
        result["onnx_speedup_forward"] = result["onnx"]["forward_images_per_s"] / result["eager"]["forward_images_per_s"]
        result["onnx_speedup_end_to_end"] = result["onnx"]["end_to_end_images_per_s"] / result["eager"]["end_to_end_images_per_s"]
    result["load_after"] = load_average()
    return result


def render(results: list[dict], env: dict, args) -> str:
    def rate_cell(m: dict, key: str) -> str:
        return f"{fmt(m[key], 1)} ({fmt(m[key + '_best'], 1)})"

    speed = []
    for r in results:
        if "error" in r:
            speed.append([r["detector"], "—", "—", f"skipped: {r['error']}", "", "", "", ""])
            continue
        for key in ("eager", "compiled", "onnx"):
            if key not in r:
                continue
            m = r[key]
            speed.append([
                r["detector"], key, fmt(r["gflops_per_image"], 3), rate_cell(m, "forward_images_per_s"),
                rate_cell(m, "end_to_end_images_per_s"), fmt(m["ratio_end_to_end_over_forward"], 2),
                fmt(m["forward_flops_per_s"] / 1e9, 1), f"{fmt(100 * m['forward_share_of_matmul_peak'], 1)} %",
            ])
    onnx = []
    for r in results:
        if "error" in r:
            continue
        load = f"{r['load_before']} -> {r['load_after']}"
        if "onnx_speedup_forward" in r:
            onnx.append([
                r["detector"], f"{fmt(r['onnx_speedup_forward'], 2)}x", f"{fmt(r['onnx_speedup_end_to_end'], 2)}x",
                f"{r['onnx_max_prob_diff']:.1e}", load,
            ])
        else:
            onnx.append([r["detector"], r.get("onnx_error", "not run"), "", "", load])
    lines = [
        "# Throughput",
        "",
        f"{env['host']}: {env['cpus']} CPUs, torch {env['torch']} ({env['threads']} threads), onnxruntime {env['onnxruntime']}, "
        f"device {env['device']}; {args.images} JPEGs 256x256 -> {args.size}x{args.size}, batch {args.batch_size}, "
        f"{args.workers} DataLoader workers, median of {args.repeats} (best in brackets).",
        f"Matrix-multiply peak (fp32 {env['matmul_n']}x{env['matmul_n']}, best of the start and end measurements): "
        f"{fmt(env['matmul_peak_gflops'], 1)} GFLOP/s. "
        f"Load at start: {env['load_start']}; at end: {env['load_end']}.",
        "",
        markdown_table(
            ["detector", "runtime", "GFLOP/img", "forward img/s", "end-to-end img/s", "e2e / forward", "forward GFLOP/s", "% of matmul peak"],
            speed,
        ),
        "",
        markdown_table(["detector", "ONNX / eager (forward)", "ONNX / eager (end to end)", "max abs prob diff", "load before -> after"], onnx),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="*", default=None, help="config names (default: every configs/detector/*.yaml)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput"))
    args = parser.parse_args()

    import onnxruntime

    from data.io import atomic_write_json, atomic_write_text
    from unmask.scoring.runtimes import pick_device

    device = pick_device(args.device)
    env = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "load_start": load_average(),
        "matmul_n": 2048,
    }
    print(f"[{env['load_start']}] measuring the matrix-multiply peak...", flush=True)
    peak = matmul_peak(device)
    env["matmul_peak_gflops"] = peak / 1e9
    print(f"matmul peak: {fmt(peak / 1e9, 1)} GFLOP/s (fp32 2048^3, best of 8)", flush=True)
    records = image_set(args.images)
    results = []
    for name in args.detectors or detector_names():
        print(f"[{load_average()}] {name}...", flush=True)
        try:
            r = bench_detector(name, args, records, device, peak)
        except Exception as e:  # a detector that cannot be built here (missing weights...) is reported, not fatal
            r = {"detector": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
        results.append(r)
        print(json.dumps(r, indent=1, default=float), flush=True)
    env["load_end"] = load_average()
    # Load moves during the run: the peak is the best of a measurement at each end.
    peak_end = matmul_peak(device)
    env["matmul_peak_gflops_end"] = peak_end / 1e9
    if peak_end > peak:
        env["matmul_peak_gflops"] = peak_end / 1e9
        for r in results:
            for key in ("eager", "compiled", "onnx"):
                if key in r:
                    r[key]["forward_share_of_matmul_peak"] = r[key]["forward_flops_per_s"] / peak_end
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"env": env, "args": vars(args), "results": results})
    table = render(results, env, args)
    atomic_write_text(out / "results.md", table)
    print(table)
    default = next((r for r in results if r["detector"] == "cnnspot" and "eager" in r), None)
    if default:
        ratio = default["eager"]["ratio_end_to_end_over_forward"]
        line = f"cnnspot: end-to-end / forward {fmt(ratio, 2)} (target >= {TARGET_E2E_RATIO})"
        if "onnx_speedup_forward" in default:
            line += (
                f"; ONNX / eager forward {fmt(default['onnx_speedup_forward'], 2)}x, end to end "
                f"{fmt(default['onnx_speedup_end_to_end'], 2)}x (target >= {TARGET_ONNX_SPEEDUP}x)"
            )
        print(line)


if __name__ == "__main__":
    main()
