"""Stage `train-seg`: a segmentation model trained on the pseudo-masks (CE or WeakTr gradient clipping, 255 ignored).

Mixed supervision: `gt_ratio` picks a fixed, seeded subset of training images (among those with GT masks)
whose GT masks replace their pseudo-masks for the whole run; the subset ids are recorded. Model selection is
label-free: lowest CE against the pseudo-masks of the held-out validation images.
Fully-supervised baseline (`targets: gt`): the same model trained on the GT masks of the training images that
have one (and selected on those of the held-out images), for the weak/full ratio.
Self-training (`self_training_rounds`): the trained model relabels the training images (`relabel`) and a fresh
model is trained on its labels; earlier rounds live in self_training/roundR (model) and roundR_masks (labels).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weakseg import dist
from weakseg.config import ConfigError
from weakseg.data import masked_fold, seg_dataset, train_val_indices
from weakseg.data.base import WeakSegDataset
from weakseg.data.torch_datasets import SegmentationDataset
from weakseg.io import IGNORE_INDEX, load_label_png, read_json, save_label_png, write_json
from weakseg.masks.affinity import ProbabilityWalk, load_probability_walk
from weakseg.models.backbones import normalizer
from weakseg.models.inference import SegPredictor, present_classes
from weakseg.models.segmentation import SegModel, build_seg_model
from weakseg.runs import StageContext, StageError, pending_shard, require_all_written
from weakseg.train.calibration import CALIBRATION_FILE, check_calibration, load_class_weights, prior_match
from weakseg.train.losses import build_seg_loss
from weakseg.train.loop import fit, load_checkpoint, load_classifier_backbone


def gt_subset(ds: WeakSegDataset, indices: list[int], ratio: float, seed: int) -> list[int]:
    """A fixed seeded subset of max(1, round(ratio * len(indices))) of `indices` that have a GT mask.

    The subset is a prefix of one seeded permutation of the GT-masked images: the same (seed, ratio) always
    gives the same ids, and a larger ratio gives a superset of a smaller one (10% is inside 20%).
    """
    if ratio <= 0:
        return []
    if ratio > 1:
        raise ValueError(f"train_seg.gt_ratio must be in [0, 1], got {ratio}")
    k = max(1, int(np.floor(ratio * len(indices) + 0.5)))
    with_gt = [i for i in indices if ds.has_mask(i)]
    if k > len(with_gt):
        raise ValueError(f"gt_ratio={ratio} needs {k} images with GT masks but only {len(with_gt)} have one")
    order = np.random.default_rng([seed, 31337]).permutation(len(with_gt))
    return sorted(int(with_gt[j]) for j in order[:k])


UNSEEN_FILE = "unseen.json"


def unseen_images(ctx: StageContext, ds: WeakSegDataset) -> set[int]:
    """The masked images `train_seg.unseen_folds` / `unseen_fold` keep out of training (empty when off); their
    ids go to train-seg's unseen.json, which evaluate scores the model on."""
    sc = ctx.cfg.train_seg
    if sc.unseen_folds == 0 and sc.unseen_fold == 0:
        return set()
    try:
        fold = masked_fold(ds, sc.unseen_folds, sc.unseen_fold, ctx.cfg.seed)
    except ValueError as e:
        raise ConfigError(f"train_seg.unseen_folds={sc.unseen_folds} / unseen_fold={sc.unseen_fold}: {e}") from None
    write_json(ctx.out / UNSEEN_FILE, {"folds": sc.unseen_folds, "fold": sc.unseen_fold, "seed": ctx.cfg.seed,
                                       "ids": [ds.ids[i] for i in fold],
                                       "note": "masked training images left out of segmentation training and "
                                               "selection; evaluate scores the model on these"})
    return set(fold)


def init_encoder_from_classifier(model: SegModel, path: Path) -> dict:
    """Load a weakseg classifier checkpoint's backbone tensors into the segmentation model's encoder.

    Matched by name (the encoder may wrap the timm model one level deeper, as smp's `tu-` encoders do) and
    shape; at least 90 % of the encoder's tensors must be found, otherwise the two backbones differ: an error.
    """
    encoder = model.encoder_module()
    if encoder is None:
        raise ValueError("train_seg.encoder_from_classifier: this segmentation model has no separate encoder")
    copied = load_classifier_backbone(path, encoder, "train_seg.encoder_from_classifier",
                                      "encoder tensors of train_seg.model (the classifier's backbone must be the "
                                      "same network)", names=lambda key: ("model." + key, key))
    return {"encoder_init": str(path), "encoder_init_tensors": copied,
            "encoder_tensors": len(encoder.state_dict())}


