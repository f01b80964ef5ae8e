"""Dense CRF (Krähenbühl & Koltun 2011) through pydensecrf2, an optional extra: ``pip install "weakseg[crf]"``.

The CRF always runs on the original uint8 RGB image; a normalised tensor cast to uint8 (the Ensembled-WSSS
bug) is refused by the dtype check.
"""

from __future__ import annotations

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


def _infer(dcrf, unary: np.ndarray, image: np.ndarray, n_labels: int, params: CrfParams) -> np.ndarray:
    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                             compat=params.bilateral_compat)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.reshape(n_labels, h, w)


def crf_from_probabilities(image: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """image (H, W, 3) uint8, probs (L, H, W) summing to 1 over L -> refined marginals (L, H, W)."""
    dcrf, dutils = _densecrf()
    image = _check_image(image, probs.shape[1:])
    probs = np.clip(probs.astype(np.float32), 1e-8, 1.0)
    return _infer(dcrf, dutils.unary_from_softmax(probs), image, probs.shape[0], params)


def crf_from_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7,
                    params: CrfParams = CrfParams()) -> np.ndarray:
    """image (H, W, 3) uint8, labels (H, W) int in [0, n_labels) -> refined marginals (n_labels, H, W)."""
    dcrf, dutils = _densecrf()
    image = _check_image(image, labels.shape)
    if n_labels < 2:
        out = np.zeros((max(n_labels, 1), *labels.shape), dtype=np.float32)
        out[0] = 1.0
        return out
    unary = dutils.unary_from_labels(labels.astype(np.int32), n_labels, gt_prob=gt_prob, zero_unsure=False)
    return _infer(dcrf, unary, image, n_labels, params)


def background_softmax(cams: np.ndarray, bg_value: float, temperature: float = 1.0) -> np.ndarray:
    """cams (K, H, W) in [0, 1] -> softmax over [constant background plane, cams] / T: (K + 1, H, W)."""
    if temperature <= 0:
        raise ValueError(f"masks.crf_softmax_temperature must be > 0, got {temperature}")
    planes = np.concatenate([np.full((1, *cams.shape[1:]), bg_value, dtype=np.float32),
                             cams.astype(np.float32)]) / temperature
    planes -= planes.max(axis=0, keepdims=True)
    e = np.exp(planes)
    return e / e.sum(axis=0, keepdims=True)
