"""Segmentation inference on whole images of any size: resize, multi-scale + flip, back to the input size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data.torch_datasets import resize_image, to_float_tensor
from weakseg.models.backbones import normalizer
from weakseg.models.segmentation import SegModel


class SegPredictor:
    """Wraps a trained `SegModel`: image (H, W, 3) uint8 -> class probabilities (C, H, W) / labels (H, W)."""

    def __init__(self, model: SegModel, infer_size: int, scales: list[float] | None = None, flip: bool = False,
                 device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.infer_size, self.scales, self.flip = infer_size, list(scales or [1.0]), flip
        self.device = torch.device(device)
        self.normalize = normalizer(model.mean, model.std)
        self.divisor = getattr(model, "size_divisor", 32)

    def _size(self, h: int, w: int, scale: float) -> tuple[int, int]:
        f = self.infer_size * scale / max(h, w)
        d = self.divisor
        return max(d, int(round(h * f / d)) * d), max(d, int(round(w * f / d)) * d)

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (C, H, W) float softmax probabilities averaged over scales and flips."""
        h, w = image.shape[:2]
        x = to_float_tensor(image).to(self.device)[None]
        total = None
        for s in self.scales:
            xs = self.normalize(resize_image(x, self._size(h, w, s)))
            outs = [self.model(xs)]
            if self.flip:
                outs.append(torch.flip(self.model(torch.flip(xs, dims=[3])), dims=[3]))
            for logits in outs:
                p = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]
                total = p if total is None else total + p
        return total / (len(self.scales) * (2 if self.flip else 1))

    def labels(self, image: np.ndarray) -> np.ndarray:
        return self.probabilities(image).argmax(0).to(torch.uint8).cpu().numpy()
