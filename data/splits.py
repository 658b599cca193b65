"""Train/val/test assignment: from the manifest when it has splits, else seeded and
group-aware (every image of a group, e.g. one video's frames, lands in one split)."""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from data.records import SPLITS, Record

__all__ = ["SPLITS", "assign_splits", "check_groups_disjoint"]


def assign_splits(
    records: list[Record],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    respect_existing: bool = True,
) -> list[Record]:
    """Fill ``Record.split``. Groups are shuffled per label with ``seed`` and cut by
    cumulative image count, so every split gets both classes in the right proportion.

    With ``respect_existing``, records that all carry a split keep them; a split other than
    train, val or test is a ``ValueError`` (a typo must not silently re-split the set). When
    only some records carry one, all are reassigned (``ManifestSource`` refuses such a
    manifest, naming the rows, before it gets here)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"data.split.fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if respect_existing:
        unknown = [r for r in records if r.split is not None and r.split not in SPLITS]
        if unknown:
            raise ValueError(
                f"unknown split {unknown[0].split!r} in {len(unknown)} record(s), first {unknown[0].path}; "
                f"a split is one of {', '.join(SPLITS)}"
            )
    if respect_existing and records and all(r.split in SPLITS for r in records):
        return records
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.group].append(r)
    by_label: dict[int, list[str]] = defaultdict(list)
    for g, members in groups.items():
        # A mixed-label group (a video with real and fake frames) is filed under its majority.
        labels = [m.label for m in members]
        by_label[max(set(labels), key=labels.count)].append(g)
    rng = random.Random(seed)
    for label in sorted(by_label):
        names = sorted(by_label[label])
        rng.shuffle(names)
        total = sum(len(groups[g]) for g in names)
        done = 0
        for g in names:
            pos = done / max(total, 1)
            split = "train" if pos < fractions[0] else "val" if pos < fractions[0] + fractions[1] else "test"
            for m in groups[g]:
                m.split = split
            done += len(groups[g])
    return records


def check_groups_disjoint(records: list[Record]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if seen.setdefault(r.group, r.split) != r.split:
            raise ValueError(f"group {r.group!r} spans splits {seen[r.group]!r} and {r.split!r}")
