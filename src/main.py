"""Contest submission entry point: reads ./testset, writes ./result_MMDDHHMM.xls.

The model is ``src/model.ckpt`` (copy the ``best.ckpt`` a training run selected) or the
file named by $UNMASK_CKPT. Extra ``key=value`` arguments are passed to infer.py's
config, e.g. ``python src/main.py scoring.threshold=prior:0.5 scoring.batch_size=128``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from unmask.core.config import CONFIG_DIR
    from unmask.tasks.infer import run_inference

    ckpt = os.environ.get("UNMASK_CKPT", str(Path(__file__).resolve().parent / "model.ckpt"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("infer", overrides=[f"ckpt={ckpt}", "input=./testset", "output_dir=.", *argv])
    run_inference(cfg)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main(sys.argv[1:])
