"""Contest export: ``python infer.py ckpt=PATH input=./testset`` -> ./result_MMDDHHMM.xls

One row per file; a video file (mp4, avi, mov, webm, mkv, m4v) gets the aggregate of its
sampled frames (``video.*``). ``runtime=onnx`` scores with onnxruntime; QPS_image and
QPS_video are printed (``metrics=true`` also writes them to result_*.metrics.json).
"""
import hydra
from omegaconf import DictConfig

import unmask.config  # noqa: F401  (registers the ${unmask_root:} resolver)


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    from unmask.inference import run_inference

    run_inference(cfg)


if __name__ == "__main__":
    main()
