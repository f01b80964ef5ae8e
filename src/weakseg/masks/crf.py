"""Dense CRF (Krähenbühl & Koltun 2011) through pydensecrf2, an optional extra: ``pip install "weakseg[crf]"``.

The CRF always runs on the original uint8 RGB image; a normalised tensor cast to uint8 (the Ensembled-WSSS
bug) is refused by the dtype check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class CrfUnavailable(ImportError):
    pass


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as dutils
    except ImportError as e:
        raise CrfUnavailable(
            'the dense CRF needs pydensecrf2: pip install "weakseg[crf]"  (or pip install pydensecrf2); '
            "or choose another masks.method") from e
    return dcrf, dutils


@dataclass(frozen=True)
class CrfParams:
    """Pairwise kernels and iteration count (defaults: AFA `utils/dcrf.py`)."""

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0


def _check_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the CRF needs the original (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if tuple(image.shape[:2]) != tuple(hw):
        raise ValueError(f"image is {image.shape[:2]} but the label maps are {tuple(hw)}")
    return np.ascontiguousarray(image)


def _infer(dcrf, unaries: Sequence[np.ndarray], image: np.ndarray, n_labels: int,
           params: CrfParams) -> list[np.ndarray]:
    """One CRF pass per unary (n_labels, H * W) -> marginals (n_labels, H, W) each. The pairwise kernels (their
    permutohedral lattices) are built once for all passes (two passes on VOC images: 0.522 -> 0.463 s,
    bench.crf_band); the marginals are those of separate CRFs, bit for bit."""
    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                             compat=params.bilateral_compat)
    marginals = []
    for unary in unaries:
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        marginals.append(np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(n_labels, h, w))
    return marginals


def crf_passes_from_probabilities(image: np.ndarray, probs: Sequence[np.ndarray],
                                  params: CrfParams = CrfParams()) -> list[np.ndarray]:
    """image (H, W, 3) uint8, each of probs (L, H, W) summing to 1 over L -> its refined marginals (L, H, W)."""
    dcrf, dutils = _densecrf()
    image = _check_image(image, probs[0].shape[1:])
    unaries = [dutils.unary_from_softmax(np.clip(p.astype(np.float32), 1e-8, 1.0)) for p in probs]
    return _infer(dcrf, unaries, image, probs[0].shape[0], params)


def crf_from_probabilities(image: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """image (H, W, 3) uint8, probs (L, H, W) summing to 1 over L -> refined marginals (L, H, W)."""
    return crf_passes_from_probabilities(image, [probs], params)[0]


def crf_passes_from_labels(image: np.ndarray, labels: Sequence[np.ndarray], n_labels: int, gt_prob: float = 0.7,
                           params: CrfParams = CrfParams()) -> list[np.ndarray]:
    """image (H, W, 3) uint8, each of labels (H, W) int in [0, n_labels) -> its refined marginals (n_labels, H, W)."""
    dcrf, dutils = _densecrf()
    image = _check_image(image, labels[0].shape)
    if n_labels < 2:
        out = np.zeros((max(n_labels, 1), *labels[0].shape), dtype=np.float32)
        out[0] = 1.0
        return [out.copy() for _ in labels]
    unaries = [dutils.unary_from_labels(index.astype(np.int32), n_labels, gt_prob=gt_prob, zero_unsure=False)
               for index in labels]
    return _infer(dcrf, unaries, image, n_labels, params)


def crf_from_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7,
                    params: CrfParams = CrfParams()) -> np.ndarray:
    """image (H, W, 3) uint8, labels (H, W) int in [0, n_labels) -> refined marginals (n_labels, H, W)."""
    return crf_passes_from_labels(image, [labels], n_labels, gt_prob, params)[0]


def background_softmax(cams: np.ndarray, bg_value: float, temperature: float = 1.0) -> np.ndarray:
    """cams (K, H, W) in [0, 1] -> softmax over [constant background plane, cams] / T: (K + 1, H, W)."""
    if temperature <= 0:
        raise ValueError(f"masks.crf_softmax_temperature must be > 0, got {temperature}")
    planes = np.concatenate([np.full((1, *cams.shape[1:]), bg_value, dtype=np.float32),
                             cams.astype(np.float32)]) / temperature
    planes -= planes.max(axis=0, keepdims=True)
    e = np.exp(planes)
    return e / e.sum(axis=0, keepdims=True)
