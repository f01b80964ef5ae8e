"""Stage `evaluate`: score CAMs, pseudo-masks and the segmentation model against pixel ground truth.

This is the only stage that reads pixel labels (evaluation only; nothing here feeds back into training).
  - CAMs on the training images that have GT: mIoU for every background threshold in the sweep, the
    best one (an oracle, labelled as such) and the label-free threshold the masks stage used;
  - pseudo-masks on the same images;
  - the segmentation model on the evaluation split, next to two baselines on that split:
    all-background, and the raw CAM of the classifier thresholded at the masks stage's threshold.
All numbers are dataset-pooled (confusion matrix over all pixels, 255 ignored).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from weakseg import dist
from weakseg.cams.generate import CamInputs, build_generator, cam_input_size, finalize_cam, present_classes
from weakseg.data import build_dataset, collapse_to_binary, masked_indices, seg_dataset
from weakseg.data.base import DataError, Subset, WeakSegDataset
from weakseg.evaluate.metrics import ConfusionMatrix, PerImageMeter, summarize_binary
from weakseg.io import IGNORE_INDEX, load_cam, load_label_png, read_json, write_json
from weakseg.masks.makers import threshold_labels
from weakseg.masks.stage import choose_threshold, upsample_cam
from weakseg.runs import StageContext, StageError


def _summary(cm: ConfusionMatrix) -> dict:
    cm.reduce_across_ranks()
    m = cm.compute()
    if cm.num_classes == 2:
        m["binary"] = summarize_binary(m, positive=cm.class_names[1], negative=cm.class_names[0])
    return m


def _as_scored(ctx: StageContext, pred: np.ndarray) -> np.ndarray:
    """Predictions in the label space of the scored dataset (binary when data.binary_masks)."""
    return collapse_to_binary(pred) if ctx.cfg.data.binary_masks else pred


def evaluate_cams(ctx: StageContext, ds: WeakSegDataset, indices: list[int], thresholds: list[float],
                  chosen: float, cam_dir: Path) -> dict:
    """`ds` is the scored (segmentation-side) view; CAMs (`cam_dir`/<id>.npz) are in the classifier's class space."""
    sweep = {t: ConfusionMatrix(ds.num_classes, ds.class_names) for t in thresholds}
    at_chosen = ConfusionMatrix(ds.num_classes, ds.class_names)
    per_image = []
    for i in tqdm(dist.shard(indices), desc="eval cams", disable=not dist.is_main_process(), dynamic_ncols=True):
        cam, classes, size = load_cam(cam_dir / f"{ds.ids[i]}.npz")
        gt = ds.mask(i)
        up = upsample_cam(cam, size)
        for t, cm in sweep.items():
            cm.update(gt, _as_scored(ctx, threshold_labels(up, classes, t)))
        pred = _as_scored(ctx, threshold_labels(up, classes, chosen))
        at_chosen.update(gt, pred)
        one = ConfusionMatrix(ds.num_classes)
        one.update(gt, pred)
        per_image.append((ds.ids[i], one.compute()["mIoU"]))
    curve = []
    for t, cm in sweep.items():
        cm.reduce_across_ranks()
        curve.append({"threshold": t, "mIoU": cm.compute()["mIoU"]})
    best = max(curve, key=lambda r: -1 if np.isnan(r["mIoU"]) else r["mIoU"])
    return {
        "images": len(indices),
        "threshold_used": chosen,
        "at_threshold_used": _summary(at_chosen),
        "sweep": curve,
        "best_threshold_oracle": best["threshold"],
        "best_mIoU_oracle": best["mIoU"],
        "oracle_note": "best threshold chosen with pixel GT: an optimistic upper bound, never used by the pipeline",
        "per_image_mIoU": dist.gather_lists(per_image),
    }


def evaluate_masks(ds: WeakSegDataset, indices: list[int], mask_dir: Path) -> dict:
    """Pseudo-masks (`mask_dir`/<id>.png) of `indices` against `ds`'s GT; ignored pixels count as background.

    Masks with ignored (255) pixels also get `on_labelled_pixels` (scored only where the mask gives a label) and
    `ignored_fraction` (of the GT's non-void pixels).
    """
    cm = ConfusionMatrix(ds.num_classes, ds.class_names)
    labelled = ConfusionMatrix(ds.num_classes, ds.class_names)
    per = PerImageMeter(ds.num_classes, ds.class_names)
    per_image = []
    for i in dist.shard(indices):
        gt, raw = ds.mask(i), load_label_png(mask_dir / f"{ds.ids[i]}.png")
        ignored = raw == IGNORE_INDEX
        pred = np.where(ignored, 0, raw)  # ignored pseudo-label pixels count as background when scored
        cm.update(gt, pred)
        labelled.update(np.where(ignored, IGNORE_INDEX, gt), pred)
        per.update(gt, pred)
        one = ConfusionMatrix(ds.num_classes)
        one.update(gt, pred)
        per_image.append((ds.ids[i], one.compute()["mIoU"]))
    out = _summary(cm)
    labelled.reduce_across_ranks()
    ignored_fraction = 1.0 - float(labelled.mat.sum()) / max(float(cm.mat.sum()), 1.0)
    if ignored_fraction > 0:
        out["ignored_fraction"] = ignored_fraction
        out["on_labelled_pixels"] = labelled.compute()
    per.reduce_across_ranks()
    out["per_image_average"] = per.compute()
    out["per_image_mIoU"] = dist.gather_lists(per_image)
    return out


