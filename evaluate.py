"""Evaluate a checkpoint: ``python evaluate.py ckpt=PATH data=faces_dev split=test [perturb=spec]``.

Writes metrics.json, report.md (overall, per source, per generator), predictions.csv and
roc.png into the run folder (see unmask/tasks/evaluate.py). The data config only selects
the files; preprocessing and the face stage come from the checkpoint, scoring from
``scoring.*``.
"""
from unmask.cli import evaluate as main  # the Hydra app, shared with the unmask-evaluate command

if __name__ == "__main__":
    main()
