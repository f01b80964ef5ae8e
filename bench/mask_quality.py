"""Pseudo-mask quality of a run's CAMs under other mask settings (maker, CRF unary and parameters, ignore band).

Takes the CAMs of `--run` (its cams stage), applies the run's resolved config plus the given overrides
(masks.*), makes masks for the training images that have pixel GT only, and scores them exactly as the
evaluate stage does (dataset-pooled, 255 ignored, ignored pseudo-label pixels counted as background). The
background threshold is chosen as the masks stage chooses it: label-free (Otsu over every training image's
CAMs) unless masks.bg_threshold is set. Nothing is written into the run directory: a maker's own files (the
refiner's model and log) go to a temporary folder with the masks, or to --work DIR, where a later row finds
and reuses a trained refiner or affinity head (one folder per training setting). With --cams DIR (CAMs kept by
`bench.cam_quality --keep-cams DIR`, the masked images' only) the masks come from those CAMs, and the
label-free threshold is Otsu over them alone, as cam_quality chooses it.

    python -m bench.mask_quality --run runs/voc07-best --label crf-labels masks.crf_unary=labels
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import masked_training_images, quality_args, run_context, write_result
from weakseg.evaluate.stage import evaluate_masks
from weakseg.masks.makers import build_mask_maker
from weakseg.masks.stage import MaskJob, choose_mask_threshold, make_masks, threshold_maps_dir


def main() -> None:
    args = quality_args(__doc__, "a completed cams stage", "mask_quality",
                        work=("--work", {"default": "", "help": "folder for the maker's own files (default: a "
                                         "temporary one); rows that share it reuse a trained refiner / affinity "
                                         "head, so give each training setting its own"}),
                        cams=("--cams", {"default": "", "help": "CAMs of the masked images kept by "
                                         "`bench.cam_quality --keep-cams` (default: the run's cams stage)"}))
    run_dir = Path(args.run)
    ctx = run_context(run_dir, "train-cls" if args.cams else "cams", "masks", args.overrides)
    cfg = ctx.cfg
    ds, scored_ds, masked = masked_training_images(cfg)
    cam_dir = Path(args.cams) if args.cams else ctx.upstream("cams") / "cams"
    threshold_ids = [ds.ids[i] for i in masked] if args.cams else ds.ids
    with tempfile.TemporaryDirectory() as tmp:
        # a maker's own files (the refiner's model, its log) stay out of the run
        ctx.out = Path(args.work) if args.work else Path(tmp) / "masks"
        (ctx.out / "masks").mkdir(parents=True, exist_ok=True)
        maker = build_mask_maker(cfg.masks)
        prepare_metrics = maker.prepare(ctx, ds, cam_dir)
        threshold, rule = None, "n/a"
        if maker.needs_threshold:
            threshold, rule, _ = choose_mask_threshold(ctx, ds, threshold_maps_dir(maker, cam_dir, cfg.masks),
                                                         threshold_ids)
            maker.bg_threshold = threshold
        job = MaskJob(ds, maker, cam_dir, ctx.out / "masks", cfg.data.binary_masks)
        t0 = time.perf_counter()
        workers = cfg.masks.num_workers if maker.parallel_safe else 0
        make_masks(job, masked, workers, desc=f"masks {args.label}")
        seconds = time.perf_counter() - t0
        maker.finish()
        scored = evaluate_masks(scored_ds, masked, ctx.out / "masks")
    write_result(f"mask_quality-{args.label}", {
        "run": str(run_dir),
        "overrides": args.overrides,
        "method": cfg.masks.method,
        "images": len(masked),
        "threshold_rule": rule,
        "threshold": None if threshold is None else round(threshold, 4),
        "mIoU": round(100 * scored["mIoU"], 2),
        "per_class_IoU": {k: round(100 * v["IoU"], 1) for k, v in scored["per_class"].items()},
        "binary": scored.get("binary"),
        "ignored_fraction": round(scored.get("ignored_fraction", 0.0), 4),
        "mIoU_on_labelled_pixels": (round(100 * scored["on_labelled_pixels"]["mIoU"], 2)
                                    if "on_labelled_pixels" in scored else None),
        "seconds": round(seconds, 1),
        "workers": workers,
        "prepare": {k: v for k, v in prepare_metrics.items() if not isinstance(v, (list, dict))},
    })


if __name__ == "__main__":
    main()
