"""evaluate.py's job (and the training run's test step): score a split with a checkpoint
through the scorer, feed the evaluators, write the report.

Writes ``metrics.json``, ``report.md`` (opening with what was evaluated; intervals beside
accuracy and AUC), ``predictions.csv`` (one row per file) and the plots of
``evaluation.detection`` (``roc.png``, ``det.png``, ``groups.png``, ``scores.png``,
``reliability.png``, ``training.png`` when the run has a CSV log); with video ``videos.csv`` and ``frames.csv``; with an attribution head
``confusion.png``; when the split has ground-truth masks ``localization.csv``; with a
perturbation grid ``robustness.csv/json/png``. The output folder is created and checked
(a folder, writable, some free space) before the checkpoint is loaded; text cells that a
spreadsheet would read as a formula start with ``'`` in the CSVs and tables (``reports.safe``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from data.io import atomic_write_json, atomic_write_text, writable_dir
from data.records import Record
from unmask.core.checkpoint import LoadedDetector, load_detector
from unmask.core.config import is_empty
from unmask.core.metrics import decide, parse_threshold
from unmask.core.schemas import ScoringConfig, options
from unmask.evaluation.attribution import Attribution
from unmask.evaluation.base import Evaluator
from unmask.evaluation.detection import Detection
from unmask.evaluation.localization import Localization
from unmask.evaluation.video import VideoLevel
from unmask.explain.gradcam import ForgeryMaps
from unmask.reports.safe import frame_csv
from unmask.reports.throughput import RunClock, format_throughput, throughput_report
from unmask.scoring.combine import VideoOptions
from unmask.scoring.scorer import Scorer
from unmask.tasks.infer import require_checkpoint

log = logging.getLogger(__name__)


def threshold_in_force(loaded: LoadedDetector, spec, probs) -> tuple[float, str]:
    """The threshold ``scoring.threshold`` asks for on these scores, and how it was chosen."""
    kind, _ = parse_threshold(spec)
    threshold = decide(probs, spec, loaded.threshold)[1]
    how = {
        "stored": loaded.threshold_from or "chosen on validation",
        "fixed": "set by scoring.threshold",
        "prior": f"scoring.threshold={spec}: that share of the files labelled fake",
    }[kind]
    return threshold, how


def evaluators_for(loaded: LoadedDetector, records: list[Record], video: VideoOptions) -> list[Evaluator]:
    """The evaluators beside ``Detection`` that this checkpoint and these records call for."""
    found: list[Evaluator] = [VideoLevel(records, video.aggregator, video.id_column)]
    classes = getattr(loaded.detector, "classes", None)
    if loaded.detector.class_names is not None and classes is not None:
        found.append(Attribution(classes))
    if any(r.mask for r in records):
        found.append(Localization())
    return found


def evaluate_records(
    ckpt: str | Path,
    records: list[Record],
    out_dir: str | Path,
    scoring: ScoringConfig | None = None,
    video: VideoOptions | None = None,
    split: str = "test",
    perturb=None,
    scale_out: bool = False,
) -> dict | None:
    """Score ``records`` with ``ckpt`` and write the evaluation into ``out_dir``; returns
    metrics.json's content. ``perturb``: a ``PerturbationGrid`` run after the clean pass.
    QPS_image / QPS_video cover the clean pass, from loading the checkpoint to its results.

    ``scale_out`` (evaluate.py): when the scoring settings ask for it (``scoring.devices``,
    ``num_nodes``, ``strategy``, ``stream``) the clean pass runs through Lightning into shards
    under ``out_dir/shards/<key>/`` (``unmask.scoring.shards``); rank zero merges them and
    writes the report (and runs the perturbation grid in its own process), the other ranks
    return None."""
    clock = RunClock()
    scoring, video = scoring or ScoringConfig(), video or VideoOptions()
    sharded = scale_out and scoring.scale_out and bool(records)
    if sharded and any(r.mask for r in records):
        raise ValueError(
            "these records have ground-truth masks: localisation metrics need every scored batch (its forgery maps) in one "
            "process, which sharded scoring does not keep; evaluate them with scoring.devices=1 scoring.stream=false"
        )
    out = writable_dir(out_dir, (1 << 20) + 1024 * len(records))  # fail before the work, not after it
    loaded = load_detector(ckpt)
    scorer = Scorer(loaded, scoring, video)
    evaluators = evaluators_for(loaded, records, video)
    # Localisation needs the detector's own forgery maps (none for a detector without one).
    explainer = ForgeryMaps("own", required=False) if any(isinstance(e, Localization) for e in evaluators) else None
    if sharded:
        from unmask.scoring.shards import score_sharded

        scores = score_sharded(ckpt, records, scoring, video, out)
        if scores is None:  # not rank zero: rank zero merges the shards and writes the report
            return None
    else:
        scores = scorer.score(records, evaluators=evaluators, explainer=explainer)
    threshold, how = threshold_in_force(loaded, scoring.threshold, scores.files["prob"].to_numpy() if len(scores.files) else [])

    report = {"split": split, "checkpoint": str(ckpt), "seconds": scores.seconds}
    markdown = [f"# Evaluation on split '{split}'", ""]
    for evaluator in [Detection(how, ckpt=ckpt, config=loaded.config, split=split), *evaluators]:
        result = evaluator.compute(scores, threshold)
        if result is None:
            continue
        if isinstance(evaluator, Detection):
            report.update(result)  # the headline tables stay at the top of metrics.json
        else:
            report[evaluator.name] = result
        markdown.append(evaluator.markdown(result))
        evaluator.write(result, scores, out)
    throughput = throughput_report(clock.seconds(), scores.n_images, scores.n_videos, scores.video_seconds, scores.n_video_frames)
    report.update(
        images_per_second=len(scores.files) / max(scores.seconds, 1e-9), qps_image=throughput["qps_image"],
        qps_video=throughput["qps_video"], throughput=throughput, runtime=scores.runtime,
    )
    predictions = scores.files
    video_level = next(e for e in evaluators if isinstance(e, VideoLevel))
    if video_level.video_ids:  # which video each row belongs to
        predictions = predictions.assign(video_id=[video_level.video_of(p) for p in predictions["path"]])
    atomic_write_text(out / "predictions.csv", frame_csv(predictions))
    if len(scores.frames):
        atomic_write_text(out / "frames.csv", frame_csv(scores.frames))
    if perturb is not None:
        from unmask.robustness.grid import evaluate_grid, write_robustness

        table, cell_scores = evaluate_grid(scorer, records, perturb, threshold=threshold)
        markdown.append(write_robustness(table, out, perturb.stage, int(table.loc[0, "n"]), files=cell_scores))
        report["robustness"] = table.to_dict(orient="records")
    text = "\n".join(markdown)
    atomic_write_json(out / "metrics.json", report)
    atomic_write_text(out / "report.md", text)
    o = report["overall"]
    log.info("%s: acc %.4f  auc %.4f  ap %.4f  eer %.4f  (%d files, %.1f files/s)", split, o["acc"], o["auc"], o["ap"], o["eer"], o["n"], report["images_per_second"])
    print(text)
    print(f"throughput ({scores.runtime} runtime): {format_throughput(throughput)}")
    print(f"report written to {out.resolve()}")
    return report


def run_evaluation(cfg: DictConfig) -> dict | None:
    """``python evaluate.py ckpt=PATH data=... split=test [perturb=spec]``: the data config
    only selects the files; preprocessing and the face stage come from the checkpoint."""
    scoring = options(cfg.scoring)  # a bad value fails here, before anything is loaded
    cfg.ckpt = require_checkpoint(cfg.ckpt, "evaluate.py")
    video = VideoOptions.from_config(cfg.get("video"))
    perturb = None if is_empty(cfg.get("perturb")) else instantiate(cfg.perturb, _convert_="all")
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    if cfg.split not in datamodule.records:
        raise ValueError(f"split must be one of {sorted(datamodule.records)}, got {cfg.split!r}")
    return evaluate_records(
        cfg.ckpt, datamodule.records[cfg.split], cfg.output_dir, scoring, video, split=cfg.split, perturb=perturb, scale_out=True,
    )
