"""FineCAM (weaktr-refinery): head-weighted class-to-patch attention x patch-token CAM, training-free.

For one forward pass of a CamClassifier on a ViT (or hybrid) backbone, with L blocks of H heads:

    a_lh = A_l[h, CLS, patches]            (N,)  CLS -> patch attention of head h in block l
    Z^   = L2-normalised final-block patch tokens before the final norm, m_n = mean_d Z^_nd
    s_lh = a_lh . m                         head score;  w_l = softmax_h(s_l)   (within each block, over heads)
    T    = (1/H) sum_l sum_h w_lh a_lh      fused attention map (N,)
    S_c  = the classifier's CAM (its 1x1 head on the patch features)
    FineCAM_c = minmax(T) * minmax(S_c),    minmax(x) = (x - min) / (max - min + eps)

Differences from the reference, on purpose: T is computed once per image and multiplied with *every* class map
in one pass (the reference recomputed the class-independent T once per class, 37x); maps are produced for all
classes so that `generate` can keep the ground-truth classes of training images (the reference used the
argmax prediction); min-max divides by (max - min), not by max; attention is recorded once per forward
(the reference recorded each block twice). S_c is the head applied to the normed patch tokens.

Train the classifier with train_cls.cls_pool=token (the reference's CLS-token ViT classifier): then the CLS
token's attention is what the classification loss shapes. With a GAP head the CLS token is never read by the
loss, which is tolerable for pretrained ViTs but leaves a randomly initialised hybrid's CLS attention untrained.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.cams.base import CamMethod, minmax_normalize


def head_weighted_cls_attention(attentions: list[torch.Tensor], tokens: torch.Tensor,
                                prefix: int) -> torch.Tensor:
    """L x (B, H, T, T) attentions, (B, T, D) pre-norm tokens -> fused CLS->patch attention (B, N), N = T - prefix."""
    cls_to_patch = torch.stack([a[:, :, 0, prefix:] for a in attentions], dim=1)  # (B, L, H, N)
    token_mean = F.normalize(tokens[:, prefix:], dim=-1).mean(dim=-1)  # (B, N)
    scores = torch.einsum("blhn,bn->blh", cls_to_patch, token_mean)
    weights = scores.softmax(dim=-1)  # over heads, within each block
    heads = cls_to_patch.shape[2]
    return torch.einsum("blh,blhn->bn", weights, cls_to_patch) / heads


class FineCAM(CamMethod):
    """FineCAM on a CamClassifier whose backbone has a CLS token and `forward_with_attention`."""

    def __init__(self, classifier: nn.Module, eps: float = 1e-6):
        super().__init__()
        backbone = getattr(classifier, "backbone", None)
        if backbone is None or not getattr(backbone, "is_vit", False) or not hasattr(classifier, "head"):
            raise TypeError("cams.method=finecam needs train_cls.model=cam_classifier on a ViT or hybrid backbone "
                            f"(got {type(classifier).__name__} on {getattr(backbone, 'name', '?')})")
        if getattr(getattr(backbone, "model", backbone), "cls_token", True) is None:
            raise TypeError(f"finecam needs a CLS token; backbone {backbone.name!r} has none")
        self.classifier = classifier
        self.eps = eps

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (logits (B, C), FineCAM (B, C, h, w) in [0, 1]), one backbone pass for all classes."""
        backbone, head = self.classifier.backbone, self.classifier.head
        vp = backbone.forward_with_attention(x)
        cam = F.conv2d(vp.features, head.weight)  # (B, C, h, w), the classifier's own CAM
        if getattr(self.classifier, "pool", "avg") == "token":
            logits = self.classifier.token_logits(vp.cls)
        else:
            logits = cam.mean(dim=(2, 3)) + head.bias
        b, _, h, w = cam.shape
        fused = head_weighted_cls_attention(vp.attentions, vp.tokens, backbone.prefix_tokens).view(b, 1, h, w)
        return logits, minmax_normalize(fused, self.eps) * minmax_normalize(cam, self.eps)
