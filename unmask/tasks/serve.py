"""serve.py's job: the detection service on LitServe.

LitServe (Lightning's serving engine, on FastAPI and uvicorn) runs HTTP server processes and
inference worker processes (``workers_per_device`` per device of ``scoring.accelerator`` /
``scoring.devices``); requests reach a worker through a queue, and a worker gathers up to
``max_batch_size`` of those waiting into one pass of the scorer (``unmask.service.batching``).

- ``POST /predict``: files (multipart field ``files``, or one file's raw bytes with
  ``X-Filename``), ``?heatmap=1`` for forgery maps; JSON per file (``unmask.service.api``).
- ``GET /health``: 200 ``ok`` once every worker has loaded the model, 503 before.
- The door (``unmask.service.uploads``): API key (``UNMASK_API_KEY``), content type (415),
  body size (413), number of files (413), empty requests (400); uploads land in a private
  folder under names made by the server, removed after the answer.

The checkpoint is loaded once here first, so a wrong path or a file that is not a checkpoint
fails before any process starts. SIGTERM shuts down like Ctrl+C: workers and HTTP servers
stop, the upload folder is removed.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from unmask.core.checkpoint import load_detector
from unmask.core.schemas import options
from unmask.scoring.shards import resolved_accelerator
from unmask.service.api import DetectionAPI, refuse_prior_threshold
from unmask.service.uploads import UploadGate, private_upload_root
from unmask.tasks.infer import require_checkpoint

log = logging.getLogger(__name__)

API_KEY_ENV = "UNMASK_API_KEY"


def build_server(cfg: DictConfig):
    """The ``LitServer`` of ``cfg`` (configs/serve.yaml) and its private upload folder."""
    import litserve as ls

    scoring = options(cfg.scoring)
    refuse_prior_threshold(scoring.threshold)
    if cfg.fallback_label not in (0, 1):
        raise ValueError(f"fallback_label must be 0 or 1, got {cfg.fallback_label!r}")
    for key in ("workers_per_device", "max_batch_size", "max_files", "max_request_mb"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]!r}")
    cfg.ckpt = require_checkpoint(cfg.ckpt, "serve.py")  # none given: the shipped default model
    load_detector(cfg.ckpt)  # a bad checkpoint fails here, before any process starts
    upload_root = private_upload_root(cfg.get("upload_dir"))
    token = secrets.token_urlsafe(32)
    video = OmegaConf.to_container(cfg.video, resolve=True) if cfg.get("video") else None
    api = DetectionAPI(
        str(Path(cfg.ckpt).resolve()), scoring, video, token, str(upload_root), fallback_label=int(cfg.fallback_label),
        heatmap_method=cfg.heatmap_method, loader_workers=int(cfg.loader_workers), threads=cfg.get("threads"),
        max_batch_size=int(cfg.max_batch_size), batch_timeout=float(cfg.batch_timeout),
    )
    api_key = os.environ.get(API_KEY_ENV) or None
    gate = {
        "upload_root": str(upload_root), "token": token, "max_bytes": int(float(cfg.max_request_mb) * (1 << 20)),
        "max_files": int(cfg.max_files), "api_key": api_key,
    }
    server = ls.LitServer(
        api, accelerator=resolved_accelerator(scoring), devices=scoring.devices, workers_per_device=int(cfg.workers_per_device),
        timeout=float(cfg.timeout), max_payload_size=None, middlewares=[(UploadGate, gate)], fast_queue=bool(cfg.fast_queue),
        disable_openapi_url=True, restart_workers=True, model_metadata={"checkpoint": Path(cfg.ckpt).name},
    )
    return server, upload_root


_MAIN_PID = os.getpid()


def _terminate(signum, frame):
    """SIGTERM in the server's main process: LitServe's graceful shutdown (as Ctrl+C). The HTTP
    server processes forked from it inherit this handler; there SIGTERM keeps its default."""
    if os.getpid() == _MAIN_PID:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def run_service(cfg: DictConfig) -> None:
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    server, upload_root = build_server(cfg)
    if os.environ.get(API_KEY_ENV):
        log.info("requests need the API key of $%s", API_KEY_ENV)
    previous = signal.signal(signal.SIGTERM, _terminate)
    print(f"serving {cfg.ckpt} on http://{cfg.host}:{cfg.port} (POST /predict, GET /health)", flush=True)
    try:
        api_servers = cfg.get("api_servers")
        server.run(
            host=str(cfg.host), port=int(cfg.port), num_api_servers=int(api_servers) if api_servers else None,
            log_level=str(cfg.log_level), generate_client_file=False,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(upload_root, ignore_errors=True)
