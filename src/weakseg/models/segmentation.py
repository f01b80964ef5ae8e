"""Segmentation models behind a plain dict registry; every model maps (B, 3, H, W) -> (B, C, H, W) logits."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation import lraspp_mobilenet_v3_large
from torchvision.models.segmentation.lraspp import LRASPPHead

from weakseg.models.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, create_timm_model


class SegModel(nn.Module):
    """Base: subclasses set `mean`/`std` (input normalisation) and implement forward -> logits at input size."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = 32


class TorchvisionLRASPP(SegModel):
    """torchvision LR-ASPP MobileNetV3-Large (random init: no weights can be downloaded here)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


class TimmLRASPP(SegModel):
    """LR-ASPP head (torchvision's) on a timm encoder: low = stride-8 features, high = deepest features."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool, inter_channels: int = 128,
                 output_stride: int = 16):
        super().__init__()
        kwargs = {"features_only": True, "output_stride": output_stride}
        self.encoder, spec = create_timm_model(backbone, pretrained, **kwargs)
        self.mean, self.std = spec.mean, spec.std
        reductions = self.encoder.feature_info.reduction()
        channels = self.encoder.feature_info.channels()
        self.low_index = max(i for i, r in enumerate(reductions) if r <= 8)
        self.head = LRASPPHead(channels[self.low_index], channels[-1], num_classes, inter_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        out = self.head({"low": feats[self.low_index], "high": feats[-1]})
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _timm_lraspp(backbone: str) -> Callable[..., SegModel]:
    def build(num_classes: int, pretrained: bool) -> SegModel:
        return TimmLRASPP(backbone, num_classes, pretrained)

    return build


SEG_MODELS: dict[str, Callable[..., SegModel]] = {
    "lraspp_mobilenet_v3_large": lambda num_classes, pretrained: TorchvisionLRASPP(num_classes),
    "lraspp_efficientnet_lite0": _timm_lraspp("efficientnet_lite0"),
    "lraspp_efficientnet_lite1": _timm_lraspp("efficientnet_lite1"),
    "lraspp_efficientnet_lite2": _timm_lraspp("efficientnet_lite2"),
    "lraspp_test_efficientnet": _timm_lraspp("test_efficientnet"),
}


def build_seg_model(name: str, num_classes: int, pretrained: bool) -> SegModel:
    try:
        builder = SEG_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown segmentation model {name!r}; valid names: {', '.join(sorted(SEG_MODELS))}") from None
    return builder(num_classes=num_classes, pretrained=pretrained)


__all__ = ["BACKBONES", "SEG_MODELS", "SegModel", "build_seg_model"]
