"""Helpers for ViT-style backbones: attention recording, pre-norm tokens, position-embedding resampling.

timm's `Attention` runs fused scaled-dot-product attention by default, which never materialises the softmax.
`record_attention` switches the modules it finds to the explicit path *only inside the `with` block* (training
outside it keeps the fast fused kernel) and records the softmax probabilities with a hook on `attn_drop`,
whose input is exactly softmax(QK^T / sqrt(d)). This is the per-instance equivalent of calling
`timm.layers.set_fused_attn(False)` before model creation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed


@dataclass
class ViTPass:
    """One forward pass of a ViT-style backbone.

    features: (B, D, h, w) patch tokens after the final norm (what `forward_features` returns).
    tokens: (B, P + h*w, D) final-block tokens *before* the final norm, P prefix (class) tokens first.
    attentions: one (B, heads, P + h*w, P + h*w) softmax attention per block, in block order.
    cls: (B, D) the CLS token after the final norm (what a token-pooling classifier head reads).
    """

    features: torch.Tensor
    tokens: torch.Tensor
    attentions: list[torch.Tensor]
    cls: torch.Tensor


def attention_modules(module: nn.Module) -> list[nn.Module]:
    """The timm attention modules (those with `fused_attn` and `attn_drop`) inside `module`, in block order."""
    return [m for m in module.modules()
            if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)]


@contextmanager
def record_attention(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yield a list that receives every block's (B, heads, T, T) softmax attention during forward passes.

    The recorded tensors stay in the autograd graph; detach them where gradients must not flow.
    """
    mods = attention_modules(module)
    if not mods:
        raise ValueError(f"{type(module).__name__} has no timm attention modules to record")
    maps: list[torch.Tensor] = []
    saved = [m.fused_attn for m in mods]
    hooks = []
    try:
        for m in mods:
            m.fused_attn = False
            hooks.append(m.attn_drop.register_forward_hook(lambda _mod, inputs, _out: maps.append(inputs[0])))
        yield maps
    finally:
        for h in hooks:
            h.remove()
        for m, fused in zip(mods, saved):
            m.fused_attn = fused


@contextmanager
def capture_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yield a list that receives the first positional input of each call of `module`."""
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _mod, inputs, _out: seen.append(inputs[0]))
    try:
        yield seen
    finally:
        hook.remove()


def resample_patch_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int],
                             num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, num_prefix + H0*W0, D) position embedding -> (prefix part (1, num_prefix, D), patch part (1, h*w, D)).

    The patch part is bicubically resampled from `old_grid` (H0, W0) to `grid` (h, w).
    """
    patch = resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(old_grid),
                                   num_prefix_tokens=num_prefix)
    return patch[:, :num_prefix], patch[:, num_prefix:]


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) patch tokens -> (B, D, h, w)."""
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
