"""CAM generation throughput (single scale, no flip) vs the bare backbone forward on the same batches.

    python bench/cam_throughput.py [--backbone efficientnet_lite0] [--images 256] [--size 224] [--batch 16]

The ratio ours / bare is the overhead of weakseg's CAM code (target >= 0.8). Both run on the same
pre-decoded batches so image decoding is excluded from both.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import timed, write_result
from weakseg import dist
from weakseg.cams.generate import CamGenerator, finalize_cam, present_classes, store_size
from weakseg.cams.methods import build_cam_method
from weakseg.models.backbones import normalizer
from weakseg.models.classifier import CamClassifier
from weakseg.models.backbones import build_backbone


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--classes", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    # channels-last for both sides, as the cams stage runs
    model = dist.channels_last(CamClassifier(build_backbone(args.backbone, pretrained=False), args.classes).eval())
    batches = [dist.channels_last(torch.rand(args.batch, 3, args.size, args.size))
               for _ in range(max(1, args.images // args.batch))]
    labels = (torch.rand(args.batch, args.classes) < 0.1).float()
    norm = normalizer(model.backbone.mean, model.backbone.std)
    gen = CamGenerator(build_cam_method("cam", model), model.backbone.mean, model.backbone.std,
                       model.backbone.stride, [1.0], flip=False)

    def bare():
        with torch.inference_mode():
            for x in batches:
                model.backbone.forward_features(norm(x))

    def ours():
        for x in batches:
            logits, cams = gen(x)
            for b in range(x.shape[0]):
                classes = present_classes(labels[b].numpy(), logits[b])
                finalize_cam(cams[b], classes, store_size(375, 500, 4))

    bare()  # warm-up
    n = len(batches) * args.batch
    t_bare, t_ours = timed(bare, 2), timed(ours, 2)
    write_result("cam_throughput", {
        "backbone": args.backbone, "images": n, "size": args.size, "batch": args.batch,
        "bare_forward_images_per_s": n / t_bare, "cam_generation_images_per_s": n / t_ours,
        "ratio_ours_over_bare": t_bare / t_ours, "target_ratio": 0.8,
    })


if __name__ == "__main__":
    main()