def evaluate_segmentation(ctx: StageContext, eval_ds: WeakSegDataset, chosen_threshold: float,
                          split: str, confusion_matrix: bool = False) -> dict:
    """Segmentation model vs baselines (all-background; raw CAM threshold) on the masked images of `split`.

    `confusion_matrix`: also return the model's pooled matrix (rows GT, columns prediction), so that the scores
    of several runs on disjoint images can be pooled (bench.unseen_ratio)."""
    from weakseg.train.classifier import load_classifier
    from weakseg.train.segmentation import load_seg_model, predictor_for

    indices = masked_indices(eval_ds)
    if not indices:
        return {"skipped": f"split {split!r} has no pixel GT"}
    predictor = predictor_for(ctx, load_seg_model(ctx, eval_ds.num_classes))
    generator = build_generator(ctx, load_classifier(ctx))
    size = cam_input_size(ctx)
    seg = ConfusionMatrix(eval_ds.num_classes, eval_ds.class_names)
    seg_per = PerImageMeter(eval_ds.num_classes, eval_ds.class_names)
    background = ConfusionMatrix(eval_ds.num_classes, eval_ds.class_names)
    cam_base = ConfusionMatrix(eval_ds.num_classes, eval_ds.class_names)
    cam_inputs = CamInputs(eval_ds, indices, size)
    per_image = []
    mine = dist.shard(list(enumerate(indices)))
    predictions = predictor.iter_labels(eval_ds.image(i) for _, i in mine)  # the CRF maybe in worker processes
    for (k, i), pred in tqdm(zip(mine, predictions), total=len(mine), desc="eval seg",
                             disable=not dist.is_main_process(), dynamic_ncols=True):
        gt = eval_ds.mask(i)
        seg.update(gt, pred)
        seg_per.update(gt, pred)
        one = ConfusionMatrix(eval_ds.num_classes)
        one.update(gt, pred)
        per_image.append((eval_ds.ids[i], one.compute()["mIoU"]))
        background.update(gt, np.zeros_like(gt))
        x = cam_inputs[k][0][None].to(ctx.device)
        logits, cams = generator(x)
        classes = present_classes(None, logits[0])
        cam = finalize_cam(cams[0], classes, gt.shape)
        cam_base.update(gt, _as_scored(ctx, threshold_labels(cam, classes + 1, chosen_threshold)))
    out = _summary(seg)
    if confusion_matrix:
        out["confusion_matrix"] = seg.mat.tolist()
    seg_per.reduce_across_ranks()
    out["per_image_average"] = seg_per.compute()
    out["per_image_mIoU"] = dist.gather_lists(per_image)
    return {
        "split": split,
        "images": len(indices),
        "segmentation": out,
        "baseline_all_background": _summary(background),
        "baseline_cam_threshold": {**_summary(cam_base), "note": "classifier-predicted labels, raw CAM, "
                                   f"background threshold {chosen_threshold:.3f}"},
    }


