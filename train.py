"""Train a detector: ``python train.py detector=npr data=faces_dev`` (see configs/train.yaml)."""
import hydra
from omegaconf import DictConfig

import unmask.core.config  # noqa: F401  (the ${unmask_root:} resolver and the config schemas)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from unmask.tasks.train import train

    metrics = train(cfg)
    return metrics.get("val/auc")  # for sweepers that optimise a number


if __name__ == "__main__":
    main()
