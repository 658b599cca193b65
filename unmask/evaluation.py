"""evaluate.py's job: score a split with a checkpoint, then metrics overall, per source and
per generator, written as metrics.json, report.md, predictions.csv and roc.png; plus
confusion.png (forgery types) with an attribution head and localization.csv when the split
has ground-truth masks."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from data.video import split_videos
from unmask.attribution import write_attribution
from unmask.checkpoint import load_detector
from unmask.io import atomic_save_figure, atomic_write_json, atomic_write_text
from unmask.localization import write_localization
from unmask.metrics import grouped_metrics
from unmask.image_scoring import score_image_records
from unmask.runtime import build_runtime
from unmask.tables import grouped_tables
from unmask.throughput import RunClock, format_throughput, throughput_report

log = logging.getLogger(__name__)


def metrics_report(df: pd.DataFrame, threshold: float) -> dict:
    scored = df[df["ok"]]
    return {
        "threshold": threshold,
        "n_undecodable": int((~df["ok"]).sum()),
        **grouped_metrics(scored["label"].to_numpy(), scored["prob"].to_numpy(), scored["source"], scored["generator"], threshold),
    }


def render_markdown(report: dict, title: str) -> str:
    parts = [
        f"# {title}",
        "",
        f"Threshold {report['threshold']:.4f} (chosen on validation unless overridden); "
        f"{report['n_undecodable']} undecodable files left out of the metrics. "
        "`recall_at_90_real_pass`: share of fakes caught when 90 % of real faces pass. "
        "Per generator: that generator's fakes against all reals of the split.",
        "",
        *grouped_tables(report),
    ]
    return "\n".join(parts)


def plot_roc(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    scored = df[df["ok"] & df["label"].isin([0, 1])]
    fig, ax = plt.subplots(figsize=(5, 5))
    if scored["label"].nunique() == 2:
        fpr, tpr, _ = roc_curve(scored["label"], scored["prob"])
        ax.plot(fpr, tpr, label="all")
        reals = scored[scored["label"] == 0]
        for gen, part in scored[scored["label"] == 1].groupby("generator"):
            both = pd.concat([reals, part])
            f, t, _ = roc_curve(both["label"], both["prob"])
            ax.plot(f, t, lw=1, alpha=0.7, label=str(gen))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.axvline(0.1, color="grey", lw=0.6, ls="--")  # 90 % real pass rate
    ax.set(xlabel="false positive rate (reals flagged)", ylabel="true positive rate (fakes caught)", title="ROC")
    ax.legend(fontsize=7, loc="lower right")
    atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def evaluate_checkpoint(
    ckpt: str,
    datamodule,
    split: str = "test",
    out_dir: str | Path = ".",
    threshold: float | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    perturb=None,
    video=None,
    runtime: str = "torch",
    compile: bool = False,
    onnx_model: str | None = None,
) -> dict:
    """``perturb``: a ``data.perturb.PerturbationGrid`` (``configs/perturb/``); when given,
    the robustness grid runs after the clean evaluation and its section is appended to
    report.md (plus robustness.csv/json/png). Without it nothing changes.

    Video files in the split are scored frame by frame (``video``: a
    ``unmask.video_scoring.VideoOptions``; sampling, aggregation, id column); their frames
    and any images a manifest assigns to a video (``video_id`` column) also get video-level
    metrics (``report["video"]``, videos.csv). ``runtime``: torch | onnx (``unmask.runtime``).
    QPS_image / QPS_video cover the clean evaluation, from loading the checkpoint to the
    results (the robustness grid, if any, is not part of them)."""
    from unmask.video_scoring import (
        VideoOptions, add_video_scores, render_video_markdown, video_file_totals, video_metrics_report,
    )

    clock = RunClock()
    video = video or VideoOptions()
    loaded = load_detector(ckpt)
    if loaded.faces is not None and video.face_crops is None:  # videos get the checkpoint's face stage too
        video = dataclasses.replace(video, face_crops=loaded.faces.frame_crops)
    datamodule.setup()
    if split not in datamodule.records:
        raise ValueError(f"split must be one of {sorted(datamodule.records)}, got {split!r}")
    # The checkpoint's own evaluation preprocessing, not whatever the data config says now.
    image_records, video_records = split_videos(datamodule.records[split])
    scorer = build_runtime(runtime, loaded, device=device, compile=compile, onnx_model=onnx_model)
    df, seconds = None, 0.0
    if image_records or not video_records:
        df, seconds = score_image_records(
            loaded, image_records, batch_size=batch_size, num_workers=num_workers, device=device, runtime=scorer,
            draft_decode=datamodule.draft_decode,
        )
    df, videos, video_s = add_video_scores(
        df, loaded.detector, loaded.canonical, image_records, video_records, video, batch_size, num_workers, device, scorer
    )
    seconds += video_s
    thr = loaded.threshold if threshold is None else float(threshold)
    report = metrics_report(df, thr)
    report.update({"split": split, "checkpoint": str(ckpt), "seconds": seconds, "images_per_second": len(df) / max(seconds, 1e-9)})
    markdown = render_markdown(report, f"Evaluation on split '{split}'")
    if videos is not None:
        report["video"] = video_metrics_report(videos, thr, video.aggregator)
        markdown += "\n" + render_video_markdown(report["video"])
    out = Path(out_dir)
    plot_roc(df, out / "roc.png")
    attribution = write_attribution(df, loaded.detector, out)  # confusion matrix, when there is a type head
    if attribution:
        report["attribution"], section = attribution
        markdown += "\n" + section
    localization = write_localization(loaded, image_records, out, batch_size, num_workers, device, datamodule.draft_decode)
    if localization:  # the split has ground-truth masks: F1 / IoU / pixel AUC (localization.csv)
        report["localization"], loc_section = localization
        markdown += "\n" + loc_section
    video_seconds, n_frames = video_file_totals(df, video_records)
    throughput = throughput_report(clock.seconds(), len(image_records), len(video_records), video_seconds, n_frames)
    report.update({"qps_image": throughput["qps_image"], "qps_video": throughput["qps_video"], "throughput": throughput, "runtime": scorer.name})
    atomic_write_json(out / "metrics.json", report)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "predictions.csv", df.to_csv(index=False))
    if videos is not None:
        atomic_write_text(out / "videos.csv", videos.to_csv(index=False))
    section = ""
    if perturb is not None:
        from unmask.robustness import evaluate_grid, write_robustness

        table = evaluate_grid(loaded, image_records, perturb, threshold=thr, batch_size=batch_size, num_workers=num_workers, device=device)
        n_images = int(table.loc[0, "n"])
        section = write_robustness(table, out, perturb.stage, n_images)
        atomic_write_text(out / "report.md", markdown + "\n" + section)
        report["robustness"] = table.to_dict(orient="records")
    o = report["overall"]
    log.info("%s: acc %.4f  auc %.4f  ap %.4f  eer %.4f  (%d images, %.1f img/s)", split, o["acc"], o["auc"], o["ap"], o["eer"], o["n"], report["images_per_second"])
    print(markdown)
    print(f"throughput ({scorer.name} runtime): {format_throughput(throughput)}")
    if section:
        print(section)
    print(f"report written to {out.resolve()}")
    return report
