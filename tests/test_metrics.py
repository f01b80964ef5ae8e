"""Segmentation metrics: hand-computed confusion matrices, torchmetrics agreement, pooled vs per-image, binary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weakseg.evaluate.metrics import ConfusionMatrix, PerImageMeter, summarize_binary

# torchmetrics and the evaluate stage are imported inside the tests that use them, so the DDP test's
# spawned workers (which re-import this module) start quickly.

# 3 classes; the 255 pixel is ignored even though it is predicted as class 2.
GT = np.array([[0, 0, 1, 1],
               [2, 2, 255, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [2, 0, 2, 0]], dtype=np.uint8)
# Counted (true, predicted) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0)
HAND_MATRIX = [[2, 1, 0],
               [0, 2, 0],
               [1, 0, 1]]


def test_confusion_matrix_matches_hand_counts_and_ignores_255():
    cm = ConfusionMatrix(3, ["background", "cat", "dog"])
    cm.update(GT, PRED)
    assert cm.mat.tolist() == HAND_MATRIX
    m = cm.compute()
    assert m["pixels"] == 7
    # tp = [2, 2, 1], GT totals = [3, 2, 2], predicted totals = [3, 3, 1], unions = [4, 3, 2]
    pc = m["per_class"]
    assert pc["background"]["IoU"] == pytest.approx(2 / 4)
    assert pc["cat"]["IoU"] == pytest.approx(2 / 3)
    assert pc["dog"]["IoU"] == pytest.approx(1 / 2)
    assert m["mIoU"] == pytest.approx(5 / 9)
    assert [pc[c]["Dice"] for c in ("background", "cat", "dog")] == pytest.approx([4 / 6, 4 / 5, 2 / 3])
    assert m["mDice"] == pytest.approx(32 / 45)
    assert [pc[c]["precision"] for c in ("background", "cat", "dog")] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert [pc[c]["recall"] for c in ("background", "cat", "dog")] == pytest.approx([2 / 3, 1.0, 1 / 2])
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)
    assert m["mean_class_accuracy"] == pytest.approx(13 / 18)
    assert "dataset-pooled" in m["convention"] and "255" in m["convention"]


def test_dice_is_not_half_of_iou_and_iou_is_not_dice():
    cm = ConfusionMatrix(3)
    cm.update(GT, PRED)
    pc = cm.compute()["per_class"]["1"]
    assert pc["IoU"] == pytest.approx(2 / 3) and pc["Dice"] == pytest.approx(4 / 5)
    assert pc["Dice"] == pytest.approx(2 * pc["IoU"] / (1 + pc["IoU"]))


def test_class_absent_from_gt_and_prediction_is_nan_and_skipped_in_the_mean():
    cm = ConfusionMatrix(4, ["bg", "a", "b", "never"])
    cm.update(np.array([[0, 0, 1, 2]]), np.array([[0, 1, 1, 1]]))
    m = cm.compute()
    assert m["per_class"]["never"] == {"IoU": None, "Dice": None, "precision": None, "recall": None}
    # class b is in GT but never predicted: IoU 0 and it counts in the mean
    assert m["per_class"]["b"]["IoU"] == 0.0 and m["per_class"]["b"]["precision"] is None
    assert m["mIoU"] == pytest.approx((1 / 2 + 1 / 3 + 0.0) / 3)


def test_class_predicted_but_absent_from_gt_counts_as_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 0, 1, 1]]), np.array([[0, 2, 1, 1]]))
    m = cm.compute()
    assert m["per_class"]["2"]["IoU"] == 0.0 and m["per_class"]["2"]["recall"] is None
    assert m["mIoU"] == pytest.approx((1 / 2 + 1.0 + 0.0) / 3)


def test_an_all_ignored_image_adds_nothing():
    cm = ConfusionMatrix(2)
    cm.update(np.full((3, 3), 255, np.uint8), np.ones((3, 3), np.uint8))
    m = cm.compute()
    assert cm.mat.sum() == 0 and m["pixels"] == 0
    assert math.isnan(m["mIoU"]) and math.isnan(m["pixel_accuracy"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_torchmetrics_multiclass_jaccard_on_random_label_maps(seed):
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(seed)
    n = 5
    ours = ConfusionMatrix(n)
    tm_none = MulticlassJaccardIndex(num_classes=n, average="none", ignore_index=255)
    tm_macro = MulticlassJaccardIndex(num_classes=n, average="macro", ignore_index=255)
    for _ in range(3):
        gt = rng.integers(0, n - 1, size=(17, 23)).astype(np.uint8)  # class n-1 is never in GT ...
        noise = rng.integers(0, n - 1, size=gt.shape).astype(np.uint8)  # ... nor predicted
        pred = np.where(rng.random(gt.shape) < 0.5, gt, noise)  # half right, so IoUs are not all tiny
        gt[rng.random(gt.shape) < 0.1] = 255
        ours.update(gt, pred)
        t, p = torch.from_numpy(gt).long()[None], torch.from_numpy(pred).long()[None]
        tm_none.update(p, t)
        tm_macro.update(p, t)
    m = ours.compute()
    expected = tm_none.compute().tolist()
    got = [m["per_class"][str(c)]["IoU"] for c in range(n)]
    assert got[:-1] == pytest.approx(expected[:-1], abs=1e-6)
    # torchmetrics writes 0 for a class with an empty union; we write None and leave it out of the mean
    assert got[-1] is None and expected[-1] == 0.0
    assert m["mIoU"] == pytest.approx(tm_macro.compute().item(), abs=1e-6)


def _pooled_vs_per_image_case():
    # image A: all class 1, predicted perfectly (background absent from both -> no background IoU)
    a_gt, a_pred = np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 1]])
    # image B: three background pixels and one class-1 pixel, everything predicted background
    b_gt, b_pred = np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]])
    return [(a_gt, a_pred), (b_gt, b_pred)]


def test_pooled_and_per_image_miou_differ_with_exact_values():
    pooled = ConfusionMatrix(2, ["background", "thing"])
    per_image = PerImageMeter(2, ["background", "thing"])
    image_mious = []
    for gt, pred in _pooled_vs_per_image_case():
        pooled.update(gt, pred)
        per_image.update(gt, pred)
        one = ConfusionMatrix(2)
        one.update(gt, pred)
        image_mious.append(one.compute()["mIoU"])
    # pooled matrix [[3, 0], [1, 4]]: background 3/4, thing 4/5
    p = pooled.compute()
    assert p["per_class"]["background"]["IoU"] == pytest.approx(3 / 4)
    assert p["per_class"]["thing"]["IoU"] == pytest.approx(4 / 5)
    assert p["mIoU"] == pytest.approx(0.775)
    # per-image, per class: background only in B (3/4); thing in A (1) and B (0) -> 1/2
    q = per_image.compute()
    assert q["per_class_IoU"] == pytest.approx({"background": 0.75, "thing": 0.5})
    assert q["mIoU"] == pytest.approx(0.625)
    assert q["images"] == 2 and "not dataset-pooled" in q["convention"]
    # mean of per-image mIoUs (the per_image_mIoU lists of metrics.json): A = 1, B = (3/4 + 0) / 2
    assert image_mious == pytest.approx([1.0, 0.375])
    assert np.mean(image_mious) == pytest.approx(0.6875)


def _binary_result():
    cm = ConfusionMatrix(2, ["background", "pet"])
    gt = np.array([[0, 0, 0, 0], [1, 1, 0, 0]])
    pred = np.array([[0, 0, 1, 1], [1, 1, 0, 0]])  # both pet pixels found, two background pixels called pet
    cm.update(gt, pred)
    return cm


def test_binary_summary_names_the_positive_class_and_reports_both_ious_separately():
    m = _binary_result().compute()
    b = summarize_binary(m, positive="pet", negative="background")
    assert b["positive_class"] == "pet" and b["negative_class"] == "background"
    assert b["pet_IoU"] == pytest.approx(2 / 4)  # tp 2, union 2 + 4 - 2
    assert b["background_IoU"] == pytest.approx(4 / 6)  # tp 4, union 6 + 4 - 4
    assert b["pet_Dice"] == pytest.approx(4 / 6)
    assert b["pet_precision"] == pytest.approx(2 / 4) and b["pet_recall"] == pytest.approx(1.0)
    assert m["mIoU"] == pytest.approx((2 / 4 + 4 / 6) / 2)  # neither IoU is the mean


def test_evaluate_stage_summary_row_for_binary_shows_pet_iou_and_background_iou():
    from weakseg.evaluate.stage import _summary, summary_rows

    m = _summary(_binary_result())
    assert m["binary"]["positive_class"] == "pet"
    (row,) = summary_rows({"pseudo_masks": m})
    assert row["positive_class"] == "pet"
    assert row["positive_IoU"] == pytest.approx(2 / 4)
    assert row["background_IoU"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("positive,negative", [("pet", "pet"), ("cat", "background"), ("pet", "bg")])
def test_binary_summary_rejects_wrong_class_names(positive, negative):
    with pytest.raises(ValueError, match="two distinct classes"):
        summarize_binary(_binary_result().compute(), positive=positive, negative=negative)


def test_binary_summary_rejects_a_three_class_result():
    cm = ConfusionMatrix(3, ["background", "cat", "dog"])
    cm.update(GT, PRED)
    with pytest.raises(ValueError, match="two-class"):
        summarize_binary(cm.compute(), positive="cat")


def test_prediction_outside_the_classes_is_an_error_not_silently_clamped():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="prediction holds class 255"):
        cm.update(np.array([[0, 1]]), np.array([[0, 255]]))
    # a 255 prediction on an ignored GT pixel is fine: that pixel is not scored
    cm.update(np.array([[0, 255]]), np.array([[0, 255]]))
    assert cm.mat.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_target_outside_the_classes_and_shape_mismatch_are_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target holds class 7"):
        cm.update(np.array([[0, 7]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="target holds class -1"):
        cm.update(np.array([[0, -1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_class_name_count_must_match_num_classes():
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        ConfusionMatrix(3, ["background", "cat"])
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        PerImageMeter(3, ["background", "cat"])


def test_accepts_torch_tensors_and_non_contiguous_numpy_views():
    a = ConfusionMatrix(3)
    a.update(torch.from_numpy(GT.astype(np.int64)), torch.from_numpy(PRED.astype(np.int64)))
    b = ConfusionMatrix(3)
    b.update(GT[:, ::-1], PRED[:, ::-1])  # negative strides
    assert a.mat.tolist() == HAND_MATRIX == b.mat.tolist()


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gt, pred = _pooled_vs_per_image_case()[rank]
        cm, per = ConfusionMatrix(2), PerImageMeter(2)
        cm.update(gt, pred)
        per.update(gt, pred)
        cm.reduce_across_ranks()
        per.reduce_across_ranks()
        if rank == 0:
            torch.save({"mat": cm.mat, "per_image_mIoU": per.compute()["mIoU"], "images": per.images}, out_file)
    finally:
        tdist.destroy_process_group()


def test_reduce_across_two_gloo_ranks_equals_single_process_result(tmp_path):
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert result["mat"].tolist() == [[3, 0], [1, 4]]
    assert result["per_image_mIoU"] == pytest.approx(0.625)
    assert result["images"] == 2


def test_pseudo_mask_scores_report_the_ignored_pixels_apart(tmp_path):
    from types import SimpleNamespace

    from weakseg.evaluate.stage import evaluate_masks
    from weakseg.io import IGNORE_INDEX, save_label_png

    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [255, 0, 1, 1]], dtype=np.uint8)
    mask = np.array([[0, 255, 1, 1], [0, 255, 255, 1], [1, 0, 0, 1]], dtype=np.uint8)
    save_label_png(tmp_path / "a.png", mask)
    ds = SimpleNamespace(num_classes=2, class_names=["background", "cat"], ids=["a"], mask=lambda i: gt)
    out = evaluate_masks(ds, [0], tmp_path)
    # all 11 non-void pixels, the 3 ignored ones as background: bg 5 TP + 2 FP, cat 4 TP + 2 FN
    assert out["mIoU"] == pytest.approx((5 / 7 + 4 / 6) / 2)
    assert out["ignored_fraction"] == pytest.approx(3 / 11)
    # the 8 labelled non-void pixels: bg 3 TP + 1 FP, cat 4 TP + 1 FN
    labelled = out["on_labelled_pixels"]
    assert labelled["mIoU"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    save_label_png(tmp_path / "a.png", np.where(mask == IGNORE_INDEX, 0, mask))
    assert "on_labelled_pixels" not in evaluate_masks(ds, [0], tmp_path)
