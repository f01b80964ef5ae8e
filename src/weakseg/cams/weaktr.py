"""WeakTr CAM network (hustvl/WeakTr phase 1, paper version) and its CAM method.

A ViT (timm ViT or hybrid) whose single CLS token is replaced by C class tokens (MCTformer style). With the
final-block tokens split into class tokens X_cls (B, C, D) and patch tokens (B, D, h, w), no final norm:

    y_tok    = mean_d X_cls                                   token logits (B, C)
    S        = Conv3x3(D -> C)(patch tokens)                   coarse CAM (B, C, h, w);  y_coarse = GAP(S)
    A_k      = the K = L*H softmax attention maps, DETACHED    (B, K, T, T), T = C + h*w
    w        = sigmoid(W2 ReLU(W1 pool(A)))                    adaptive attention fusion (SE block, no biases)
    A_bar    = (1/K) sum_k w_k A_k
    M_c      = A_bar[c, C:] (as h x w) * ReLU(S_c).detach()    fused CAM
    F_c      = A_bar[C:, C:] @ vec(M_c)                        patch-attention refined CAM;  y_fine = GAP(F)
    loss     = MLSM(y_tok, y) + MLSM(y_coarse, y) + MLSM(y_fine, y)

Because A and S are detached, the third loss trains only the fusion weights (W1, W2), and the first two
losses never reach them. `pool="avg"` (the reference default) averages a softmax map, which is always 1/T,
so the weights are then learnt per-map constants; `pool="max"` makes them depend on the image.
When the backbone's CLS token is pretrained, it and its position embedding are replicated C times (WeakTr's
fine-tuning from DeiT with --extra-token); otherwise the C tokens are initialised independently
(train_cls.weaktr_token_init=replicate|random forces either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from weakseg.cams.base import CamMethod
from weakseg.config import ClsTrainCfg
from weakseg.models.backbones import build_backbone, split_parameters
from weakseg.models.vit_utils import record_attention, tokens_to_map


class AdaptiveAttentionFusion(nn.Module):
    """SE-style weights over K attention maps: (B, K, T, T) -> (B, K) in (0, 1)."""

    def __init__(self, num_maps: int, reduction: float = 4, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"aaf pool must be 'avg' or 'max', got {pool!r}")
        hidden = max(1, int(num_maps / reduction))
        self.pool = pool
        self.fc1 = nn.Linear(num_maps, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, num_maps, bias=False)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        pooled = attn.mean(dim=(2, 3)) if self.pool == "avg" else attn.amax(dim=(2, 3))
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))


@dataclass
class WeakTrOutput:
    token_logits: torch.Tensor  # (B, C)
    coarse_logits: torch.Tensor  # (B, C)
    fine_logits: torch.Tensor  # (B, C)
    coarse_cam: torch.Tensor  # (B, C, h, w), conv head output (with gradient)
    fused_cam: torch.Tensor  # (B, C, h, w), cross attention x ReLU(coarse CAM), >= 0
    refined_cam: torch.Tensor  # (B, C, h, w), patch-attention refined fused CAM, >= 0
    map_weights: torch.Tensor  # (B, K) fusion weights


class WeakTrNet(nn.Module):
    """ViT with C class tokens, conv CAM head and adaptive attention fusion; trained by `train-cls`."""

    def __init__(self, backbone: nn.Module, num_classes: int, aaf_reduction: float = 4, aaf_pool: str = "avg",
                 replicate_class_token: bool = True):
        super().__init__()
        if not getattr(backbone, "is_vit", False):
            raise TypeError(f"WeakTr needs a ViT or hybrid backbone, got {getattr(backbone, 'name', backbone)!r}")
        self.num_classes = num_classes
        token, pos = backbone.class_token_init()
        if replicate_class_token:
            self.class_tokens = nn.Parameter(token.repeat(1, num_classes, 1))
            self.class_pos = nn.Parameter(pos.repeat(1, num_classes, 1))
        else:
            self.class_tokens = nn.Parameter(trunc_normal_(torch.zeros_like(token.repeat(1, num_classes, 1)),
                                                           std=0.02))
            self.class_pos = nn.Parameter(trunc_normal_(torch.zeros_like(self.class_tokens), std=0.02))
        backbone.strip_class_token_and_norm()
        self.backbone = backbone
        dim = self.class_tokens.shape[-1]
        self.head = nn.Conv2d(dim, num_classes, kernel_size=3, padding=1)
        self.aaf = AdaptiveAttentionFusion(backbone.depth * backbone.num_heads, aaf_reduction, aaf_pool)

    @classmethod
    def from_config(cls, cfg: ClsTrainCfg, num_classes: int, pretrained: bool | None = None) -> "WeakTrNet":
        pretrained = cfg.pretrained if pretrained is None else pretrained
        backbone = build_backbone(cfg.backbone, pretrained, cfg.checkpoint, cfg.output_stride,
                                  drop_path_rate=cfg.drop_path_rate)
        init = getattr(cfg, "weaktr_token_init", "auto")
        if init not in ("auto", "replicate", "random"):
            raise ValueError(f"train_cls.weaktr_token_init must be auto, replicate or random, got {init!r}")
        replicate = backbone.pretrained_class_token if init == "auto" else init == "replicate"
        return cls(backbone, num_classes, cfg.aaf_reduction, cfg.aaf_pool, replicate_class_token=replicate)

    def forward_all(self, x: torch.Tensor) -> WeakTrOutput:
        """(B, 3, H, W) normalised -> all logits and maps of one pass."""
        c = self.num_classes
        patches, grid = self.backbone.embed_patches(x)
        tokens = torch.cat([(self.class_tokens + self.class_pos).expand(x.shape[0], -1, -1), patches], dim=1)
        with record_attention(self.backbone.blocks) as maps:
            tokens = self.backbone.blocks(self.backbone.pre_blocks(tokens))
        token_logits = tokens[:, :c].mean(dim=-1)
        coarse = self.head(tokens_to_map(tokens[:, c:], grid))
        attn = torch.stack(maps, dim=1).detach().flatten(1, 2)  # (B, L*H, T, T)
        weights = self.aaf(attn)
        fused_attn = torch.einsum("bk,bkij->bij", weights, attn) / attn.shape[1]  # (B, T, T)
        b, _, h, w = coarse.shape
        cross = fused_attn[:, :c, c:].reshape(b, c, h, w)
        fused_cam = cross * F.relu(coarse.detach())
        patch_attn = fused_attn[:, c:, c:]  # (B, N, N)
        refined = torch.bmm(patch_attn, fused_cam.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        return WeakTrOutput(token_logits, coarse.mean(dim=(2, 3)), refined.mean(dim=(2, 3)), coarse, fused_cam,
                            refined, weights)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three multi-label soft-margin losses (token, coarse CAM, fused/refined CAM), plus the logits."""
        out = self.forward_all(x)
        return {
            "token": F.multilabel_soft_margin_loss(out.token_logits, y),
            "coarse": F.multilabel_soft_margin_loss(out.coarse_logits, y),
            "fine": F.multilabel_soft_margin_loss(out.fine_logits, y),
            "logits": out.token_logits,
        }

    def loss_and_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.losses(x, y)
        return parts["token"] + parts["coarse"] + parts["fine"], parts["logits"]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised, (B, C) multi-hot -> scalar loss."""
        return self.loss_and_logits(x, y)[0]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> token logits (B, C); with `targets` (B, C), the training loss (through DDP's forward)."""
        if targets is not None:
            return self.training_loss(x, targets)
        return self.forward_all(x).token_logits

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        own = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        pretrained, new = split_parameters(self.backbone)
        return [
            {"params": pretrained, "lr": lr * backbone_lr_scale, "weight_decay": weight_decay},
            {"params": new + own, "lr": lr, "weight_decay": weight_decay},
        ]


class WeakTrCAM(CamMethod):
    """maps(x) -> (token logits, CAM) of a trained WeakTrNet.

    refine=True (method `weaktr`): the patch-attention refined fused CAM F (WeakTr's `--patch-attn-refine`);
    refine=False (method `weaktr_fused`): the fused CAM M. The refinement relies on the patch-to-patch
    attention being an affinity, which holds for (pre)trained ViTs, not for a randomly initialised one.
    """

    def __init__(self, model: nn.Module, refine: bool = True):
        super().__init__()
        if not isinstance(model, WeakTrNet):
            raise TypeError(f"cams.method=weaktr needs train_cls.model=weaktr, got {type(model).__name__}")
        self.model, self.refine = model, refine

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_all(x)
        return out.token_logits, out.refined_cam if self.refine else out.fused_cam


def weaktr_fused(model: nn.Module) -> WeakTrCAM:
    """WeakTr's fused CAM without the patch-attention refinement."""
    return WeakTrCAM(model, refine=False)
