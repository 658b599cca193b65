"""Face analysers on faces-dev: how often a face is found, how many, and how fast.

    python bench/faces_faces_dev.py [--analyzer mesh|mtcnn] [--limit N] [--quick]
        [--threads T] [--out CSV] [extra Hydra overrides, e.g. faces.analyzer.min_score=0.5]

The analyser is ``faces.analyzer`` of ``configs/faces/<analyzer>.yaml`` (composed as
``train.py faces=<analyzer>`` would). Each image is decoded with ``data.decode.decode_image``;
only ``analyzer.detect`` is timed (detection + landmarks). Prints one markdown table per
source and label and per label, and writes one CSV row per image to
``bench/results/faces_faces_dev_<analyzer>.csv``. ``--limit`` draws N images round-robin
over (source, label) groups (seeded), so every group is represented; ``--quick`` = 40.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT  # noqa: E402
from unmask.reports.tables import fmt, markdown_table  # noqa: E402

QUICK_LIMIT = 40


def load_analyzer(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import unmask.core.config

    with initialize_config_dir(config_dir=unmask.core.config.CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"faces={name}", *overrides])
    return instantiate(cfg.faces.analyzer), Path(cfg.paths.shared_dir), cfg.faces.cache_dir


def select(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """All rows, or ``limit`` of them taken round-robin over shuffled (source, label) groups."""
    if limit is None or limit >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for i in rng.permutation(len(rows)):
        groups[(rows[i]["source"], rows[i]["label"])].append(rows[i])
    queues = [groups[k] for k in sorted(groups)]
    picked: list[dict] = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop())
    return picked


def summarise(results: list[dict], key) -> dict:
    groups: dict = defaultdict(list)
    for r in results:
        groups[key(r)].append(r)
    table = {}
    for name in sorted(groups):
        ok = [r for r in groups[name] if r["ok"]]
        found = [r["top_score"] for r in ok if r["faces"]]
        table[name] = {
            "images": len(groups[name]),
            "undecodable": len(groups[name]) - len(ok),
            "detection_rate": np.mean([r["faces"] >= 1 for r in ok]) if ok else float("nan"),
            "faces_per_image": np.mean([r["faces"] for r in ok]) if ok else float("nan"),
            "mean_top_score": np.mean(found) if found else float("nan"),
            "ms_per_image": np.mean([r["ms"] for r in ok]) if ok else float("nan"),
        }
    return table


def markdown(table: dict, first: str) -> str:
    cols = ["images", "undecodable", "detection_rate", "faces_per_image", "mean_top_score", "ms_per_image"]
    return markdown_table(
        [first, *cols],
        ([name, *(fmt(m[c], 1 if c == "ms_per_image" else 3) for c in cols)] for name, m in table.items()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analyzer", default="mesh", help="a configs/faces/<name>.yaml with an analyzer node")
    parser.add_argument("--limit", type=int, default=None, help="images to run (round-robin over source/label)")
    parser.add_argument("--quick", action="store_true", help=f"--limit {QUICK_LIMIT}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--manifest", default=None, help="default: ${paths.shared_dir}/faces-dev/MANIFEST.csv")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/faces_faces_dev_<analyzer>.csv)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (faces.analyzer.*)")
    args = parser.parse_args()

    import torch

    from data.decode import ImageDecodeError, decode_image
    from data.faces.cache import FaceCache, content_hash

    if args.threads:
        torch.set_num_threads(args.threads)
    analyzer, shared, cache_dir = load_analyzer(args.analyzer, args.overrides)
    # What is found here also fills the face cache the training runs read (same key).
    cache = FaceCache(analyzer.key, cache_dir)
    manifest = Path(args.manifest or shared / "faces-dev" / "MANIFEST.csv")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = select(rows, QUICK_LIMIT if args.quick and args.limit is None else args.limit, args.seed)
    print(f"{analyzer.key} {analyzer.settings()}\n{len(rows)} images from {manifest}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    analyzer.detect(np.full((256, 256, 3), 128, np.uint8))  # warm-up: first call allocates
    results = []
    start = time.perf_counter()
    for i, row in enumerate(rows):
        rec = {k: row[k] for k in ("relpath", "source", "label", "generator", "split", "width", "height")}
        try:
            rgb = decode_image(manifest.parent / row["relpath"])
        except ImageDecodeError as e:
            results.append({**rec, "ok": False, "faces": 0, "top_score": float("nan"), "ms": float("nan"),
                            "error": str(e)})
            continue
        t = time.perf_counter()
        faces = analyzer.detect(rgb)
        ms = (time.perf_counter() - t) * 1000
        results.append({**rec, "ok": True, "faces": len(faces), "top_score": faces[0].score if faces else float("nan"),
                        "ms": ms, "error": ""})
        cache.put(content_hash(manifest.parent / row["relpath"]), faces)
        if (i + 1) % 500 == 0:
            print(f"  {i + 1}/{len(rows)} images, {time.perf_counter() - start:.0f} s", flush=True)

    cache.save()
    print(f"\n## {args.analyzer}: by source and label\n")
    print(markdown(summarise(results, lambda r: f"{r['source']} / {r['label']}"), "source / label"))
    print(f"\n## {args.analyzer}: by label\n")
    by_label = summarise(results, lambda r: r["label"])
    by_label["all"] = summarise(results, lambda r: "all")["all"]
    print(markdown(by_label, "label"))

    out = Path(args.out or ROOT / "bench" / "results" / f"faces_faces_dev_{args.analyzer}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]) if results else ["relpath"])
        writer.writeheader()
        writer.writerows(results)
    print(f"\n{len(results)} rows -> {os.path.relpath(out, ROOT)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
