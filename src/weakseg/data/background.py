"""Object-free background images appended to a training split (the Ensembled-WSSS "bg" setting).

Each background image gets all-zero image labels (a negative for every class) and, when asked for,
an all-background mask of its size. Ids are "bg_<file stem>".
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from weakseg.data.base import DataError, WeakSegDataset
from weakseg.data.files import ProblemLog, allowed_roots, escapes
from weakseg.data.imageio import list_images, read_header, read_image

BACKGROUND_ID_PREFIX = "bg_"


class WithBackgroundImages(WeakSegDataset):
    """`base` followed by the images of `folder` as negatives; same classes as `base`."""

    def __init__(self, base: WeakSegDataset, folder: str | Path, with_masks: bool = False,
                 on_error: str = "raise"):
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: background image folder (data.background_dir) not found", file=folder)
        self.base, self.folder, self.with_masks = base, folder, with_masks
        self.class_names = base.class_names
        log = ProblemLog(on_error)
        allowed = allowed_roots(folder)
        base_ids = set(base.ids)
        self.paths: list[Path] = []
        bg_ids: list[str] = []
        for path in list_images(folder):
            sample_id = f"{BACKGROUND_ID_PREFIX}{path.stem}"
            reason = escapes(path, allowed)
            if reason:
                log.add(sample_id, path, f"background image {reason}")
            elif sample_id in base_ids or sample_id in bg_ids:
                log.add(sample_id, path, f"id {sample_id!r} is already used (rename the file)")
            else:
                self.paths.append(path)
                bg_ids.append(sample_id)
        if not self.paths:
            raise DataError(f"{folder}: no usable background images", file=folder)
        self.ids = list(base.ids) + bg_ids
        self.skipped = list(base.skipped) + log.items
        log.warn(f"background images in {folder}")

    def _background_path(self, i: int) -> Optional[Path]:
        k = i - len(self.base)
        return self.paths[k] if k >= 0 else None

    def image(self, i: int) -> np.ndarray:
        path = self._background_path(i)
        return self.base.image(i) if path is None else read_image(path)

    def labels(self, i: int) -> np.ndarray:
        path = self._background_path(i)
        return self.base.labels(i) if path is None else np.zeros(self.num_classes - 1, dtype=np.float32)

    def has_mask(self, i: int) -> bool:
        path = self._background_path(i)
        return self.base.has_mask(i) if path is None else self.with_masks

    def mask(self, i: int) -> Optional[np.ndarray]:
        """Base mask, or (H, W) zeros for a background image when `with_masks` (None otherwise)."""
        path = self._background_path(i)
        if path is None:
            return self.base.mask(i)
        if not self.with_masks:
            return None
        return np.zeros(read_header(path).size, dtype=np.uint8)

    def source(self, i: int) -> str:
        path = self._background_path(i)
        return self.base.source(i) if path is None else str(path)

    def describe(self) -> dict:
        info = self.base.describe()
        info.update(num_images=len(self), num_background=len(self.paths), background_dir=str(self.folder),
                    num_skipped=len(self.skipped))
        return info
