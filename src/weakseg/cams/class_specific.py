"""Class-specific CCAM (Ensembled-WSSS §2.5): one class-agnostic C2AM per class, each applied to its own images.

The reference trained one full CCAM (ResNet-50 + disentangler) per class folder: 37 breed models, or 2
species models (cat / dog), each on all the images of its class, and picked each model's epoch by hand from
test-set IoU. Here one network holds K = C disentangler heads (conv3x3 -> BN -> 1 map, as in `ccam.py`) on a
backbone they share:

    Z       = backbone features (CNN: last `levels` stages concatenated; ViT/hybrid: patch features)
    P_k     = sigmoid(orient_k(BN_k(Conv3x3_k(Z))))        head k's foreground probability
    loss_k  = SimMax(v_fg) + SimMin(v_bg, v_fg) + SimMax(v_bg)  on the images of class k only

- `backbone="frozen"` (default): the ImageNet backbone is frozen (eval mode, no gradient), so the heads share
  nothing trainable and are exactly K independent CCAMs on the same features. Each head is trained only on
  batches of its own class (`train-cls` builds class-homogeneous batches) and keeps its own best epoch: the
  lowest CCAM loss on the held-out images of its class (no pixel labels). One backbone pass per image serves
  all K heads, which keeps 37 "models" CPU-cheap. The reference's own table puts the ImageNet-initialised CCAM
  (68.2 IoU) above every fine-tuned one, so freezing loses little.
- `backbone="shared"`: the backbone is fine-tuned by every head's loss (closer to the reference's per-class
  fine-tuning, but the classes then share one backbone); one epoch is selected for all heads (summed loss).
K fully separate backbones (37 ResNet-50s) are not offered: 37x the memory and compute.

Polarity is kept per head, as in `CCAMNet`: a running mean of P_k on the border strips, updated in training
only; above 0.5 the head's map is flipped. A linear probe on the detached features gives the classifier
logits (label-free selection, the predicted class of unlabelled images).

The CAM method `class_specific_ccam` returns channel k = ReLU(oriented logit of head k). `generate` keeps the
image's labelled classes (its predicted ones when unlabelled), so each image gets the map of its own class's
CCAM. The 2-class variant is data.label_mode=species (one head per species), the 37-class one label_mode=breeds.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.cams.base import CamMethod
from weakseg.cams.ccam import border_mask, sim_max_loss, sim_min_loss
from weakseg.config import ClsTrainCfg
from weakseg.models.backbones import build_backbone, split_parameters

BACKBONE_MODES = ("frozen", "shared")


def ccam_contrast_loss(z: torch.Tensor, prob: torch.Tensor, alpha: float) -> torch.Tensor:
    """Features (B, D, h, w), foreground probability (B, 1, h, w) -> SimMax(fg) + SimMin(bg, fg) + SimMax(bg)."""
    hw = prob.shape[-2] * prob.shape[-1]
    zf = z.flatten(2)
    fg = torch.einsum("bn,bdn->bd", prob.flatten(1), zf) / hw
    bg = torch.einsum("bn,bdn->bd", (1 - prob).flatten(1), zf) / hw
    return sim_max_loss(fg, alpha) + sim_min_loss(bg, fg) + sim_max_loss(bg, alpha)


class ClassSpecificCCAMNet(nn.Module):
    """Backbone + K per-class disentangler heads + a linear probe; trained by `train-cls`
    (train_cls.model=class_specific_ccam), read by the CAM method `class_specific_ccam`."""

    class_specific = True  # train-cls: class-homogeneous batches, per-head selection

    def __init__(self, backbone: nn.Module, num_classes: int, alpha: float = 0.25, levels: int = 2,
                 backbone_mode: str = "frozen", momentum: float = 0.1):
        super().__init__()
        if backbone_mode not in BACKBONE_MODES:
            raise ValueError(f"train_cls.ccam_backbone must be one of {', '.join(BACKBONE_MODES)}, "
                             f"got {backbone_mode!r}")
        self.backbone, self.num_classes, self.alpha, self.levels = backbone, num_classes, alpha, levels
        self.backbone_mode, self.momentum = backbone_mode, momentum
        self.touch_all_heads = False  # set under DDP: heads absent from a batch join its graph with zero weight
        dim = self._prepare_backbone()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, 1, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(1))
            for _ in range(num_classes))
        self.probe = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.probe.weight, std=0.01)
        nn.init.zeros_(self.probe.bias)
        self.register_buffer("border_mean", torch.full((num_classes,), 0.5))

    @classmethod
    def from_config(cls, cfg: ClsTrainCfg, num_classes: int, pretrained: bool | None = None) -> "ClassSpecificCCAMNet":
        backbone = build_backbone(cfg.backbone, cfg.pretrained if pretrained is None else pretrained,
                                  cfg.checkpoint, cfg.output_stride)
        return cls(backbone, num_classes, cfg.ccam_alpha, cfg.ccam_levels, cfg.ccam_backbone)

    @property
    def frozen(self) -> bool:
        return self.backbone_mode == "frozen"

    def _raw_features(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.backbone, "is_vit", False):
            return self.backbone.forward_features(x)
        return self.backbone.forward_levels(x, self.levels)[1]

    def _prepare_backbone(self) -> int:
        """Frozen: no backbone parameter trains. Shared: parameters outside Z's graph are frozen (DDP). -> Dz."""
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.enable_grad():
            z = self._raw_features(torch.zeros(1, 3, 64, 64))
            if not self.frozen:
                z.sum().backward()
        for p in self.backbone.parameters():
            if self.frozen or p.grad is None:
                p.requires_grad_(False)
            p.grad = None
        self.backbone.train(was_training and not self.frozen)
        return int(z.shape[1])

    def train(self, mode: bool = True) -> "ClassSpecificCCAMNet":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen means frozen BatchNorm statistics too
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> Z (B, Dz, h, w)."""
        if self.frozen:
            with torch.no_grad():
                return self._raw_features(x)
        return self._raw_features(x)

    def head_logit(self, z: torch.Tensor, k: int, batch_stats: bool = False) -> torch.Tensor:
        """Head k on features (B, Dz, h, w) -> oriented logit (B, 1, h, w), foreground positive.

        In training, head k's border statistic is updated from this batch (its own class's images).
        `batch_stats`: normalise with this batch's statistics, as in training, without touching the running ones
        (the held-out selection loss; see `group_losses`)."""
        if batch_stats:
            conv, bn = self.heads[k]
            raw = F.batch_norm(conv(z), None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        else:
            raw = self.heads[k](z)
        if self.training:
            with torch.no_grad():
                border = torch.sigmoid(raw)[:, 0][:, border_mask(*raw.shape[-2:], raw.device)].mean()
                self.border_mean[k].lerp_(border, self.momentum)
        return -raw if bool(self.border_mean[k] > 0.5) else raw

    def all_head_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Dz, h, w) -> (B, K, h, w) oriented logits of every head (no statistic is updated)."""
        was = self.training
        self.training = False
        try:
            return torch.cat([self.head_logit(z, k) for k in range(self.num_classes)], dim=1)
        finally:
            self.training = was

    def probe_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.probe(z.detach().mean(dim=(2, 3), keepdim=True)).flatten(1)

    def group_losses(self, z: torch.Tensor, groups: torch.Tensor,
                     batch_stats: bool = False) -> dict[int, tuple[torch.Tensor, int]]:
        """{class k: (CCAM loss of head k on the images of group k, their number)}; group -1 = no head.

        `batch_stats=True` (held-out selection): the heads' BatchNorm uses the statistics of these images, i.e. the
        training objective itself. Each head sees only ~n_k / batch_size batches per epoch, so its running
        statistics lag its weights for many epochs; an eval-mode loss then mostly measures that lag (it favoured
        the first epochs in practice) rather than the separation the head has learnt."""
        out = {}
        for k in sorted(int(g) for g in torch.unique(groups) if int(g) >= 0):
            sel = groups == k
            zk = z[sel]
            prob = torch.sigmoid(self.head_logit(zk, k, batch_stats))
            out[k] = (ccam_contrast_loss(zk, prob, self.alpha), int(sel.sum()))
        return out

    def loss_and_logits(self, x: torch.Tensor, y: torch.Tensor,
                        groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W), (B, C) multi-hot, (B,) head of each image (default: its first labelled class, -1 if
        none) -> (size-weighted mean of the heads' CCAM losses + probe BCE, probe logits (B, C))."""
        if groups is None:
            groups = default_groups(y)
        z = self.features(x)
        logits = self.probe_logits(z)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        parts = self.group_losses(z, groups)
        n = sum(count for _, count in parts.values())
        if n:
            loss = loss + sum(value * count for value, count in parts.values()) / n
        return loss, logits

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.loss_and_logits(x, y, groups)[0]
        if self.touch_all_heads:
            loss = loss + 0.0 * sum(p.sum() for p in self.heads.parameters())
        return loss

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> probe logits (B, C); with `targets` (B, C) (and `groups`), the training loss."""
        if targets is not None:
            return self.training_loss(x, targets, groups)
        return self.probe_logits(self.features(x))

    def head_state(self, k: int) -> dict[str, torch.Tensor]:
        """Head k's parameters and statistics (its conv, BN and polarity), for per-head selection."""
        state = {f"heads.{k}.{name}": t.detach().clone() for name, t in self.heads[k].state_dict().items()}
        state["border_mean"] = self.border_mean[k].detach().clone()
        return state

    def load_head_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        prefix = f"heads.{k}."
        self.heads[k].load_state_dict({n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})
        with torch.no_grad():
            self.border_mean[k].copy_(state["border_mean"])

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        pretrained, new = split_parameters(self.backbone)
        pretrained = [p for p in pretrained if p.requires_grad]
        new = [p for p in new if p.requires_grad]
        groups = [{"params": new + list(self.heads.parameters()) + list(self.probe.parameters()), "lr": lr,
                   "weight_decay": weight_decay}]
        if pretrained:
            groups.insert(0, {"params": pretrained, "lr": lr * backbone_lr_scale, "weight_decay": weight_decay})
        return groups


def default_groups(y: torch.Tensor) -> torch.Tensor:
    """(B, C) multi-hot -> (B,) first labelled class of each image, -1 for an image with no label."""
    has = y > 0.5
    first = has.float().argmax(dim=1)
    return torch.where(has.any(dim=1), first, torch.full_like(first, -1))


class ClassSpecificCAM(CamMethod):
    """maps(x) -> (probe logits (B, C), channel k = ReLU(oriented logit of class k's CCAM head) (B, C, h, w)).

    `generate` keeps the labelled (else predicted) classes of each image, i.e. each image is read by the CCAM
    of its own class."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, ClassSpecificCCAMNet):
            raise TypeError("cams.method=class_specific_ccam needs train_cls.model=class_specific_ccam, "
                            f"got {type(model).__name__}")
        self.model = model

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model.features(x)
        return self.model.probe_logits(z), F.relu(self.model.all_head_logits(z))
