"""bench.unseen_ratio: folds of weak and fully-supervised runs pooled into one ratio on the same unseen images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.unseen_ratio import unseen_ratio

CLASSES = ["background", "cat", "dog"]


def fake_run(root: Path, name: str, targets: str, matrix: list[list[int]], ids: list[str],
             scored: list[str] | None = None) -> Path:
    """A run folder with just what the bench reads: train-seg's targets / classes / unseen ids, evaluate's result."""
    run = root / name
    (run / "train-seg").mkdir(parents=True)
    (run / "evaluate").mkdir()
    (run / "train-seg" / "metrics.json").write_text(json.dumps({"targets": targets}))
    (run / "train-seg" / "classes.json").write_text(json.dumps({"class_names": CLASSES}))
    (run / "train-seg" / "unseen.json").write_text(json.dumps({"ids": ids}))
    per_image = [[i, 0.5] for i in (ids if scored is None else scored)]
    result = {"split": f"{name} fold", "images": len(per_image),
              "segmentation": {"confusion_matrix": matrix, "per_image_mIoU": per_image}}
    (run / "evaluate" / "metrics.json").write_text(json.dumps({"segmentation_unseen": result}))
    (run / "evaluate" / "done.json").write_text("{}")
    return run


def iou(m: np.ndarray) -> np.ndarray:
    tp = np.diag(m)
    return tp / (m.sum(0) + m.sum(1) - tp)


def test_folds_are_pooled_into_one_matrix_per_side(tmp_path):
    weak = [[50, 10, 0], [5, 20, 5], [0, 0, 10]]
    full_a, full_b = [[30, 2, 0], [1, 10, 0], [0, 0, 4]], [[25, 0, 1], [0, 12, 2], [1, 1, 5]]
    result = unseen_ratio([fake_run(tmp_path, "weak", "pseudo", weak, ["a", "b", "c"])],
                          [fake_run(tmp_path, "f0", "gt", full_a, ["b"]), fake_run(tmp_path, "f1", "gt", full_b,
                                                                                      ["c", "a"])])
    w = iou(np.array(weak, float)).mean()
    f = iou(np.array(full_a, float) + np.array(full_b, float)).mean()  # pooled, not the mean of two folds' mIoU
    assert result["images"] == 3
    assert result["weak_mIoU"] == pytest.approx(w) and result["full_mIoU"] == pytest.approx(f)
    assert result["ratio_weak_over_full"] == pytest.approx(w / f)


@pytest.mark.parametrize("case, message", [
    ("overlap", "overlap an earlier run's"),
    ("fewer", "scored different images"),
    ("swapped", "trained on 'gt' targets, not 'pseudo'"),
    ("stale", "evaluate scored other images than train-seg left out"),
])
def test_mismatched_runs_are_refused(tmp_path, case, message):
    m = [[5, 1, 0], [1, 5, 0], [0, 0, 5]]
    weak = fake_run(tmp_path, "weak", "gt" if case == "swapped" else "pseudo", m, ["a", "b"],
                    scored=["a", "z"] if case == "stale" else None)
    full = [fake_run(tmp_path, "f0", "gt", m, ["a"]),
            fake_run(tmp_path, "f1", "gt", m, {"overlap": ["a", "b"], "fewer": []}.get(case, ["b"]))]
    with pytest.raises(SystemExit, match=message):
        unseen_ratio([weak], full)
