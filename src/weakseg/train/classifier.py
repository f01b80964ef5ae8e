"""Stage `train-cls`: multi-label classifier on image-level labels only.

Model selection is label-free: the epoch with the lowest BCE on a seeded hold-out of the training images
(image-level labels) is kept. Validation mAP is logged too.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data import build_dataset, train_val_indices
from weakseg.data.torch_datasets import ClassificationDataset
from weakseg.io import write_json
from weakseg.models.classifier import CamClassifier
from weakseg.runs import StageContext
from weakseg.train.loop import fit, load_checkpoint


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Class-wise average precision averaged over classes with at least one positive (VOC-style mAP)."""
    aps = []
    for c in range(labels.shape[1]):
        y = labels[:, c]
        if y.sum() == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = y[order]
        precision = np.cumsum(hits) / (np.arange(len(hits)) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps)) if aps else float("nan")


def build_classifier(ctx_or_cfg, num_foreground: int, pretrained: bool | None = None) -> CamClassifier:
    cfg = getattr(ctx_or_cfg, "cfg", ctx_or_cfg)
    return CamClassifier.from_config(cfg.train_cls, num_foreground, pretrained=pretrained)


def load_classifier(ctx: StageContext) -> CamClassifier:
    """The trained classifier of this run (architecture from the config, weights from train-cls/model.pt)."""
    ds_classes = len(build_dataset(ctx.cfg.data, ctx.cfg.data.train_split).class_names) - 1
    model = build_classifier(ctx, ds_classes, pretrained=False)
    state = load_checkpoint(ctx.upstream("train-cls") / "model.pt")
    model.load_state_dict(state["model"])
    return model.to(ctx.device).eval()


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    tc = cfg.train_cls
    ds = build_dataset(cfg.data, cfg.data.train_split)
    train_idx, val_idx = train_val_indices(len(ds), cfg.data.val_fraction, cfg.seed)
    write_json(ctx.out / "splits.json", {"train": [ds.ids[i] for i in train_idx], "val": [ds.ids[i] for i in val_idx]})
    torch.manual_seed(cfg.seed)
    model = build_classifier(ctx, ds.num_classes - 1)
    normalize = _normalizer(model)
    train_set = ClassificationDataset(ds, train_idx, tc.image_size, train=True, seed=cfg.seed)
    val_set = ClassificationDataset(ds, val_idx, tc.image_size, train=False)

    def loss_fn(m, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(m(normalize(x)), y)

    def validate(m) -> dict:
        if len(val_set) == 0:
            return {"val_loss": 0.0}
        loader = torch.utils.data.DataLoader(val_set, batch_size=tc.batch_size, num_workers=tc.num_workers)
        losses, scores, labels = [], [], []
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            logits = m(normalize(x))
            losses.append(F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item())
            scores.append(torch.sigmoid(logits).cpu().numpy())
            labels.append(y.cpu().numpy())
        s, lab = np.concatenate(scores), np.concatenate(labels)
        return {"val_loss": sum(losses) / lab.size, "val_mAP": mean_average_precision(s, lab)}

    optimizer = torch.optim.AdamW(model.param_groups(tc.lr, tc.backbone_lr_scale, tc.weight_decay))
    t0 = time.time()
    result = fit(ctx, model, train_set, loss_fn, optimizer, tc.epochs, tc.batch_size, cfg.seed, validate=validate,
                 num_workers=tc.num_workers, checkpoint_every=tc.checkpoint_every)
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    return {
        "selection": "lowest validation BCE on image-level labels (no pixel labels)",
        "best_epoch": result.best_epoch,
        "val_loss": best.get("val_loss"),
        "val_mAP": best.get("val_mAP"),
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "train_seconds": round(time.time() - t0, 1),
    }


def _normalizer(model: CamClassifier):
    from weakseg.models.backbones import normalizer

    return normalizer(model.backbone.mean, model.backbone.std)
