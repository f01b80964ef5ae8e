"""Stage `train-cls`: multi-label classifier on image-level labels only.

Model selection is label-free: the epoch with the lowest BCE on a seeded hold-out of the training images
(image-level labels) is kept. Validation mAP is logged too.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.config import ConfigError
from weakseg.data import DataError, build_dataset, train_val_indices
from weakseg.data.torch_datasets import ClassificationDataset
from weakseg.io import write_json
from weakseg.models.classifier import CamClassifier
from weakseg.runs import StageContext, resolve_init_from
from weakseg.train.loop import fit, load_checkpoint, load_classifier_backbone


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
    from weakseg.cams.class_specific import ClassSpecificCCAMNet
    from weakseg.cams.recam import ReCAMClassifier
    from weakseg.cams.weaktr import WeakTrNet

    return {"cam_classifier": CamClassifier, "weaktr": WeakTrNet, "ccam": CCAMNet,
            "class_specific_ccam": ClassSpecificCCAMNet, "recam": ReCAMClassifier}


def build_classifier(ctx_or_cfg, num_foreground: int, pretrained: bool | None = None):
    cfg = getattr(ctx_or_cfg, "cfg", ctx_or_cfg)
    models = classifier_models()
    if cfg.train_cls.model not in models:
        raise ConfigError(f"train_cls.model={cfg.train_cls.model!r}; valid: {', '.join(models)}")
    return models[cfg.train_cls.model].from_config(cfg.train_cls, num_foreground, pretrained=pretrained)


def check_model_for_method(cfg) -> None:
    """cams.method and train_cls.model must agree (checked before training, not after it)."""
    from weakseg.cams.methods import compatible_models

    allowed = compatible_models(cfg.cams.method)
    if cfg.train_cls.model not in allowed:
        raise ConfigError(f"cams.method={cfg.cams.method} needs train_cls.model={' or '.join(allowed)} "
                          f"(got train_cls.model={cfg.train_cls.model})")
    if cfg.train_cls.ecs and cfg.train_cls.model != "ccam":
        raise ConfigError("train_cls.ecs trains CCAM (train_cls.model=ccam); for ECS on CAMs use cams.ecs=true")
    if cfg.train_cls.recam_epochs < 0 or (cfg.train_cls.recam_epochs and cfg.train_cls.model != "recam"):
        raise ConfigError(f"train_cls.recam_epochs={cfg.train_cls.recam_epochs}: the number of ReCAM fine-tuning "
                          "epochs after the BCE ones, >= 0, and only with train_cls.model=recam")
    if cfg.train_cls.ccam_backbone not in ("frozen", "shared"):
        raise ConfigError(f"train_cls.ccam_backbone={cfg.train_cls.ccam_backbone!r}; valid: frozen, shared")
    if cfg.train_cls.weaktr_token_init not in ("auto", "replicate", "random"):
        raise ConfigError(f"train_cls.weaktr_token_init={cfg.train_cls.weaktr_token_init!r}; "
                          "valid: auto, replicate, random")


def init_backbone_from(model, path: Path) -> dict:
    """Load the `backbone.*` tensors of a weakseg classifier checkpoint into `model.backbone`.

    Tensors the target lacks (e.g. a CLS token WeakTr strips) are ignored; at least 90% of the target backbone's
    tensors must be found with the same shape, otherwise the two runs' backbones differ and this is an error.
    """
    copied = load_classifier_backbone(path, model.backbone, "train_cls.init_from", "backbone tensors of "
                                      "train_cls.backbone (same backbone name and output_stride needed)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    info = {"init_from": str(path), "init_from_sha256": digest, "init_from_tensors": copied}
    if getattr(model, "fine_tunes_a_cam_classifier", False):
        info["init_from_head"] = load_cam_head(model, path)
    return info


def load_cam_head(model, path: Path) -> int:
    """Copy a CAM classifier checkpoint's `head.*` (its BCE 1x1 head) into `model.head`; their shapes must agree."""
    state = load_checkpoint(path)["model"]
    own = model.head.state_dict()
    found = {k: state.get(f"head.{k}") for k in own}
    bad = [k for k, v in found.items() if v is None or tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"train_cls.init_from: {path} has no CAM classifier head of this shape "
                          f"(head.{', head.'.join(bad)}; train_cls.model={model.__class__.__name__} fine-tunes a "
                          "cam_classifier run with the same classes)")
    model.head.load_state_dict(found)
    return len(found)


def load_classifier(ctx: StageContext):
    """The trained classifier of this run (architecture from the config, weights from train-cls/model.pt)."""
    ds_classes = len(build_dataset(ctx.cfg.data, ctx.cfg.data.train_split).class_names) - 1
    return load_trained_classifier(ctx, ds_classes, ctx.upstream("train-cls") / "model.pt").to(ctx.device)


