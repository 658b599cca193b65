"""Train a detector: ``python train.py detector=npr data=faces_dev`` (see configs/train.yaml)."""
from unmask.cli import train as main  # the Hydra app, shared with the unmask-train command

if __name__ == "__main__":
    main()
