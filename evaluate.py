"""Evaluate a checkpoint: ``python evaluate.py ckpt=PATH data=faces_dev split=test``.

Writes metrics.json, report.md (overall, per source, per generator), predictions.csv and
roc.png into the run folder. The data config only selects the images; preprocessing comes
from the checkpoint, exactly as it was in training.
"""
import hydra
from omegaconf import DictConfig

import unmask.config  # noqa: F401  (registers the ${unmask_root:} resolver)


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    from unmask.evaluation import evaluate_checkpoint

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
    )


if __name__ == "__main__":
    main()
