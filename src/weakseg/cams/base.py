"""The CAM-method interface and small map utilities shared by the methods."""

from __future__ import annotations

import torch
import torch.nn as nn


class CamMethod(nn.Module):
    """Maps a batch of normalised images to non-negative class maps.

    ``maps(x (B, 3, H, W)) -> (logits (B, C), cams (B, C, h, w) >= 0)``. Multi-scale/flip aggregation, label
    restriction, normalisation and storage are done once for all methods in `weakseg.cams.generate`.
    """

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, K, h, w) -> (x - min) / (max - min + eps) per map, in [0, 1]."""
    flat = maps.flatten(2)
    lo = flat.min(dim=2).values[..., None, None]
    hi = flat.max(dim=2).values[..., None, None]
    return (maps - lo) / (hi - lo + eps)


def max_normalize(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, K, h, w) non-negative -> divided by each map's max (maps that are all zero stay zero)."""
    peak = maps.flatten(2).max(dim=2).values.clamp(min=eps)
    return maps / peak[..., None, None]
