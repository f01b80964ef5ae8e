"""Weak / fully-supervised ratio on images neither segmentation model saw (`train_seg.unseen_folds`).

Each run's evaluate stage scored its model on the masked training images left out of its segmentation training
(`segmentation_unseen`, with the pooled confusion matrix). The runs of one side must hold disjoint folds; their
matrices are summed, so every image is scored once, by a model that never trained on it. Both sides must cover
the same images. Typical use: the weak preset with `train_seg.unseen_folds=1` (all masked images unseen) against
the fully-supervised preset run once per fold (`unseen_folds=K unseen_fold=k`, k = 0..K-1), which can then train
on the other folds' masks only.

    python -m bench.unseen_ratio --label voc07 --weak runs/voc07-unseen \\
        --full runs/voc07-full-f0 runs/voc07-full-f1 runs/voc07-full-f2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import write_result
from weakseg.evaluate.metrics import ConfusionMatrix
from weakseg.io import read_json


def pooled(runs: list[Path], targets: str) -> tuple[ConfusionMatrix, list[str], list[str]]:
    """-> (summed matrix, the images scored, the folds' descriptions) of runs trained on `targets` (pseudo | gt).

    The ids are the ones evaluate scored (its per-image list, from the same file as the matrix) and must equal
    those train-seg left out; the runs' folds must be disjoint."""
    cm, ids, folds = None, [], []
    for run in runs:
        if not (run / "evaluate" / "done.json").exists():
            raise SystemExit(f"{run}: its evaluate stage is not complete")
        result = read_json(run / "evaluate" / "metrics.json").get("segmentation_unseen")
        if result is None or "confusion_matrix" not in result["segmentation"]:
            raise SystemExit(f"{run}: its evaluate stage scored no unseen images (train_seg.unseen_folds was 0)")
        trained_on = read_json(run / "train-seg" / "metrics.json")["targets"]
        if trained_on != targets:
            raise SystemExit(f"{run}: its segmentation model trained on {trained_on!r} targets, not {targets!r}")
        scored = sorted(image_id for image_id, _ in result["segmentation"]["per_image_mIoU"])
        if scored != sorted(read_json(run / "train-seg" / "unseen.json")["ids"]):
            raise SystemExit(f"{run}: evaluate scored other images than train-seg left out; rerun evaluate")
        names = read_json(run / "train-seg" / "classes.json")["class_names"]
        matrix = torch.tensor(result["segmentation"]["confusion_matrix"], dtype=torch.int64)
        if cm is None:
            cm = ConfusionMatrix(len(names), names)
        elif cm.class_names != names:
            raise SystemExit(f"{run}: classes differ from {runs[0]}'s")
        overlap = set(scored) & set(ids)
        if overlap:
            raise SystemExit(f"{run}: its unseen images overlap an earlier run's ({len(overlap)}, e.g. "
                             f"{sorted(overlap)[0]}): use disjoint folds")
        cm.mat += matrix
        ids += scored
        folds.append(f"{run.name}: {result['split']}")
    return cm, sorted(ids), folds


def unseen_ratio(weak_runs: list[Path], full_runs: list[Path]) -> dict:
    """Pooled mIoU of both sides on the same unseen images and their ratio (IoU as fractions)."""
    weak, weak_ids, weak_folds = pooled(weak_runs, "pseudo")
    full, full_ids, full_folds = pooled(full_runs, "gt")
    if weak.class_names != full.class_names:
        raise SystemExit("the two sides have different classes")
    if weak_ids != full_ids:
        raise SystemExit(f"the two sides scored different images ({len(weak_ids)} weak, {len(full_ids)} fully "
                         f"supervised, {len(set(weak_ids) ^ set(full_ids))} not on both)")
    w, f = weak.compute(), full.compute()
    return {
        "images": len(weak_ids),
        "convention": "dataset-pooled confusion matrix over the unseen images, ignore_index=255",
        "weak_mIoU": w["mIoU"], "full_mIoU": f["mIoU"], "ratio_weak_over_full": w["mIoU"] / f["mIoU"],
        "per_class_IoU": {name: {"weak": w["per_class"][name]["IoU"], "full": f["per_class"][name]["IoU"]}
                          for name in weak.class_names},
        "weak_runs": weak_folds, "full_runs": full_folds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="row name; the result goes to bench/out/unseen_ratio-<label>.json")
    ap.add_argument("--weak", nargs="+", type=Path, required=True, help="weakly-supervised run(s)")
    ap.add_argument("--full", nargs="+", type=Path, required=True, help="fully-supervised run(s)")
    args = ap.parse_args()
    write_result(f"unseen_ratio-{args.label}", unseen_ratio(args.weak, args.full))


if __name__ == "__main__":
    main()
