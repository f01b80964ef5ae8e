"""Multi-label image classifier whose 1x1 head doubles as the CAM projection (Zhou et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.config import ClsTrainCfg
from weakseg.models.backbones import Backbone, build_backbone, split_parameters


class CamClassifier(nn.Module):
    """backbone -> (B, D, h, w) -> global average pool -> linear -> (B, C) logits.

    `cam(x)` applies the same linear map to every position: (B, C, h, w) with GAP(cam) + bias == logits.
    With pool="token" (ViT backbones only) the logits come from the linear map of the normed CLS token
    instead, as in a standard timm ViT classifier (weaktr-refinery's), and the CAM is the same linear map on
    the patch tokens; this trains the CLS token's attention, which FineCAM reads.
    """

    def __init__(self, backbone: Backbone, num_classes: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "token"):
            raise ValueError(f"classifier pool must be 'avg' or 'token', got {pool!r}")
        if pool == "token" and not getattr(backbone, "is_vit", False):
            raise ValueError(f"pool='token' needs a ViT or hybrid backbone, got {getattr(backbone, 'name', '?')!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.pool = pool
        self.head = nn.Conv2d(backbone.feature_dim, num_classes, kernel_size=1, bias=True)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, cfg: ClsTrainCfg, num_classes: int, pretrained: bool | None = None) -> "CamClassifier":
        backbone = build_backbone(cfg.backbone, cfg.pretrained if pretrained is None else pretrained,
                                  cfg.checkpoint, cfg.output_stride)
        return cls(backbone, num_classes, pool=cfg.cls_pool)

    def token_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """(B, D) normed CLS token -> (B, C) logits (pool="token")."""
        return F.linear(cls, self.head.weight.flatten(1), self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, C) logits."""
        if self.pool == "token":
            return self.token_logits(self.backbone.forward_cls_and_features(x)[0])
        feats = self.backbone.forward_features(x)
        return self.head(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass -> (logits (B, C), raw CAM (B, C, h, w) without bias)."""
        if self.pool == "token":
            cls, feats = self.backbone.forward_cls_and_features(x)
            return self.token_logits(cls), F.conv2d(feats, self.head.weight)
        feats = self.backbone.forward_features(x)
        cam = F.conv2d(feats, self.head.weight)
        logits = cam.mean(dim=(2, 3)) + self.head.bias
        return logits, cam

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised, (B, C) multi-hot -> multi-label BCE (what train-cls minimises)."""
        return F.binary_cross_entropy_with_logits(self(x), y)

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        pretrained, new = split_parameters(self.backbone)  # new: a hybrid's randomly initialised transformer
        return [
            {"params": pretrained, "lr": lr * backbone_lr_scale, "weight_decay": weight_decay},
            {"params": new + list(self.head.parameters()), "lr": lr, "weight_decay": weight_decay},
        ]
