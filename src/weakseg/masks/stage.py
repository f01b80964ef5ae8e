"""Stage `masks`: CAMs -> pseudo-mask PNGs, with a background threshold chosen without pixel labels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from weakseg import dist
from weakseg.cams.generate import top_cam_counts, top_cam_histogram
from weakseg.data import build_dataset, collapse_to_binary
from weakseg.io import load_cam, save_label_png
from weakseg.masks.makers import build_mask_maker, otsu_threshold
from weakseg.runs import StageContext, StageError, pending_shard, require_all_written


def upsample_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) -> (K, H, W) bilinear, clipped to [0, 1]."""
    if cam.shape[0] == 0:
        return np.zeros((0, *size), dtype=np.float32)
    t = F.interpolate(torch.from_numpy(cam)[None], size=size, mode="bilinear", align_corners=False)[0]
    return t.clamp_(0, 1).numpy()


def cam_histogram(cam_dir, ids: list[str], bins: int = 100) -> np.ndarray:
    """Pooled histogram of each pixel's top CAM score over `ids` (images with no class are skipped)."""
    hist = np.zeros(bins, dtype=np.int64)
    for sid in ids:
        hist += top_cam_counts(load_cam(cam_dir / f"{sid}.npz")[0], bins)
    return hist


def choose_threshold(cfg_threshold: float, cam_dir, ids: list[str]) -> tuple[float, str]:
    if cfg_threshold >= 0:
        return cfg_threshold, "fixed (config masks.bg_threshold)"
    return otsu_threshold(cam_histogram(cam_dir, ids)), "label-free: Otsu on the pooled top-CAM histogram"


THRESHOLD_RULES = ("otsu", "area_match")


def check_threshold_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown masks.bg_threshold_rule {rule!r}; valid: {', '.join(THRESHOLD_RULES)}")


def share_above(hist: np.ndarray, threshold: float) -> float:
    """Share of a [0, 1] histogram's pixels at or above `threshold` (a bin edge)."""
    return float(hist[int(round(threshold * len(hist))):].sum() / max(1, hist.sum()))


def threshold_keeping(hist: np.ndarray, share: float) -> float:
    """The bin edge of a [0, 1] histogram whose share of pixels at or above it is closest to `share`."""
    above = hist[::-1].cumsum()[::-1] / max(1, hist.sum())
    return float(np.argmin(np.abs(above - share)) / len(hist))


def area_matched_threshold(cam_dir, ids: list[str], reference_hist: np.ndarray) -> tuple[float, dict]:
    """masks.bg_threshold_rule=area_match: the threshold that keeps, of the pooled top-CAM pixels of `ids`, the
    foreground share Otsu finds on `reference_hist` (the same CAMs at the classifier's training size)."""
    reference = otsu_threshold(reference_hist)
    share = share_above(reference_hist, reference)
    threshold = threshold_keeping(cam_histogram(cam_dir, ids, bins=1000), share)
    return threshold, {"reference_otsu": reference, "foreground_share": round(share, 4)}


def choose_mask_threshold(ctx: StageContext, ds, cam_dir, ids: list[str]) -> tuple[float, str, dict]:
    """The masks stage's background threshold -> (threshold, rule, details), by masks.bg_threshold and
    masks.bg_threshold_rule; no pixel label is read."""
    mc = ctx.cfg.masks
    check_threshold_rule(mc.bg_threshold_rule)
    if mc.bg_threshold >= 0 or mc.bg_threshold_rule == "otsu":
        return (*choose_threshold(mc.bg_threshold, cam_dir, ids), {})
    size = ctx.cfg.train_cls.image_size
    wanted = set(ids)
    pool = [i for i in range(len(ds)) if ds.ids[i] in wanted]
    rng = np.random.default_rng(ctx.cfg.seed)
    subset = sorted(rng.choice(pool, size=min(mc.area_match_images, len(pool)), replace=False).tolist())
    threshold, details = area_matched_threshold(cam_dir, ids, top_cam_histogram(ctx, ds, subset, size))
    rule = (f"label-free: the foreground share of Otsu on the CAMs at the classifier's {size} px "
            f"({len(subset)} seeded training images), kept of the pooled top-CAM histogram")
    return threshold, rule, {**details, "reference_images": len(subset), "reference_size": size}


def threshold_maps_dir(maker, cam_dir: Path, mc) -> Path:
    """The folder whose maps pick the label-free threshold (`maker.threshold_cam_dir`). area_match re-makes the
    cams stage's CAMs at the classifier's size, so a maker that thresholds other maps (fusion) is refused."""
    threshold_dir = maker.threshold_cam_dir(cam_dir)
    if threshold_dir != cam_dir and mc.bg_threshold_rule == "area_match" and mc.bg_threshold < 0:
        raise StageError(f"masks.bg_threshold_rule=area_match re-makes the cams stage's CAMs at the classifier's "
                         f"size, but masks.method={mc.method} thresholds other maps ({threshold_dir}); "
                         "use masks.bg_threshold_rule=otsu or a fixed masks.bg_threshold")
    return threshold_dir


