"""The one dataset interface every stage reads: image, image-level label vector, optional mask, id."""

from __future__ import annotations

from typing import Optional

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file and the problem (`file` holds that path when known)."""

    def __init__(self, message: str, file: object = None):
        super().__init__(message)
        self.file = None if file is None else str(file)


class WeakSegDataset:
    """Base class of all datasets.

    Class index 0 is background; `labels(i)` is a multi-hot vector over the foreground classes 1..C-1
    (so its length is ``num_classes - 1``). Masks hold class ids with 255 = ignore.
    """

    class_names: list[str]  # index 0 = "background"
    ids: list[str]

    @property
    def skipped(self) -> list[dict]:
        """Samples removed under ``on_error="skip"``: dicts {id, file, problem} (empty if none)."""
        return self.__dict__.get("_skipped", [])

    @skipped.setter
    def skipped(self, value: list[dict]) -> None:
        self.__dict__["_skipped"] = list(value)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> np.ndarray:
        """-> (H, W, 3) uint8 RGB."""
        raise NotImplementedError

    def labels(self, i: int) -> np.ndarray:
        """-> (num_classes - 1,) float32 multi-hot image-level labels."""
        raise NotImplementedError

    def mask(self, i: int) -> Optional[np.ndarray]:
        """-> (H, W) uint8 class ids (255 = ignore), or None if this image has no pixel annotation."""
        return None

    def has_mask(self, i: int) -> bool:
        return False

    def source(self, i: int) -> str:
        """Where sample i comes from (a file path), for error messages."""
        return self.ids[i]

    def describe(self) -> dict:
        return {"type": type(self).__name__, "num_images": len(self), "classes": self.class_names,
                "num_skipped": len(self.skipped)}


class Subset(WeakSegDataset):
    """A view of `base` restricted to `indices` (keeps ids and class names)."""

    def __init__(self, base: WeakSegDataset, indices: list[int]):
        self.base = base
        self.indices = list(indices)
        self.class_names = base.class_names
        self.ids = [base.ids[i] for i in self.indices]
        self.skipped = base.skipped

    def image(self, i: int) -> np.ndarray:
        return self.base.image(self.indices[i])

    def labels(self, i: int) -> np.ndarray:
        return self.base.labels(self.indices[i])

    def mask(self, i: int) -> Optional[np.ndarray]:
        return self.base.mask(self.indices[i])

    def has_mask(self, i: int) -> bool:
        return self.base.has_mask(self.indices[i])

    def source(self, i: int) -> str:
        return self.base.source(self.indices[i])

    def describe(self) -> dict:
        info = self.base.describe()
        info.update(num_images=len(self), num_skipped=len(self.skipped), subset_of=info.get("num_images"))
        return info


def check_mask(mask: np.ndarray, image_shape: tuple[int, ...], num_classes: int, where: str) -> np.ndarray:
    """Validate a label map against its image; raise DataError naming `where` on any problem."""
    if mask.ndim != 2:
        raise DataError(f"{where}: mask must be a single-channel label map, got shape {mask.shape}")
    if mask.shape != tuple(image_shape[:2]):
        raise DataError(f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                        f"{image_shape[1]}x{image_shape[0]}")
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= num_classes and v != 255]
    if bad:
        raise DataError(f"{where}: mask values {bad} are outside the class set 0..{num_classes - 1} (+255 ignore)")
    return mask


class BinaryView(WeakSegDataset):
    """`base` seen as foreground-vs-background: classes [background, `name`], masks collapsed (255 kept)."""

    def __init__(self, base: WeakSegDataset, name: str = "foreground"):
        self.base = base
        self.class_names = ["background", name]
        self.ids = base.ids

    def image(self, i: int) -> np.ndarray:
        return self.base.image(i)

    def labels(self, i: int) -> np.ndarray:
        return np.array([float(self.base.labels(i).any())], dtype=np.float32)

    def mask(self, i: int) -> Optional[np.ndarray]:
        m = self.base.mask(i)
        return None if m is None else collapse_to_binary(m)

    def has_mask(self, i: int) -> bool:
        return self.base.has_mask(i)

    def source(self, i: int) -> str:
        return self.base.source(i)


def collapse_to_binary(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> 0 background / 1 any foreground class, 255 kept."""
    return np.where(labels == 255, 255, labels > 0).astype(np.uint8)
