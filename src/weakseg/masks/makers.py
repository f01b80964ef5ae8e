"""Pseudo-mask makers: CAMs of an image's present classes -> a label map.

Interface (`MaskMaker.make`): cams (K, H, W) float in [0, 1] at image size, classes (K,) 1-based class ids,
image (H, W, 3) uint8 RGB (the original pixels, never a normalised tensor) -> (H, W) uint8 label map
with 255 = ignore. Makers that need more than that use two optional hooks the masks stage calls:
`prepare(ctx, ds, cam_dir)` once per run (e.g. to train the refiner), `extra_inputs(sample_id, size)`
per image (keyword inputs of `make`, e.g. the fusion maker's foreground map) and `finish()` at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.config import MaskCfg
from weakseg.io import IGNORE_INDEX, load_cam
from weakseg.masks.crf import (CrfParams, _densecrf, background_softmax, crf_passes_from_labels,
                              crf_passes_from_probabilities)
from weakseg.masks.fusion import foreground_map, fuse_agnostic_specific, fused_scores, resolve_cams_dir

if TYPE_CHECKING:
    from weakseg.masks.affinity import StoredLevels


def threshold_labels(cams: np.ndarray, classes: np.ndarray, bg_threshold: float, ignore_low: float = -1.0,
                     ignore_high: float = -1.0) -> np.ndarray:
    """Background plane at `bg_threshold` + argmax over the present classes.

    Pixels whose top CAM score lies in [ignore_low, ignore_high) are uncertain and written as 255.
    """
    h, w = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((h, w), dtype=np.uint8)
    top = cams.max(axis=0)
    labels = np.asarray(classes, dtype=np.uint8)[cams.argmax(axis=0)]
    out = np.where(top >= bg_threshold, labels, 0).astype(np.uint8)
    if 0 <= ignore_low < ignore_high:
        out[(top >= ignore_low) & (top < ignore_high)] = IGNORE_INDEX
    return out


class MaskMaker:
    """Base class: `make(cams, classes, image) -> (H, W) uint8`. `needs_threshold` makers get one set."""

    needs_threshold = True
    parallel_safe = True  # may run in forked worker processes (masks.num_workers)
    writes_ignore_band = False  # honours masks.ignore_low / ignore_high

    def __init__(self, cfg: MaskCfg):
        if 0 <= cfg.ignore_low < cfg.ignore_high and not self.writes_ignore_band:
            raise ValueError(f"masks.method={cfg.method} writes no ignore band, but masks.ignore_low / ignore_high = "
                             f"{cfg.ignore_low} / {cfg.ignore_high} ask for one; unset them (-1) or use "
                             f"another masks.method (the refiner and affinity have none)")
        self.cfg = cfg
        self.bg_threshold = cfg.bg_threshold

    def prepare(self, ctx: Any, ds: Any, cam_dir: Path) -> dict:
        """Run-level setup before any image (all ranks); returns metrics to record. Default: nothing."""
        return {}

    def threshold_cam_dir(self, cam_dir: Path) -> Path:
        """Folder of the CAM files whose pooled histogram picks the label-free threshold."""
        return cam_dir

    def extra_inputs(self, sample_id: str, size: tuple[int, int]) -> dict:
        """Extra keyword inputs of `make` for one image. Default: none."""
        return {}

    def finish(self) -> None:
        """After every image of the run is written (all ranks): drop temporary files. Default: nothing."""

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ThresholdMaker(MaskMaker):
    """Background threshold + argmax, with an optional ignore band."""

    writes_ignore_band = True

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray) -> np.ndarray:
        return threshold_labels(cams, classes, self.bg_threshold, self.cfg.ignore_low, self.cfg.ignore_high)


def confident_regions(at_high: np.ndarray, at_low: np.ndarray) -> np.ndarray:
    """IRN's confident regions from two label maps (H, W) (0 = background) of the background plane at the band's
    high and low ends: at_high's classes where it has one, background where at_low still says background, 255
    elsewhere."""
    out = np.full(at_high.shape, IGNORE_INDEX, dtype=np.uint8)
    out[at_high > 0] = at_high[at_high > 0]
    out[(at_high == 0) & (at_low == 0)] = 0
    return out


class CrfMaker(MaskMaker):
    """Dense CRF on the original RGB image over background + the image's classes.

    crf_unary=softmax: unary from softmax([bg plane at the threshold, cams] / T) (AFA/WeakTr final-CRF style);
    crf_unary=labels: unary from the threshold+argmax labels with crf_gt_prob (WeakTr CAM / Ensembled style).
    With an ignore band [ignore_low, ignore_high) (IRN's confident regions), two CRF passes replace the one at
    the threshold: foreground where the pass with its background plane at ignore_high still says foreground,
    background where the pass at ignore_low still says background, 255 elsewhere.
    """

    writes_ignore_band = True

    def __init__(self, cfg: MaskCfg):
        super().__init__(cfg)
        if cfg.crf_unary not in ("softmax", "labels"):
            raise ValueError(f"masks.crf_unary must be softmax or labels, got {cfg.crf_unary!r}")
        _densecrf()  # fail now, with the install command, rather than at the first image
        self.params = CrfParams(cfg.crf_iterations, cfg.crf_gaussian_sxy, cfg.crf_gaussian_compat,
                                cfg.crf_bilateral_sxy, cfg.crf_bilateral_srgb, cfg.crf_bilateral_compat)

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray) -> np.ndarray:
        if cams.shape[0] == 0:
            return np.zeros(cams.shape[1:], dtype=np.uint8)
        if not 0 <= self.cfg.ignore_low < self.cfg.ignore_high:
            return self.crf_labels(cams, classes, image, [self.bg_threshold])[0]
        return confident_regions(*self.crf_labels(cams, classes, image, [self.cfg.ignore_high, self.cfg.ignore_low]))

    def crf_labels(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray,
                   bg_values: Sequence[float]) -> list[np.ndarray]:
        """One CRF pass per background plane value in `bg_values` -> (H, W) uint8 labels each (0 = background)."""
        if self.cfg.crf_unary == "softmax":
            probs = [background_softmax(cams, bg_value, self.cfg.crf_softmax_temperature) for bg_value in bg_values]
            marginals = crf_passes_from_probabilities(image, probs, self.params)
        else:
            top, index = cams.max(axis=0), cams.argmax(axis=0) + 1
            labels = [np.where(top >= bg_value, index, 0) for bg_value in bg_values]
            marginals = crf_passes_from_labels(image, labels, cams.shape[0] + 1, self.cfg.crf_gt_prob, self.params)
        ids = np.concatenate([[0], np.asarray(classes)]).astype(np.uint8)
        return [ids[m.argmax(axis=0)] for m in marginals]


class RefinerMaker(MaskMaker):
    """weaktr-refinery CNN-decoder refiner; `prepare` trains it, masks follow `masks.loss_threshold`."""

    needs_threshold = False
    parallel_safe = False  # holds a torch model: runs in-process

    def __init__(self, cfg: MaskCfg):
        super().__init__(cfg)
        self.decoder: Optional[torch.nn.Module] = None
        self.backbone: Optional[torch.nn.Module] = None
        self.device = torch.device("cpu")

    def prepare(self, ctx: Any, ds: Any, cam_dir: Path) -> dict:
        from weakseg.masks.refiner import fit_refiner_for_run
        from weakseg.train.classifier import load_classifier

        classifier = load_classifier(ctx)
        self.decoder, metrics = fit_refiner_for_run(ctx, ds, cam_dir, classifier)
        self.backbone, self.device = classifier.backbone.eval(), ctx.device
        return {**metrics, "loss_threshold": self.cfg.loss_threshold}

    @torch.no_grad()
    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray) -> np.ndarray:
        from weakseg.data.torch_datasets import resize_image, to_float_tensor
        from weakseg.masks.refiner import loss_threshold_labels, normalised_loss_maps, refiner_forward
        from weakseg.models.backbones import normalizer

        if self.decoder is None or self.backbone is None:
            raise RuntimeError("RefinerMaker.prepare(ctx, ds, cam_dir) must run before make()")
        h, w = cams.shape[1:]
        if cams.shape[0] == 0:
            return np.zeros((h, w), dtype=np.uint8)
        size = self.cfg.refiner_image_size
        x = resize_image(to_float_tensor(image), (size, size))[None].to(self.device)
        feats = self.backbone.forward_features(normalizer(self.backbone.mean, self.backbone.std)(x))
        channels = torch.as_tensor(np.asarray(classes) - 1, dtype=torch.long, device=self.device)
        logits = refiner_forward(self.decoder, feats, channels[None], size)[0]  # (K, S, S)
        target = F.interpolate(torch.from_numpy(cams)[None].to(self.device), size=(size, size), mode="bilinear",
                               align_corners=False)[0]
        maps = torch.stack([normalised_loss_maps(logits, target), torch.sigmoid(logits)])  # (2, K, S, S)
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False).cpu().numpy()
        return loss_threshold_labels(maps[0], maps[1], classes, self.cfg.loss_threshold)


class FusionMaker(MaskMaker):
    """Class-agnostic foreground map (another run's CAMs, e.g. CCAM) x class CAMs: argmax class where F > t.

    The threshold t is `bg_threshold` (label-free: Otsu on the pooled foreground maps when < 0).
    """

    writes_ignore_band = True

    def __init__(self, cfg: MaskCfg):
        super().__init__(cfg)
        self.agnostic_dir: Optional[Path] = None

    def prepare(self, ctx: Any, ds: Any, cam_dir: Path) -> dict:
        self.agnostic_dir = resolve_cams_dir(self.cfg.agnostic_cams_run, ctx.cfg.runs_dir)
        return {"agnostic_cams_dir": str(self.agnostic_dir)}

    def threshold_cam_dir(self, cam_dir: Path) -> Path:
        return self.agnostic_dir or cam_dir

    def extra_inputs(self, sample_id: str, size: tuple[int, int]) -> dict:
        if self.agnostic_dir is None:
            raise RuntimeError("FusionMaker.prepare(ctx, ds, cam_dir) must run before extra_inputs()")
        path = self.agnostic_dir / f"{sample_id}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no class-agnostic CAM for image {sample_id}")
        cam, _, agnostic_size = load_cam(path)
        if tuple(agnostic_size) != tuple(size):
            raise ValueError(f"{path}: made for {agnostic_size[1]}x{agnostic_size[0]}, image is {size[1]}x{size[0]}")
        return {"foreground": foreground_map(cam, size)}

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray,
             foreground: Optional[np.ndarray] = None) -> np.ndarray:
        return fuse_agnostic_specific(self.require_foreground(foreground), cams, classes, self.bg_threshold,
                                      self.cfg.ignore_low, self.cfg.ignore_high)

    @staticmethod
    def require_foreground(foreground: Optional[np.ndarray]) -> np.ndarray:
        if foreground is None:
            raise ValueError("the fusion maker needs the class-agnostic foreground map (foreground=...)")
        return foreground


class FusionCrfMaker(FusionMaker):
    """The fusion, then the dense CRF: unary softmax([t, F * cams_k / max_j cams_j] / T) on the original image.

    Before the CRF its argmax is exactly the fusion maker's labels; the CRF then moves the unsure pixels to
    colour edges, with the `crf` maker's unary temperature and kernels (masks.crf_*), and its two-pass ignore
    band when masks.ignore_low / ignore_high are set (on the fused scores, whose max is the foreground map).
    """

    def __init__(self, cfg: MaskCfg):
        super().__init__(cfg)
        if cfg.crf_unary != "softmax":
            raise ValueError(f"masks.method=fusion_crf uses the softmax unary; got masks.crf_unary={cfg.crf_unary!r}")
        self.crf = CrfMaker(cfg)

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray,
             foreground: Optional[np.ndarray] = None) -> np.ndarray:
        self.crf.bg_threshold = self.bg_threshold
        return self.crf.make(fused_scores(self.require_foreground(foreground), cams), classes, image)


class AffinityMaker(MaskMaker):
    """AffinityNet-style random walk of the CAMs (weakseg.masks.affinity): `prepare` trains the affinity head on
    the frozen classifier's features and CAM seeds; masks = walked maps against the background threshold."""

    def __init__(self, cfg: MaskCfg):
        super().__init__(cfg)
        if cfg.affinity_seeds not in ("cams", "crf"):
            raise ValueError(f"masks.affinity_seeds must be cams or crf, got {cfg.affinity_seeds!r}")
        if not 0 < cfg.affinity_seed_scale <= 1:
            raise ValueError(f"masks.affinity_seed_scale must be in (0, 1], got {cfg.affinity_seed_scale}")
        if cfg.affinity_background not in ("plane", "walked"):
            raise ValueError(f"masks.affinity_background must be plane or walked, got {cfg.affinity_background!r}")
        if cfg.affinity_background_power < 0:
            raise ValueError(f"masks.affinity_background_power must be >= 0 (0: from the threshold), "
                             f"got {cfg.affinity_background_power}")
        if cfg.affinity_seeds == "crf":
            CrfMaker(cfg)  # the seeds' CRF: fail now if pydensecrf or the unary setting is missing
        self.head: Optional[torch.nn.Module] = None
        self.backbone: Optional[torch.nn.Module] = None
        self.stored: Optional[StoredLevels] = None
        self.device = torch.device("cpu")

    @property
    def parallel_safe(self) -> bool:  # type: ignore[override]
        return self.device.type == "cpu"  # forked CPU workers each run the model on one thread

    def prepare(self, ctx: Any, ds: Any, cam_dir: Path) -> dict:
        from weakseg.masks.affinity import StoredLevels, feature_paths, fit_affinity_for_run
        from weakseg.train.classifier import load_classifier

        backbone = getattr(load_classifier(ctx), "backbone", None)
        if backbone is None or getattr(backbone, "is_vit", True) or not hasattr(backbone, "forward_pyramid"):
            raise ValueError(f"masks.method={self.cfg.method} needs a CNN classifier backbone (forward_pyramid); "
                             f"train_cls.backbone={getattr(ctx.cfg.train_cls, 'backbone', '?')!r} is not one")
        self.head, metrics = fit_affinity_for_run(ctx, ds, cam_dir, backbone)
        self.backbone, self.device = backbone.eval(), ctx.device
        self.stored = StoredLevels(feature_paths(ctx.out), list(ds.ids))
        return metrics

    def extra_inputs(self, sample_id: str, size: tuple[int, int]) -> dict:
        """The image's backbone levels stored while training the head (saves a second backbone pass)."""
        return {"levels": self.stored(sample_id)} if self.stored is not None else {}

    def finish(self) -> None:
        from weakseg import dist

        if self.stored is not None and dist.is_main_process():
            self.stored.delete()

    def walked(self, cams: np.ndarray, image: np.ndarray, levels: Optional[list] = None) -> np.ndarray:
        """(K, H, W) CAMs -> (K, H, W) walked maps in [0, 1], to be set against the plane at `bg_threshold`.

        affinity_background=plane: the walked CAMs, global max 1 (IRN). walked: the background map
        (1 - max CAM)^alpha walks with them (AffinityNet; alpha = affinity_background_power, by default the one
        that makes it equal the top CAM at t), and a class's map is t x walked CAM / walked background,
        so that it clears the plane t exactly where the walked CAM outweighs the walked background (a pixel whose
        top map exceeds 1 has all its maps divided by that top).
        """
        from weakseg.masks.affinity import walk_image

        if self.head is None or self.backbone is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(ctx, ds, cam_dir) must run before make()")
        cfg, t = self.cfg, self.bg_threshold
        background = None
        if cfg.affinity_background == "walked" and cams.shape[0] > 0:
            if not 0.0 < t < 1.0:
                raise ValueError(f"masks.affinity_background=walked needs a background threshold in (0, 1), got {t}")
            power = cfg.affinity_background_power or math.log(t) / math.log(1.0 - t)
            background = np.clip(1.0 - cams.max(axis=0), 0.0, 1.0) ** power
        walked = walk_image(self.backbone, self.head, image, cams, cfg.affinity_image_size, cfg.affinity_radius,
                            cfg.affinity_beta, cfg.affinity_iterations, self.device, levels, background)
        if background is None:
            return walked
        scores = t * walked[1:] / np.maximum(walked[0], 1e-6)
        return (scores / np.maximum(scores.max(axis=0), 1.0)).astype(np.float32)  # top <= 1, the classes' order kept

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray,
             levels: Optional[list] = None) -> np.ndarray:
        return threshold_labels(self.walked(cams, image, levels), classes, self.bg_threshold)


class AffinityCrfMaker(AffinityMaker):
    """The random walk, then the `crf` maker on the walked maps (its unary, kernels and two-pass ignore band)."""

    writes_ignore_band = True

    def __init__(self, cfg: MaskCfg):
        super().__init__(cfg)
        self.crf = CrfMaker(cfg)

    def make(self, cams: np.ndarray, classes: np.ndarray, image: np.ndarray,
             levels: Optional[list] = None) -> np.ndarray:
        self.crf.bg_threshold = self.bg_threshold
        return self.crf.make(self.walked(cams, image, levels), classes, image)


MAKERS: dict[str, Callable[[MaskCfg], MaskMaker]] = {
    "threshold": ThresholdMaker,
    "crf": CrfMaker,
    "refiner": RefinerMaker,
    "fusion": FusionMaker,
    "fusion_crf": FusionCrfMaker,
    "affinity": AffinityMaker,
    "affinity_crf": AffinityCrfMaker,
}
# the makers that learn an affinity head (masks/affinity.pt), which train_seg.infer_affinity_walk walks on
AFFINITY_MAKERS = tuple(name for name, maker in MAKERS.items() if issubclass(maker, AffinityMaker))


def build_mask_maker(cfg: MaskCfg) -> MaskMaker:
    try:
        builder = MAKERS[cfg.method]
    except KeyError:
        raise ValueError(f"unknown mask maker {cfg.method!r}; valid names: {', '.join(sorted(MAKERS))}") from None
    return builder(cfg)


def otsu_threshold(hist: np.ndarray) -> float:
    """Otsu's threshold of a histogram over [0, 1] (bin centres); label-free."""
    hist = hist.astype(np.float64)
    bins = len(hist)
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    return float((k + 1) / bins)
