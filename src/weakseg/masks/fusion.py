"""Class-agnostic + class-specific fusion (the ensemble Ensembled-WSSS describes but never built).

A class-agnostic map F (e.g. CCAM's foreground probability) decides *where* the object is; the class CAMs
decide *which* of the image's classes it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weakseg.io import IGNORE_INDEX


def fused_scores(foreground: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """foreground (H, W) in [0, 1], cams (K, H, W) -> (K, H, W) scores F * cams_k / max_j cams_j.

    Their max over k is F (where the object is) and their argmax is the CAMs' argmax (which class), so
    thresholding them at t is the fusion rule, and they can feed any maker that reads class scores (the CRF's
    softmax unary over [t, scores]). Where every CAM is 0 all K scores equal F.
    """
    if foreground.shape != cams.shape[1:]:
        raise ValueError(f"foreground map {foreground.shape} does not match the CAMs {cams.shape[1:]}")
    eps = np.float32(1e-6)
    share = (cams + eps) / (cams.max(axis=0, keepdims=True) + eps)
    return (foreground[None] * share).astype(np.float32)


def fuse_agnostic_specific(foreground: np.ndarray, cams: np.ndarray, classes: np.ndarray, fg_threshold: float,
                           ignore_low: float = -1.0, ignore_high: float = -1.0) -> np.ndarray:
    """foreground (H, W) in [0, 1], cams (K, H, W), classes (K,) 1-based ids -> (H, W) uint8 labels.

    label = classes[argmax_k cams] where foreground > fg_threshold, else 0 (background); pixels whose
    foreground value lies in [ignore_low, ignore_high) are 255. An image with no class is all background.
    """
    if foreground.shape != cams.shape[1:]:
        raise ValueError(f"foreground map {foreground.shape} does not match the CAMs {cams.shape[1:]}")
    if cams.shape[0] == 0:
        out = np.zeros(foreground.shape, dtype=np.uint8)
    else:
        labels = np.asarray(classes, dtype=np.uint8)[cams.argmax(axis=0)]
        out = np.where(foreground > fg_threshold, labels, 0).astype(np.uint8)
    if 0 <= ignore_low < ignore_high:
        out[(foreground >= ignore_low) & (foreground < ignore_high)] = IGNORE_INDEX
    return out


def foreground_map(agnostic_cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class-agnostic CAM file's planes (K', h, w) -> (H, W) foreground map: max over planes, bilinear.

    A class-agnostic method stores one map (or the same map per present class), so the max is that map.
    """
    from weakseg.masks.stage import upsample_cam

    if agnostic_cam.shape[0] == 0:
        return np.zeros(size, dtype=np.float32)
    return upsample_cam(agnostic_cam, size).max(axis=0)


def resolve_cams_dir(run: str, runs_dir: str | Path) -> Path:
    """`run` = a run name under `runs_dir`, a run folder, or its `cams` stage folder -> the folder of CAM files."""
    if not run:
        raise ValueError("masks.method=fusion needs masks.agnostic_cams_run: the run (name or path) whose cams "
                         "stage produced the class-agnostic foreground maps (e.g. cams.method=ccam)")
    tried = []
    for base in (Path(run), Path(runs_dir) / run):
        for stage_dir in (base / "cams", base):
            tried.append(str(stage_dir))
            if (stage_dir / "done.json").exists() and (stage_dir / "cams").is_dir():
                return stage_dir / "cams"
    raise FileNotFoundError(f"masks.agnostic_cams_run={run!r}: no completed cams stage found (looked for done.json "
                            f"in {', '.join(tried)})")
