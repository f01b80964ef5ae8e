"""CAM methods: each maps a batch of normalised images to non-negative class maps.

Interface (`CamMethod`): ``maps(x) -> (logits (B, C), cams (B, C, h, w) >= 0)`` for a batch x of
(B, 3, H, W) normalised images. Multi-scale/flip aggregation, label restriction, normalisation and
storage are done once for all methods in `weakseg.cams.generate`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class CamMethod(nn.Module):
    """Base class; subclasses implement `maps`."""

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ClassicCAM(CamMethod):
    """Zhou et al. 2016: CAM_c = ReLU(sum_k w_ck F_k), from the classifier's own 1x1 head."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.classifier.forward_with_cam(x)
        return logits, torch.relu(cam)


METHODS: dict[str, Callable[[nn.Module], CamMethod]] = {
    "cam": ClassicCAM,
}


def build_cam_method(name: str, classifier: nn.Module) -> CamMethod:
    try:
        builder = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown CAM method {name!r}; valid names: {', '.join(sorted(METHODS))}") from None
    return builder(classifier)
