"""Stage `cams`: multi-scale + flip CAMs of the training images, streamed to disk compactly.

Images are decoded and resized in DataLoader workers (no model call inside a Dataset); the model runs
on whole batches; each image's CAM is restricted to its image-level labels (training images) or to the
predicted labels (unlabelled images), max-normalised per class, and stored as float16 at
(H/store_stride, W/store_stride) with only the present classes. Files already written by a killed run
are kept (they were written atomically); work is sharded across ranks under torchrun.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weakseg import dist
from weakseg.cams.methods import CamMethod, build_cam_method
from weakseg.data import build_dataset
from weakseg.data.base import WeakSegDataset
from weakseg.data.torch_datasets import resize_image, shrink_to, to_float_tensor
from weakseg.io import save_cam
from weakseg.models.backbones import normalizer
from weakseg.runs import StageContext, pending_shard, require_all_written


class CamInputs(torch.utils.data.Dataset):
    """Dataset index -> (image resized to (S, S) float [0, 1], labels, original H, W, index)."""

    def __init__(self, ds: WeakSegDataset, indices: list[int], size: int):
        self.ds, self.indices, self.size = ds, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        img = self.ds.image(i)
        x = resize_image(to_float_tensor(shrink_to(img, None, self.size, factor=2.0)[0]), (self.size, self.size))
        return x, torch.from_numpy(self.ds.labels(i)), img.shape[0], img.shape[1], i


class CamGenerator:
    """Aggregates a CAM method over scales and flips for a batch of (S, S) images."""

    def __init__(self, method: CamMethod, mean, std, stride: int, scales: list[float], flip: bool):
        self.method, self.stride, self.scales, self.flip = method, stride, list(scales), flip
        self.normalize = normalizer(mean, std)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> (mean logits (B, C), summed CAMs (B, C, S/4, S/4), not normalised)."""
        size = x.shape[-1]
        grid = max(1, size // 4)
        total, logits_sum, n = None, None, 0
        for s in self.scales:
            side = max(self.stride, int(round(size * s / self.stride)) * self.stride)
            xs = self.normalize(resize_image(x, (side, side)) if side != size else x)
            inputs = [(xs, False)] + ([(torch.flip(xs, dims=[3]), True)] if self.flip else [])
            for inp, flipped in inputs:
                logits, cam = self.method.maps(inp)
                cam = F.interpolate(cam.float(), size=(grid, grid), mode="bilinear", align_corners=False)
                if flipped:
                    cam = torch.flip(cam, dims=[3])
                total = cam if total is None else total + cam
                logits_sum = logits if logits_sum is None else logits_sum + logits
                n += 1
        return logits_sum.float() / n, total


def finalize_cam(cam: torch.Tensor, classes: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """(C, g, g) summed CAMs -> (K, h, w) float32 in [0, 1] for the K 0-based foreground `classes`."""
    if len(classes) == 0:
        return np.zeros((0, *out_size), dtype=np.float32)
    sel = cam[torch.as_tensor(classes, dtype=torch.long)][None]
    sel = F.interpolate(sel, size=out_size, mode="bilinear", align_corners=False)[0].clamp_(min=0)
    peak = sel.flatten(1).max(dim=1).values.clamp_(min=1e-5)
    return (sel / peak[:, None, None]).cpu().numpy()


def top_cam_counts(cam: np.ndarray, bins: int) -> np.ndarray:
    """(bins,) histogram over [0, 1] of each pixel's top score in stored maps (K, h, w); zeros when K = 0."""
    if not len(cam):
        return np.zeros(bins, dtype=np.int64)
    return np.histogram(cam.max(axis=0), bins=bins, range=(0.0, 1.0))[0]


def present_classes(labels: Optional[np.ndarray], logits: torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    """0-based foreground classes to keep: the image labels if known, else the predicted ones."""
    if labels is not None:
        return np.flatnonzero(labels > 0.5)
    return np.flatnonzero(torch.sigmoid(logits).cpu().numpy() > threshold)


def store_size(h: int, w: int, store_stride: int) -> tuple[int, int]:
    return max(1, math.ceil(h / store_stride)), max(1, math.ceil(w / store_stride))


def finalized_cams(batch: tuple, logits: torch.Tensor, cams: torch.Tensor, store_stride: int):
    """One CamInputs batch -> per image (dataset index, 0-based classes (K,), stored maps (K, h, w), original (H, W)),
    from (labels, H, W, index) of the batch, (B, C) logits and (B, C, g, g) summed CAMs."""
    labels, hs, ws, idx = batch
    for b in range(len(idx)):
        classes = present_classes(labels[b].numpy(), logits[b])
        size = (int(hs[b]), int(ws[b]))
        yield int(idx[b]), classes, finalize_cam(cams[b], classes, store_size(*size, store_stride)), size


def save_batch(out_dir: Path, ids: list[str], batch: tuple, logits: torch.Tensor, cams: torch.Tensor,
               store_stride: int) -> None:
    """Write one CamInputs batch's CAMs (see `finalized_cams`)."""
    for i, classes, cam, size in finalized_cams(batch, logits, cams, store_stride):
        save_cam(out_dir / f"{ids[i]}.npz", cam, classes + 1, size)


def build_generator(ctx: StageContext, classifier) -> CamGenerator:
    method = dist.channels_last(build_cam_method(ctx.cfg.cams.method, classifier, ctx.cfg.cams).to(ctx.device).eval())
    bb = classifier.backbone
    return CamGenerator(method, bb.mean, bb.std, bb.stride, ctx.cfg.cams.scales, ctx.cfg.cams.flip)


def cam_input_size(ctx: StageContext) -> int:
    return ctx.cfg.cams.image_size or ctx.cfg.train_cls.image_size


def top_cam_histogram(ctx: StageContext, ds: WeakSegDataset, indices: list[int], size: int,
                      bins: int = 100) -> np.ndarray:
    """(bins,) pooled histogram over [0, 1] of each pixel's top CAM for `indices`, the CAMs made in memory as the
    stage makes them (method, scales, flip, restriction to the image labels, max-normalisation, stored size)
    but with the images resized to `size`."""
    from weakseg.train.classifier import load_classifier

    generator = build_generator(ctx, load_classifier(ctx))
    loader = torch.utils.data.DataLoader(CamInputs(ds, indices, size), batch_size=ctx.cfg.cams.batch_size)
    hist = np.zeros(bins, dtype=np.int64)
    for batch, logits, cams, _ in cam_batches(ctx, generator, loader, f"cams at {size} px", leave=False):
        for _, _, cam, _ in finalized_cams(batch, logits, cams, ctx.cfg.cams.store_stride):
            hist += top_cam_counts(cam, bins)
    return hist


def cam_batches(ctx: StageContext, generator: CamGenerator, loader, desc: str, leave: bool = True):
    """Run `generator` over a CamInputs loader (progress bar on rank 0). Yields per batch: ((labels, H, W,
    index), (B, C) mean logits, (B, C, g, g) summed CAMs, seconds spent in the model)."""
    precision = dist.resolve_precision(ctx.cfg.precision, ctx.device)
    for x, *batch in tqdm(loader, desc=desc, disable=not dist.is_main_process(), leave=leave, dynamic_ncols=True):
        t0 = time.perf_counter()
        with dist.autocast(ctx.device, precision):
            logits, cams = generator(dist.channels_last(x.to(ctx.device)))
        yield tuple(batch), logits, cams, time.perf_counter() - t0


def run(ctx: StageContext) -> dict:
    from weakseg.train.classifier import load_classifier

    cfg = ctx.cfg
    ds = build_dataset(cfg.data, cfg.data.train_split)
    out_dir = ctx.out / "cams"
    classifier = load_classifier(ctx)
    generator = build_generator(ctx, classifier)
    todo = pending_shard(out_dir, ds.ids, ".npz")
    loader = torch.utils.data.DataLoader(CamInputs(ds, todo, cam_input_size(ctx)), batch_size=cfg.cams.batch_size,
                                         num_workers=cfg.train_cls.num_workers)
    dist.warn_loader_oversubscription(ctx.stage, ctx.device, cfg.train_cls.num_workers)
    t0 = time.time()
    done = 0
    for batch, logits, cams, _ in cam_batches(ctx, generator, loader, "cams"):
        save_batch(out_dir, ds.ids, batch, logits, cams, cfg.cams.store_stride)
        done += len(logits)
    seconds = time.time() - t0
    require_all_written(out_dir, ds.ids, ".npz", "cams")
    return {
        "method": cfg.cams.method,
        "scales": cfg.cams.scales,
        "flip": cfg.cams.flip,
        "images": len(ds),
        "generated_this_attempt": done,
        "seconds": round(seconds, 1),
        "images_per_second": round(done / seconds, 2) if seconds > 0 and done else None,
    }
