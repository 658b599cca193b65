"""Evaluate a checkpoint: ``python evaluate.py ckpt=PATH data=faces_dev split=test``.

Writes metrics.json, report.md (overall, per source, per generator), predictions.csv and
roc.png into the run folder. The data config only selects the images; preprocessing comes
from the checkpoint, exactly as it was in training. ``perturb=spec`` adds the robustness
grid (every perturbation x severity, D_r per cell) to report.md and writes
robustness.csv/json/png.
Video files in the split (mp4, avi, mov, webm...) are scored frame by frame and aggregated
(``video`` config); video-level metrics are grouped by the manifest's ``video_id`` column.
QPS_image and QPS_video are printed and stored in metrics.json.
"""
import hydra
from omegaconf import DictConfig

import unmask.config  # noqa: F401  (registers the ${unmask_root:} resolver)


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    from unmask.config import is_empty
    from unmask.evaluation import evaluate_checkpoint
    from unmask.video_scoring import VideoOptions

    datamodule = instantiate(cfg.data)
    evaluate_checkpoint(
        cfg.ckpt,
        datamodule,
        split=cfg.split,
        out_dir=cfg.output_dir,
        threshold=cfg.threshold,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=cfg.device,
        perturb=None if is_empty(cfg.get("perturb")) else instantiate(cfg.perturb, _convert_="all"),
        video=VideoOptions.from_config(cfg.get("video")),
        runtime=cfg.get("runtime", "torch"),
        compile=cfg.get("compile", False),
        onnx_model=cfg.get("onnx_model"),
    )


if __name__ == "__main__":
    main()
