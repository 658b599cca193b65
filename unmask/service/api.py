"""The inference workers' side of the service: LitServe's ``LitAPI`` around the scorer.

Each worker process loads the checkpoint once (``setup``) and scores the files of a batch of
requests (``unmask.service.batching``: every request waiting, up to ``max_batch_size``) with
the same ``Scorer`` as infer.py: the checkpoint's
preprocessing and face stage, video frame sampling and aggregation, the threshold rule
(``unmask.core.metrics.decide``) and the fallback label for a file that cannot be decoded.
So a file's JSON entry equals its row of ``infer.py scores=true``.

One entry per file, in the order sent::

    {"name": "a.jpg", "ok": true, "error": "", "prob": 0.93, "label": 1, "threshold": 0.5,
     "n_faces": 1, "type": "gan", "type_prob": 0.8, "heatmap": "<base64 PNG>"}

``n_faces`` is null without a face stage, ``type``/``type_prob`` are null without an
attribution head, ``n_frames``/``video_seconds`` come with video files, ``heatmap`` (the
forgery map of the deciding view, 8-bit grey PNG at the model's input size) with
``?heatmap=1`` on image files. A file that cannot be decoded gets ``ok: false``, the reason in
``error``, ``prob: null`` and the fallback label; its batch goes on. Should scoring the batch
fail as a whole, each file is scored alone, so one file never costs the others theirs.
"""
from __future__ import annotations

import base64
import dataclasses
import hmac
import io
import logging
import math
from pathlib import Path

import litserve as ls
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.faces.cache import FaceCache
from data.records import Record
from data.video import split_videos
from unmask.core.checkpoint import load_detector
from unmask.core.metrics import decide, parse_threshold
from unmask.core.schemas import ScoringConfig
from unmask.explain.gradcam import ForgeryMaps
from unmask.scoring.combine import VideoOptions
from unmask.scoring.scorer import ScoredBatch, Scorer
from unmask.service.batching import DrainingBatchLoop

log = logging.getLogger(__name__)


def refuse_prior_threshold(spec) -> None:
    """``prior:P`` labels a share of a whole input by rank: a service sees one request at a
    time, so it takes the stored threshold or a number."""
    if parse_threshold(spec)[0] == "prior":
        raise ValueError(f"scoring.threshold={spec} labels a share of a whole input; the service scores requests one by one: give a number or null")


