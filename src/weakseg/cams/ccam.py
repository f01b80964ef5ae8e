"""C2AM / CCAM: class-agnostic activation maps by foreground-background contrast (Xie et al., CVPR 2022).

    Z     = backbone features (CNN: the last `levels` stages concatenated, e.g. ResNet-50 layer3+layer4)
    P     = sigmoid(BN(Conv3x3(Z -> 1)))                     (B, 1, h, w) foreground probability
    v_fg  = (1/hw) sum_p P_p Z_p,   v_bg = (1/hw) sum_p (1 - P_p) Z_p
    loss  = SimMax(v_fg) + SimMin(v_bg, v_fg) + SimMax(v_bg)
    SimMax(U) = mean_ij exp(-alpha r_ij) * -log cos(u_i, u_j),  r_ij = rank of j in row i (descending) - 1
    SimMin(A, B) = mean_ij -log(1 - cos(a_i, b_j)),           cosines clamped to [5e-4, 0.9995]

Polarity: the losses are symmetric in fg/bg, so the network may learn P as background. The fix is a model
property, not a per-batch or per-image decision: a running mean of P over the border strips (about a quarter of
the grid wide) is kept like BatchNorm statistics (updated in training, frozen in eval); when it is above 0.5
the map is flipped (P -> 1 - P, i.e. the logit changes sign). Every image therefore gets the same map whatever
its batch. (The reference flipped per batch in training and per image, from 4 corner pixels, at inference.)

A linear probe (1x1 conv on the detached features Z, trained with BCE on the image labels) gives
the classifier logits the pipeline needs (label-free model selection, predicted classes of unlabelled images)
without changing the CCAM features. With `ecs`, the probe's CAMs also give the ECS target:
loss += ecs_weight * MSE(ECS, P), ECS = max over the labelled classes of the erased CAM supervision maps.
Backbone parameters that cannot influence Z (e.g. EfficientNet's conv_head) are frozen, so that DDP sees
no parameter without a gradient.

The CAM method returns ReLU of the oriented BN logit (positive where P > 0.5), the same map for every class:
`generate` keeps the image's labelled (or predicted) classes, so each of them gets the foreground map. On
multi-class images the classes then share one map, which is the inherent limit of a class-agnostic method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.cams.base import CamMethod
from weakseg.cams.ecs import erased_cam_supervision
from weakseg.config import ClsTrainCfg
from weakseg.models.backbones import build_backbone, split_parameters

SIM_MIN, SIM_MAX = 5e-4, 0.9995


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities clamped to [5e-4, 0.9995]."""
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).clamp(SIM_MIN, SIM_MAX)


def sim_max_loss(u: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """(N, D) -> rank-weighted mean of -log cos: pulls the N embeddings together, nearest pairs weighted most."""
    sim = cosine_matrix(u, u)
    order = sim.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1, stable=True) - 1  # self (the largest) -> -1, nearest other -> 0
    return (torch.exp(-alpha * rank.to(sim.dtype)) * -torch.log(sim)).mean()


