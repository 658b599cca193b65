"""Pretrain the OSN noise simulator: ``python pretrain_osn.py data=faces_dev`` (see
configs/osn_pretrain.yaml); then train with
``python train.py experiment=osn_robust osn.simulator.weights=<printed path>``."""
import hydra
from omegaconf import DictConfig

import unmask.core.config  # noqa: F401  (the ${unmask_root:} resolver and the config schemas)


@hydra.main(version_base="1.3", config_path="configs", config_name="osn_pretrain")
def main(cfg: DictConfig) -> None:
    from unmask.tasks.osn_pretrain import pretrain_simulator

    pretrain_simulator(cfg)


if __name__ == "__main__":
    main()
