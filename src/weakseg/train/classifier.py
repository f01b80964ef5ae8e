"""Stage `train-cls`: multi-label classifier on image-level labels only.

Model selection is label-free: the epoch with the lowest BCE on a seeded hold-out of the training images
(image-level labels) is kept. Validation mAP is logged too.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.config import ConfigError
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


def classifier_models() -> dict:
    """train_cls.model -> model class (each has from_config, param_groups; the non-default ones also
    forward(x, targets) -> loss and loss_and_logits(x, y))."""
    from weakseg.cams.ccam import CCAMNet
    from weakseg.cams.weaktr import WeakTrNet

    return {"cam_classifier": CamClassifier, "weaktr": WeakTrNet, "ccam": CCAMNet}


def build_classifier(ctx_or_cfg, num_foreground: int, pretrained: bool | None = None):
    cfg = getattr(ctx_or_cfg, "cfg", ctx_or_cfg)
    models = classifier_models()
    if cfg.train_cls.model not in models:
        raise ConfigError(f"train_cls.model={cfg.train_cls.model!r}; valid: {', '.join(models)}")
    return models[cfg.train_cls.model].from_config(cfg.train_cls, num_foreground, pretrained=pretrained)


def check_model_for_method(cfg) -> None:
    """cams.method and train_cls.model must agree (checked before training, not after it)."""
    from weakseg.cams.methods import required_model

    need = required_model(cfg.cams.method)
    if cfg.train_cls.model != need:
        raise ConfigError(f"cams.method={cfg.cams.method} needs train_cls.model={need} "
                          f"(got train_cls.model={cfg.train_cls.model})")
    if cfg.train_cls.ecs and cfg.train_cls.model != "ccam":
        raise ConfigError("train_cls.ecs trains CCAM (train_cls.model=ccam); for ECS on CAMs use cams.ecs=true")


def load_classifier(ctx: StageContext):
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
    # What was read, with which label conventions, and every sample skipped as bad (data.on_error=skip).
    write_json(ctx.out / "data.json", {"split": cfg.data.train_split, "dataset": ds.describe(),
                                       "skipped": ds.skipped})
    check_model_for_method(cfg)
    torch.manual_seed(cfg.seed)
    model = build_classifier(ctx, ds.num_classes - 1)
    own_loss = not isinstance(model, CamClassifier)  # WeakTr / CCAM: forward(x, targets) returns their loss
    normalize = _normalizer(model)
    train_set = ClassificationDataset(ds, train_idx, tc.image_size, train=True, seed=cfg.seed)
    val_set = ClassificationDataset(ds, val_idx, tc.image_size, train=False)

    def loss_fn(m, batch):
        x, y = batch
        if own_loss:
            return m(normalize(x), targets=y)
        return F.binary_cross_entropy_with_logits(m(normalize(x)), y)

    def validate(m) -> dict:
        if len(val_set) == 0:
            return {"val_loss": 0.0}
        loader = torch.utils.data.DataLoader(val_set, batch_size=tc.batch_size, num_workers=tc.num_workers)
        losses, scores, labels = [], [], []
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            if own_loss:
                loss, logits = m.loss_and_logits(normalize(x), y)
                losses.append(loss.item() * y.numel())
            else:
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
        "selection": ("lowest validation BCE on image-level labels (no pixel labels)" if not own_loss else
                      f"lowest validation {tc.model} training loss on image-level labels (no pixel labels)"),
        "model": tc.model,
        "best_epoch": result.best_epoch,
        "val_loss": best.get("val_loss"),
        "val_mAP": best.get("val_mAP"),
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "skipped_images": len(ds.skipped),
        "train_seconds": round(time.time() - t0, 1),
    }


def _normalizer(model: CamClassifier):
    from weakseg.models.backbones import normalizer

    return normalizer(model.backbone.mean, model.backbone.std)
