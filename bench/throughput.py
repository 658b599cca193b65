"""Throughput of every detector config: end to end (decode, canonicalise, model) against the
model's forward pass alone on the same batch and against the input pipeline alone (decode,
canonicalise, collate, no model) on the same files, on a fixed generated image set; the
forward's achieved FLOP/s against a matrix-multiply peak measured on the same machine; and
the ONNX Runtime path against eager PyTorch.

    python bench/throughput.py [--detectors cnnspot npr] [--size 128] [--images 256]
                               [--batch-size 64] [--workers N] [--repeats 3] [--compile]
                               [--onnx-whole-batch] [--pipeline-variants] [--nice 0 5 10]
    python bench/throughput.py --scaling [--images 256] [--repeats 3]   # images/s vs batch, workers, input size

Detectors are built with random weights (speed does not depend on them). The image set is
``--images`` JPEGs of 256x256 (natural-statistics images from data/synthetic.py, seed 0),
written once under .cache/bench_throughput. Every figure is the median of ``--repeats``
interleaved runs (best in brackets); the machine's load average is printed next to each
detector, as the figures move with it. ``--workers`` defaults to the scorer's own choice
from the machine (``scoring.num_workers=null``).

End to end is compared with its ceiling, the slower of the pipeline alone and the forward
alone (``e2e / ceiling``), and, because on a CPU both stages share the same cores, with the
rate of the two run one after the other, ``1 / (1/pipeline + 1/forward)`` (``e2e / serial``).

``--onnx-whole-batch`` adds onnxruntime called once per batch (before issue 18) beside the
default cache-sized calls; ``--pipeline-variants`` times the pipeline alone as it was before
issue 18 (float samples from the workers, PIL re-encode) and with each change alone;
``--nice`` times end to end with each niceness of the decoding workers. ``--scaling`` writes
images/s against batch size and worker count, and against the input files' size (128 px to
2,000 px), with the runtime ``scoring.runtime=auto`` picks (ONNX on a CPU).
Results: bench/results/throughput/results.json, results.md (and scaling.json, scaling.md).
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
TARGET_CEILING_SHARE = 0.9  # issue 18: end-to-end >= 0.9 x the slower of pipeline alone and forward alone


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


def random_loaded(name: str, size: int):
    """A LoadedDetector of ``name`` with random weights, no face stage, a nominal threshold."""
    from unmask.core.checkpoint import LoadedDetector

    detector, canonical = build(name, size)
    config = {"detector": {"_target_": f"detectors.{name}.{type(detector).__name__}"}}
    return LoadedDetector(detector, 0.5, canonical, config=config, path=f"<random {name}>")


def pipeline_pass(scorer, dataset, runtime, mode: str | None = None) -> None:
    """The input pipeline alone, as the scorer runs it for ``runtime``: the DataLoader
    workers (or the scoring process) decode and canonicalise, the main process finishes each
    batch (float on the device), no model; workers at normal priority (nothing to yield to)."""
    from unmask.scoring.loading import Batches

    batches = scorer.batches(dataset, runtime)
    if mode is not None:
        batches = Batches(dataset, mode, batches.device, batches.channels_last)
    source, collate = batches.dataset_and_collate()
    for batch in scorer._loader(source, collate):  # no model: the workers need not yield to one
        batches.finish(batch)


def export_for_bench(detector, size: int, result: dict):
    """(onnx runtime, error): the detector exported into a temporary folder (not the cache)."""
    from unmask.scoring.onnx_export import export_onnx, probe_images
    from unmask.scoring.runtimes import OnnxRuntime, TorchRuntime

    try:
        path = Path(tempfile.mkdtemp(prefix="bench_onnx_")) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(detector, path, size)
        result["onnx_export_seconds"] = time.perf_counter() - t0
        images = probe_images(size, 8)
        ref = TorchRuntime(detector, device="cpu", amp=False)(images).prob
        onnx = OnnxRuntime(path)
        result["onnx_max_prob_diff"] = float((onnx(images).prob - ref).abs().max())
        if not onnx_computes(path):
            return None, "exported graph does not depend on the image (constant output at random init); not timed"
        return onnx, None
    except Exception as e:  # a detector the exporter cannot trace (e.g. input gradients)
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0] if str(e) else "")  # no terminal colours
        return None, f"{type(e).__name__}: {first_line[:200]}"


def shares(e2e: float, pipeline: float, forward: float) -> dict:
    ceiling = min(pipeline, forward)
    serial = 1.0 / (1.0 / pipeline + 1.0 / forward)
    return {"ceiling_images_per_s": ceiling, "share_of_ceiling": e2e / ceiling, "serial_images_per_s": serial, "share_of_serial": e2e / serial}


def bench_detector(name: str, args, records, device: torch.device, peak: float) -> dict:
    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.runtimes import OnnxRuntime, TorchRuntime, cpu_micro_batch
    from unmask.scoring.scorer import Scorer

    loaded = random_loaded(name, args.size)
    detector = loaded.detector
    # End to end = the one scoring loop (decode, canonicalise, model, per-file rows) with the
    # runtime under test; a random-weight detector with no face stage and a nominal threshold.
    options = ScoringConfig(batch_size=args.batch_size, num_workers=args.workers, device=str(device), progress=False)
    scorer = Scorer(loaded, options)
    dataset = scorer.dataset(records)
    batch = torch.stack([dataset[i][0]["image"] for i in range(args.batch_size)])  # one view per file
    result: dict = {"detector": name, "load_before": load_average(), "batch_size": scorer.batch_size, "workers": scorer.num_workers}
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
        onnx, error = export_for_bench(detector, args.size, result)
        if onnx is not None:
            runtimes["onnx"] = onnx
            result["onnx_call_images"] = cpu_micro_batch(args.size, args.size)
            if args.onnx_whole_batch:
                runtimes["onnx_whole_batch"] = OnnxRuntime(onnx.path, micro_batch=args.batch_size)
        else:
            result["onnx_error"] = error
    runtimes["eager"] = TorchRuntime(detector, device=device)
    if args.compile:
        runtimes["compiled"] = TorchRuntime(detector, device=device, compile=True)
        t0 = time.perf_counter()
        forward(runtimes["compiled"], 1)()
        result["compile_seconds"] = time.perf_counter() - t0
    for runtime in runtimes.values():
        forward(runtime, 1)()  # warm-up (allocator, oneDNN primitive cache, ORT arenas)
    # the pipeline alone as the fastest runtime's loop runs it (its layout and worker settings)
    piped = runtimes.get("onnx", runtimes["eager"])
    # Interleave the measurements so that load changes hit every runtime alike.
    times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "end_to_end": []} for k in runtimes}
    times["pipeline"] = {"alone": []}
    for _ in range(args.repeats):
        times["pipeline"]["alone"] += time_it(lambda: pipeline_pass(scorer, dataset, piped), 1)
        for key, runtime in runtimes.items():
            times[key]["forward"] += time_it(forward(runtime), 1)
            times[key]["end_to_end"] += time_it(lambda runtime=runtime: end_to_end(runtime), 1)
    pipe, pipe_best = rate(len(records), times["pipeline"]["alone"])
    result["pipeline"] = {"images_per_s": pipe, "images_per_s_best": pipe_best}
    for key in runtimes:
        fwd, fwd_best = rate(args.batch_size * n_batches, times[key]["forward"])
        e2e, e2e_best = rate(len(records), times[key]["end_to_end"])
        result[key] = {
            "forward_images_per_s": fwd,
            "forward_images_per_s_best": fwd_best,
            "end_to_end_images_per_s": e2e,
            "end_to_end_images_per_s_best": e2e_best,
            "ratio_end_to_end_over_forward": e2e / fwd,
            "ratio_end_to_end_over_pipeline": e2e / pipe,
            **shares(e2e, pipe, fwd),
            "forward_flops_per_s": flops / args.batch_size * fwd,
            "forward_share_of_matmul_peak": flops / args.batch_size * fwd / peak,
        }
    if "onnx" in runtimes:
        result["onnx_speedup_forward"] = result["onnx"]["forward_images_per_s"] / result["eager"]["forward_images_per_s"]
        result["onnx_speedup_end_to_end"] = result["onnx"]["end_to_end_images_per_s"] / result["eager"]["end_to_end_images_per_s"]
    if "onnx_whole_batch" in runtimes:  # the whole of the old setting, end to end, for before -> after
        result["before_issue_18"] = legacy_end_to_end(loaded, records, runtimes["onnx_whole_batch"], device, args)
    if args.pipeline_variants:
        result["pipeline_variants"] = pipeline_variants(scorer, dataset, piped, args.repeats)
    if args.nice and "onnx" in runtimes:
        result["niceness"] = niceness_variants(scorer, dataset, runtimes["onnx"], args.nice, args.repeats)
    result["load_after"] = load_average()
    return result


def legacy_end_to_end(loaded, records, runtime, device: torch.device, args) -> dict:
    """End to end as before issue 18: onnxruntime once per batch, float samples from 2
    workers at the model's priority, PIL re-encode; and now, interleaved with it."""
    import data.canonical as canonical
    import unmask.scoring.loading as loading
    import unmask.scoring.scorer as scorer_module
    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.scorer import Scorer

    old = Scorer(loaded, ScoringConfig(batch_size=args.batch_size, num_workers=2, device=str(device), progress=False))
    saved = (canonical._roundtrip_impl(), loading.plain, scorer_module.WORKER_NICENESS)
    times: dict[str, list[float]] = {"before": [], "now": []}
    now = Scorer(loaded, ScoringConfig(batch_size=args.batch_size, device=str(device), progress=False))
    auto = now.runtime  # what scoring.runtime=auto builds (the cached export)
    try:
        for _ in range(args.repeats):
            canonical._ROUNDTRIP, loading.plain, scorer_module.WORKER_NICENESS = canonical._pil_roundtrip, (lambda d: False), 0
            times["before"] += time_it(lambda: old.score(records, runtime=runtime, progress=False), 1)
            canonical._ROUNDTRIP, loading.plain, scorer_module.WORKER_NICENESS = saved
            times["now"] += time_it(lambda: now.score(records, runtime=auto, progress=False), 1)
    finally:
        canonical._ROUNDTRIP, loading.plain, scorer_module.WORKER_NICENESS = saved
    n = len(records)
    return {
        "runtime_now": now.runtime_choice.line(), "workers_now": now.num_workers,
        **{k: {"end_to_end_images_per_s": rate(n, v)[0], "end_to_end_images_per_s_best": rate(n, v)[1]} for k, v in times.items()},
    }


