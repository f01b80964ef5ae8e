"""CAM methods: each maps a batch of normalised images to non-negative class maps.

Interface (`CamMethod`): ``maps(x) -> (logits (B, C), cams (B, C, h, w) >= 0)`` for a batch x of
(B, 3, H, W) normalised images. Multi-scale/flip aggregation, label restriction, normalisation and
storage are done once for all methods in `weakseg.cams.generate`.

Registry (`METHODS`): name -> builder(classifier). The classifier is the model trained by `train-cls`;
methods that need their own model say so in `REQUIRED_MODEL` (the `train_cls.model` value).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from weakseg.cams.base import CamMethod
from weakseg.cams.ccam import CCAMNet, ClassAgnosticCAM
from weakseg.cams.class_specific import ClassSpecificCAM, ClassSpecificCCAMNet
from weakseg.cams.ecs import ErasedCamSupervision
from weakseg.cams.finecam import FineCAM
from weakseg.cams.recam import ReCAM, ReCAMBlend
from weakseg.cams.weaktr import WeakTrCAM, WeakTrNet, weaktr_fused


class ClassicCAM(CamMethod):
    """Zhou et al. 2016: CAM_c = ReLU(sum_k w_ck F_k), from the classifier's own 1x1 head."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        if isinstance(classifier, (WeakTrNet, CCAMNet, ClassSpecificCCAMNet)):
            raise TypeError(f"cams.method=cam needs train_cls.model=cam_classifier, got {type(classifier).__name__}")
        self.classifier = classifier

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.classifier.forward_with_cam(x)
        return logits, torch.relu(cam)


METHODS: dict[str, Callable[[nn.Module], CamMethod]] = {
    "cam": ClassicCAM,
    "finecam": FineCAM,
    "weaktr": WeakTrCAM,
    "weaktr_fused": weaktr_fused,
    "ccam": ClassAgnosticCAM,
    "class_specific_ccam": ClassSpecificCAM,
    "recam": ReCAM,
    "recam_blend": ReCAMBlend,
}

# train_cls.model each method needs (methods not listed use the default CamClassifier).
REQUIRED_MODEL: dict[str, str] = {"weaktr": "weaktr", "weaktr_fused": "weaktr", "ccam": "ccam",
                                  "class_specific_ccam": "class_specific_ccam", "recam": "recam",
                                  "recam_blend": "recam"}
# Other models a method also runs on: classic CAM reads the BCE head a ReCAM classifier trains too (an ablation).
ALSO_RUNS_ON: dict[str, tuple[str, ...]] = {"cam": ("recam",)}


def required_model(method: str) -> str:
    """The `train_cls.model` that CAM method `method` needs."""
    return REQUIRED_MODEL.get(method, "cam_classifier")


def compatible_models(method: str) -> tuple[str, ...]:
    """Every `train_cls.model` CAM method `method` runs on, the one it is trained for first."""
    return (required_model(method), *ALSO_RUNS_ON.get(method, ()))


def build_cam_method(name: str, classifier: nn.Module, cam_cfg: Optional[object] = None) -> CamMethod:
    """Method `name` on `classifier`; with `cam_cfg.ecs` true, wrapped in erased-CAM supervision."""
    try:
        builder = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown CAM method {name!r}; valid names: {', '.join(sorted(METHODS))}") from None
    method = builder(classifier)
    if cam_cfg is not None and getattr(cam_cfg, "ecs", False):
        method = ErasedCamSupervision(method, delta=cam_cfg.ecs_delta, sigma=cam_cfg.ecs_sigma)
    return method
