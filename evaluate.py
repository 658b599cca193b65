"""Evaluate a checkpoint: ``python evaluate.py ckpt=PATH data=faces_dev split=test [perturb=spec]``.

Writes metrics.json, report.md (overall, per source, per generator), predictions.csv and
roc.png into the run folder (see unmask/tasks/evaluate.py). The data config only selects
the files; preprocessing and the face stage come from the checkpoint, scoring from
``scoring.*``.
"""
import hydra
from omegaconf import DictConfig

import unmask.core.config  # noqa: F401  (the ${unmask_root:} resolver and the config schemas)


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from unmask.tasks.evaluate import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    main()
