"""Segmenter (Strudel et al. 2021) as WeakTr uses it for online retraining: a ViT encoder + mask transformer.

MaskTransformer: patch tokens are projected, concatenated with one learnable embedding per class, passed
through `n_layers` transformer blocks and a LayerNorm; patch and class features are projected and
L2-normalised, masks = patches . classes^T, then a LayerNorm over the class dimension. The (h, w) masks are
upsampled bilinearly by the encoder stride (x16 for a /16 ViT).

The encoder is anything with `forward_features((B, 3, H, W)) -> (B, D, H/stride, W/stride)` and the
attributes `feature_dim`, `stride`, `mean`, `std` (e.g. `weakseg.models.backbones.Backbone`, or a hybrid).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from weakseg.models.segmentation import SegModel, pad_to_multiple


class MaskTransformer(nn.Module):
    """features (B, D_enc, h, w) -> class masks (B, num_classes, h, w)."""

    def __init__(self, num_classes: int, encoder_dim: int, d_model: int = 0, n_layers: int = 2, n_heads: int = 0,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        d_model = d_model or encoder_dim
        n_heads = n_heads or max(1, d_model // 64)
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, d_model)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d_model))
        rates = torch.linspace(0, drop_path, n_layers).tolist()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout,
                                          attn_drop=dropout, drop_path=r) for r in rates)
        self.decoder_norm = nn.LayerNorm(d_model)
        scale = d_model ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feats.shape
        x = self.proj_dec(feats.flatten(2).transpose(1, 2))  # (B, N, d)
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : h * w] @ self.proj_patch, x[:, h * w:] @ self.proj_classes
        patches = F.normalize(patches, dim=-1)
        classes = F.normalize(classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, C)
        return masks.transpose(1, 2).reshape(b, self.num_classes, h, w)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Segmenter(SegModel):
    """encoder -> MaskTransformer -> bilinear upsampling: (B, 3, H, W) -> (B, C, H, W) logits.

    Inputs of any size: padded (zeros, bottom/right) to a multiple of the encoder stride, cropped back after.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, n_layers: int = 2, dropout: float = 0.1,
                 drop_path: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.mean, self.std = tuple(encoder.mean), tuple(encoder.std)
        self.size_divisor = int(encoder.stride)
        self.decoder = MaskTransformer(num_classes, int(encoder.feature_dim), n_layers=n_layers, dropout=dropout,
                                       drop_path=drop_path)

    def encoder_module(self) -> nn.Module:
        return self.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.size_divisor)
        masks = self.decoder(self.encoder.forward_features(x))
        masks = F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return masks[..., :h, :w]
