"""Segmentation inference on whole images of any size: resize, multi-scale + flip, optional sliding window,
back to the input size."""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakseg import dist
from weakseg.data.torch_datasets import resize_image, to_float_tensor
from weakseg.masks.crf import CrfParams, _densecrf, crf_from_probabilities
from weakseg.models.backbones import normalizer
from weakseg.models.segmentation import SegModel


class SegPredictor:
    """Wraps a trained `SegModel`: image (H, W, 3) uint8 -> class probabilities (C, H, W) / labels (H, W).

    `class_weights` (C,): labels are argmax_c w_c * p_c (a label-free calibration, weakseg.train.calibration).
    `crf`: labels come from a dense CRF over every class on the original image, unary -log p (DeepLab-style);
    `crf_workers` > 0: `iter_labels` runs that CRF in as many processes beside this one.
    `walk`: (image, probs (C, H, W)) -> probs (C, H, W), applied before the CRF
    (weakseg.masks.affinity.ProbabilityWalk).
    """

    def __init__(self, model: SegModel, infer_size: int, scales: list[float] | None = None, flip: bool = False,
                 device: torch.device | str = "cpu", window: int = 0, window_overlap: float = 1 / 3,
                 precision: str = "fp32", class_weights: Sequence[float] | None = None,
                 crf: Optional[CrfParams] = None, crf_workers: int = 0,
                 walk: Optional[Callable[[np.ndarray, torch.Tensor], torch.Tensor]] = None):
        if window < 0 or not 0 <= window_overlap < 1:
            raise ValueError(f"sliding window needs window >= 0 and 0 <= overlap < 1, got {window}, {window_overlap}")
        self.model = dist.channels_last(model.to(device).eval())
        self.infer_size, self.scales, self.flip = infer_size, list(scales or [1.0]), flip
        self.device = torch.device(device)
        self.window, self.window_overlap = window, window_overlap
        self.precision = dist.resolve_precision(precision, self.device)
        self.normalize = normalizer(model.mean, model.std)
        self.divisor = getattr(model, "size_divisor", 32)
        self.class_weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        if crf_workers < 0:
            raise ValueError(f"crf_workers must be >= 0, got {crf_workers}")
        self.crf, self.crf_workers, self.walk = crf, crf_workers, walk
        if crf is not None:
            _densecrf()  # fail now, with the install command, rather than at the first image

    @classmethod
    def from_config(cls, model: SegModel, sc, device: torch.device | str = "cpu", precision: str = "fp32",
                    class_weights: Sequence[float] | None = None,
                    walk: Optional[Callable[[np.ndarray, torch.Tensor], torch.Tensor]] = None) -> "SegPredictor":
        """From a `SegTrainCfg` (infer_size, infer_scales, infer_flip, infer_window(_overlap), infer_crf*)."""
        crf = inference_crf_params(sc) if sc.infer_crf else None
        return cls(model, sc.infer_size or sc.crop_size, sc.infer_scales, sc.infer_flip, device,
                   sc.infer_window, sc.infer_window_overlap, precision, class_weights, crf, sc.infer_crf_workers, walk)

    def _size(self, h: int, w: int, scale: float) -> tuple[int, int]:
        f = self.infer_size * scale / max(h, w)
        d = self.divisor
        return max(d, int(round(h * f / d)) * d), max(d, int(round(w * f / d)) * d)

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (C, H, W) float softmax probabilities averaged over scales and flips."""
        h, w = image.shape[:2]
        x = dist.channels_last(to_float_tensor(image).to(self.device)[None])
        total = None
        for s in self.scales:
            xs = self.normalize(resize_image(x, self._size(h, w, s)))
            outs = [self.logits(xs)]
            if self.flip:
                outs.append(torch.flip(self.logits(torch.flip(xs, dims=[3])), dims=[3]))
            for logits in outs:
                p = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]
                total = p if total is None else total + p
        return total / (len(self.scales) * (2 if self.flip else 1))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with dist.autocast(self.device, self.precision):
            return self.model(x).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) normalised -> (1, C, h, w) logits: one forward pass, or the average over overlapping
        `window` x `window` tiles when the image is larger than the window (zero padding where it is smaller)."""
        h, w = x.shape[2:]
        win = self.window
        if win <= 0 or (h <= win and w <= win):
            return self._forward(x)
        stride = max(1, int(win * (1 - self.window_overlap)))
        ph, pw = max(h, win), max(w, win)
        x = F.pad(x, (0, pw - w, 0, ph - h))
        total = count = None
        for top in _window_starts(ph, win, stride):
            for left in _window_starts(pw, win, stride):
                out = self._forward(x[:, :, top:top + win, left:left + win])
                if total is None:
                    total = out.new_zeros(1, out.shape[1], ph, pw)
                    count = out.new_zeros(1, 1, ph, pw)
                total[:, :, top:top + win, left:left + win] += out
                count[:, :, top:top + win, left:left + win] += 1
        return (total / count)[:, :, :h, :w]

    def network_probabilities(self, image: np.ndarray, present: np.ndarray | None = None) -> torch.Tensor:
        """(H, W, 3) uint8 -> (C, H, W) probabilities after the class weights, the `present` gate ((C,) bool:
        the classes the image may hold; the others get 0) and the walk, before any CRF."""
        probs = self.probabilities(image)
        if self.class_weights is not None:
            if len(self.class_weights) != probs.shape[0]:
                raise ValueError(f"{len(self.class_weights)} class weights for a {probs.shape[0]}-class model")
            probs = reweight(probs, self.class_weights)
        if present is not None:
            if len(present) != probs.shape[0]:
                raise ValueError(f"a gate of {len(present)} classes for a {probs.shape[0]}-class model")
            probs = reweight(probs, np.asarray(present, dtype=np.float32))
        if self.walk is not None:
            probs = self.walk(image, probs.cpu())
        return probs.cpu()

    def final_probabilities(self, image: np.ndarray, present: np.ndarray | None = None) -> torch.Tensor:
        """`network_probabilities`, then the dense CRF on the original image when `crf`: (C, H, W)."""
        probs = self.network_probabilities(image, present)
        return probs if self.crf is None else crf_refined(image, probs, present, self.crf)

    def labels(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) uint8 class ids (after the dense CRF on the original image when `crf`)."""
        return self.final_probabilities(image).argmax(0).to(torch.uint8).numpy()

    def iter_labels(self, images: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """`labels` of each image, in order. With the CRF and `crf_workers` > 0, the CRF (single-threaded, most of
        the time on a CPU) runs in that many worker processes while this one runs the network on the next images
        with `crf_workers` fewer torch threads (at least 1; restored when the iteration ends), and at most
        `crf_workers` + 1 images wait for theirs. The same labels up to the float rounding of the network at
        another thread count (identical on 209 VOC images; bench.crf_workers checks them)."""
        if self.crf is None or self.crf_workers == 0:
            for image in images:
                yield self.labels(image)
            return
        with dist.threads_beside(self.crf_workers), \
                dist.worker_pool(self.crf_workers, "the inference CRF", "train_seg.infer_crf_workers=0 (predict: "
                                 "--crf-workers 0)", initializer=torch.set_num_threads, initargs=(1,)) as pool:
            waiting: deque = deque()
            for image in images:
                probs = self.network_probabilities(image).numpy()
                waiting.append(pool.submit(_crf_labels, image, probs, self.crf))
                if len(waiting) > self.crf_workers:
                    yield waiting.popleft().result()
            last = [result.result() for result in waiting]
        yield from last  # the pool is closed and the threads restored even if the caller stops after the last one


def crf_refined(image: np.ndarray, probs: torch.Tensor, present: np.ndarray | None, params: CrfParams) -> torch.Tensor:
    """The dense CRF of `probs` (C, H, W) on `image` (H, W, 3) uint8 over the `present` classes ((C,) bool; None =
    all); the others keep probability 0. Returns (C, H, W)."""
    # gated-out classes hold no probability: the CRF runs over the others alone (its cost grows with C)
    probs = probs.cpu()
    keep = torch.arange(probs.shape[0]) if present is None else torch.from_numpy(np.flatnonzero(present))
    refined = (torch.from_numpy(crf_from_probabilities(image, probs[keep].numpy(), params))
               if len(keep) > 1 else probs[keep].float())  # one class left: nothing to refine
    return refined.new_zeros(probs.shape).index_copy_(0, keep, refined)


def _crf_labels(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """In a worker process: (H, W) uint8 labels of the CRF of `probs` (C, H, W) on `image`."""
    return crf_refined(image, torch.from_numpy(probs), None, params).argmax(0).to(torch.uint8).numpy()


def present_classes(image_labels: np.ndarray) -> np.ndarray:
    """(C - 1,) bool over the foreground classes of an image's labels -> (C,) bool with background always in."""
    return np.concatenate([[True], np.asarray(image_labels, dtype=bool)])


def reweight(probs: torch.Tensor, weights) -> torch.Tensor:
    """probs (C, H, W) times per-class `weights` (C,), renormalised over C (0 where every weighted class is 0).
    0/1 weights gate the classes an image may hold; the argmax of the result is argmax_c w_c * p_c."""
    w = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device)
    probs = probs * w[:, None, None]
    return probs / probs.sum(0, keepdim=True).clamp_min(1e-12)


def inference_crf_params(sc) -> CrfParams:
    """The kernels of the inference CRF of a `SegTrainCfg` (train_seg.infer_crf_*)."""
    return CrfParams(sc.infer_crf_iterations, sc.infer_crf_gaussian_sxy, sc.infer_crf_gaussian_compat,
                     sc.infer_crf_bilateral_sxy, sc.infer_crf_bilateral_srgb, sc.infer_crf_bilateral_compat)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` covering [0, length) with step `stride`, the last flush with the end."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts
