"""Would gating the segmentation model by image-level classes help? Scores a trained run's segmentation model
on the training images that have pixel GT, as the evaluate stage does, with the scores of the classes an image
does not contain set to zero before the argmax: no gate, the true image labels (a bound), and the classifier's
predicted labels at several probability thresholds (what `predict` could do on unlabelled images).

    python -m bench.seg_class_gate --run runs/voc07-best
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.common import masked_training_images, run_context, write_result
from weakseg.cams.generate import CamInputs, build_generator, cam_input_size
from weakseg.evaluate.metrics import ConfusionMatrix
from weakseg.train.classifier import load_classifier
from weakseg.train.segmentation import load_seg_model, predictor_for


def gated_labels(probs: torch.Tensor, keep: np.ndarray) -> np.ndarray:
    """probs (C, H, W) with background at 0; keep (C - 1,) bool over foreground classes -> (H, W) uint8."""
    gate = torch.ones(probs.shape[0])
    gate[1:] = torch.as_tensor(keep, dtype=torch.float32)
    return (probs * gate[:, None, None]).argmax(0).to(torch.uint8).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory with completed train-cls and train-seg stages")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    args = ap.parse_args()

    run_dir = Path(args.run)
    ctx = run_context(run_dir, "train-seg", "evaluate")
    cfg = ctx.cfg
    cls_ds, ds, masked = masked_training_images(cfg)
    predictor = predictor_for(ctx, load_seg_model(ctx, ds.num_classes))
    generator = build_generator(ctx, load_classifier(ctx))
    inputs = CamInputs(cls_ds, masked, cam_input_size(ctx))
    rows = ["no gate", "true image labels (bound)"] + [f"predicted labels, p > {t}" for t in args.thresholds]
    cms = {r: ConfusionMatrix(ds.num_classes, ds.class_names) for r in rows}
    for k, i in enumerate(tqdm(masked, desc="seg class gate", dynamic_ncols=True)):
        gt, probs = ds.mask(i), predictor.probabilities(ds.image(i)).cpu()
        x, labels = inputs[k][0][None].to(ctx.device), inputs[k][1].numpy()
        with torch.inference_mode():
            logits, _ = generator(x)
        predicted = torch.sigmoid(logits[0]).cpu().numpy()
        cms[rows[0]].update(gt, probs.argmax(0).to(torch.uint8).numpy())
        cms[rows[1]].update(gt, gated_labels(probs, labels > 0.5))
        for t, row in zip(args.thresholds, rows[2:]):
            cms[row].update(gt, gated_labels(probs, predicted > t))
    write_result(f"seg_class_gate-{run_dir.name}", {
        "run": str(run_dir), "images": len(masked),
        "mIoU": {r: round(100 * cm.compute()["mIoU"], 2) for r, cm in cms.items()},
    })


if __name__ == "__main__":
    main()
