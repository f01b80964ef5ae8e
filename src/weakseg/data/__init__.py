"""Datasets behind one interface (`WeakSegDataset`) and a plain dict registry of builders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from weakseg.config import DataCfg
from weakseg.data.base import BinaryView, DataError, Subset, WeakSegDataset, check_mask, collapse_to_binary
from weakseg.data.background import WithBackgroundImages
from weakseg.data.demo import DEMO_CLASSES, DemoDataset
from weakseg.data.files import config_path, drop_bad_samples


def _build_demo(cfg: DataCfg, split: str) -> WeakSegDataset:
    n = {"train": cfg.demo_train, "test": cfg.demo_test, "val": cfg.demo_test}.get(split)
    if n is None:
        raise DataError(f"demo dataset has splits train/test/val, not {split!r}")
    return DemoDataset(split, n, cfg.demo_seed, cfg.demo_size)


# name -> builder(cfg, split) -> dataset. The real-data builders are added at the bottom of this module.
DATASETS: dict[str, Callable[[DataCfg, str], WeakSegDataset]] = {"demo": _build_demo}


def build_dataset(cfg: DataCfg, split: str, validate: bool = True) -> WeakSegDataset:
    """Build split `split` of the dataset named by ``cfg.name``.

    Steps: the builder (cheap checks: ids, label files, files exist) -> ``cfg.max_images`` prefix -> the
    ``cfg.background_dir`` images appended when `split` is ``cfg.train_split`` -> with ``on_error="skip"``
    and `validate`, every sample is decoded once and bad ones are dropped into ``ds.skipped`` (the result
    is cached per process). With ``on_error="raise"`` decoding errors surface on access, naming the file.
    """
    try:
        builder = DATASETS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid names: {', '.join(sorted(DATASETS))}") from None
    ds = builder(cfg, split)
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.name!r} split {split!r} under {cfg.root or '(built-in)'} is empty")
    if cfg.max_images and len(ds) > cfg.max_images:
        ds = Subset(ds, list(range(cfg.max_images)))
    if cfg.background_dir and split == cfg.train_split:
        root = Path(cfg.root) if cfg.root else Path(".")
        ds = WithBackgroundImages(ds, config_path(root, cfg.background_dir), cfg.background_masks, cfg.on_error)
    if cfg.on_error == "skip" and validate:
        ds = _drop_bad_samples_cached(cfg, split, ds)
        if len(ds) == 0:
            raise DataError(f"dataset {cfg.name!r} split {split!r} under {cfg.root}: every sample was skipped "
                            f"as bad ({len(ds.skipped)} problems)")
    return ds


# (config, split) -> (ids checked, indices kept, problems found) of `drop_bad_samples`, per process.
_VALIDATED: dict[tuple[str, str], tuple[list[str], list[int], list[dict]]] = {}


def _drop_bad_samples_cached(cfg: DataCfg, split: str, ds: WeakSegDataset) -> WeakSegDataset:
    key = (json.dumps(dataclasses.asdict(cfg), sort_keys=True), split)
    cached = _VALIDATED.get(key)
    if cached is None or cached[0] != ds.ids:
        checked = drop_bad_samples(ds)
        kept = list(checked.indices) if checked is not ds else list(range(len(ds)))
        new_problems = checked.skipped[len(ds.skipped):] if checked is not ds else []
        _VALIDATED[key] = (list(ds.ids), kept, new_problems)
        return checked
    _, kept, new_problems = cached
    if not new_problems:
        return ds
    sub = Subset(ds, kept)
    sub.skipped = list(ds.skipped) + new_problems
    return sub


def seg_dataset(cfg: DataCfg, split: str) -> WeakSegDataset:
    """The dataset as the segmentation side sees it (binary view when ``cfg.binary_masks``)."""
    ds = build_dataset(cfg, split)
    return BinaryView(ds, cfg.binary_name) if cfg.binary_masks else ds


def train_val_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic seeded split of range(n) into (train, val) for label-free model selection."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    val = sorted(int(i) for i in perm[:n_val])
    train = sorted(int(i) for i in perm[n_val:])
    return train, val


def masked_indices(ds: WeakSegDataset) -> list[int]:
    """Indices of `ds` whose images have a GT mask."""
    return [i for i in range(len(ds)) if ds.has_mask(i)]


def masked_fold(ds: WeakSegDataset, folds: int, fold: int, seed: int) -> list[int]:
    """Fold `fold` of `folds` seeded, near-equal folds of the indices of `ds` whose images have a GT mask.

    folds = 1 gives every masked image. Used to keep images out of segmentation training so that its score on
    them is a score on unseen images (`train_seg.unseen_folds`).
    """
    if folds < 1 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 1 and 0 <= fold < folds")
    masked = masked_indices(ds)
    if len(masked) < folds:
        raise ValueError(f"{folds} folds of the images with a GT mask, but only {len(masked)} have one")
    order = np.random.default_rng([seed, 4243]).permutation(len(masked))
    return sorted(int(masked[j]) for j in np.array_split(order, folds)[fold])


__all__ = [
    "DATASETS", "DEMO_CLASSES", "DataError", "DemoDataset", "Subset", "WeakSegDataset", "WithBackgroundImages",
    "BinaryView", "build_dataset", "check_mask", "collapse_to_binary", "drop_bad_samples", "seg_dataset",
    "masked_fold", "masked_indices", "train_val_indices",
]

# Real-data builders, registered explicitly.
from weakseg.data.coco import build_coco  # noqa: E402
from weakseg.data.folder import build_folder  # noqa: E402
from weakseg.data.pet import build_pet  # noqa: E402
from weakseg.data.voc import build_voc  # noqa: E402

DATASETS.update(voc=build_voc, pet=build_pet, coco=build_coco, folder=build_folder)
