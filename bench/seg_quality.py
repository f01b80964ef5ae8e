"""Segmentation quality of a trained run's model under other inference settings, and with class gating.

Loads the segmentation model of `--run` (its train-seg stage) with the run's resolved config plus the given
overrides (train_seg.infer_size / infer_scales / infer_flip / infer_window), predicts the training images that
have pixel GT and scores them exactly as the evaluate stage does (dataset-pooled, 255 ignored). With `--gate`,
it also scores the same predictions with the scores of the classes an image does not contain set to zero
before the argmax: by the true image labels (a bound) and by the run's classifier's predicted labels at the
given probability thresholds. With `--crf`, also after the inference CRF (train_seg.infer_crf_* kernels) on the
probabilities. Nothing is written into the run directory.

    python -m bench.seg_quality --run runs/voc07-best --label flip-only
    python -m bench.seg_quality --run runs/voc07-best --label ms "train_seg.infer_scales=[0.75,1.0,1.25]"
    python -m bench.seg_quality --run runs/voc07-best --label gate --gate 0.05 0.1 0.2 0.3 0.5
    python -m bench.seg_quality --run runs/voc07-best-v2 --label prior --calibrate
    python -m bench.seg_quality --run runs/voc07-clsinit-enc01 --label crf --crf
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.common import masked_training_images, quality_args, run_context, write_result
from weakseg.cams.generate import CamInputs, build_generator, cam_input_size
from weakseg.data import train_val_indices
from weakseg.evaluate.metrics import ConfusionMatrix
from weakseg.io import load_label_png
from weakseg.masks.crf import crf_from_probabilities
from weakseg.models.inference import inference_crf_params, present_classes, reweight
from weakseg.train.calibration import prior_match
from weakseg.train.classifier import load_classifier
from weakseg.train.segmentation import load_seg_model, predictor_for


def gated_labels(probs: torch.Tensor, keep: np.ndarray) -> np.ndarray:
    """probs (C, H, W) with background at 0; keep (C - 1,) bool over foreground classes -> (H, W) uint8."""
    return reweight(probs, present_classes(keep)).argmax(0).to(torch.uint8).numpy()


def main() -> None:
    args = quality_args(__doc__, "completed train-cls and train-seg stages", "seg_quality",
                        gate=("--gate", dict(type=float, nargs="*", default=None, metavar="P",
                                             help="also score class gating at these classifier probabilities")),
                        calibrate=("--calibrate", dict(action="store_true",
                                                       help="also score the prior-match calibration, fitted on the "
                                                            "run's held-out images' pseudo-masks")),
                        crf=("--crf", dict(action="store_true",
                                           help="also score the inference CRF on the model's probabilities "
                                                "(train_seg.infer_crf_* kernels, every class)")))
    run_dir = Path(args.run)
    ctx = run_context(run_dir, "train-seg", "evaluate", args.overrides)
    cls_ds, ds, masked = masked_training_images(ctx.cfg)
    predictor = predictor_for(ctx, load_seg_model(ctx, ds.num_classes))
    rows = ["segmentation model"]
    calibration = None
    if args.calibrate:
        _, val_idx = train_val_indices(len(ds), ctx.cfg.data.val_fraction, ctx.cfg.seed)
        mask_dir = ctx.upstream("masks") / "masks"
        t0 = time.perf_counter()
        calibration = prior_match(lambda i: predictor.probabilities(ds.image(i)),
                                  lambda i: load_label_png(mask_dir / f"{ds.ids[i]}.png"), val_idx, ds.num_classes)
        calibration["seconds"] = round(time.perf_counter() - t0, 1)
        weights = torch.tensor(calibration["class_weights"])
        rows.append("calibrated (prior match on the held-out images' pseudo-masks)")
    if args.gate is not None:  # after the calibrated row
        generator = build_generator(ctx, load_classifier(ctx))
        inputs = CamInputs(cls_ds, masked, cam_input_size(ctx))
        rows += ["gated by the true image labels (bound)"] + [f"gated by predicted labels, p > {t}" for t in args.gate]
    crf_row = "dense CRF on the probabilities"
    calibrated_crf_row = "calibrated, then the dense CRF"
    if args.crf:
        rows.append(crf_row)
        crf_params = inference_crf_params(ctx.cfg.train_seg)
        if calibration is not None:
            rows.append(calibrated_crf_row)
    cms = {r: ConfusionMatrix(ds.num_classes, ds.class_names) for r in rows}
    model_seconds = 0.0
    for k, i in enumerate(tqdm(masked, desc=f"seg {args.label}", dynamic_ncols=True)):
        gt, image = ds.mask(i), ds.image(i)
        t0 = time.perf_counter()
        probs = predictor.probabilities(image).cpu()
        model_seconds += time.perf_counter() - t0
        cms[rows[0]].update(gt, probs.argmax(0).to(torch.uint8).numpy())
        if calibration is not None:
            cms[rows[1]].update(gt, reweight(probs, weights).argmax(0).to(torch.uint8).numpy())
        if args.gate is not None:
            x, labels = inputs[k][0][None].to(ctx.device), inputs[k][1].numpy()
            with torch.inference_mode():
                predicted = torch.sigmoid(generator(x)[0][0]).cpu().numpy()
            gate_rows = [r for r in rows if r.startswith("gated")]
            cms[gate_rows[0]].update(gt, gated_labels(probs, labels > 0.5))
            for t, row in zip(args.gate, gate_rows[1:]):
                cms[row].update(gt, gated_labels(probs, predicted > t))
        if args.crf:
            cms[crf_row].update(gt, crf_from_probabilities(image, probs.numpy(), crf_params).argmax(0).astype(np.uint8))
            if calibration is not None:
                refined = crf_from_probabilities(image, reweight(probs, weights).numpy(), crf_params)
                cms[calibrated_crf_row].update(gt, refined.argmax(0).astype(np.uint8))
    sc = ctx.cfg.train_seg
    write_result(f"seg_quality-{args.label}", {
        "run": str(run_dir), "overrides": args.overrides, "images": len(masked),
        "infer_size": sc.infer_size, "infer_scales": sc.infer_scales, "infer_flip": sc.infer_flip,
        "infer_window": sc.infer_window,
        "mIoU": {r: round(100 * cm.compute()["mIoU"], 2) for r, cm in cms.items()},
        "per_class_IoU": {r: {k: round(100 * v["IoU"], 1) for k, v in cm.compute()["per_class"].items()}
                          for r, cm in cms.items()},
        **({"calibration": calibration} if calibration is not None else {}),
        "model_seconds": round(model_seconds, 2),
        "images_per_second": round(len(masked) / model_seconds, 2),
    })


if __name__ == "__main__":
    main()
