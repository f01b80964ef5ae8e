"""Pseudo-mask makers: CAMs of an image's present classes -> a label map.

Interface (`MaskMaker.make`): cams (K, H, W) float in [0, 1] at image size, classes (K,) 1-based class ids,
image (H, W, 3) uint8 RGB (the original pixels, never a normalised tensor) -> (H, W) uint8 label map
with 255 = ignore.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from weakseg.config import MaskCfg
from weakseg.io import IGNORE_INDEX


def threshold_labels(cams: np.ndarray, classes: np.ndarray, bg_threshold: float, ignore_low: float = -1.0,
                     ignore_high: float = -1.0) -> np.ndarray:
    """Background plane at `bg_threshold` + argmax over the present classes.

    Pixels whose top CAM score lies in [ignore_low, ignore_high) are uncertain and written as 255.
    """
    h, w = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((h, w), dtype=np.uint8)
    top = cams.max(axis=0)
    labels = np.asarray(classes, dtype=np.uint8)[cams.argmax(axis=0)]
    out = np.where(top >= bg_threshold, labels, 0).astype(np.uint8)
    if 0 <= ignore_low < ignore_high:
        out[(top >= ignore_low) & (top < ignore_high)] = IGNORE_INDEX
    return out


class MaskMaker:
    """Base class: `make(cams, classes, image) -> (H, W) uint8`. `needs_threshold` makers get one set."""

    needs_threshold = True

    def __init__(self, cfg: MaskCfg):
        self.cfg = cfg
        self.bg_threshold = cfg.bg_threshold

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ThresholdMaker(MaskMaker):
    """Background threshold + argmax, with an optional ignore band."""

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray) -> np.ndarray:
        return threshold_labels(cams, classes, self.bg_threshold, self.cfg.ignore_low, self.cfg.ignore_high)


MAKERS: dict[str, Callable[[MaskCfg], MaskMaker]] = {
    "threshold": ThresholdMaker,
}


def build_mask_maker(cfg: MaskCfg) -> MaskMaker:
    try:
        builder = MAKERS[cfg.method]
    except KeyError:
        raise ValueError(f"unknown mask maker {cfg.method!r}; valid names: {', '.join(sorted(MAKERS))}") from None
    return builder(cfg)


def otsu_threshold(hist: np.ndarray) -> float:
    """Otsu's threshold of a histogram over [0, 1] (bin centres); label-free."""
    hist = hist.astype(np.float64)
    bins = len(hist)
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    return float((k + 1) / bins)