def load_trained_classifier(ctx_or_cfg, num_foreground: int, path: Path):
    """The classifier of the config with the weights of `path` (a train-cls model.pt), in eval mode."""
    model = build_classifier(ctx_or_cfg, num_foreground, pretrained=False)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.eval()


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    tc = cfg.train_cls
    ds = build_dataset(cfg.data, cfg.data.train_split)
    train_idx, val_idx = train_val_indices(len(ds), cfg.data.val_fraction, cfg.seed)
    write_json(ctx.out / "splits.json", {"train": [ds.ids[i] for i in train_idx], "val": [ds.ids[i] for i in val_idx]})
    # What was read, with which label conventions, and every sample skipped as bad (data.on_error=skip).
    write_json(ctx.out / "data.json", {"split": cfg.data.train_split, "dataset": ds.describe(),
                                       "skipped": ds.skipped})
    check_no_empty_class(ds, cfg.data)
    check_model_for_method(cfg)
    torch.manual_seed(cfg.seed)
    init_path = resolve_init_from(tc.init_from, cfg.runs_dir) if tc.init_from else None
    phases = {}
    if tc.model == "recam" and tc.recam_epochs > 0:
        # ReCAM's schedule: a plain BCE CAM classifier first (its own folder, so a killed run resumes either
        # phase), then the ReCAM fine-tuning from its selected weights.
        first = CamClassifier.from_config(tc, ds.num_classes - 1)
        init_info = init_backbone_from(first, init_path) if init_path else {}
        bce = _fit_classifier(ctx, first, ds, train_idx, val_idx, tc.epochs, tc.lr, ctx.out / "bce")
        phases["bce_phase"] = {k: bce[k] for k in ("best_epoch", "val_loss", "val_mAP", "train_seconds")}
        model = build_classifier(ctx, ds.num_classes - 1)
        phases["recam_init"] = init_backbone_from(model, ctx.out / "bce" / "model.pt")
        result = _fit_classifier(ctx, model, ds, train_idx, val_idx, tc.recam_epochs, tc.recam_lr)
        result["train_seconds"] = round(result["train_seconds"] + bce["train_seconds"], 1)
    else:
        model = build_classifier(ctx, ds.num_classes - 1)
        init_info = init_backbone_from(model, init_path) if init_path else {}
        result = _fit_classifier(ctx, model, ds, train_idx, val_idx, tc.epochs, tc.lr)
    return {
        **init_info,
        **phases,
        "model": tc.model,
        **result,
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "skipped_images": len(ds.skipped),
    }


def _fit_classifier(ctx: StageContext, model, ds, train_idx: list[int], val_idx: list[int], epochs: int, lr: float,
                    out: Path | None = None) -> dict:
    """Train `model` on the image labels with its own loss (BCE for a plain CamClassifier); keep the epoch of lowest
    held-out loss as `out`/model.pt (default: the stage folder). -> best epoch, its val loss / mAP, seconds."""
    cfg, tc = ctx.cfg, ctx.cfg.train_cls
    own_loss = type(model) is not CamClassifier  # WeakTr / CCAM / ReCAM: forward(x, targets) returns their loss
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

    batch_fn, special = None, None
    if getattr(model, "class_specific", False):  # class-specific CCAM: per-class batches and selection
        from weakseg.train.class_specific import ClassSpecificTraining

        special = ClassSpecificTraining(ctx, model, ds, train_idx, val_idx, normalize)
        train_set, loss_fn, validate, batch_fn = special.train_set, special.loss_fn, special.validate, special.batches

    frozen = freeze_backbone_levels(model, tc.frozen_backbone_levels) if tc.frozen_backbone_levels else 0
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
              for g in model.param_groups(lr, tc.backbone_lr_scale, tc.weight_decay)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    t0 = time.time()
    result = fit(ctx, model, train_set, loss_fn, optimizer, epochs, tc.batch_size, cfg.seed, validate=validate,
                 num_workers=tc.num_workers, checkpoint_every=tc.checkpoint_every, batch_fn=batch_fn, out=out)
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    return {
        "selection": ("lowest validation BCE on image-level labels (no pixel labels)" if not own_loss else
                      f"lowest validation {tc.model} training loss on image-level labels (no pixel labels)"),
        **(special.finish(result) if special is not None else {}),  # may state its own selection
        "best_epoch": result.best_epoch,
        "val_loss": best.get("val_loss"),
        "val_mAP": best.get("val_mAP"),
        "train_seconds": round(time.time() - t0, 1),
        **({"frozen_backbone_tensors": frozen} if frozen else {}),
    }


def freeze_backbone_levels(model, levels: int) -> int:
    """train_cls.frozen_backbone_levels on the model's timm backbone -> the number of frozen tensors."""
    freeze = getattr(getattr(model, "backbone", None), "freeze_levels", None)
    if freeze is None:
        raise ConfigError(f"train_cls.frozen_backbone_levels={levels}: {type(model).__name__} has no timm backbone "
                          "whose feature levels could be frozen")
    try:
        return freeze(levels)
    except ValueError as e:
        raise ConfigError(f"train_cls.frozen_backbone_levels={levels}: {e}") from None


def check_no_empty_class(ds, data_cfg) -> None:
    """Stop before training if a class of the class list is carried by no training image.

    The classifier cannot learn a class it never sees: no CAM, pseudo-mask or prediction would ever contain
    it and its IoU would be a silent 0, so this is an error (DataError) that says what to do, not a warning.
    """
    counts = np.zeros(ds.num_classes - 1, dtype=np.int64)
    for i in range(len(ds)):
        counts += np.asarray(ds.labels(i)) > 0
    empty = [ds.class_names[c + 1] for c in np.flatnonzero(counts == 0)]
    if not empty:
        return
    shown = ", ".join(repr(n) for n in empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    fixes = ["add training images labelled with it", "remove it from the class list (data.classes_file of a "
                                                         "folder dataset)"]
    if data_cfg.max_images:
        fixes.insert(0, f"raise data.max_images (now {data_cfg.max_images}: only a prefix of the split is used)")
    raise DataError(f"{'classes' if len(empty) > 1 else 'class'} {shown} {'are' if len(empty) > 1 else 'is'} "
                    f"carried by none of the {len(ds)} images of the training split "
                    f"{data_cfg.train_split!r}: the classifier cannot learn it, so no CAM, pseudo-mask or "
                    f"prediction would ever contain it. Fix: {'; or '.join(fixes)}; or check the labels file.")


def _normalizer(model: CamClassifier):
    from weakseg.models.backbones import normalizer

    return normalizer(model.backbone.mean, model.backbone.std)