def build_optimizer(model: SegModel, sc) -> torch.optim.Optimizer:
    """`train_seg.optimizer` over the model's param groups (encoder lr scaled by encoder_lr_scale)."""
    groups = model.param_groups(sc.lr, sc.encoder_lr_scale, sc.weight_decay)
    if sc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=sc.lr)
    if sc.optimizer == "adam":
        return torch.optim.Adam(groups, lr=sc.lr)
    if sc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=sc.lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown train_seg.optimizer {sc.optimizer!r}; valid names: adamw, adam, sgd")


def load_trained_seg_model(name: str, num_classes: int, path: Path) -> SegModel:
    """The `train_seg.model` called `name` with the weights of a trained model.pt at `path` (on the CPU)."""
    model = build_seg_model(name, num_classes, pretrained=False)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model


def load_seg_model(ctx: StageContext, num_classes: int) -> SegModel:
    model = load_trained_seg_model(ctx.cfg.train_seg.model, num_classes, ctx.upstream("train-seg") / "model.pt")
    return model.to(ctx.device).eval()


def predictor_for(ctx: StageContext, model: SegModel) -> SegPredictor:
    sc = ctx.cfg.train_seg
    weights = load_class_weights(ctx.upstream("train-seg"), sc.calibration)
    walk = probability_walk_for(ctx.cfg, ctx.run_dir, ctx.device)
    return SegPredictor.from_config(model, sc, ctx.device, ctx.cfg.precision, weights, walk)


def probability_walk_for(cfg, run_dir: Path, device) -> ProbabilityWalk | None:
    """`train_seg.infer_affinity_walk` of `run_dir` (its masks stage's affinity head), or None when it is 0."""
    steps = cfg.train_seg.infer_affinity_walk
    return load_probability_walk(cfg, run_dir, steps, device) if steps else None


def relabel(ctx: StageContext, ds: WeakSegDataset, model_path: Path, indices: list[int], folder: Path,
            previous: Callable[[int], np.ndarray]) -> dict:
    """Self-training targets: the model at `model_path` labels each image of `indices` as evaluate would
    (infer_size / scales / flip, infer_crf), over background + the classes of the image's labels only; pixels
    whose top probability is below `train_seg.self_training_confidence` become 255. Writes `folder`/<id>.png
    (sharded over ranks; a killed attempt's files are kept) and `folder`.json -> {images, ignored_fraction,
    changed_fraction (of the pixels labelled in both, against `previous(i)`), seconds}."""
    sc = ctx.cfg.train_seg
    marker = folder.with_suffix(".json")
    if marker.exists():
        return read_json(marker)
    t0 = time.time()
    dist.barrier()  # model.pt is written by rank 0
    model = load_trained_seg_model(sc.model, ds.num_classes, model_path)
    walk = probability_walk_for(ctx.cfg, ctx.run_dir, ctx.device)
    predictor = SegPredictor.from_config(model, sc, ctx.device, ctx.cfg.precision, walk=walk)
    stems = [ds.ids[i] for i in indices]
    for k in tqdm(pending_shard(folder, stems, ".png"), desc=f"{ctx.stage} relabel {folder.name}",
                  disable=not dist.is_main_process(), leave=False, dynamic_ncols=True):
        i = indices[k]
        present = present_classes(ds.labels(i) > 0.5)
        confidence, labels = predictor.final_probabilities(ds.image(i), present).max(0)
        labels = labels.to(torch.uint8).numpy()
        labels[confidence.numpy() < sc.self_training_confidence] = IGNORE_INDEX
        save_label_png(folder / f"{stems[k]}.png", labels)
    require_all_written(folder, stems, ".png", f"{ctx.stage} self-training relabel")
    if dist.is_main_process():
        pixels = ignored = both = changed = 0
        for i in indices:
            new, old = load_label_png(folder / f"{ds.ids[i]}.png"), previous(i)
            labelled = (new != IGNORE_INDEX) & (old != IGNORE_INDEX)
            pixels, ignored = pixels + new.size, ignored + int((new == IGNORE_INDEX).sum())
            both, changed = both + int(labelled.sum()), changed + int((labelled & (new != old)).sum())
        write_json(marker, {"images": len(indices), "ignored_fraction": ignored / max(pixels, 1),
                            "changed_fraction": changed / max(both, 1), "seconds": round(time.time() - t0, 1)})
    dist.barrier()
    return read_json(marker)