def pipeline_variants(scorer, dataset, runtime, repeats: int) -> dict:
    """The pipeline alone before issue 18 (float samples from 2 workers, PIL re-encode), with
    each change alone, and now (uint8 pixels, torchvision re-encode, the machine's workers);
    interleaved."""
    import data.canonical as canonical
    from unmask.scoring.loading import Batches

    now = scorer.num_workers
    pil, tv = canonical._pil_roundtrip, canonical._torchvision_roundtrip
    variants = {
        "float samples, PIL re-encode, 2 workers (before)": ("views", pil, 2),
        f"float samples, PIL re-encode, {now} workers": ("views", pil, now),
        f"float samples, torchvision re-encode, {now} workers": ("views", tv, now),
        f"uint8 pixels, PIL re-encode, {now} workers": ("pixels", pil, now),
        "uint8 pixels, torchvision re-encode, 1 worker": ("pixels", tv, 1),
        "uint8 pixels, torchvision re-encode, 2 workers": ("pixels", tv, 2),
        f"uint8 pixels, torchvision re-encode, {now} workers (now)": ("pixels", tv, now),
    }

    def run(mode: str, workers: int) -> None:
        base = scorer.batches(dataset, runtime)
        batches = Batches(dataset, mode, base.device, base.channels_last)
        source, collate = batches.dataset_and_collate()
        for batch in scorer._loader(source, collate, workers=workers):
            batches.finish(batch)

    saved = canonical._roundtrip_impl()
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(repeats):
            for key, (mode, impl, workers) in variants.items():
                canonical._ROUNDTRIP = impl  # the forked workers inherit it
                times[key] += time_it(lambda mode=mode, workers=workers: run(mode, workers), 1)
    finally:
        canonical._ROUNDTRIP = saved
    n = len(dataset)
    return {k: {"images_per_s": rate(n, v)[0], "images_per_s_best": rate(n, v)[1]} for k, v in times.items()}


