"""Stage `train-seg`: a segmentation model trained on the pseudo-masks (CE, 255 ignored).

Mixed supervision: `gt_ratio` picks a fixed, seeded subset of training images (among those with GT masks)
whose GT masks replace their pseudo-masks for the whole run; the subset ids are recorded. Model selection is
label-free: lowest CE against the pseudo-masks of the held-out validation images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data import build_dataset, train_val_indices
from weakseg.data.base import WeakSegDataset
from weakseg.data.torch_datasets import SegmentationDataset
from weakseg.io import IGNORE_INDEX, load_label_png, write_json
from weakseg.models.backbones import normalizer
from weakseg.models.inference import SegPredictor
from weakseg.models.segmentation import SegModel, build_seg_model
from weakseg.runs import StageContext
from weakseg.train.loop import fit, load_checkpoint


def gt_subset(ds: WeakSegDataset, indices: list[int], ratio: float, seed: int) -> list[int]:
    """A fixed seeded subset: round(ratio * len(indices)) of the images that have a GT mask."""
    if ratio <= 0:
        return []
    if ratio > 1:
        raise ValueError(f"train_seg.gt_ratio must be in [0, 1], got {ratio}")
    k = int(round(ratio * len(indices)))
    with_gt = [i for i in indices if ds.has_mask(i)]
    if k > len(with_gt):
        raise ValueError(f"gt_ratio={ratio} needs {k} images with GT masks but only {len(with_gt)} have one")
    rng = np.random.default_rng([seed, 31337])
    return sorted(int(i) for i in rng.choice(with_gt, size=k, replace=False))


def load_seg_model(ctx: StageContext, num_classes: int) -> SegModel:
    model = build_seg_model(ctx.cfg.train_seg.model, num_classes, pretrained=False)
    model.load_state_dict(load_checkpoint(ctx.upstream("train-seg") / "model.pt")["model"])
    return model.to(ctx.device).eval()


def predictor_for(ctx: StageContext, model: SegModel) -> SegPredictor:
    sc = ctx.cfg.train_seg
    return SegPredictor(model, sc.infer_size or sc.crop_size, sc.infer_scales, sc.infer_flip, ctx.device)


def run(ctx: StageContext) -> dict:
    cfg, sc = ctx.cfg, ctx.cfg.train_seg
    ds = build_dataset(cfg.data, cfg.data.train_split)
    mask_dir: Path = ctx.upstream("masks") / "masks"
    train_idx, val_idx = train_val_indices(len(ds), cfg.data.val_fraction, cfg.seed)
    gt_ids = set(gt_subset(ds, train_idx, sc.gt_ratio, cfg.seed))
    write_json(ctx.out / "classes.json", {"class_names": ds.class_names})
    write_json(ctx.out / "gt_subset.json", {"gt_ratio": sc.gt_ratio, "ids": [ds.ids[i] for i in sorted(gt_ids)]})

    def target(i: int) -> np.ndarray:
        if i in gt_ids:
            return ds.mask(i)
        return load_label_png(mask_dir / f"{ds.ids[i]}.png")

    torch.manual_seed(cfg.seed)
    model = build_seg_model(sc.model, ds.num_classes, sc.pretrained)
    normalize = normalizer(model.mean, model.std)
    train_set = SegmentationDataset(ds, train_idx, target, sc.crop_size, train=True, seed=cfg.seed)
    val_set = SegmentationDataset(ds, val_idx, target, sc.crop_size, train=False)

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(normalize(x)), y, ignore_index=IGNORE_INDEX)

    def validate(m) -> dict:
        if len(val_set) == 0:
            return {"val_loss_vs_pseudo": 0.0}
        loader = torch.utils.data.DataLoader(val_set, batch_size=sc.batch_size, num_workers=sc.num_workers)
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            loss = F.cross_entropy(m(normalize(x)), y, ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((y != IGNORE_INDEX).sum())
        return {"val_loss_vs_pseudo": total / max(count, 1)}

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.weight_decay)
    t0 = time.time()
    result = fit(ctx, model, train_set, loss_fn, optimizer, sc.epochs, sc.batch_size, cfg.seed, validate=validate,
                 select_key="val_loss_vs_pseudo", num_workers=sc.num_workers, checkpoint_every=sc.checkpoint_every)
    return {
        "model": sc.model,
        "selection": "lowest CE against pseudo-masks of held-out training images (no pixel labels)",
        "best_epoch": result.best_epoch,
        "val_loss_vs_pseudo": result.best_score,
        "gt_ratio": sc.gt_ratio,
        "gt_images": len(gt_ids),
        "train_images": len(train_idx),
        "train_seconds": round(time.time() - t0, 1),
    }
