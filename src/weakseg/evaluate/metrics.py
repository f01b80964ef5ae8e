"""Segmentation metrics from a dataset-pooled confusion matrix (the field's convention), 255 ignored.

`ConfusionMatrix` accumulates counts over every pixel of every image, then derives per-class IoU, Dice/F1,
precision, recall and pixel accuracy. `PerImageMeter` gives the per-image-averaged alternative, explicitly
named as such. Confusion matrices are summed across DDP ranks with `reduce_across_ranks`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from weakseg import dist
from weakseg.io import IGNORE_INDEX


class ConfusionMatrix:
    """mat[t, p] = number of pixels of true class t predicted as p, pooled over the dataset."""

    def __init__(self, num_classes: int, class_names: Optional[list[str]] = None):
        self.num_classes = num_classes
        self.class_names = _names(num_classes, class_names)
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray) -> None:
        """target, pred: same-shape integer label maps; target == 255 is ignored.

        A prediction outside 0..num_classes-1 (including 255) is an error: map it to a class first.
        """
        target, pred = _flat_long(target), _flat_long(pred)
        if target.shape != pred.shape:
            raise ValueError(f"target and prediction shapes differ: {tuple(target.shape)} vs {tuple(pred.shape)}")
        keep = target != IGNORE_INDEX
        target, pred = target[keep], pred[keep]
        n = self.num_classes
        if target.numel():
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"target holds class {lo if lo < 0 else hi}, outside 0..{n - 1} (+255 ignore)")
            lo, hi = int(pred.min()), int(pred.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"prediction holds class {lo if lo < 0 else hi}, outside 0..{n - 1}; "
                                 "map ignored/unknown predictions to a class before scoring")
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def reduce_across_ranks(self) -> None:
        """Sum the matrix over DDP ranks (call once, on every rank)."""
        self.mat = _all_reduce(self.mat)

    def compute(self) -> dict:
        """Per-class and mean metrics. Classes absent from both GT and prediction get NaN (skipped in means)."""
        m = self.mat.double()
        tp = m.diag()
        gt = m.sum(1)
        pr = m.sum(0)
        union = gt + pr - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = (tp / union).numpy()
            dice = (2 * tp / (gt + pr)).numpy()
            precision = (tp / pr).numpy()
            recall = (tp / gt).numpy()
        iou[union.numpy() == 0] = np.nan
        total = float(m.sum())
        out = {
            "convention": "dataset-pooled confusion matrix, ignore_index=255",
            "pixels": int(total),
            "mIoU": _nanmean(iou),
            "mDice": _nanmean(dice),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_class_accuracy": _nanmean(recall),
            "per_class": {
                name: {"IoU": _f(iou[i]), "Dice": _f(dice[i]), "precision": _f(precision[i]),
                       "recall": _f(recall[i])}
                for i, name in enumerate(self.class_names)
            },
        }
        return out


def _names(num_classes: int, class_names: Optional[list[str]]) -> list[str]:
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for {num_classes} classes: {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique: {names}")
    return names


def _flat_long(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().long().flatten()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64).ravel())


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (NCCL needs it on the GPU for the call); returns a CPU tensor."""
    t = t.clone()
    if dist.is_distributed() and torch.distributed.get_backend() == "nccl":
        return dist.all_reduce_sum(t.cuda()).cpu()
    return dist.all_reduce_sum(t)


def _f(x: float) -> Optional[float]:
    return None if np.isnan(x) else float(x)


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


class PerImageMeter:
    """Per-image IoU per class averaged over the images where the class is present in GT or prediction.

    This is the *per-image-averaged* alternative (as in Ensembled-WSSS), not the field's pooled mIoU.
    """

    def __init__(self, num_classes: int, class_names: Optional[list[str]] = None):
        self.num_classes = num_classes
        self.class_names = _names(num_classes, class_names)
        self.sums = np.zeros(num_classes)
        self.counts = np.zeros(num_classes)
        self.images = 0

    def update(self, target: np.ndarray, pred: np.ndarray) -> None:
        cm = ConfusionMatrix(self.num_classes)
        cm.update(target, pred)
        m = cm.mat.double()
        tp, union = m.diag(), m.sum(0) + m.sum(1) - m.diag()
        present = (union > 0).numpy()
        self.sums[present] += (tp[present] / union[present]).numpy()
        self.counts[present] += 1
        self.images += 1

    def reduce_across_ranks(self) -> None:
        """Sum the per-class sums and counts over DDP ranks (call once, on every rank)."""
        packed = torch.from_numpy(np.concatenate([self.sums, self.counts, [self.images]])).double()
        packed = _all_reduce(packed).numpy()
        n = self.num_classes
        self.sums, self.counts, self.images = packed[:n].copy(), packed[n:2 * n].copy(), int(round(packed[-1]))

    def compute(self) -> dict:
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.sums / self.counts
        return {
            "convention": "per-image IoU averaged over images (not dataset-pooled)",
            "images": self.images,
            "mIoU": _nanmean(iou),
            "per_class_IoU": {n: _f(iou[i]) for i, n in enumerate(self.class_names)},
        }


def summarize_binary(metrics: dict, positive: str, negative: str = "background") -> dict:
    """For two-class tasks: name the positive class explicitly and report both IoUs separately."""
    pc = metrics["per_class"]
    if len(pc) != 2:
        raise ValueError(f"summarize_binary needs a two-class result, got classes {list(pc)}")
    if positive == negative or positive not in pc or negative not in pc:
        raise ValueError(f"positive {positive!r} and negative {negative!r} must be the two distinct classes "
                         f"{list(pc)}")
    return {
        "positive_class": positive,
        "negative_class": negative,
        f"{positive}_IoU": pc[positive]["IoU"],
        f"{negative}_IoU": pc[negative]["IoU"],
        f"{positive}_Dice": pc[positive]["Dice"],
        f"{positive}_precision": pc[positive]["precision"],
        f"{positive}_recall": pc[positive]["recall"],
    }
