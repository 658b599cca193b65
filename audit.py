"""Audit a data set (T/ZFIDA 0003-2024, section 7.1): ``python audit.py data=faces_dev
[audit.detectors=[a.ckpt,b.ckpt]] [audit.limit=50]``.

Writes audit.csv (one row per file, one column per measure), audit.json (per-class,
per-source and per-generator summaries) and report.md with pictures into the run folder
(see unmask/tasks/audit.py and configs/audit/default.yaml).
"""
import hydra
from omegaconf import DictConfig

import unmask.core.config  # noqa: F401  (the ${unmask_root:} resolver and the config schemas)


@hydra.main(version_base="1.3", config_path="configs", config_name="audit")
def main(cfg: DictConfig) -> None:
    from unmask.tasks.audit import run_audit

    run_audit(cfg)


if __name__ == "__main__":
    main()
