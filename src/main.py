"""Contest submission entry point: reads ./testset, writes ./result_MMDDHHMM.xls.

The model is the file named by $UNMASK_CKPT, else ``src/model.ckpt`` where it exists (copy
the ``best.ckpt`` a training run selected), else the framework's shipped default model
(``unmask/model_zoo/default``: the submission needs no training). Extra ``key=value`` arguments are passed to infer.py's
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

    local = Path(__file__).resolve().parent / "model.ckpt"
    ckpt = os.environ.get("UNMASK_CKPT") or (str(local) if local.is_file() else None)
    chosen = [f"ckpt={ckpt}"] if ckpt else []  # none: infer.py's default, the shipped model
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("infer", overrides=[*chosen, "input=./testset", "output_dir=.", *argv])
    run_inference(cfg)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main(sys.argv[1:])