def run(ctx: StageContext) -> dict:
    cfg, sc = ctx.cfg, ctx.cfg.train_seg
    if sc.targets not in ("pseudo", "gt"):
        raise ValueError(f"train_seg.targets must be pseudo or gt, got {sc.targets!r}")
    check_calibration(sc.calibration)
    rounds = sc.self_training_rounds
    if rounds < 0 or not 0 <= sc.self_training_confidence < 1:
        raise ValueError(f"train_seg.self_training_rounds must be >= 0 and self_training_confidence in [0, 1), got "
                         f"{rounds} and {sc.self_training_confidence}")
    if sc.self_training_init not in ("fresh", "previous") or sc.self_training_epochs < 0:
        raise ValueError(f"train_seg.self_training_init must be fresh or previous and self_training_epochs >= 0, got "
                         f"{sc.self_training_init!r} and {sc.self_training_epochs}")
    if rounds and sc.targets == "gt":
        raise ValueError("train_seg.self_training_rounds relabels pseudo-masks; it has no meaning with targets=gt")
    ds = seg_dataset(cfg.data, cfg.data.train_split)
    train_idx, val_idx = train_val_indices(len(ds), cfg.data.val_fraction, cfg.seed)
    unseen = unseen_images(ctx, ds)
    if unseen:
        train_idx = [i for i in train_idx if i not in unseen]
        val_idx = [i for i in val_idx if i not in unseen]
        if not train_idx:
            raise StageError(f"train_seg.unseen_folds={sc.unseen_folds} / unseen_fold={sc.unseen_fold} leaves no "
                             f"training image: all {len(unseen)} of them are in the unseen fold")
    criterion = build_seg_loss(sc.loss, sc.start_value, sc.window_size, sc.crop_size, sc.label_smoothing)
    mask_dir = None
    if sc.targets == "gt":
        if sc.gt_ratio > 0:
            raise ValueError("train_seg.gt_ratio mixes GT into pseudo-masks; it has no meaning with targets=gt")
        train_idx = [i for i in train_idx if ds.has_mask(i)]
        val_idx = [i for i in val_idx if ds.has_mask(i)]
        if not train_idx:
            raise StageError("train_seg.targets=gt: no training image has a GT mask")
        gt_ids = set(train_idx) | set(val_idx)
        val_key = "val_loss_vs_gt"
    else:
        mask_dir = ctx.upstream("masks") / "masks"
        gt_ids = set(gt_subset(ds, train_idx, sc.gt_ratio, cfg.seed))
        val_key = "val_loss_vs_pseudo"
    write_json(ctx.out / "classes.json", {"class_names": ds.class_names})
    write_json(ctx.out / "gt_subset.json", {"targets": sc.targets, "gt_ratio": sc.gt_ratio, "seed": cfg.seed,
                                            "ids": [ds.ids[i] for i in sorted(gt_ids) if i in set(train_idx)]})

    def reader(folder: Path | None) -> Callable[[int], np.ndarray]:
        def target(i: int) -> np.ndarray:
            if i in gt_ids:
                return ds.mask(i)
            return load_label_png(folder / f"{ds.ids[i]}.png")
        return target

    def train_round(target: Callable[[int], np.ndarray], out: Path, epochs: int, start: Path | None = None):
        """One round of training on `target`; `start`: a trained model.pt to fine-tune instead of a fresh model."""
        torch.manual_seed(cfg.seed)
        if start is not None:
            model, init_info = load_trained_seg_model(sc.model, ds.num_classes, start), {"round_init": str(start)}
        else:
            model = build_seg_model(sc.model, ds.num_classes, sc.pretrained and not sc.encoder_from_classifier)
            init_info = (init_encoder_from_classifier(model, ctx.upstream("train-cls") / "model.pt")
                         if sc.encoder_from_classifier else {})
            if sc.zero_init_head:
                try:
                    model.zero_init_classifier()
                except ValueError as e:
                    raise ConfigError(f"train_seg.zero_init_head with model {sc.model}: {e}") from None
                init_info = {**init_info, "zero_init_head": True}
        if sc.frozen_encoder_levels:
            try:
                frozen = model.freeze_encoder_levels(sc.frozen_encoder_levels)
            except ValueError as e:
                raise ConfigError(f"train_seg.frozen_encoder_levels={sc.frozen_encoder_levels}: {e}") from None
            init_info = {**init_info, "frozen_encoder_tensors": frozen}
        normalize = normalizer(model.mean, model.std)
        train_set = SegmentationDataset(ds, train_idx, target, sc.crop_size, train=True, seed=cfg.seed)
        val_set = SegmentationDataset(ds, val_idx, target, sc.crop_size, train=False)

        def loss_fn(m, batch):
            x, y = batch
            return criterion(m(normalize(x)), y)

        def validate(m) -> dict:
            loader = torch.utils.data.DataLoader(val_set, batch_size=sc.batch_size, num_workers=sc.num_workers)
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(ctx.device), y.to(ctx.device)
                loss = F.cross_entropy(m(normalize(x)), y, ignore_index=IGNORE_INDEX, reduction="sum")
                total += float(loss)
                count += int((y != IGNORE_INDEX).sum())
            return {val_key: total / max(count, 1)}

        result = fit(ctx, model, train_set, loss_fn, build_optimizer(model, sc), epochs, sc.batch_size, cfg.seed,
                     validate=validate if len(val_set) else None, select_key=val_key, num_workers=sc.num_workers,
                     checkpoint_every=sc.checkpoint_every, out=out, ema_decay=sc.ema_decay)
        return result, init_info

    t0 = time.time()
    target = reader(mask_dir)
    per_round: list[dict] = []

    def round_dir(r: int) -> Path:
        return ctx.out if r == rounds else ctx.out / "self_training" / f"round{r}"

    later_epochs = sc.self_training_epochs or sc.epochs  # of every round after round 0
    for r in range(rounds + 1):  # rounds before the last one live in self_training/; the last one is the stage's
        out = round_dir(r)
        if r < rounds and (out / "fit.json").exists():  # completed by a killed attempt
            record = read_json(out / "fit.json")
        else:
            start = round_dir(r - 1) / "model.pt" if r > 0 and sc.self_training_init == "previous" else None
            result, init_info = train_round(target, out, later_epochs if r > 0 else sc.epochs, start)
            record = {"round": r, "best_epoch": result.best_epoch, val_key: result.best_score if val_idx else None}
            if r < rounds and dist.is_main_process():
                write_json(out / "fit.json", record)
        if r < rounds:
            folder = ctx.out / "self_training" / f"round{r + 1}_masks"
            record = {**record, "relabel": relabel(ctx, ds, out / "model.pt",
                                                   [i for i in train_idx + val_idx if i not in gt_ids], folder, target)}
            target = reader(folder)
            ctx.log({"self_training_round": r, **record})
        per_round.append(record)
    calibration = calibrate(ctx, ds, val_idx, target, val_key) if sc.calibration != "none" else {}
    if sc.targets == "gt":
        selection = "lowest CE against GT masks of held-out training images (fully supervised baseline)"
    elif val_idx:
        against = f"round {rounds}'s relabelled masks" if rounds else "pseudo-masks"
        selection = f"lowest CE against the {against} of held-out training images (no pixel labels)"
    else:
        selection = "last epoch (no held-out images)"
    return {
        "model": sc.model,
        **init_info,
        "targets": sc.targets,
        "loss": sc.loss,
        **({"start_value": sc.start_value, "window_size": sc.window_size} if sc.loss == "gradient_clipping" else {}),
        "selection": selection,
        **({"ema_decay": sc.ema_decay} if sc.ema_decay else {}),
        **({"label_smoothing": sc.label_smoothing} if sc.label_smoothing else {}),
        "best_epoch": per_round[-1]["best_epoch"],
        val_key: per_round[-1][val_key],
        **({"self_training_rounds": rounds, "self_training_confidence": sc.self_training_confidence,
            "self_training_init": sc.self_training_init,
            "self_training_epochs": later_epochs, "self_training": per_round}
           if rounds else {}),
        "gt_ratio": sc.gt_ratio,
        "gt_images": len(gt_ids & set(train_idx)),
        "gt_subset_file": "gt_subset.json",
        "train_images": len(train_idx),
        **({"unseen_images": len(unseen), "unseen_file": UNSEEN_FILE} if unseen else {}),
        "train_seconds": round(time.time() - t0, 1),
        **calibration,
    }


def calibrate(ctx: StageContext, ds: WeakSegDataset, val_idx: list[int], target, val_key: str) -> dict:
    """Fit `train_seg.calibration` for the selected model.pt on the held-out images (rank 0) -> metrics."""
    sc = ctx.cfg.train_seg
    if not val_idx:
        raise StageError(f"train_seg.calibration={sc.calibration} fits on the held-out training images, but there "
                         f"are none (data.val_fraction = {ctx.cfg.data.val_fraction})")
    t0 = time.time()
    dist.barrier()  # model.pt is written by rank 0
    if dist.is_main_process():
        model = load_trained_seg_model(sc.model, ds.num_classes, ctx.out / "model.pt")
        predictor = SegPredictor.from_config(model, sc, ctx.device, ctx.cfg.precision)
        record = prior_match(lambda i: predictor.probabilities(ds.image(i)), target, val_idx, ds.num_classes)
        record["fitted_on"] = f"{len(val_idx)} held-out training images' {val_key.removeprefix('val_loss_vs_')} masks"
        write_json(ctx.out / CALIBRATION_FILE, record)
    dist.barrier()
    return {"calibration": sc.calibration, "calibration_file": CALIBRATION_FILE,
            "calibration_seconds": round(time.time() - t0, 1)}