def run(ctx: StageContext) -> dict:
    from weakseg.train.segmentation import UNSEEN_FILE

    cfg = ctx.cfg
    train_ds = seg_dataset(cfg.data, cfg.data.train_split)
    masked = masked_indices(train_ds)
    if cfg.data.mask_eval_split:  # score CAMs / pseudo-masks only on the train images listed in that split
        listed = set(build_dataset(cfg.data, cfg.data.mask_eval_split, validate=False).ids)
        masked = [i for i in masked if train_ds.ids[i] in listed]
        if not masked:
            raise StageError(f"data.mask_eval_split={cfg.data.mask_eval_split!r}: none of its images is a "
                             f"{cfg.data.train_split!r} image with a GT mask (CAMs exist for train images only)")
    cam_dir = ctx.upstream("cams") / "cams"
    chosen = read_json(ctx.upstream("masks") / "metrics.json").get("bg_threshold")
    if chosen is None:  # the mask maker used no CAM threshold (refiner): score CAMs at the label-free one
        chosen, _ = choose_threshold(-1.0, cam_dir, train_ds.ids)
    chosen = float(chosen)
    metrics: dict = {"convention": "dataset-pooled confusion matrix over all pixels, ignore_index=255; "
                                   "per-image averages are labelled per_image_average"}
    if masked:
        metrics["cams"] = evaluate_cams(ctx, train_ds, masked, cfg.evaluate.thresholds, chosen, cam_dir)
        metrics["pseudo_masks"] = evaluate_masks(train_ds, masked, ctx.upstream("masks") / "masks")
    else:
        metrics["cams"] = metrics["pseudo_masks"] = {"skipped": "no training image has a GT mask"}
    unseen_file = ctx.upstream("train-seg") / UNSEEN_FILE
    if unseen_file.exists():  # train_seg.unseen_folds: score the model on the masked images it never saw
        record = read_json(unseen_file)
        position = {image_id: i for i, image_id in enumerate(train_ds.ids)}
        missing = [image_id for image_id in record["ids"] if image_id not in position]
        if missing:
            raise StageError(f"{unseen_file}: {len(missing)} ids are not {cfg.data.train_split!r} images "
                             f"(first: {missing[0]})")
        unseen = evaluate_segmentation(
            ctx, Subset(train_ds, [position[image_id] for image_id in record["ids"]]), chosen,
            f"{cfg.data.train_split} (masked training images the segmentation model never saw: fold "
            f"{record['fold']} of {record['folds']})", confusion_matrix=True)
        unseen["baseline_cam_threshold"]["note"] += " (the classifier did train on these images' image labels)"
        metrics["segmentation_unseen"] = unseen
    elif masked and cfg.evaluate.segmentation_on_train:
        metrics["segmentation_train"] = evaluate_segmentation(
            ctx, Subset(train_ds, masked), chosen, f"{cfg.data.train_split} (masked training images)")
    try:
        eval_ds = seg_dataset(cfg.data, cfg.data.eval_split)
    except DataError as e:  # e.g. a withheld split: say so, do not fail the run
        metrics["segmentation"] = {"skipped": f"evaluation split unavailable: {e}"}
    else:
        metrics["segmentation"] = evaluate_segmentation(ctx, eval_ds, chosen, cfg.data.eval_split)
    metrics["summary"] = summary_rows(metrics)
    if dist.is_main_process():
        write_json(ctx.out / "summary.json", metrics["summary"])
    return metrics


def _row(what: str, m: dict, **extra) -> dict:
    row = {"what": what, "mIoU": m["mIoU"], **extra}
    if "binary" in m:
        b = m["binary"]
        row["positive_class"] = b["positive_class"]
        row["positive_IoU"] = b[f"{b['positive_class']}_IoU"]
        row["background_IoU"] = b["background_IoU"]
    return row


def summary_rows(metrics: dict) -> list[dict]:
    rows = []
    cams, masks = metrics.get("cams", {}), metrics.get("pseudo_masks", {})
    if "at_threshold_used" in cams:
        rows.append(_row("CAM (train images with GT, label-free threshold)", cams["at_threshold_used"],
                         threshold=cams["threshold_used"]))
        rows.append({"what": "CAM (train, oracle threshold: chosen with GT)", "mIoU": cams["best_mIoU_oracle"],
                     "threshold": cams["best_threshold_oracle"]})
    if "mIoU" in masks:
        rows.append(_row("pseudo-masks (train images with GT)", masks))
    for key in ("segmentation_train", "segmentation_unseen", "segmentation"):
        seg = metrics.get(key, {})
        if "segmentation" in seg:
            split = seg["split"]
            rows.append(_row(f"segmentation model ({split})", seg["segmentation"]))
            rows.append(_row(f"baseline: all background ({split})", seg["baseline_all_background"]))
            rows.append(_row(f"baseline: raw CAM threshold ({split})", seg["baseline_cam_threshold"]))
    return rows


def format_summary(rows: list[dict]) -> str:
    """Plain-text table; binary tasks get the positive-class and background IoU columns too."""
    binary = any("positive_IoU" in r for r in rows)
    width = max([len(r["what"]) for r in rows] + [10])
    head = f"{'result':<{width}}  {'mIoU':>6}"
    if binary:
        pos = next(r["positive_class"] for r in rows if "positive_class" in r)
        head += f"  {pos + ' IoU':>10}  {'bg IoU':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['what']:<{width}}  {100 * r['mIoU']:6.2f}"
        if binary:
            line += (f"  {100 * r['positive_IoU']:10.2f}  {100 * r['background_IoU']:7.2f}"
                     if "positive_IoU" in r else f"  {'':10}  {'':7}")
        if "threshold" in r:
            line += f"  (t={r['threshold']:.2f})"
        lines.append(line)
    lines.append("dataset-pooled confusion matrix, 255 ignored; the oracle row used pixel GT to pick its threshold")
    return "\n".join(lines)
