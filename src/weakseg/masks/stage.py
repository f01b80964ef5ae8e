"""Stage `masks`: CAMs -> pseudo-mask PNGs, with a background threshold chosen without pixel labels."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weakseg import dist
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
        cam, _, _ = load_cam(cam_dir / f"{sid}.npz")
        if cam.shape[0]:
            hist += np.histogram(cam.max(axis=0), bins=bins, range=(0.0, 1.0))[0]
    return hist


def choose_threshold(cfg_threshold: float, cam_dir, ids: list[str]) -> tuple[float, str]:
    if cfg_threshold >= 0:
        return cfg_threshold, "fixed (config masks.bg_threshold)"
    return otsu_threshold(cam_histogram(cam_dir, ids)), "label-free: Otsu on the pooled top-CAM histogram"


class MaskJob:
    """One image: CAM file + original RGB -> pseudo-mask PNG; returns its foreground fraction."""

    def __init__(self, ds, maker, cam_dir, out_dir, binary: bool):
        self.ds, self.maker, self.cam_dir, self.out_dir, self.binary = ds, maker, cam_dir, out_dir, binary

    def __call__(self, i: int) -> float:
        ds = self.ds
        cam, classes, size = load_cam(self.cam_dir / f"{ds.ids[i]}.npz")
        image = ds.image(i)
        if tuple(image.shape[:2]) != tuple(size):
            raise StageError(f"{ds.source(i)}: image is {image.shape[1]}x{image.shape[0]} but its CAM was made "
                             f"for {size[1]}x{size[0]}")
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


def pool_context() -> mp.context.BaseContext:
    """fork where the platform has it (workers inherit the dataset and the maker, nothing to pickle), else spawn
    (macOS / Windows: the job is pickled once per worker)."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def make_masks(job: MaskJob, indices: list[int], workers: int, desc: str = "masks") -> list[float]:
    """Run `job` on every dataset index (in `workers` processes when > 0); returns each image's foreground
    fraction, in the order of `indices`."""
    fractions: list[float] = []
    # the bar is closed (its line ended) before an error propagates, so the CLI's error line stands alone
    with tqdm(desc=desc, total=len(indices), disable=not dist.is_main_process(), dynamic_ncols=True) as bar:
        if workers > 0 and len(indices) > 1:
            with pool_context().Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
                for fraction in pool.imap(_work, indices, chunksize=4):
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
    rule = "n/a"
    if maker.needs_threshold:
        threshold_dir = maker.threshold_cam_dir(cam_dir)
        threshold, rule = choose_threshold(cfg.masks.bg_threshold, threshold_dir, ds.ids) \
            if dist.is_main_process() else (0.0, "")
        if threshold_dir != cam_dir:
            rule += f" of {threshold_dir}"
        threshold, rule = dist.broadcast_object((threshold, rule))
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
        "images": len(ds),
        "mean_foreground_fraction_this_attempt": float(np.mean(fg_fraction)) if fg_fraction else None,
        "seconds": round(seconds, 1),
        "workers": workers,
        **maker_metrics,
    }
