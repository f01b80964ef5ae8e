"""Multi-label image classifier whose 1x1 head doubles as the CAM projection (Zhou et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.config import ClsTrainCfg
from weakseg.models.backbones import Backbone, build_backbone


class CamClassifier(nn.Module):
    """backbone -> (B, D, h, w) -> global average pool -> linear -> (B, C) logits.

    `cam(x)` applies the same linear map to every position: (B, C, h, w) with GAP(cam) + bias == logits.
    """

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Conv2d(backbone.feature_dim, num_classes, kernel_size=1, bias=True)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, cfg: ClsTrainCfg, num_classes: int, pretrained: bool | None = None) -> "CamClassifier":
        backbone = build_backbone(cfg.backbone, cfg.pretrained if pretrained is None else pretrained,
                                  cfg.checkpoint, cfg.output_stride)
        return cls(backbone, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, C) logits."""
        feats = self.backbone.forward_features(x)
        return self.head(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass -> (logits (B, C), raw CAM (B, C, h, w) without bias)."""
        feats = self.backbone.forward_features(x)
        cam = F.conv2d(feats, self.head.weight)
        logits = cam.mean(dim=(2, 3)) + self.head.bias
        return logits, cam

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        return [
            {"params": list(self.backbone.parameters()), "lr": lr * backbone_lr_scale, "weight_decay": weight_decay},
            {"params": list(self.head.parameters()), "lr": lr, "weight_decay": weight_decay},
        ]
