"""Wall time of the contest entry point on a contest-shaped folder: ``src/main.py`` from its
start to its finished result file, model loading included.

    python bench/contest_time.py [--images 6000] [--ckpt PATH] [--seed 0] [--runs 2]
                                 [--startup-images 16] [-- key=value ...]

The contest scores 5,000-6,000 JPEGs on one RTX 3090 with a 10-core CPU and breaks accuracy
ties by running time. This script builds such a folder, deterministically (``--seed``):
``--images`` photo-like JPEGs (natural-statistics images from data/synthetic.py, enlarged
with fine detail added) whose long side is log-uniform in 128-2,000 px, aspect 3:4 to 4:3,
quality 75-95. It is written once under ``bench/results/contest/`` (ignored by git; never
commit it). Then it runs ``python src/main.py`` in that folder's parent as the contest would
(``testset/`` beside it, ``UNMASK_CKPT`` naming the checkpoint), ``--runs`` times, and prints
each run's wall time, images/s and the runtime the run chose. The first run starts from an
empty ONNX cache (a private ``UNMASK_CACHE``), so it includes the export where
``scoring.runtime=auto`` exports (on a CPU); the later ones reuse it.

Without ``--ckpt`` the shipped default model (``unmask/model_zoo/default``) scores, as
``src/main.py`` does without a checkpoint of its own; ``--random`` writes a checkpoint of the
default detector (cnnspot, 128 px) with random weights once (speed does not depend on the weights). Arguments after ``--`` go
to src/main.py (``scoring.runtime=torch``, ``scoring.decode=cpu``, ...).

With fewer than 6,000 images the 6,000-image time is extrapolated, and labelled so: the
fixed cost (interpreter, imports, model load, workers) is measured by a run on
``--startup-images`` files, and the rest scales with the file count.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT  # noqa: E402

CONTEST_IMAGES = 6000
OUT = ROOT / "bench" / "results" / "contest"


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like uint8 RGB image of ``width`` x ``height``: a natural-statistics image
    (256 px) resized to the size, with pixel-level detail added, as a camera's would have."""
    import cv2

    from data.synthetic import natural_image

    base = natural_image(rng, 256)
    img = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC if max(width, height) > 256 else cv2.INTER_AREA)
    detail = rng.normal(0.0, 5.0, size=(height, width, 1)) + rng.normal(0.0, 2.0, size=(height, width, 3))
    return np.clip(img + detail, 0, 255).astype(np.uint8)


