"""Score image files with a loaded checkpoint: the shared path of infer.py and evaluate.py.

Without a face stage each file is one sample. With one (the checkpoint's ``faces``), each
file becomes its whole image plus up to ``faces.max_faces`` face crops; their scores go back
to one row per file (``FacePipeline.combine``: max over faces, then with the whole image),
and the row says how many faces were found and whether the whole image had to stand in.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data.dataset import WHOLE_IMAGE, ImageDataset
from data.faces.pipeline import FacePipeline
from data.records import Record
from unmask.predict import predict


def combine_face_rows(df: pd.DataFrame, faces: FacePipeline) -> pd.DataFrame:
    """Rows per (file, face) -> one row per file, in first-seen order. Adds ``n_faces``,
    ``face_fallback`` (no face found: the whole image decided), ``whole_prob`` and
    ``face_probs`` (';'-joined, most confident face first)."""
    out = []
    for _, part in df.groupby("path", sort=False):
        whole = part[part["face_index"] == WHOLE_IMAGE]
        crops = part[part["face_index"] >= 0].sort_values("face_index")
        ok = part["ok"].to_numpy(bool)
        whole_prob = float(whole["prob"].iloc[0]) if len(whole) and bool(whole["ok"].iloc[0]) else None
        face_probs = crops.loc[crops["ok"], "prob"].to_numpy(float)
        # the row that decides carries the per-row extras (forgery type...): the most suspicious one
        row = part.loc[part["prob"].fillna(-1.0).idxmax()].to_dict() if ok.any() else part.iloc[0].to_dict()
        row.update(
            prob=faces.combine(face_probs, whole_prob) if ok.any() else float("nan"),
            ok=bool(ok.any()),
            error="" if ok.any() else str(part["error"].iloc[0]),
            n_faces=int(len(crops)),
            face_fallback=bool(len(crops) == 0),
            whole_prob=np.nan if whole_prob is None else whole_prob,
            face_probs=";".join(f"{p:.4f}" for p in face_probs),
        )
        row.pop("face_index", None)
        row.pop("face_found", None)
        out.append(row)
    return pd.DataFrame(out)


def score_image_records(
    loaded, records: list[Record], batch_size: int = 64, num_workers: int = 2, device: str = "auto", amp: bool = True,
    runtime=None, draft_decode: bool = True, progress: bool = True,
) -> tuple[pd.DataFrame, float]:
    """One row per record (see ``unmask.predict.predict`` for the columns) and the seconds
    spent scoring (face detection included)."""
    import time

    start = time.perf_counter()
    faces = loaded.faces
    if faces is not None:
        faces.prepare([r.path for r in records], progress=progress)
    dataset = ImageDataset(records, loaded.canonical, train=False, draft_decode=draft_decode, faces=faces, expand_faces=faces is not None)
    df, _ = predict(loaded.detector, dataset, batch_size=batch_size, num_workers=num_workers, device=device, amp=amp, runtime=runtime, progress=progress)
    if faces is not None and len(df):
        df = combine_face_rows(df, faces)
    return df, time.perf_counter() - start