def sim_min_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> mean of -log(1 - cos): pushes every a_i away from every b_j."""
    return -torch.log(1 - cosine_matrix(a, b)).mean()


def border_mask(h: int, w: int, device=None) -> torch.Tensor:
    """(h, w) bool: the border strips, max(1, min(h, w) // 4) cells wide."""
    k = max(1, min(h, w) // 4)
    m = torch.ones(h, w, dtype=torch.bool, device=device)
    m[k:h - k, k:w - k] = False
    return m


@dataclass
class CCAMOutput:
    logits: torch.Tensor  # (B, C) linear-probe logits
    features: torch.Tensor  # (B, Dz, h, w) disentangler input Z (also the probe input, detached there)
    fg: torch.Tensor  # (B, Dz) foreground embedding
    bg: torch.Tensor  # (B, Dz) background embedding
    map_logit: torch.Tensor  # (B, 1, h, w) oriented BN logit (foreground positive)
    prob: torch.Tensor  # (B, 1, h, w) oriented foreground probability


class CCAMNet(nn.Module):
    """Backbone + disentangler head (+ linear probe); trained by `train-cls` with train_cls.model=ccam."""

    def __init__(self, backbone: nn.Module, num_classes: int, alpha: float = 0.25, levels: int = 2,
                 ecs: bool = False, ecs_delta: float = 0.6, ecs_weight: float = 1.0, momentum: float = 0.1):
        super().__init__()
        self.backbone, self.num_classes, self.alpha, self.levels = backbone, num_classes, alpha, levels
        self.ecs, self.ecs_delta, self.ecs_weight, self.momentum = ecs, ecs_delta, ecs_weight, momentum
        dim = self._freeze_unused_backbone_parameters()
        self.disentangler = nn.Sequential(nn.Conv2d(dim, 1, kernel_size=3, padding=1, bias=False),
                                          nn.BatchNorm2d(1))
        self.probe = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.probe.weight, std=0.01)
        nn.init.zeros_(self.probe.bias)
        self.register_buffer("border_mean", torch.tensor(0.5))

    @classmethod
    def from_config(cls, cfg: ClsTrainCfg, num_classes: int, pretrained: bool | None = None) -> "CCAMNet":
        backbone = build_backbone(cfg.backbone, cfg.pretrained if pretrained is None else pretrained,
                                  cfg.checkpoint, cfg.output_stride)
        return cls(backbone, num_classes, cfg.ccam_alpha, cfg.ccam_levels, cfg.ecs, cfg.ecs_delta, cfg.ecs_weight)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> Z (B, Dz, h, w): ViT patch features, or the last `levels` CNN stages concatenated."""
        if getattr(self.backbone, "is_vit", False):
            return self.backbone.forward_features(x)
        return self.backbone.forward_levels(x, self.levels)[1]

    def _freeze_unused_backbone_parameters(self) -> int:
        """One probe pass: parameters outside Z's graph get requires_grad=False. Returns Dz."""
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.enable_grad():
            z = self._features(torch.zeros(1, 3, 64, 64))
            z.sum().backward()
        for p in self.backbone.parameters():
            if p.grad is None:
                p.requires_grad_(False)
            p.grad = None
        self.backbone.train(was_training)
        return int(z.shape[1])

    @property
    def flipped(self) -> bool:
        return bool(self.border_mean > 0.5)

    def forward_parts(self, x: torch.Tensor) -> CCAMOutput:
        """(B, 3, H, W) normalised -> probe logits, embeddings and the oriented foreground map."""
        z = self._features(x)
        raw = self.disentangler(z)  # (B, 1, h, w)
        if self.training:
            with torch.no_grad():
                border = torch.sigmoid(raw)[:, 0][:, border_mask(*raw.shape[-2:], raw.device)].mean()
                self.border_mean.lerp_(border, self.momentum)
        map_logit = -raw if self.flipped else raw
        prob = torch.sigmoid(map_logit)
        hw = prob.shape[-2] * prob.shape[-1]
        zf = z.flatten(2)  # (B, Dz, hw)
        fg = torch.einsum("bn,bdn->bd", prob.flatten(1), zf) / hw
        bg = torch.einsum("bn,bdn->bd", (1 - prob).flatten(1), zf) / hw
        logits = self.probe(z.detach().mean(dim=(2, 3), keepdim=True)).flatten(1)
        return CCAMOutput(logits, z, fg, bg, map_logit, prob)

    def probe_cam(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Dz, h, w) features -> ReLU(probe CAM) (B, C, h, w)."""
        return F.relu(F.conv2d(z, self.probe.weight))

    def ecs_target(self, x: torch.Tensor, out: CCAMOutput, y: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) class-agnostic ECS target: max over the labelled classes of ECS_c (0 if no label)."""
        sigma = float(torch.empty(()).uniform_(0.1, 2.0)) if self.training else 1.0

        def cam_fn(images: torch.Tensor) -> torch.Tensor:
            was_training = self.training
            self.eval()
            try:
                return self.probe_cam(self._features(images))
            finally:
                self.train(was_training)

        with torch.no_grad():
            ecs = erased_cam_supervision(cam_fn, x, self.probe_cam(out.features.detach()), y, self.ecs_delta, sigma,
                                         radius=7)
            return (ecs * y[:, :, None, None]).amax(dim=1, keepdim=True)

    def loss_and_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W), (B, C) multi-hot -> (CCAM + probe BCE [+ ECS MSE] loss, probe logits (B, C))."""
        out = self.forward_parts(x)
        loss = sim_max_loss(out.fg, self.alpha) + sim_min_loss(out.bg, out.fg) + sim_max_loss(out.bg, self.alpha)
        loss = loss + F.binary_cross_entropy_with_logits(out.logits, y)
        if self.ecs:
            loss = loss + self.ecs_weight * F.mse_loss(out.prob, self.ecs_target(x, out, y))
        return loss, out.logits

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(x, y)[0]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> probe logits (B, C); with `targets` (B, C), the training loss."""
        if targets is not None:
            return self.training_loss(x, targets)
        return self.forward_parts(x).logits

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        pretrained, new = split_parameters(self.backbone)
        pretrained = [p for p in pretrained if p.requires_grad]
        new = [p for p in new if p.requires_grad]
        return [
            {"params": pretrained, "lr": lr * backbone_lr_scale, "weight_decay": weight_decay},
            {"params": new + list(self.disentangler.parameters()) + list(self.probe.parameters()), "lr": lr,
             "weight_decay": weight_decay},
        ]


class ClassAgnosticCAM(CamMethod):
    """maps(x) -> (probe logits (B, C), ReLU(oriented CCAM logit) repeated for every class (B, C, h, w))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, CCAMNet):
            raise TypeError(f"cams.method=ccam needs train_cls.model=ccam, got {type(model).__name__}")
        self.model = model

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_parts(x)
        fg = F.relu(out.map_logit)
        return out.logits, fg.expand(-1, self.model.num_classes, -1, -1)
