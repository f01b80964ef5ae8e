"""Segmentation losses: WeakTr's gradient-clipping loss (Zhu et al. 2023, `segm/model/decoder.py`).

GradientClipping(start_value, window_size) on the per-pixel cross-entropy map l (B, H, W), ignored pixels = 0:
  - global mean  lambda_g = mean(l) over all B*H*W pixels;
  - if lambda_g > start_value: no clipping, L = mean(l) (every pixel is still hard: warm-up by loss level);
  - else m = mean_b l_b (one H x W map for the batch); lambda_i = mean of m over each non-overlapping
    window_size x window_size window; tau_i = max(lambda_i, lambda_g), detached;
    l' = min(l, tau_i(p)) (so pixels above the threshold get zero gradient); L = mean(l').
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.io import IGNORE_INDEX


def window_means(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H, W) -> (each pixel's window mean (N, H, W), window means (N, ceil(H/w), ceil(W/w))).

    Windows are non-overlapping and tile the whole map from the top-left; windows cut by the border are
    averaged over their valid pixels only, so every pixel belongs to exactly one window.
    """
    if window < 1:
        raise ValueError(f"window size must be >= 1, got {window}")
    n, h, w = x.shape
    ph, pw = (-h) % window, (-w) % window
    nh, nw = (h + ph) // window, (w + pw) // window
    padded = F.pad(x, (0, pw, 0, ph))
    valid = F.pad(torch.ones_like(x), (0, pw, 0, ph))
    sums = padded.view(n, nh, window, nw, window).sum(dim=(2, 4))
    counts = valid.view(n, nh, window, nw, window).sum(dim=(2, 4))
    means = sums / counts
    per_pixel = means.repeat_interleave(window, dim=1).repeat_interleave(window, dim=2)[:, :h, :w]
    return per_pixel, means


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """logits (B, C, H, W), target (B, H, W) int -> per-pixel CE (B, H, W), ignored pixels 0.

    label_smoothing eps: the target is (1 - eps) on its class + eps / C on every class (torch's definition)."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)


def gradient_clipping_loss(pixel_loss: torch.Tensor, start_value: float, window_size: int) -> torch.Tensor:
    """WeakTr's GradientClipping on a per-pixel loss map (B, H, W) -> scalar (see the module docstring)."""
    if pixel_loss.ndim != 3:
        raise ValueError(f"expected a per-pixel loss map (B, H, W), got shape {tuple(pixel_loss.shape)}")
    h, w = pixel_loss.shape[-2:]
    if h % window_size or w % window_size:
        raise ValueError(f"gradient clipping needs the crop ({h}x{w}) to be divisible by window_size={window_size}; "
                         f"set train_seg.crop_size to a multiple of {window_size} or change train_seg.window_size")
    global_mean = pixel_loss.mean()
    if global_mean.item() > start_value:
        return global_mean
    with torch.no_grad():
        local, _ = window_means(pixel_loss.mean(dim=0, keepdim=True), window_size)  # (1, H, W)
        tau = torch.maximum(local, global_mean)
    clipped = torch.clamp(pixel_loss - tau, max=0) + tau  # = min(l, tau); gradient 0 where l > tau
    return clipped.mean()


class GradientClippingLoss(nn.Module):
    """CE + WeakTr gradient clipping: forward(logits (B, C, H, W), target (B, H, W), 255 ignored) -> scalar."""

    def __init__(self, start_value: float = 1.2, window_size: int = 120, ignore_index: int = IGNORE_INDEX,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.start_value, self.window_size, self.ignore_index = start_value, window_size, ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gradient_clipping_loss(pixel_cross_entropy(logits, target, self.ignore_index, self.label_smoothing),
                                      self.start_value, self.window_size)


class CrossEntropy(nn.Module):
    """CE with 255 ignored, mean over the labelled pixels: forward(logits (B, C, H, W), target (B, H, W)) -> scalar."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)


def build_seg_loss(name: str, start_value: float = 1.2, window_size: int = 120, crop_size: int = 0,
                   label_smoothing: float = 0.0) -> nn.Module:
    """`train_seg.loss` -> a loss module; checks the crop/window divisibility and the smoothing up front."""
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"train_seg.label_smoothing must be in [0, 1), got {label_smoothing}")
    if name == "ce":
        return CrossEntropy(label_smoothing=label_smoothing)
    if name == "gradient_clipping":
        if crop_size and crop_size % window_size:
            raise ValueError(f"train_seg.loss=gradient_clipping needs train_seg.crop_size ({crop_size}) divisible by "
                             f"train_seg.window_size ({window_size})")
        return GradientClippingLoss(start_value, window_size, label_smoothing=label_smoothing)
    raise ValueError(f"unknown train_seg.loss {name!r}; valid names: ce, gradient_clipping")
