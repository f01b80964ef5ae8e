"""Training step of the VOC preset's two networks under fp32, bf16, and bf16 with fp32 depthwise convolutions.

    python -m bench.depthwise_bf16 [--steps 12] [--frozen-levels 2]

Bare steps (forward, backward, AdamW) on random tensors, channels-last, random init, the stem and the first
`--frozen-levels` levels without gradient as the preset trains them: the EfficientNet-Lite0 classifier (output
stride 16) on a batch of 32 at 320 px, and LR-ASPP Lite0 on a batch of 16 at 256 px. `bf16+fp32dw` is what
`weakseg.train.loop.fit` does under `precision=bf16` on the CPU (`dist.fp32_depthwise_convs`); `bf16+fp32dw-all`
also switches the frozen depthwise convs, which only run forward. Reports the median step of the last
`--steps - 4` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import write_result
from weakseg import dist
from weakseg.models.backbones import build_backbone
from weakseg.models.classifier import CamClassifier
from weakseg.models.segmentation import build_seg_model

VARIANTS = ("fp32", "bf16", "bf16+fp32dw", "bf16+fp32dw-all")


def step_times(model: torch.nn.Module, x: torch.Tensor, loss_of, variant: str, steps: int) -> list[float]:
    dist.channels_last(model).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if variant == "bf16+fp32dw-all":  # let the context see the frozen depthwise convs as trainable
        for p in frozen:
            p.requires_grad_(True)
    switch = dist.fp32_depthwise_convs(model) if variant.startswith("bf16+") else contextlib.nullcontext()
    with switch:
        for p in frozen:
            p.requires_grad_(False)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            with dist.autocast(torch.device("cpu"), "fp32" if variant == "fp32" else "bf16"):
                loss = loss_of(model(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--frozen-levels", type=int, default=2)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    results = {}
    for name in ("classifier", "segmentation"):
        results[name] = {}
        for variant in VARIANTS:
            torch.manual_seed(0)
            if name == "classifier":
                model = CamClassifier(build_backbone("efficientnet_lite0", pretrained=False, output_stride=16), 20)
                model.backbone.freeze_levels(args.frozen_levels)
                x, y = torch.rand(32, 3, 320, 320, generator=g), (torch.rand(32, 20, generator=g) < 0.1).float()

                def loss_of(out, y=y):
                    return F.binary_cross_entropy_with_logits(out.float(), y)
            else:
                model = build_seg_model("lraspp_efficientnet_lite0", 21, pretrained=False)
                model.freeze_encoder_levels(args.frozen_levels)
                x, y = torch.rand(16, 3, 256, 256, generator=g), torch.randint(0, 21, (16, 256, 256), generator=g)

                def loss_of(out, y=y):
                    return F.cross_entropy(out.float(), y)
            times = step_times(model, dist.channels_last(x), loss_of, variant, args.steps)
            results[name][variant] = {"median_step_s": round(statistics.median(times[4:]), 3),
                                      "steps_s": [round(t, 3) for t in times]}
            print(name, variant, results[name][variant]["median_step_s"], flush=True)
    write_result("depthwise_bf16", {"steps": args.steps, "frozen_levels": args.frozen_levels, **results})


if __name__ == "__main__":
    main()