class MaskJob:
    """One image: CAM file + original RGB -> pseudo-mask PNG; returns its foreground fraction. With `scale` < 1 the
    image and the CAMs are shrunk by it first (the mask PNG too)."""

    def __init__(self, ds, maker, cam_dir, out_dir, binary: bool, scale: float = 1.0):
        self.ds, self.maker, self.cam_dir, self.out_dir, self.binary = ds, maker, cam_dir, out_dir, binary
        self.scale = scale

    def __call__(self, i: int) -> float:
        ds = self.ds
        cam, classes, size = load_cam(self.cam_dir / f"{ds.ids[i]}.npz")
        image = ds.image(i)
        if tuple(image.shape[:2]) != tuple(size):
            raise StageError(f"{ds.source(i)}: image is {image.shape[1]}x{image.shape[0]} but its CAM was made "
                             f"for {size[1]}x{size[0]}")
        if self.scale != 1.0:
            size = (max(1, round(size[0] * self.scale)), max(1, round(size[1] * self.scale)))
            image = np.array(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        mask = self.maker.make(upsample_cam(cam, size), classes, image, **self.maker.extra_inputs(ds.ids[i], size))
        if self.binary:
            mask = collapse_to_binary(mask)
        save_label_png(self.out_dir / f"{ds.ids[i]}.png", mask)
        return float(((mask > 0) & (mask < 255)).mean())


_worker_job: MaskJob | None = None


def _init_worker(job: MaskJob) -> None:
    global _worker_job
    torch.set_num_threads(1)
    _worker_job = job


def _work(i: int) -> float:
    assert _worker_job is not None
    return _worker_job(i)


def make_masks(job: MaskJob, indices: list[int], workers: int, desc: str = "masks") -> list[float]:
    """Run `job` on every dataset index (in `workers` processes when > 0); returns each image's foreground
    fraction, in the order of `indices`."""
    fractions: list[float] = []
    # the bar is closed (its line ended) before an error propagates, so the CLI's error line stands alone
    with tqdm(desc=desc, total=len(indices), disable=not dist.is_main_process(), dynamic_ncols=True) as bar:
        if workers > 0 and len(indices) > 1:
            with dist.worker_pool(workers, desc, "masks.num_workers=0", initializer=_init_worker,
                                  initargs=(job,)) as pool:
                for fraction in pool.map(_work, indices, chunksize=4):
                    fractions.append(fraction)
                    bar.update()
        else:
            for i in indices:
                fractions.append(job(i))
                bar.update()
    return fractions


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    ds = build_dataset(cfg.data, cfg.data.train_split)
    cam_dir = ctx.upstream("cams") / "cams"
    out_dir = ctx.out / "masks"
    maker = build_mask_maker(cfg.masks)
    maker_metrics = maker.prepare(ctx, ds, cam_dir)  # e.g. trains the refiner, finds the agnostic CAMs
    rule, threshold_details = "n/a", {}
    if maker.needs_threshold:
        threshold_dir = threshold_maps_dir(maker, cam_dir, cfg.masks)
        threshold, rule, threshold_details = choose_mask_threshold(ctx, ds, threshold_dir, ds.ids) \
            if dist.is_main_process() else (0.0, "", {})
        if threshold_dir != cam_dir:
            rule += f" of {threshold_dir}"
        threshold, rule, threshold_details = dist.broadcast_object((threshold, rule, threshold_details))
        maker.bg_threshold = threshold
    todo = pending_shard(out_dir, ds.ids, ".png")
    t0 = time.time()
    job = MaskJob(ds, maker, cam_dir, out_dir, cfg.data.binary_masks)
    workers = cfg.masks.num_workers if maker.parallel_safe else 0
    fg_fraction = make_masks(job, todo, workers)
    seconds = time.time() - t0
    require_all_written(out_dir, ds.ids, ".png", "masks")
    maker.finish()
    return {
        "method": cfg.masks.method,
        "bg_threshold": maker.bg_threshold if maker.needs_threshold else None,
        "threshold_rule": rule,
        **({"threshold_rule_details": threshold_details} if threshold_details else {}),
        "images": len(ds),
        "mean_foreground_fraction_this_attempt": float(np.mean(fg_fraction)) if fg_fraction else None,
        "seconds": round(seconds, 1),
        "workers": workers,
        **maker_metrics,
    }
