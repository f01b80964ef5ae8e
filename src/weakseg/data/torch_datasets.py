"""torch Datasets over a `WeakSegDataset` for training, with per-sample seeded augmentation.

Augmentation randomness comes from ``np.random.default_rng([seed, epoch, index])``, not from a global
RNG, so a run resumed mid-epoch draws exactly the same crops as an uninterrupted one, whatever the
number of DataLoader workers or ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from weakseg.data.base import WeakSegDataset


def to_float_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) float -> resized bilinearly (antialiased when shrinking)."""
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None]
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0] if squeeze else out


def shrink_to(image: np.ndarray, mask: Optional[np.ndarray], size: int,
              factor: float = 1.5) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Cheaply shrink a large uint8 image (and its mask, nearest) so its shorter side is ~factor*size.

    Augmentation then works on a small tensor instead of a multi-megapixel float copy; crops keep the same
    relative geometry, so the training distribution is unchanged up to interpolation.
    """
    h, w = image.shape[:2]
    target = int(round(size * factor))
    if min(h, w) <= target:
        return image, mask
    scale = target / min(h, w)
    new = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    small = np.array(Image.fromarray(image).resize(new, Image.BILINEAR, reducing_gap=2.0))
    small_mask = None if mask is None else np.array(Image.fromarray(mask).resize(new, Image.NEAREST))
    return small, small_mask


def random_resized_crop_flip(image: torch.Tensor, mask: Optional[torch.Tensor], size: int,
                             rng: np.random.Generator, scale: tuple[float, float] = (0.35, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Joint crop+resize+flip of an image (3, H, W) and its mask (H, W); the mask uses nearest interpolation."""
    _, h, w = image.shape
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            break
    else:
        ch, cw, top, left = h, w, 0, 0
    flip = rng.random() < 0.5
    img = TF.resized_crop(tv_tensors.Image(image), top, left, ch, cw, [size, size], antialias=True)
    if flip:
        img = TF.horizontal_flip(img)
    out_mask = None
    if mask is not None:
        m = TF.resized_crop(tv_tensors.Mask(mask[None]), top, left, ch, cw, [size, size])
        if flip:
            m = TF.horizontal_flip(m)
        out_mask = m[0].as_subclass(torch.Tensor)
    return img.as_subclass(torch.Tensor), out_mask


def colour_jitter(image: torch.Tensor, rng: np.random.Generator, strength: float = 0.2) -> torch.Tensor:
    """Brightness/contrast/saturation jitter of a (3, H, W) float image in [0, 1]."""
    b, c, s = (1.0 + rng.uniform(-strength, strength) for _ in range(3))
    image = image * b
    mean = image.mean()
    image = (image - mean) * c + mean
    gray = image.mean(0, keepdim=True)
    image = (image - gray) * s + gray
    return image.clamp_(0.0, 1.0)


class ClassificationDataset(torch.utils.data.Dataset):
    """(image (3, S, S) float [0, 1], labels (C-1,) float) pairs; train mode augments, eval mode resizes."""

    def __init__(self, ds: WeakSegDataset, indices: list[int], size: int, train: bool, seed: int = 0):
        self.ds, self.indices, self.size, self.train, self.seed = ds, list(indices), size, train, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.indices[k]
        img = to_float_tensor(shrink_to(self.ds.image(i), None, self.size)[0])
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img, _ = random_resized_crop_flip(img, None, self.size, rng)
            img = colour_jitter(img, rng)
        else:
            img = resize_image(img, (self.size, self.size))
        return img, torch.from_numpy(self.ds.labels(i))


class SegmentationDataset(torch.utils.data.Dataset):
    """(image (3, S, S) float [0, 1], target (S, S) int64 with 255 ignore) pairs.

    `target_fn(i)` returns the (H, W) uint8 target of dataset index i (a pseudo-mask or a GT mask).
    """

    def __init__(self, ds: WeakSegDataset, indices: list[int], target_fn: Callable[[int], np.ndarray], size: int,
                 train: bool, seed: int = 0):
        self.ds, self.indices, self.target_fn, self.size, self.train, self.seed = (
            ds, list(indices), target_fn, size, train, seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.indices[k]
        image, target_np = self.ds.image(i), self.target_fn(i)
        if target_np.shape != image.shape[:2]:
            raise ValueError(f"{self.ds.source(i)}: target {tuple(target_np.shape)} does not match image "
                             f"{tuple(image.shape[:2])}")
        image, target_np = shrink_to(image, target_np, self.size)
        img = to_float_tensor(image)
        target = torch.from_numpy(target_np.astype(np.int64))
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img, target = random_resized_crop_flip(img, target, self.size, rng, scale=(0.25, 1.0))
            img = colour_jitter(img, rng)
        else:
            img = resize_image(img, (self.size, self.size))
            target = TF.resize(tv_tensors.Mask(target[None]), [self.size, self.size])[0].as_subclass(torch.Tensor)
        return img, target


def mask_reader(folder: Path, ds: WeakSegDataset) -> Callable[[int], np.ndarray]:
    from weakseg.io import load_label_png

    def read(i: int) -> np.ndarray:
        return load_label_png(folder / f"{ds.ids[i]}.png")

    return read
