"""What the audit measures per file, and the one function that measures a file.

``MEASURES`` names every column with the spec clause it answers and a one-line definition
(the report prints them); ``measure_file`` decodes a file and fills the columns; a file that
cannot be decoded gets a row with ``ok`` False and the reason, a file without a face gets the
image measures and NaN face measures with a ``note``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data.dataset import load_mask
from data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from data.faces.pipeline import FacePipeline
from data.faces.types import Face
from data.records import Record
from data.video import FrameSampler, is_video, probe_video, read_frames
from unmask.audit import consistency, diversity, face_quality, identity, video
from unmask.audit.image_quality import cap_size, image_measures, to_gray
from unmask.audit.regions import face_mask, is_mesh

log = logging.getLogger(__name__)

# Bump when a measure's definition changes: cached rows of other versions are not reused.
MEASURE_VERSION = 1


@dataclass(frozen=True)
class Measure:
    column: str
    clause: str  # the spec's clause (T/ZFIDA 0003-2024)
    title: str
    definition: str
    headline: bool = False  # plotted per class and generator, and balanced in tertiles


MEASURES = (
    Measure("ssim", "7.1.6", "SSIM", "structural similarity with the manifest's `reference` image (scikit-image; 1 = identical)", True),
    Measure("psnr", "7.1.6", "PSNR", "peak signal-to-noise ratio against the reference, dB (scikit-image)"),
    Measure("sharpness", "7.1.6", "sharpness", "variance of the Laplacian of the grey image at the working size (no reference)", True),
    Measure("noise_sigma", "7.1.6", "noise level", "Gaussian noise standard deviation, grey levels (scikit-image's wavelet estimator)", True),
    Measure("jpeg_quality", "7.1.6", "JPEG quality", "IJG quality 1-100 whose luminance table matches the file's quantisation table; empty for non-JPEG", True),
    Measure("width", "7.1.7", "width", "pixels"),
    Measure("height", "7.1.7", "height", "pixels"),
    Measure("megapixels", "7.1.7", "megapixels", "width x height / 10^6"),
    Measure("upscale_factor", "7.1.7", "up-scaling", "largest k in 1.5-8 such that the spectrum above 1/k of the band limit is nearly empty (1: native)"),
    Measure("effective_short_side", "7.1.7", "effective resolution", "short side / up-scaling factor: the resolution the pixels carry", True),
    Measure("resolution_class", "7.1.7", "resolution class", "band of the effective short side: <128, 128-255, 256-511, 512-1023, >=1024 px (an up-scaled image keeps its original class)"),
    Measure("nominal_resolution_class", "7.1.7", "nominal class", "band of the stored short side"),
    Measure("n_faces", "7.1.3", "faces", "faces the face stage keeps (the most confident is measured)"),
    Measure("face_width", "7.1.3", "face width", "landmarks' extent (FaceMesh), else the detector's box, pixels"),
    Measure("face_area_share", "7.1.3", "face area share", "area of the landmarks' convex hull (else the box) / image area", True),
    Measure("face_share_band", "7.1.3", "face share band", "<30 %, 30-50 % or >50 % of the image"),
    Measure("inter_ocular_px", "7.1.8", "inter-ocular distance", "distance of the eye centres, pixels"),
    Measure("completeness", "7.1.8", "completeness", "share of the landmarks inside the frame"),
    Measure("face_quality", "7.1.8", "face quality", "0-100: 100 x completeness x mean of the size, sharpness, brightness, contrast and pose sub-scores (q_*)", True),
    Measure("q_size", "7.1.8", "size score", "inter-ocular distance 15 px -> 0 ... 60 px -> 1"),
    Measure("q_sharpness", "7.1.8", "sharpness score", "s / (s + 100), s = Laplacian variance of the face normalised to 160 px"),
    Measure("q_brightness", "7.1.8", "brightness score", "1 for a mean face grey in 100-170, falling to 0 at 0 and 270"),
    Measure("q_contrast", "7.1.8", "contrast score", "grey standard deviation of the face / 40, at most 1"),
    Measure("q_pose", "7.1.8", "pose score", "1 - max(|yaw|, |pitch|) / 45 degrees, at least 0"),
    Measure("yaw", "7.1.8", "yaw", "degrees, cv2.solvePnP of 6 FaceMesh points on a generic 3-D face"),
    Measure("pitch", "7.1.8", "pitch", "degrees, as yaw"),
    Measure("roll", "7.1.8", "roll", "degrees, tilt of the eye line"),
    *(Measure(f"local_quality_{p}", "7.1.9", f"local quality: {p}", f"0-100, mean of the sharpness and contrast scores of the {p} region"
              + (" (a band above the face oval)" if p == "hair" else ""), p in ("eyes", "mouth"))
      for p in ("eyes", "brows", "nose", "mouth", "hair")),
    Measure("skin_tone_consistency", "7.1.10", "skin-tone consistency", "mean a*b* histogram similarity (1 - Bhattacharyya) of the forehead with each cheek; empty for grey images", True),
    Measure("contour_blending", "7.1.11", "contour blending", "100 / max(jaw seam, 1): 100 when the jaw line is no stronger an edge than its surroundings", True),
    Measure("jaw_seam", "7.1.11", "jaw seam", "mean gradient on the jaw line / mean gradient beside it (sharpness of the contour)"),
    Measure("jaw_continuity", "7.1.11", "jaw continuity", "1 - coefficient of variation of the edge strength along the jaw line"),
    Measure("fg_bg_colour_consistency", "7.1.12", "foreground/background colour", "Lab histogram similarity (1 - Bhattacharyya) of the face and the background (outside the face grown by 20 %)", True),
    Measure("spectrum_consistency", "7.1.13", "spectrum consistency", "1 / (1 + mean |log2| ratio) of the face's and the background's FFT energy shares in low (<1/16), mid (<1/4), high bands", True),
    Measure("identity_similarity", "7.1.14", "identity similarity", "cosine similarity of face embeddings (InceptionResnetV1) of the file and its reference"),
    Measure("akd", "7.1.16", "geometric coherence (AKD)", "mean landmark distance of each frame to the video's mean face after similarity alignment, in inter-ocular distances"),
    Measure("identity_consistency", "7.1.17", "identity consistency", "mean cosine similarity of each frame's face embedding with the video's mean"),
    Measure("motion_continuity", "7.1.18", "motion continuity", "(median + 1) / (max + 1) of the Farneback-flow warp residuals of neighbouring frames"),
    Measure("lighting_consistency", "7.1.19", "lighting consistency", "mean correlation of grey histograms of the face (the whole frame unless every frame has one) in neighbouring frames"),
    Measure("mask_blending", "7.1.20", "tampered-region blending", "100 / max(seam of the mask's boundary, 1)"),
    Measure("mask_colour_consistency", "7.1.20", "tampered-region colour", "Lab histogram similarity of the masked region and a ring around it"),
    Measure("mask_noise_ratio", "7.1.20", "tampered-region noise", "median |Laplacian| inside the mask / in the ring around it"),
    Measure("skin_tone_ita", "7.1.3", "skin tone (ITA)", "individual typology angle atan((L*-50)/b*) of the forehead and cheeks, degrees; empty for grey images", True),
    Measure("skin_tone", "7.1.3", "skin tone band", "light (ITA > 41), medium (10-41), dark (<= 10)"),
)
MEASURE_BY_COLUMN = {m.column: m for m in MEASURES}


@dataclass
class MeasureContext:
    """What every file is measured with (``configs/audit``, the data set's face stage)."""

    faces: FacePipeline | None = None
    identity: identity.IdentityModel | None = None
    max_side: int = 1024  # whole-image measures run with the long side at most this (area filter)
    video_frames: int = 32  # consecutive frames read from the start of a video
    max_pixels: int = DEFAULT_MAX_PIXELS

    def settings(self) -> dict:
        """Everything that changes a row (part of the cache key)."""
        faces = None
        if self.faces is not None:
            f = self.faces
            faces = {"analyzer": f.analyzer.key, "min_score": f.min_score, "min_face_px": f.min_face_px, "max_faces": f.max_faces}
        return {"version": MEASURE_VERSION, "faces": faces, "identity": self.identity.digest if self.identity else None,
                "max_side": self.max_side, "video_frames": self.video_frames, "max_pixels": self.max_pixels}


def reference_path(record: Record, root: Path | None) -> str | None:
    """The file's reference image (manifest column ``reference``, relative to the data root)."""
    ref = (record.extra or {}).get("reference")
    if not ref:
        return None
    path = Path(ref)
    return str(path if path.is_absolute() or root is None else root / path)


def scaled_face(face: Face, r: float) -> Face:
    return Face(face.box * r, face.score, face.landmarks * r)


def face_measures(rgb: np.ndarray, capped: np.ndarray, r: float, face: Face, ctx: MeasureContext, grey: bool) -> dict:
    """Every measure of one face of a decoded image (``capped``: the image at the working
    size, ``r`` its scale)."""
    eye_indices = ctx.faces.eye_indices if ctx.faces is not None else None
    sizes = face_quality.size_measures(face, rgb.shape[:2], eye_indices)
    norm = face_quality.normalise_face(rgb, face)
    row = {**sizes, **face_quality.face_quality(norm, sizes, rgb.shape[:2])}
    if is_mesh(face.landmarks):
        row |= face_quality.local_quality(norm)
    row |= consistency.skin_tone_consistency(norm, grey) | consistency.contour_blending(norm) | diversity.skin_tone(norm, grey)
    small = scaled_face(face, r)
    fg = face_mask(capped.shape[:2], small.landmarks if is_mesh(small.landmarks) else None, small.box)
    bg = consistency.background_mask(capped.shape[:2], face_quality.face_extent(small))
    row |= consistency.foreground_background(capped, fg, bg)
    return row


def _top_face(ctx: MeasureContext, path: str | None, rgb: np.ndarray) -> tuple[list[Face], str]:
    if ctx.faces is None:
        return [], "no face stage (faces=none): face measures left out"
    faces = ctx.faces.faces(path, rgb) if path is not None else ctx.faces.detect(rgb)
    return faces, "" if faces else "no face found"


def measure_image(record: Record, ctx: MeasureContext, reference: str | None) -> dict:
    rgb = decode_image(record.path, ctx.max_pixels)
    capped, r = cap_size(rgb, ctx.max_side)
    ref_rgb, notes = None, []
    if reference is not None:
        try:
            ref_rgb = decode_image(reference, ctx.max_pixels)
        except ImageDecodeError as e:
            notes.append(f"reference not decodable: {e}")
    row = image_measures(rgb, to_gray(capped), record.path, ref_rgb)
    grey = diversity.is_grey(rgb)
    row["greyscale"] = grey
    if record.mask:
        try:
            mask = load_mask(record.mask, (rgb.shape[1], rgb.shape[0]))
            if r < 1:
                mask = cv2.resize(mask, capped.shape[1::-1], interpolation=cv2.INTER_NEAREST)
            row |= consistency.mask_blending(capped, mask > 0.5)
        except ImageDecodeError as e:
            notes.append(f"mask not decodable: {e}")
    faces, note = _top_face(ctx, record.path, rgb)
    row["n_faces"] = len(faces)
    if note:
        notes.append(note)
    if faces:
        row |= face_measures(rgb, capped, r, faces[0], ctx, grey)
        if ctx.identity is not None and ref_rgb is not None:
            ref_faces, _ = _top_face(ctx, reference, ref_rgb)
            if ref_faces:
                e = ctx.identity.embed([identity.face_chip(rgb, faces[0]), identity.face_chip(ref_rgb, ref_faces[0])])
                row["identity_similarity"] = identity.cosine(e[0], e[1])
            else:
                notes.append("no face found in the reference")
    row["note"] = "; ".join(notes)
    return row


def measure_video(record: Record, ctx: MeasureContext) -> dict:
    """The video measures over the first ``video_frames`` consecutive frames; the image and
    face measures of the middle one."""
    info = probe_video(record.path, ctx.max_pixels)
    sampler = FrameSampler(num_frames=None, fps=max(info.fps, 1e-3), max_frames=ctx.video_frames)
    info, frames = read_frames(record.path, sampler, ctx.max_pixels)
    pixels = [f.pixels for f in frames]
    middle = pixels[len(pixels) // 2]
    capped, r = cap_size(middle, ctx.max_side)
    row = image_measures(middle, to_gray(capped), record.path, None)
    grey = diversity.is_grey(middle)
    row.update(greyscale=grey, n_frames=len(frames), video_seconds=info.duration, fps=info.fps)
    row |= video.motion_continuity(pixels)
    found = [(_top_face(ctx, None, p)[0] or [None])[0] for p in pixels]
    faces = [f for f in found if f is not None]
    eye_indices = ctx.faces.eye_indices if ctx.faces is not None else None
    row["akd"] = video.average_keypoint_distance([f.landmarks for f in faces], eye_indices) if len(faces) >= 2 else math.nan
    # The face in every frame when it is found in every frame; else the whole frames.
    all_faces = len(faces) == len(found)
    row |= video.lighting_consistency([identity.face_chip(p, f) for p, f in zip(pixels, found)] if all_faces else pixels)
    if ctx.identity is not None and len(faces) >= 2:
        row["identity_consistency"] = identity.consistency(ctx.identity.embed([identity.face_chip(p, f) for p, f in zip(pixels, found) if f is not None]))
    mid_face = found[len(found) // 2]
    row["n_faces"] = int(mid_face is not None)
    note = "" if faces else ("no face found" if ctx.faces is not None else "no face stage (faces=none): face measures left out")
    if mid_face is not None:
        row |= face_measures(middle, capped, r, mid_face, ctx, grey)
    elif faces:
        note = "no face in the middle frame"
    row["note"] = note
    return row


def measure_file(record: Record, ctx: MeasureContext, reference: str | None = None) -> dict:
    """One row of measures for ``record``: ``ok``, ``error``, ``note``, ``seconds`` and the
    measure columns. Never raises for a bad file."""
    start = time.perf_counter()
    kind = "video" if is_video(record.path) else "image"
    try:
        row = measure_video(record, ctx) if kind == "video" else measure_image(record, ctx, reference)
        row.update(ok=True, error="")
    except ImageDecodeError as e:  # VideoDecodeError included
        row = {"ok": False, "error": str(e), "note": ""}
    except Exception as e:  # noqa: BLE001 - one odd file must not end an audit of thousands
        log.warning("audit of %s failed: %s", record.path, e, exc_info=log.isEnabledFor(logging.DEBUG))
        row = {"ok": False, "error": f"measure failed ({type(e).__name__}: {e})", "note": "", "retry": True}
    row.update(kind=kind, seconds=time.perf_counter() - start)
    return row
