"""``python -m unmask.leaderboard DIR... [--out DIR] [--sort COLUMN]``: the leaderboard of
finished training runs (a sweep folder, or run folders), as ``train.py -m`` writes it at the
end of a sweep (``unmask.reports.leaderboard``). Prints the markdown; ``--out`` also writes
``leaderboard.md`` and ``leaderboard.csv`` there."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from unmask.reports.leaderboard import find_runs, leaderboard_frame, leaderboard_markdown, write_leaderboard


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unmask.leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="a sweep folder (multirun/train/<time>) or run folders")
    parser.add_argument("--out", help="write leaderboard.md and leaderboard.csv into this folder")
    parser.add_argument("--sort", help="sort by this column (default: the objective), e.g. 'test auc'")
    args = parser.parse_args(argv)
    try:
        if args.out:
            frame, text = write_leaderboard(args.out, args.dirs, args.sort)
        else:
            frame, metric, mode = leaderboard_frame(find_runs(args.dirs), args.sort)
            text = leaderboard_markdown(frame, metric, mode)
    except (NotADirectoryError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if frame.empty:
        print(f"no run folders (with summary.json or .hydra/) in {' '.join(args.dirs)}", file=sys.stderr)
        return 1
    print(text)
    if args.out:
        print(f"leaderboard written to {Path(args.out).resolve() / 'leaderboard.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