def contest_sizes(rng: np.random.Generator, n: int, low: int = 128, high: int = 2000) -> list[tuple[int, int, int]]:
    """(width, height, JPEG quality) of ``n`` files: long side log-uniform in [low, high]."""
    out = []
    for _ in range(n):
        long_side = int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))
        aspect = rng.uniform(0.75, 1.0)
        short = max(low // 2, int(round(long_side * aspect)))
        w, h = (long_side, short) if rng.random() < 0.5 else (short, long_side)
        out.append((w, h, int(rng.integers(75, 96))))
    return out


def write_jpegs(folder: Path, sizes: list[tuple[int, int, int]], seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    for i, (w, h, q) in enumerate(sizes):
        Image.fromarray(photo(rng, w, h)).save(folder / f"{i:05d}.jpg", quality=q)


def contest_folder(n: int, seed: int = 0) -> Path:
    """``bench/results/contest/n<N>_seed<S>/`` holding ``testset/`` (written once)."""
    root = OUT / f"n{n}_seed{seed}"
    done = root / "done"
    if not done.is_file():
        if root.exists():
            shutil.rmtree(root)
        start = time.perf_counter()
        print(f"writing {n} contest-shaped JPEGs to {root / 'testset'}...", flush=True)
        write_jpegs(root / "testset", contest_sizes(np.random.default_rng(seed), n), seed)
        done.write_text("ok\n")
        print(f"written in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def random_checkpoint(size: int = 128) -> Path:
    """A checkpoint of the default detector (cnnspot at ``size`` px) with random weights."""
    path = OUT / f"random_cnnspot_{size}.ckpt"
    if path.is_file():
        return path
    import torch
    from hydra import compose, initialize_config_dir

    from detectors.backbones import skip_pretrained
    from unmask.core.build import build_detector
    from unmask.core.config import CONFIG_DIR, to_plain
    from unmask.core.module import DetectionModule

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["detector=cnnspot", f"data.image_size={size}", "paths.output_dir=/tmp", "hydra.run.dir=/tmp"])
    torch.manual_seed(0)
    with skip_pretrained():
        detector = build_detector(cfg)
    module = DetectionModule(detector, optimizer=torch.optim.SGD, run_config=to_plain(cfg))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def run_main(folder: Path, ckpt: Path, cache: Path, extra: list[str]) -> dict:
    """``python src/main.py`` in ``folder`` (which holds ``testset/``): wall seconds from the
    start to the finished result file, the result's rows and the runtime line it printed."""
    before = set(folder.glob("result_*.xls"))
    env = {**os.environ, "UNMASK_CKPT": str(ckpt), "UNMASK_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "main.py"), *extra], cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(log[-4000:])
        raise SystemExit(f"src/main.py failed with exit status {proc.returncode}")
    new = sorted(set(folder.glob("result_*.xls")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise SystemExit("src/main.py wrote no result file")
    result = new[-1]
    with open(result, newline="") as f:
        rows = sum(1 for _ in csv.reader(f))
    for p in new:  # keep the folder clean for the next run (the result was only counted)
        for side in p.parent.glob(p.stem + ".*"):
            side.unlink()
    runtime = next((m.group(0) for m in re.finditer(r"runtime: \w+ \([^\n]*\)", log)), "runtime: (not printed)")
    return {"wall_s": wall, "rows": rows, "runtime": runtime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=CONTEST_IMAGES)
    parser.add_argument("--ckpt", default=None, help="a checkpoint (default: the shipped default model)")
    parser.add_argument("--random", action="store_true", help="score with a random-weights cnnspot checkpoint (128 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=2, help="runs on the same folder (the first with an empty ONNX cache)")
    parser.add_argument("--startup-images", type=int, default=16, help="files of the fixed-cost run used to extrapolate (0: none)")
    parser.add_argument("overrides", nargs="*", help="key=value arguments for src/main.py (after --)")
    args = parser.parse_args()

    if args.ckpt:
        ckpt = Path(args.ckpt).resolve()
    elif args.random:
        ckpt = random_checkpoint()
    else:
        from unmask.core.default_model import default_checkpoint

        ckpt = default_checkpoint()
    folder = contest_folder(args.images, args.seed)
    cache = OUT / "cache"
    shutil.rmtree(cache / "onnx", ignore_errors=True)  # the first run exports, as on a fresh machine
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.images} JPEGs in {folder / 'testset'}; checkpoint {ckpt}; {os.cpu_count()} CPUs; load {load}", flush=True)
    walls = []
    for k in range(args.runs):
        r = run_main(folder, ckpt, cache, args.overrides)
        if r["rows"] != args.images:
            raise SystemExit(f"the result has {r['rows']} rows for {args.images} files")
        walls.append(r["wall_s"])
        kind = "cold ONNX cache" if k == 0 else "warm cache"
        print(f"run {k + 1} ({kind}): {r['wall_s']:.1f} s wall for {args.images} images ({args.images / r['wall_s']:.1f} images/s); {r['runtime']}", flush=True)
    warm = statistics.median(walls[1:]) if len(walls) > 1 else walls[0]
    if args.images < CONTEST_IMAGES and args.startup_images > 0:
        small = run_main(contest_folder(args.startup_images, args.seed + 1000), ckpt, cache, args.overrides)
        per_image = max(0.0, warm - small["wall_s"]) / max(1, args.images - args.startup_images)
        estimate = small["wall_s"] + per_image * (CONTEST_IMAGES - args.startup_images)
        print(
            f"EXTRAPOLATED, not measured: {CONTEST_IMAGES} images ~ {estimate:.0f} s "
            f"(fixed {small['wall_s']:.1f} s measured on {args.startup_images} files, + {per_image * 1000:.1f} ms per file from the "
            f"{args.images}-file run with a warm cache)"
        )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load at the end {load}")


if __name__ == "__main__":
    main()
