"""ECS, erased CAM supervision (ECS-Net, Sun et al. ICCV 2021, as used by Ensembled-WSSS).

Erase the high-CAM region of the image (pixels whose max-normalised CAM exceeds delta are replaced by a
Gaussian-blurred copy), recompute the CAM on the erased image so that complementary object parts light up, and
combine per pixel:

    ECS_c = max(M_c(x) / max M_c(x),  M_c(x') / max M_c(x'))        (B, C, h, w), in [0, 1]

This is an element-wise maximum of two 2-D maps per class. (The reference's evaluation path took
`np.max(E, axis=0)` of a 2-D map, a per-column maximum broadcast over rows; that bug is not reproduced.)

With several classes, one erased image per image is used: the union of the high regions of the classes of
interest (the ground-truth classes in training; the predicted classes, at least the top one, at inference).
For a single-label image this is exactly the per-class erasure of the reference.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from weakseg.cams.base import CamMethod, max_normalize


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """(B, C, H, W) -> separable Gaussian blur with std `sigma` pixels (kernel 2*radius+1, replicate padding)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma))) if radius is None else radius
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def erase_mask(cams: torch.Tensor, classes: torch.Tensor, size: tuple[int, int], delta: float) -> torch.Tensor:
    """(B, C, h, w) CAMs >= 0, (B, C) 0/1 classes of interest -> (B, 1, H, W) bool mask.

    True where the max-normalised CAM of some class of interest, upsampled to (H, W), exceeds delta."""
    norm = max_normalize(cams) * classes[:, :, None, None].to(cams.dtype)
    union = norm.amax(dim=1, keepdim=True)
    return F.interpolate(union, size=size, mode="bilinear", align_corners=False) > delta


def erase_by_blur(x: torch.Tensor, mask: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) images, (B, 1, H, W) bool mask -> images with the masked pixels replaced by a blurred copy."""
    return torch.where(mask, gaussian_blur(x, sigma, radius), x)


def combine_erased(cams: torch.Tensor, erased_cams: torch.Tensor) -> torch.Tensor:
    """Two (B, C, h, w) CAMs >= 0 -> element-wise max of the per-map max-normalised maps."""
    return torch.maximum(max_normalize(cams), max_normalize(erased_cams))


def erased_cam_supervision(cam_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cams: torch.Tensor,
                           classes: torch.Tensor, delta: float, sigma: float,
                           radius: int | None = None) -> torch.Tensor:
    """cam_fn: (B, 3, H, W) -> (B, C, h, w) >= 0; `cams` = cam_fn(x); classes (B, C) -> ECS maps (B, C, h, w)."""
    mask = erase_mask(cams, classes, tuple(x.shape[-2:]), delta)
    erased = cam_fn(erase_by_blur(x, mask, sigma, radius))
    return combine_erased(cams, erased)


def predicted_classes(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, C) logits -> (B, C) 0/1: sigmoid > threshold, plus the top class of every image."""
    chosen = torch.sigmoid(logits) > threshold
    chosen[torch.arange(logits.shape[0]), logits.argmax(dim=1)] = True
    return chosen.to(logits.dtype)


class ErasedCamSupervision(CamMethod):
    """Wraps any CamMethod: maps(x) = ECS of the inner method's maps, erasing the predicted classes' regions.

    `sigma` is in pixels of the network input (the reference blurred with PIL radius 20 at 224 px).
    """

    def __init__(self, inner: CamMethod, delta: float = 0.5, sigma: float = 20.0):
        super().__init__()
        self.inner, self.delta, self.sigma = inner, delta, sigma

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (inner logits (B, C), ECS (B, C, h, w) in [0, 1])."""
        logits, cams = self.inner.maps(x)
        ecs = erased_cam_supervision(lambda z: self.inner.maps(z)[1], x, cams, predicted_classes(logits),
                                     self.delta, self.sigma)
        return logits, ecs
