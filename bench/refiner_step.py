"""Training-step time of the weaktr-refinery decoder: refinery's order vs `refiner_forward`.

    python -m bench.refiner_step [--batch 64] [--dim 320] [--grid 14] [--size 224] [--classes 20] [--steps 5]

refinery upsamples block3's c3 channels x4, applies the 1x1 classifier to every class at full resolution and
then picks the item's class; `refiner_forward` classifies at 1/4 resolution and upsamples only the picked
channel (the same logits: tests/test_masks_refine.py). Both run the clipped loss, backward and an Adam step on
the same random features and targets; the defaults are the VOC2007 run's shapes (Lite0 stride-16 features of a
224 px image, 20 classes, batch 64).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import write_result
from weakseg.masks.refiner import RefinerDecoder, clipped_refiner_loss, refiner_forward


def refinery_order(decoder: RefinerDecoder, feats: torch.Tensor, channels: torch.Tensor, size: int) -> torch.Tensor:
    logits = decoder(feats)  # every class at full resolution, then the item's class
    if logits.shape[-1] != size:
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    return logits[torch.arange(len(channels)), channels]


def seconds_per_step(forward, args, steps: int) -> float:
    torch.manual_seed(0)
    decoder = RefinerDecoder(args.dim, args.classes, "medium")
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(args.batch, args.dim, args.grid, args.grid, generator=g)
    channels = torch.randint(0, args.classes, (args.batch,), generator=g)
    target = torch.rand(args.batch, args.size, args.size, generator=g)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        loss = clipped_refiner_loss(forward(decoder, feats, channels, args.size), target, 120, 1.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=320)
    p.add_argument("--grid", type=int, default=14)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    before = seconds_per_step(refinery_order, args, args.steps)
    after = seconds_per_step(refiner_forward, args, args.steps)
    write_result("refiner_step", {**vars(args), "refinery_order_s_per_step": round(before, 3),
                                  "refiner_forward_s_per_step": round(after, 3), "speedup": round(before / after, 2)})


if __name__ == "__main__":
    main()
