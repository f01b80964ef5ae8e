"""Datasets behind one interface (`WeakSegDataset`) and a plain dict registry of builders."""

from __future__ import annotations

from typing import Callable

import numpy as np

from weakseg.config import DataCfg
from weakseg.data.base import DataError, Subset, WeakSegDataset, check_mask
from weakseg.data.demo import DEMO_CLASSES, DemoDataset


def _build_demo(cfg: DataCfg, split: str) -> WeakSegDataset:
    n = {"train": cfg.demo_train, "test": cfg.demo_test, "val": cfg.demo_test}.get(split)
    if n is None:
        raise DataError(f"demo dataset has splits train/test/val, not {split!r}")
    return DemoDataset(split, n, cfg.demo_seed, cfg.demo_size)


# name -> builder(cfg, split) -> dataset. Real-data builders register themselves in their modules below.
DATASETS: dict[str, Callable[[DataCfg, str], WeakSegDataset]] = {"demo": _build_demo}


def build_dataset(cfg: DataCfg, split: str) -> WeakSegDataset:
    """Build split `split` of the dataset named by ``cfg.name``; honours ``cfg.max_images``."""
    try:
        builder = DATASETS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid names: {', '.join(sorted(DATASETS))}") from None
    ds = builder(cfg, split)
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.name!r} split {split!r} under {cfg.root or '(built-in)'} is empty")
    if cfg.max_images and len(ds) > cfg.max_images:
        ds = Subset(ds, list(range(cfg.max_images)))
    return ds


def train_val_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic seeded split of range(n) into (train, val) for label-free model selection."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    val = sorted(int(i) for i in perm[:n_val])
    train = sorted(int(i) for i in perm[n_val:])
    return train, val


__all__ = [
    "DATASETS", "DEMO_CLASSES", "DataError", "DemoDataset", "Subset", "WeakSegDataset", "build_dataset",
    "check_mask", "train_val_indices",
]
