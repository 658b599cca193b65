"""Contest export: ``python infer.py ckpt=PATH input=./testset`` -> ./result_MMDDHHMM.xls"""
import hydra
from omegaconf import DictConfig

import unmask.config  # noqa: F401  (registers the ${unmask_root:} resolver)


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    from unmask.inference import run_inference

    run_inference(cfg)


if __name__ == "__main__":
    main()
