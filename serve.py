"""The detection service: ``python serve.py ckpt=PATH [port=8000] [workers_per_device=1]
[max_batch_size=16] [batch_timeout=0]``.

``POST /predict`` scores uploaded images and videos as infer.py would (configs/scoring,
configs/video); ``GET /health`` answers once the model is loaded (unmask/tasks/serve.py).
"""
import hydra
from omegaconf import DictConfig

import unmask.core.config  # noqa: F401  (the ${unmask_root:} resolver and the config schemas)


@hydra.main(version_base="1.3", config_path="configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    from unmask.tasks.serve import run_service

    run_service(cfg)


if __name__ == "__main__":
    main()
