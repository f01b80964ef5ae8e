"""Label-free class calibration of a trained segmentation model ("prior matching").

A model trained on noisy pseudo-masks tends to give the rarer classes fewer pixels than its own targets do:
where the targets disagree from image to image, background wins. Prior matching finds one weight per class
so that argmax_c(w_c * p_c) gives each class the same share of pixels as the pseudo-masks do, on held-out
training images (the ones already set aside for label-free model selection). It reads pseudo-masks only,
never pixel ground truth. Background keeps weight 1. `evaluate` and `predict` apply the weights, and
`weakseg export` adds log w_c to the exported logits (the same labels at one scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from weakseg.io import IGNORE_INDEX, read_json

CALIBRATION_FILE = "calibration.json"
CALIBRATIONS = ("none", "prior_match")


def predicted_shares(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """probs (C, N) over N pixels, weights (C,) -> (C,) share of the N pixels argmax(w * p) gives each class."""
    labels = (probs * weights[:, None]).argmax(0)
    return torch.bincount(labels, minlength=probs.shape[0]).double() / max(labels.numel(), 1)


def fit_class_weights(probs: torch.Tensor, target_shares: torch.Tensor, iterations: int = 100,
                      step: float = 0.5, max_ratio: float = 2.0) -> torch.Tensor:
    """probs (C, N), target_shares (C,) summing to 1 -> weights (C,), background (index 0) fixed at 1.

    Multiplicative updates w_c <- w_c * clip(target_c / share_c, 1/max_ratio, max_ratio) ** step; a class with
    no target pixels keeps weight 1 (nothing to match).
    """
    target = target_shares.double()
    weights = torch.ones(probs.shape[0], dtype=torch.float64)
    for _ in range(iterations):
        share = predicted_shares(probs, weights.to(probs.dtype))
        ratio = torch.where(share > 0, target / share.clamp_min(1e-12), torch.full_like(share, max_ratio))
        ratio = torch.where(target > 0, ratio.clamp(1 / max_ratio, max_ratio), torch.ones_like(ratio))
        ratio[0] = 1.0  # background is the reference: C - 1 weights fix the C shares (they sum to 1)
        weights = weights * ratio ** step
    return weights.float()


def prior_match(probabilities: Callable[[int], torch.Tensor], target: Callable[[int], np.ndarray],
                indices: Sequence[int], num_classes: int, stride: int = 4) -> dict:
    """Fit the class weights on `indices`: probabilities(i) (C, H, W), target(i) (H, W) pseudo-mask (255 =
    ignored); every `stride`-th pixel in each direction is used. Returns the record of calibration.json."""
    probs, counts = [], torch.zeros(num_classes, dtype=torch.float64)
    for i in indices:
        t = torch.as_tensor(np.asarray(target(i))[::stride, ::stride].astype(np.int64))
        p = probabilities(i)[:, ::stride, ::stride].float().cpu()
        keep = t != IGNORE_INDEX
        probs.append(p[:, keep])
        counts += torch.bincount(t[keep], minlength=num_classes)[:num_classes].double()
    if not probs or counts.sum() == 0:
        raise ValueError("prior matching needs held-out images with labelled pseudo-mask pixels; none were given")
    stacked = torch.cat(probs, dim=1)
    target_shares = counts / counts.sum()
    weights = fit_class_weights(stacked, target_shares)
    return {
        "method": "prior_match",
        "what": "class weights w: labels = argmax_c w_c * p_c; matched to the pseudo-masks' class shares on "
                "held-out training images (no pixel ground truth)",
        "class_weights": [round(float(w), 6) for w in weights],
        "target_shares": [round(float(s), 6) for s in target_shares],
        "shares_before": [round(float(s), 6) for s in predicted_shares(stacked, torch.ones(num_classes))],
        "shares_after": [round(float(s), 6) for s in predicted_shares(stacked, weights)],
        "images": len(indices),
        "pixels": int(stacked.shape[1]),
        "stride": stride,
    }


def check_calibration(method: str) -> None:
    if method not in CALIBRATIONS:
        raise ValueError(f"unknown train_seg.calibration {method!r}; valid names: {', '.join(CALIBRATIONS)}")


def load_class_weights(seg_dir: Path, method: str) -> Optional[list[float]]:
    """The class weights the train-seg stage in `seg_dir` fitted for `method` (None for `none`)."""
    check_calibration(method)
    if method == "none":
        return None
    path = Path(seg_dir) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: train_seg.calibration={method} but this train-seg stage wrote no "
                                f"calibration; run its train-seg stage again")
    return [float(w) for w in read_json(path)["class_weights"]]
