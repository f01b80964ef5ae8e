"""ONNX export of a trained segmentation model, with an onnxruntime parity check (optional extra `weakseg[onnx]`).

The exported graph includes the input normalisation: input "image" (B, 3, H, W) float RGB in [0, 1] ->
output "logits" (B, C, H, W). The batch dimension is dynamic; H and W are fixed at export time (ViT position
embeddings are resampled once for that size and stored as constants).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from weakseg.models.segmentation import SegModel


class NormalisedSegModel(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> the wrapped model's logits (B, C, H, W).

    With `class_weights` (C,) (a run's calibration) the logits are shifted by log w_c, so that their argmax is
    argmax_c w_c * softmax_c, the label `weakseg predict` gives at one scale.
    """

    def __init__(self, model: SegModel, class_weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1))
        log_weights = None if class_weights is None else torch.tensor(list(class_weights)).log().view(1, -1, 1, 1)
        self.register_buffer("log_weights", log_weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model((image - self.mean) / self.std)
        return logits if self.log_weights is None else logits + self.log_weights


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@contextlib.contextmanager
def frozen_position_embeddings() -> Iterator[None]:
    """While active, timm's `resample_abs_pos_embed` (used by timm ViTs and our hybrid ViT) is computed once per
    (embedding, size) eagerly and then replayed as a constant.

    timm resamples position embeddings on every call with antialiased bicubic interpolation, which ONNX cannot
    express; for a fixed export size the result is a constant, so the exported graph stores it instead.
    """
    from timm.layers import pos_embed as timm_pos_embed

    original = timm_pos_embed.resample_abs_pos_embed
    cache: dict[tuple, torch.Tensor] = {}

    def frozen(posemb: torch.Tensor, new_size, *args, **kwargs) -> torch.Tensor:
        key = (posemb.data_ptr(), tuple(int(v) for v in posemb.shape), tuple(int(v) for v in new_size), repr(args),
               repr(sorted(kwargs.items())))
        if key not in cache:
            with torch.no_grad():
                cache[key] = original(posemb, new_size, *args, **kwargs).detach().clone()
        return cache[key]

    patched = [m for m in list(sys.modules.values()) if getattr(m, "resample_abs_pos_embed", None) is original]
    for module in patched:
        module.resample_abs_pos_embed = frozen
    try:
        yield
    finally:
        for module in patched:
            module.resample_abs_pos_embed = original


def export_onnx(model: SegModel, path: str | Path, size: int | tuple[int, int], opset: int = 17,
                class_weights: Optional[Sequence[float]] = None) -> Path:
    """Write `model` (eval mode, on CPU) as ONNX for inputs of `size` (H, W) or H = W = size; returns the path.
    `class_weights`: see `NormalisedSegModel`."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError('ONNX export needs onnx: pip install "weakseg[onnx]"') from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = _hw(size)
    example = torch.rand(1, 3, h, w)
    wrapped = NormalisedSegModel(copy.deepcopy(model), class_weights).cpu().eval()
    with torch.no_grad(), warnings.catch_warnings(), frozen_position_embeddings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        wrapped(example)  # fills the position-embedding cache outside the trace
        torch.onnx.export(wrapped, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def onnx_parity(model: SegModel, path: str | Path, size: int | tuple[int, int], batch: int = 2,
                seed: int = 0, class_weights: Optional[Sequence[float]] = None) -> float:
    """Max |logits_torch - logits_onnxruntime| on seeded random images of `size` (the check export must pass)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError('the ONNX parity check needs onnxruntime: pip install "weakseg[onnx]"') from e
    h, w = _hw(size)
    image = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    wrapped = NormalisedSegModel(copy.deepcopy(model), class_weights).cpu().eval()
    with torch.no_grad():
        expected = wrapped(image).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": image.numpy()})
    if got.shape != expected.shape:
        raise AssertionError(f"ONNX output shape {got.shape} != torch {expected.shape}")
    return float(np.abs(got - expected).max())


__all__ = ["NormalisedSegModel", "export_onnx", "frozen_position_embeddings", "onnx_parity"]
