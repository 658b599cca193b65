"""Contest export: ``python infer.py ckpt=PATH input=./testset`` -> ./result_MMDDHHMM.xls

One row per file; a video file (mp4, avi, mov, webm, mkv, m4v) gets the aggregate of its
sampled frames (``video.*``). How the checkpoint is scored: ``scoring.*`` (configs/scoring);
``explain=gallery`` adds maps and an HTML page (configs/explain).
"""
from unmask.cli import infer as main  # the Hydra app, shared with the unmask-infer command

if __name__ == "__main__":
    main()
