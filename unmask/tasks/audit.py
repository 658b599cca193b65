"""audit.py's job: measure a data set as the financial spec's section 7.1 asks (data-set
quality and attack capability) and write ``audit.csv``, ``audit.json`` and ``report.md``.

The data config selects the files (any ``data=`` source, its splits and filters), the face
stage (``faces=``) gives the landmarks; ``audit.detectors`` score the fakes through the scorer.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from data.splits import SPLITS
from unmask.audit.identity import IdentityModel
from unmask.audit.measures import MeasureContext
from unmask.audit.run import audit, check_output, limit_records
from unmask.core.schemas import AuditConfig, options
from unmask.scoring.combine import VideoOptions

log = logging.getLogger(__name__)


def run_audit(cfg: DictConfig) -> dict:
    settings: AuditConfig = options(cfg.audit)  # every setting is checked before any file is read
    scoring = options(cfg.scoring)
    video = VideoOptions.from_config(cfg.get("video"))
    out = Path(settings.output_dir)
    check_output(out, settings.overwrite)
    for ckpt in settings.detectors:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"audit.detectors: checkpoint {ckpt} not found")
    identity = IdentityModel(settings.identity_weights) if settings.identity_weights else None
    datamodule = instantiate(cfg.data)
    splits = settings.splits or list(SPLITS)
    by_split = datamodule.split_records()
    records = limit_records([r for s in splits for r in by_split[s]], settings.limit, settings.seed)
    ctx = MeasureContext(datamodule.faces, identity, int(settings.max_side), int(settings.video_frames))
    source = datamodule.source
    data_name = str(getattr(source, "manifest", None) or getattr(source, "root", None) or type(source).__name__)
    info = {
        "data": f"`{cfg.data.source._target_.rsplit('.', 1)[-1]}` {data_name}",
        "splits": splits,
        "limit": settings.limit,
        "faces": datamodule.faces.analyzer.key if datamodule.faces is not None else "none (faces=none: no face measures)",
        "identity": (f"measured with `{settings.identity_weights}`" if identity is not None else
                     "not measured: they need a face-recognition model; set audit.identity_weights to a local "
                     "InceptionResnetV1 state dict (facenet-pytorch), and the columns identity_similarity / "
                     "identity_consistency appear"),
    }
    cache_dir = Path(cfg.paths.cache_dir) / "audit" if settings.cache else None
    root = getattr(source, "root", None)
    return audit(records, ctx, out, settings.detectors, scoring, video, cache_dir, Path(root) if root else None, info, settings.progress)
