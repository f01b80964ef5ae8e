"""CAM quality and throughput of a trained run's classifier under other CAM settings (scales, flip, ECS, method).

Loads the classifier of `--run` (its train-cls stage), applies the run's resolved config plus the given
overrides, generates CAMs for the training images that have pixel GT only (the 209 VOC2007 masks, the 300
Pet trimaps), and scores them exactly as the evaluate stage does: dataset-pooled, 255 ignored, at the
label-free Otsu threshold of these images' CAMs, plus the GT-chosen oracle of the sweep (a bound only).
Nothing is written into the run directory; the CAMs go to a temporary folder, or to --keep-cams DIR, where
`bench.mask_quality --cams DIR` makes and scores pseudo-masks from them without a full cams stage.

    python -m bench.cam_quality --run runs/voc07-best --label cam-1.0 cams.scales=[1.0] cams.flip=false
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.common import masked_training_images, quality_args, run_context, write_result
from weakseg.cams.generate import CamInputs, build_generator, cam_batches, cam_input_size, save_batch
from weakseg.evaluate.stage import evaluate_cams
from weakseg.masks.stage import choose_threshold
from weakseg.train.classifier import load_classifier


def main() -> None:
    args = quality_args(__doc__, "a completed train-cls stage", "cam_quality",
                        keep=("--keep-cams", {"default": "", "help": "keep the CAMs in this folder (for "
                                              "`bench.mask_quality --cams`) instead of a temporary one"}))
    run_dir = Path(args.run)
    ctx = run_context(run_dir, "train-cls", "cams", args.overrides)
    cfg = ctx.cfg
    cls_ds, scored_ds, masked = masked_training_images(cfg)
    ids = [cls_ds.ids[i] for i in masked]

    generator = build_generator(ctx, load_classifier(ctx))
    loader = torch.utils.data.DataLoader(CamInputs(cls_ds, masked, cam_input_size(ctx)),
                                         batch_size=cfg.cams.batch_size, num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        cam_dir = Path(args.keep_cams) if args.keep_cams else Path(tmp) / "cams"
        model_seconds = 0.0
        for batch, logits, cams, seconds in cam_batches(ctx, generator, loader, f"cams {args.label}"):
            model_seconds += seconds
            save_batch(cam_dir, cls_ds.ids, batch, logits, cams, cfg.cams.store_stride)
        threshold, rule = choose_threshold(-1.0, cam_dir, ids)
        scored = evaluate_cams(ctx, scored_ds, masked, cfg.evaluate.thresholds, threshold, cam_dir)
    write_result(f"cam_quality-{args.label}", {
        "run": str(run_dir),
        "overrides": args.overrides,
        "method": cfg.cams.method, "scales": cfg.cams.scales, "flip": cfg.cams.flip, "ecs": cfg.cams.ecs,
        "images": len(masked),
        "threshold_rule": f"{rule}, over these {len(masked)} images' CAMs",
        "threshold": round(threshold, 4),
        "mIoU_label_free": round(100 * scored["at_threshold_used"]["mIoU"], 2),
        "mIoU_oracle": round(100 * scored["best_mIoU_oracle"], 2),
        "oracle_threshold": scored["best_threshold_oracle"],
        "binary": scored["at_threshold_used"].get("binary"),
        "model_seconds": round(model_seconds, 2),
        "batch_size": cfg.cams.batch_size,
        "kept_freed_heap": args.kept_freed_heap,
        "images_per_second": round(len(masked) / model_seconds, 2),
    })


if __name__ == "__main__":
    main()
