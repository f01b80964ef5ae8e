"""Training throughput of weakseg's engine vs a bare forward+backward loop of the same model.

    python -m bench.train_throughput [--images 192] [--size 128] [--batch 16] [--workers 0] [--precision fp32]
                                     [--frozen-encoder-levels 0]

Ours = `weakseg.train.loop.fit` on the demo dataset (decoding, augmentation, DataLoader, scheduler,
logging, checkpoint) for the classifier and the segmentation model; bare = the same model, loss and
optimizer on pre-made tensors. Target ratio ours/bare >= 0.9. `--workers 1` on a 2-core machine shows what a
DataLoader worker beside torch's two threads costs; `--precision bf16` the CPU's bf16 autocast;
`--frozen-encoder-levels 2` the segmentation model with train_seg.frozen_encoder_levels=2 (docs/performance.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import write_result
from weakseg import dist
from weakseg.config import PipelineCfg
from weakseg.data import DemoDataset
from weakseg.data.torch_datasets import ClassificationDataset, SegmentationDataset
from weakseg.models.backbones import build_backbone, normalizer
from weakseg.models.classifier import CamClassifier
from weakseg.models.segmentation import build_seg_model
from weakseg.runs import StageContext
from weakseg.train.loop import fit


def bare_loop(model, loss_of, batches, precision: str) -> float:
    """The same model, loss, optimizer and autocast on pre-made (channels-last, as `fit` uses) tensors."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dist.channels_last(model).train()
    t0 = time.perf_counter()
    with dist.fp32_depthwise_convs(model, enabled=precision == "bf16"):  # as fit does under CPU bf16
        for x, y in batches:
            with dist.autocast(torch.device("cpu"), precision):
                loss = loss_of(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def ours_loop(model, loss_of, dataset, batch, tmp: Path, workers: int, precision: str) -> float:
    cfg = PipelineCfg(runs_dir=str(tmp), name="bench", precision=precision)
    ctx = StageContext(cfg, "bench", torch.device("cpu"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    fit(ctx, model, dataset, lambda m, b: loss_of(m, *b), opt, epochs=1, batch_size=batch, seed=0,
        num_workers=workers)
    ctx.close()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--frozen-encoder-levels", type=int, default=0)
    args = p.parse_args()
    ds = DemoDataset("train", args.images, 0, args.size)
    n_batches = args.images // args.batch
    results = {}

    cls = CamClassifier(build_backbone("efficientnet_lite0", pretrained=False), 5)
    norm_c = normalizer(cls.backbone.mean, cls.backbone.std)

    def cls_loss(m, x, y):
        return F.binary_cross_entropy_with_logits(m(norm_c(x)), y)

    seg = build_seg_model("lraspp_efficientnet_lite0", 6, pretrained=False)
    seg.freeze_encoder_levels(args.frozen_encoder_levels)
    norm_s = normalizer(seg.mean, seg.std)

    def seg_loss(m, x, y):
        return F.cross_entropy(m(norm_s(x)), y, ignore_index=255)

    def image_batch():
        return dist.channels_last(torch.rand(args.batch, 3, args.size, args.size))

    cls_batches = [(image_batch(), torch.rand(args.batch, 5).round()) for _ in range(n_batches)]
    seg_batches = [(image_batch(),
                    torch.randint(0, 6, (args.batch, args.size, args.size))) for _ in range(n_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, loss_of, bare_batches, dataset in [
            ("classifier", cls, cls_loss, cls_batches, ClassificationDataset(ds, list(range(args.images)), args.size,
                                                                            train=True)),
            ("segmentation", seg, seg_loss, seg_batches,
             SegmentationDataset(ds, list(range(args.images)), ds.mask, args.size, train=True)),
        ]:
            bare_loop(model, loss_of, bare_batches[:1], args.precision)  # warm-up
            t_bare = bare_loop(model, loss_of, bare_batches, args.precision)
            t_ours = ours_loop(model, loss_of, dataset, args.batch, Path(tmp) / name, args.workers, args.precision)
            n = n_batches * args.batch
            results[name] = {"bare_images_per_s": n / t_bare, "ours_images_per_s": n / t_ours,
                             "ratio_ours_over_bare": t_bare / t_ours}
    write_result("train_throughput", {"images": args.images, "size": args.size, "batch": args.batch,
                                      "workers": args.workers, "precision": args.precision,
                                      "frozen_encoder_levels": args.frozen_encoder_levels, "target_ratio": 0.9,
                                      **results})


if __name__ == "__main__":
    main()
