"""Throughput of the issue-3 detectors on this machine.

    python bench/lgrad_univfd_throughput.py [--size 128] [--images 64] [--batch 32] [--threads 1]
        [--univfd-limit 600] [--univfd-epochs 3] [--skip-univfd]

1. LGrad gradient maps per second with the MobileNetV2 ImageNet source: one batched
   backward (this framework), ``torch.func.vmap`` over single images (what a source with a
   minibatch-stddev layer gets), and one image at a time (the reference implementation's
   way, batch size 1). The maps of the three must agree.
2. UnivFD (EfficientNet-Lite2 encoder, linear probe) training time on faces-dev with and
   without the embedding cache (``detector.feature_cache``), per epoch, via train.py.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT  # noqa: E402
from unmask.reports.tables import fmt, markdown_table  # noqa: E402


def gradient_throughput(size: int, images: int, batch: int) -> None:
    from detectors.input_gradients import input_gradients, minmax_normalize
    from detectors.lgrad import build_timm_source

    source = build_timm_source("mobilenetv2_100", "imagenet").eval()
    for p in source.parameters():
        p.requires_grad_(False)
    x = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    input_gradients(source, x[:2], "sum", "batched")  # warm-up (allocator, oneDNN kernels)
    results = {}
    for mode in ("batched", "vmap", "loop"):
        start = time.perf_counter()
        maps = torch.cat([minmax_normalize(input_gradients(source, x[i : i + batch], "sum", mode)) for i in range(0, images, batch)])
        seconds = time.perf_counter() - start
        results[mode] = (images / seconds, maps)
    ref = results["loop"][1]
    print(f"\n## LGrad gradient maps/s (MobileNetV2 source, {size}x{size}, {images} images, {torch.get_num_threads()} threads)\n")
    labels = {"batched": f"one batched backward (batch {batch})", "vmap": f"vmap over single images (batch {batch})", "loop": "one image at a time (reference)"}
    print(markdown_table(
        ["mode", "maps/s", "speed-up vs one at a time", "max abs diff of 0-255 maps vs one at a time"],
        ([labels[mode], fmt(rate, 1), fmt(rate / results["loop"][0], 2) + "x", fmt((maps - ref).abs().max().item(), 0)]
         for mode, (rate, maps) in results.items()),
    ))


def univfd_epoch_times(limit: int, epochs: int, threads: int, cache_dir: Path | None) -> tuple[list[tuple[float, float]], float]:
    overrides = [
        f"num_threads={threads}",
        "detector=univfd",
        "data=faces_dev",
        f"data.limit_per_split={limit}",
        "canonical=deterministic",
        "augment=none",
        "optimizer.weight_decay=0.0",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "callbacks.early_stopping=null",
        "+callbacks.epoch_timer._target_=bench.epoch_timer.EpochTimer",
        "logger=none",
        "test=false",
        f"hydra.run.dir={tempfile.mkdtemp(prefix='univfd_tp_')}",
    ]
    if cache_dir is not None:
        overrides.append(f"detector.feature_cache={cache_dir}")
    print("$ python train.py " + " ".join(overrides), flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"train.py failed ({proc.returncode})")
    times = [(float(a), float(b)) for a, b in re.findall(r"\[epoch_timer\] epoch \d+: training ([\d.]+) s, validation ([\d.]+) s", proc.stdout)]
    for line in proc.stdout.splitlines():
        if line.startswith("[epoch_timer]"):
            print("   " + line)
    return times, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--univfd-limit", type=int, default=600, help="data.limit_per_split of the UnivFD runs")
    parser.add_argument("--univfd-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared CPU)")
    parser.add_argument("--skip-univfd", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gradient_throughput(args.size, args.images, args.batch)
    if args.skip_univfd:
        return
    print()
    plain, plain_total = univfd_epoch_times(args.univfd_limit, args.univfd_epochs, args.threads, None)
    with tempfile.TemporaryDirectory(prefix="univfd_cache_") as cache:
        cached, cached_total = univfd_epoch_times(args.univfd_limit, args.univfd_epochs, args.threads, Path(cache))
    print(f"\n## UnivFD (EfficientNet-Lite2 probe) on faces-dev, limit_per_split={args.univfd_limit}, {args.univfd_epochs} epochs\n")
    rows = [[i, fmt(pt, 1), fmt(ct, 1), fmt(pv, 1), fmt(cv, 1)] for i, ((pt, pv), (ct, cv)) in enumerate(zip(plain, cached))]
    rows.append(["whole train.py run (s)", fmt(plain_total, 1), fmt(cached_total, 1), "", ""])
    print(markdown_table(["epoch", "train s, no cache", "train s, cache", "val s, no cache", "val s, cache"], rows))


if __name__ == "__main__":
    main()
