"""Contest export: ``python infer.py ckpt=PATH input=./testset`` -> ./result_MMDDHHMM.xls

One row per file; a video file (mp4, avi, mov, webm, mkv, m4v) gets the aggregate of its
sampled frames (``video.*``). How the checkpoint is scored: ``scoring.*`` (configs/scoring);
``explain=gallery`` adds maps and an HTML page (configs/explain).
"""
import hydra
from omegaconf import DictConfig

import unmask.core.config  # noqa: F401  (the ${unmask_root:} resolver and the config schemas)


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    from unmask.tasks.infer import run_inference

    run_inference(cfg)


if __name__ == "__main__":
    main()