def niceness_variants(scorer, dataset, runtime, values: list[int], repeats: int) -> dict:
    """End to end with each niceness of the decoding workers (interleaved)."""
    import unmask.scoring.scorer as scorer_module

    saved = scorer_module.WORKER_NICENESS
    times: dict[int, list[float]] = {v: [] for v in values}
    try:
        for _ in range(repeats):
            for v in values:
                scorer_module.WORKER_NICENESS = v
                times[v] += time_it(lambda: scorer.score(dataset, runtime=runtime, progress=False), 1)
    finally:
        scorer_module.WORKER_NICENESS = saved
    n = len(dataset)
    return {str(v): {"end_to_end_images_per_s": rate(n, t)[0], "end_to_end_images_per_s_best": rate(n, t)[1]} for v, t in times.items()}


# ---- scaling: images/s against batch size and workers, and against the input size ------------
def sized_image_set(n: int, long_side: int, seed: int = 0) -> list:
    """``n`` photo-like JPEGs with a ``long_side`` x 3/4 size (bench/contest_time.photo), cached."""
    from PIL import Image

    from bench.contest_time import photo
    from data.records import Record

    folder = ROOT / ".cache" / "bench_throughput" / f"photo_n{n}_l{long_side}_seed{seed}"
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for i in range(n):
            Image.fromarray(photo(rng, long_side, max(16, long_side * 3 // 4))).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / "done").write_text("ok")
    return [Record(str(p)) for p in sorted(folder.glob("*.jpg"))]


def scaling(args, device: torch.device) -> dict:
    """cnnspot at ``--size`` with the runtime auto picks: end to end (and the pipeline alone)
    against batch size x workers on the 256 px set, and against the input size."""
    from unmask.core.schemas import ScoringConfig
    from unmask.scoring.choice import choose_runtime
    from unmask.scoring.scorer import Scorer

    loaded = random_loaded("cnnspot", args.size)
    choice = choose_runtime(loaded, ScoringConfig(device=str(device), progress=False))
    runtime = choice.runtime
    print(choice.line(), flush=True)
    out: dict = {"runtime": choice.line(), "load_before": load_average(), "grid": [], "sizes": []}
    records = image_set(args.images)
    batch_sizes = args.scaling_batches
    workers = args.scaling_workers
    times: dict = {}
    for _ in range(args.repeats):
        for b in batch_sizes:
            for w in workers:
                scorer = Scorer(loaded, ScoringConfig(batch_size=b, num_workers=w, device=str(device), progress=False))
                dataset = scorer.dataset(records)
                times.setdefault((b, w), {"e2e": [], "pipe": []})
                times[(b, w)]["e2e"] += time_it(lambda s=scorer, d=dataset: s.score(d, runtime=runtime, progress=False), 1)
                times[(b, w)]["pipe"] += time_it(lambda s=scorer, d=dataset: pipeline_pass(s, d, runtime), 1)
    for (b, w), t in times.items():
        out["grid"].append({"batch_size": b, "workers": w, "end_to_end_images_per_s": rate(len(records), t["e2e"])[0],
                            "pipeline_images_per_s": rate(len(records), t["pipe"])[0]})
    sizes = {}
    for long_side in args.scaling_sizes:
        sizes[long_side] = sized_image_set(args.scaling_size_images, long_side)
    size_workers = args.scaling_size_workers or [None]  # None: the machine's choice
    scorers = {w: Scorer(loaded, ScoringConfig(device=str(device), num_workers=w, progress=False)) for w in size_workers}
    size_times: dict = {}
    for _ in range(args.repeats):
        for long_side, recs in sizes.items():
            for w, scorer in scorers.items():
                dataset = scorer.dataset(recs)
                size_times.setdefault((long_side, w), {"e2e": [], "pipe": []})
                size_times[(long_side, w)]["e2e"] += time_it(lambda s=scorer, d=dataset: s.score(d, runtime=runtime, progress=False), 1)
                size_times[(long_side, w)]["pipe"] += time_it(lambda s=scorer, d=dataset: pipeline_pass(s, d, runtime), 1)
    for (long_side, w), t in size_times.items():
        n = len(sizes[long_side])
        out["sizes"].append({"long_side": long_side, "files": n, "workers": scorers[w].num_workers, "batch_size": scorers[w].batch_size,
                             "end_to_end_images_per_s": rate(n, t["e2e"])[0], "pipeline_images_per_s": rate(n, t["pipe"])[0]})
    out["load_after"] = load_average()
    return out


def render_scaling(out: dict, env: dict, args) -> str:
    grid = [[g["batch_size"], g["workers"], fmt(g["end_to_end_images_per_s"], 1), fmt(g["pipeline_images_per_s"], 1)] for g in out["grid"]]
    sizes = [[f"{s['long_side']} x {max(16, s['long_side'] * 3 // 4)}", s["files"], s["workers"], fmt(s["pipeline_images_per_s"], 1),
              fmt(s["end_to_end_images_per_s"], 1)] for s in out["sizes"]]
    return "\n".join([
        "# Scaling",
        "",
        f"{env['host']}: {env['cpus']} CPUs, device {env['device']}; cnnspot at {args.size} px, random weights; {out['runtime']}. "
        f"Median of {args.repeats} interleaved runs. Load {out['load_before']} -> {out['load_after']}.",
        "",
        f"Batch size x DataLoader workers ({args.images} JPEGs 256x256):",
        "",
        markdown_table(["batch", "workers", "end-to-end img/s", "pipeline alone img/s"], grid),
        "",
        f"Input size ({args.scaling_size_images} photo-like JPEGs per size, quality 90; the batch scoring chooses):",
        "",
        markdown_table(["input px", "files", "workers", "pipeline alone img/s", "end-to-end img/s"], sizes),
    ]) + "\n"


def render(results: list[dict], env: dict, args) -> str:
    def rate_cell(m: dict, key: str) -> str:
        return f"{fmt(m[key], 1)} ({fmt(m[key + '_best'], 1)})"

    keys = ("eager", "compiled", "onnx_whole_batch", "onnx")
    speed, ceiling = [], []
    for r in results:
        if "error" in r:
            speed.append([r["detector"], "—", "—", f"skipped: {r['error']}", "", "", "", ""])
            continue
        pipe = r["pipeline"]
        for key in keys:
            if key not in r:
                continue
            m = r[key]
            speed.append([
                r["detector"], key, fmt(r["gflops_per_image"], 3), rate_cell(m, "forward_images_per_s"),
                rate_cell(m, "end_to_end_images_per_s"), fmt(m["ratio_end_to_end_over_forward"], 2),
                fmt(m["forward_flops_per_s"] / 1e9, 1), f"{fmt(100 * m['forward_share_of_matmul_peak'], 1)} %",
            ])
            ceiling.append([
                r["detector"], key, rate_cell(pipe, "images_per_s"), fmt(m["forward_images_per_s"], 1), fmt(m["end_to_end_images_per_s"], 1),
                fmt(m["ratio_end_to_end_over_pipeline"], 2), fmt(m["ratio_end_to_end_over_forward"], 2),
                f"**{fmt(m['share_of_ceiling'], 2)}**", fmt(m["serial_images_per_s"], 1), fmt(m["share_of_serial"], 2),
            ])
    onnx = []
    for r in results:
        if "error" in r:
            continue
        load = f"{r['load_before']} -> {r['load_after']}"
        if "onnx_speedup_forward" in r:
            onnx.append([
                r["detector"], f"{fmt(r['onnx_speedup_forward'], 2)}x", f"{fmt(r['onnx_speedup_end_to_end'], 2)}x",
                f"{r['onnx_max_prob_diff']:.1e}", r.get("onnx_call_images", ""), load,
            ])
        else:
            onnx.append([r["detector"], r.get("onnx_error", "not run"), "", "", "", load])
    workers = sorted({str(r.get("workers")) for r in results if "workers" in r})
    lines = [
        "# Throughput",
        "",
        f"{env['host']}: {env['cpus']} CPUs, torch {env['torch']} ({env['threads']} threads), onnxruntime {env['onnxruntime']}, "
        f"device {env['device']}; {args.images} JPEGs 256x256 -> {args.size}x{args.size}, batch {args.batch_size}, "
        f"{'/'.join(workers) or args.workers} DataLoader workers{'' if args.workers is not None else ' (from the machine)'}, "
        f"median of {args.repeats} (best in brackets).",
        f"Matrix-multiply peak (fp32 {env['matmul_n']}x{env['matmul_n']}, best of the start and end measurements): "
        f"{fmt(env['matmul_peak_gflops'], 1)} GFLOP/s. "
        f"Load at start: {env['load_start']}; at end: {env['load_end']}.",
        "",
        markdown_table(
            ["detector", "runtime", "GFLOP/img", "forward img/s", "end-to-end img/s", "e2e / forward", "forward GFLOP/s", "% of matmul peak"],
            speed,
        ),
        "",
        "End to end against its ceiling (the slower of the pipeline alone and the forward alone) and against the "
        "two run one after the other (`serial` = 1 / (1/pipeline + 1/forward): on a CPU both share the cores):",
        "",
        markdown_table(
            ["detector", "runtime", "pipeline alone img/s", "forward img/s", "end-to-end img/s", "e2e / pipeline", "e2e / forward",
             "e2e / ceiling", "serial img/s", "e2e / serial"],
            ceiling,
        ),
        "",
        markdown_table(["detector", "ONNX / eager (forward)", "ONNX / eager (end to end)", "max abs prob diff", "images per ORT call", "load before -> after"], onnx),
    ]
    for r in results:
        if r.get("before_issue_18"):
            b = r["before_issue_18"]
            rows = [["before: onnxruntime once per batch, float samples, PIL re-encode, 2 workers", rate_cell(b["before"], "end_to_end_images_per_s")],
                    [f"now: {b['runtime_now']}, {b['workers_now']} worker(s)", rate_cell(b["now"], "end_to_end_images_per_s")]]
            lines += ["", f"End to end, {r['detector']}, before issue 18 and now (interleaved):", "",
                      markdown_table(["setting", "end-to-end img/s"], rows)]
        if r.get("pipeline_variants"):
            rows = [[k, rate_cell(v, "images_per_s")] for k, v in r["pipeline_variants"].items()]
            lines += ["", f"Pipeline alone, {r['detector']}: before issue 18 and with each change:", "",
                      markdown_table(["pipeline", "img/s"], rows)]
        if r.get("niceness"):
            rows = [[k, rate_cell(v, "end_to_end_images_per_s")] for k, v in r["niceness"].items()]
            lines += ["", f"End to end (onnx), {r['detector']}, by the decoding workers' niceness:", "",
                      markdown_table(["niceness", "end-to-end img/s"], rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="*", default=None, help="config names (default: every configs/detector/*.yaml)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the scorer's choice from the machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--onnx-whole-batch", action="store_true", help="also onnxruntime with one call per batch (before issue 18)")
    parser.add_argument("--pipeline-variants", action="store_true", help="the pipeline alone before issue 18 and with each change")
    parser.add_argument("--nice", type=int, nargs="*", default=None, help="end to end with these worker niceness values")
    parser.add_argument("--scaling", action="store_true", help="images/s against batch size x workers and against the input size")
    parser.add_argument("--scaling-batches", type=int, nargs="*", default=[16, 32, 64, 128, 256])
    parser.add_argument("--scaling-workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--scaling-sizes", type=int, nargs="*", default=[128, 256, 512, 1024, 2000])
    parser.add_argument("--scaling-size-images", type=int, default=128)
    parser.add_argument("--scaling-size-workers", type=int, nargs="*", default=None, help="workers for the input-size table (default: the machine's)")
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
    out = Path(args.out)
    if args.scaling:
        result = scaling(args, device)
        atomic_write_json(out / "scaling.json", {"env": env, "args": vars(args), "scaling": result})
        table = render_scaling(result, env, args)
        atomic_write_text(out / "scaling.md", table)
        print(table)
        return
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
            for key in ("eager", "compiled", "onnx", "onnx_whole_batch"):
                if key in r:
                    r[key]["forward_share_of_matmul_peak"] = r[key]["forward_flops_per_s"] / peak_end
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
            m = default["onnx"]
            line += f"; ONNX end to end / ceiling {fmt(m['share_of_ceiling'], 2)} (target >= {TARGET_CEILING_SHARE})"
        print(line)


if __name__ == "__main__":
    main()
