"""Time of one classifier training step under glibc's default heap, the mmap/trim thresholds alone, and
`weakseg.dist.keep_freed_heap_memory` (no mmap + kept), each in a fresh process (mallopt is process-wide).

    python -m bench.heap_step --size 320 --batch 32

Lite0 classifier (random init), random images and labels, forward + backward + SGD step; the median of the
steps after 2 warm-up ones. docs/performance.md, "A heap that keeps freed memory".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# heap -> the child's MALLOC_*_ environment (glibc reads it at start-up)
HEAPS = {"default": {}, "thresholds": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                                       "MALLOC_TRIM_THRESHOLD_": str(100_000 << 20)},
         "keep_freed_heap_memory": {}}


def one_heap(heap: str, size: int, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from weakseg import dist

    if heap == "keep_freed_heap_memory":
        assert dist.keep_freed_heap_memory(), "not applied (a MALLOC_*_ variable is set, or not glibc)"
    from weakseg.models.backbones import build_backbone
    from weakseg.models.classifier import CamClassifier

    torch.manual_seed(0)
    model = dist.channels_last(CamClassifier(build_backbone("efficientnet_lite0", pretrained=False), 20))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = dist.channels_last(torch.randn(batch, 3, size, size))
    y = (torch.rand(batch, 20) > 0.8).float()
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--heap", choices=HEAPS, help=argparse.SUPPRESS)  # the child process's one measurement
    args = ap.parse_args()
    if args.heap:
        print(json.dumps(one_heap(args.heap, args.size, args.batch, args.steps)))
        return
    from bench.common import write_result

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    seconds = {}
    for heap, heap_env in HEAPS.items():
        out = subprocess.run([sys.executable, "-m", "bench.heap_step", "--heap", heap, "--size", str(args.size),
                              "--batch", str(args.batch), "--steps", str(args.steps)],
                             env={**env, **heap_env}, capture_output=True, text=True, check=True)
        seconds[heap] = round(json.loads(out.stdout.strip().splitlines()[-1]), 3)
    write_result(f"heap_step-{args.size}-b{args.batch}", {"size": args.size, "batch": args.batch,
                                                         "median_step_seconds": seconds})


if __name__ == "__main__":
    main()