def png_base64(heat: np.ndarray) -> str:
    grey = (np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Heatmaps:
    """Evaluator that keeps the deciding view's map of each image file (by path)."""

    def __init__(self) -> None:
        self.maps: dict[str, np.ndarray] = {}

    def update(self, scored: ScoredBatch) -> None:
        if scored.kind != "images" or scored.maps is None:
            return
        meta = scored.batch["meta"]
        for view in scored.deciding_views():
            if meta["ok"][view]:
                self.maps[meta["path"][view]] = scored.maps[view, 0].numpy()


def records_of(table) -> list[dict]:
    """``table.to_dict("records")`` (the same Python values) at a third of its cost: a worker
    converts every batch, and its batches are small."""
    columns = list(table.columns)
    return [dict(zip(columns, values)) for values in zip(*(table[c].tolist() for c in columns))]


def _number(value):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class DetectionAPI(ls.LitAPI):
    """``POST /predict`` on the workers. Built in the server's process and sent to each worker
    (plain settings only); the model is loaded in ``setup``."""

    def __init__(
        self, ckpt: str, scoring: ScoringConfig, video: dict | None, token: str, upload_root: str, fallback_label: int = 0,
        heatmap_method: str = "auto", loader_workers: int = 0, threads: int | None = None, max_batch_size: int = 16, batch_timeout: float = 0.0,
    ) -> None:
        batched = int(max_batch_size) > 1
        super().__init__(
            max_batch_size=int(max_batch_size), batch_timeout=float(batch_timeout), api_path="/predict",
            loop=DrainingBatchLoop() if batched else "auto",
        )
        refuse_prior_threshold(scoring.threshold)
        self.ckpt, self.scoring, self.video_config = str(ckpt), scoring, video
        self.token, self.upload_root = token, str(Path(upload_root).resolve())
        self.fallback_label, self.heatmap_method = int(fallback_label), heatmap_method
        self.loader_workers, self.threads = int(loader_workers), threads

    # ---- the worker's life -------------------------------------------------------------------------
    def setup(self, device) -> None:
        if self.threads:
            torch.set_num_threads(int(self.threads))
        device = str(device)
        device = "mps" if device.startswith("mps") else device
        loaded = load_detector(self.ckpt)
        if loaded.faces is not None:  # uploads' face detections stay in memory, for one batch (see predict)
            loaded.faces.cache = FaceCache(loaded.faces.cache.analyzer_key, None)
        options = dataclasses.replace(self.scoring, device=device, num_workers=self.loader_workers, progress=False)
        video = VideoOptions.from_config(OmegaConf.create(self.video_config) if self.video_config else None)
        self.scorer = Scorer(loaded, options, video)
        self.maps = ForgeryMaps(self.heatmap_method)
        self.model_name = Path(self.ckpt).name
        _ = self.scorer.runtime  # built now (an ONNX export, a compile), not on the first request
        log.info("worker ready on %s: %s, threshold %s", device, self.ckpt, self.scoring.threshold or loaded.threshold)

    def health(self) -> bool:
        return True

    # ---- requests ------------------------------------------------------------------------------------
    def decode_request(self, request, **kwargs) -> dict:
        """The upload gate's JSON: the token proves it came through the gate; every path must lie
        in this server's upload folder. Never raises: a batch holds other clients' requests."""
        if not isinstance(request, dict) or not hmac.compare_digest(str(request.get("token", "")), self.token):
            return {"refused": "this payload did not come through the upload gate"}
        files = []
        for f in request.get("files") or []:
            try:
                path = Path(str(f["path"])).resolve()
            except (KeyError, TypeError, OSError):
                return {"refused": "malformed file entry"}
            if self.upload_root not in [str(p) for p in path.parents]:
                return {"refused": "a file outside the upload folder"}
            files.append({"name": str(f.get("name", path.name)), "path": str(path)})
        return {"files": files, "heatmap": bool(request.get("heatmap"))}

    def batch(self, inputs):
        return list(inputs)

    def unbatch(self, output):
        return list(output)

    def predict(self, jobs, **kwargs):
        single = isinstance(jobs, dict)
        jobs = [jobs] if single else list(jobs)
        try:
            results = self.answer(jobs)
        finally:
            faces = self.scorer.loaded.faces
            if faces is not None:
                faces.cache.entries.clear()
        return results[0] if single else results

    def encode_response(self, output, **kwargs) -> dict:
        return output

    # ---- scoring -------------------------------------------------------------------------------------
    def answer(self, jobs: list[dict]) -> list[dict]:
        """One response per job: every file of every job scored in one pass of the scorer."""
        files = [f for job in jobs if "files" in job for f in job["files"]]
        heat = {f["path"] for job in jobs if job.get("heatmap") for f in job.get("files", [])}
        rows = self.rows(files, heat)
        probs = np.array([_number(rows[f["path"]].get("prob")) if f["path"] in rows else None for f in files], dtype=np.float64)
        labels, threshold = decide(probs, self.scoring.threshold, self.scorer.loaded.threshold)
        decided = {f["path"]: int(label) for f, label in zip(files, labels)}
        out = []
        for job in jobs:
            if "refused" in job:
                out.append({"error": job["refused"], "files": []})
                continue
            entries = [self.entry(f, rows.get(f["path"]), decided[f["path"]], threshold) for f in job["files"]]
            out.append({"files": entries, "threshold": float(threshold), "model": self.model_name})
        return out

    def rows(self, files: list[dict], heat: set[str]) -> dict[str, dict]:
        """Each file's scored row (by path); a batch that fails as a whole is scored file by file."""
        try:
            return self._score(files, heat)
        except Exception:  # noqa: BLE001 - one hostile file must not cost the batch its answers
            log.exception("scoring a batch of %d files failed; scoring them one by one", len(files))
        rows = {}
        for f in files:
            try:
                rows.update(self._score([f], heat))
            except Exception as e:  # noqa: BLE001
                log.exception("scoring %s failed", f["name"])
                rows[f["path"]] = {"prob": math.nan, "ok": False, "error": f"internal error while scoring ({type(e).__name__})"}
        return rows

    def _score(self, files: list[dict], heat: set[str]) -> dict[str, dict]:
        records = [Record(f["path"], source="upload") for f in files]
        images, videos = split_videos(records)
        plain = [r for r in images if r.path not in heat] + videos
        mapped = [r for r in images if r.path in heat]
        rows: dict[str, dict] = {}
        if plain:
            rows.update({r["path"]: r for r in records_of(self.scorer.score(plain, progress=False).files)})
        if mapped:
            keep = _Heatmaps()
            scores = self.scorer.score(mapped, evaluators=[keep], explainer=self.maps, runtime=self.scorer.eager_runtime(), progress=False)
            for r in records_of(scores.files):
                r["heatmap"] = png_base64(keep.maps[r["path"]]) if r["path"] in keep.maps else None
                rows[r["path"]] = r
        return rows

    def entry(self, f: dict, row: dict | None, label: int, threshold: float) -> dict:
        """The JSON of one file (``row``: its scorer row)."""
        row = row or {"prob": math.nan, "ok": False, "error": "not scored"}
        ok = bool(row.get("ok")) and _number(row.get("prob")) is not None
        error = "" if ok else str(row.get("error") or "could not be decoded")
        error = error.replace(f["path"], f["name"]).replace(self.upload_root, "<upload>")
        entry = {
            "name": f["name"], "ok": ok, "error": error, "prob": _number(row.get("prob")) if ok else None,
            "label": label if label >= 0 else self.fallback_label, "threshold": float(threshold),
            "n_faces": int(row["n_faces"]) if _number(row.get("n_faces")) is not None else None,
            "type": (row.get("type") or None) if ok and "type" in row else None,
            "type_prob": _number(row.get("type_prob")) if ok else None,
        }
        if _number(row.get("n_frames")) is not None:
            entry.update(n_frames=int(row["n_frames"]), video_seconds=_number(row.get("video_seconds")))
        if "heatmap" in row:
            entry["heatmap"] = row["heatmap"]
        return entry
