"""ReCAM (Chen et al., "Class Re-Activation Maps for Weakly-Supervised Semantic Segmentation", CVPR 2022).

The multi-label BCE of a CAM classifier lets a class keep only its most discriminative part and lets
co-occurring classes share activations. ReCAM adds a second 1x1 head trained with a *softmax* cross-entropy on
class-weighted features: for every class k an image carries, its max-normalised CAM weights the feature map,
the weighted map is averaged over positions and the second head must name k among all C classes. At
inference the "re-activated" CAM of class k is the BCE head's CAM with each channel re-weighted by the second
head's weights for k: ReLU(conv2d(F, W_re * W_bce)).

    loss = BCE(logits, y) + w * (1/B) sum_b mean_{k in y_b} CE(W_re . mean_hw(norm(CAM_k) * F), k)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.cams.base import CamMethod, max_normalize
from weakseg.config import ClsTrainCfg, ConfigError
from weakseg.models.backbones import Backbone, build_backbone
from weakseg.models.classifier import CamClassifier


class ReCAMClassifier(CamClassifier):
    """A CamClassifier (GAP + 1x1 head, trained with BCE) plus ReCAM's softmax head `recam_head` (no bias).

    ReCAM fine-tunes a trained CAM classifier: with `train_cls.init_from` its backbone *and* BCE head start from
    that run (`fine_tunes_a_cam_classifier`); without it both losses train jointly from the start.
    """

    fine_tunes_a_cam_classifier = True

    def __init__(self, backbone: Backbone, num_classes: int, recam_loss_weight: float = 1.0):
        if num_classes < 2:
            raise ConfigError(f"train_cls.model=recam needs at least 2 foreground classes, got {num_classes}: its "
                              "softmax over one class has zero loss, so the re-activation head would never train")
        super().__init__(backbone, num_classes, pool="avg")
        self.recam_loss_weight = recam_loss_weight
        self.recam_head = nn.Conv2d(backbone.feature_dim, num_classes, kernel_size=1, bias=False)
        nn.init.normal_(self.recam_head.weight, std=0.01)

    @classmethod
    def from_config(cls, cfg: ClsTrainCfg, num_classes: int, pretrained: bool | None = None) -> "ReCAMClassifier":
        backbone = build_backbone(cfg.backbone, cfg.pretrained if pretrained is None else pretrained,
                                  cfg.checkpoint, cfg.output_stride)
        return cls(backbone, num_classes, recam_loss_weight=cfg.recam_loss_weight)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, C) logits; with (B, C) multi-hot `targets`, the training loss instead."""
        if targets is None:
            return super().forward(x)
        return self.loss_and_logits(x, targets)[0]

    def _features_cam_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> features (B, D, h, w), the BCE head's raw CAM (B, C, h, w) and its logits (B, C) = GAP(CAM) + bias."""
        feats = self.backbone.forward_features(x)
        cam = F.conv2d(feats, self.head.weight)
        return feats, cam, cam.mean(dim=(2, 3)) + self.head.bias

    def loss_and_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE + recam_loss_weight * ReCAM's softmax CE (module docstring), and the (B, C) BCE-head logits."""
        feats, cam, logits = self._features_cam_logits(x)
        bce = F.binary_cross_entropy_with_logits(logits, y)
        present = y > 0.5  # an image without labels adds no pair (the head stays in the graph for DDP)
        weights = max_normalize(torch.relu(cam))
        # (B, C, D): the feature map averaged under each class's normalised CAM
        class_features = torch.einsum("bchw,bdhw->bcd", weights, feats) / (feats.shape[2] * feats.shape[3])
        image, cls = present.nonzero(as_tuple=True)
        re_logits = F.linear(class_features[image, cls], self.recam_head.weight.flatten(1))  # (P, C)
        per_pair = F.cross_entropy(re_logits, cls, reduction="none")
        per_image_count = present.sum(dim=1).clamp(min=1).to(per_pair.dtype)
        ce = (per_pair / per_image_count[image]).sum() / y.shape[0]
        return bce + self.recam_loss_weight * ce, logits

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(x, y)[0]

    def forward_with_cam_and_recam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass -> (BCE-head logits (B, C), raw BCE CAMs (B, C, h, w), raw ReCAM maps (B, C, h, w)).

        ReCAM_k = sum_d W_re[k, d] W_bce[k, d] F_d: the BCE head's CAM with each channel re-weighted by the softmax
        head. The softmax head alone is free to add any per-class constant (a softmax ignores it), so its own maps
        need not be low on the background; the product keeps the BCE head's localisation.
        """
        feats, cam, logits = self._features_cam_logits(x)
        return logits, cam, F.conv2d(feats, self.recam_head.weight * self.head.weight)

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        groups = super().param_groups(lr, backbone_lr_scale, weight_decay)
        groups[1]["params"] = groups[1]["params"] + list(self.recam_head.parameters())
        return groups


class ReCAM(CamMethod):
    """ReLU of the re-activated maps of a trained ReCAMClassifier (logits: its BCE head, for label prediction)."""

    name = "recam"

    def __init__(self, classifier: nn.Module):
        super().__init__()
        if not isinstance(classifier, ReCAMClassifier):
            raise TypeError(f"cams.method={self.name} needs train_cls.model=recam, got {type(classifier).__name__}")
        self.classifier = classifier

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _, recam = self.classifier.forward_with_cam_and_recam(x)
        return logits, torch.relu(recam)


class ReCAMBlend(ReCAM):
    """The mean of ReCAM's map and the same classifier's BCE-head CAM, each ReLU'd and max-normalised per map
    (their scales differ: W_re * W_bce against W_bce), so each contributes equally at every scale and flip."""

    name = "recam_blend"

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam, recam = self.classifier.forward_with_cam_and_recam(x)
        return logits, (max_normalize(torch.relu(cam)) + max_normalize(torch.relu(recam))) / 2
