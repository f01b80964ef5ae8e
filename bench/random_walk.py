"""The affinity random walk per image: `weakseg.masks.affinity.random_walk` (a sparse CSR product per step)
against the neighbour gather it replaced (unfold of each cell's (2r+1)^2 window, the disk's cells picked).

    python -m bench.random_walk [--repeats 10]

Grids and steps of the VOC preset (affinity images 320 px -> 40 x 40, 16 steps; 448 px -> 56 x 56, 64 steps),
radius 5, random transition weights, 4 maps (background + a few classes: the masks stage) and 21 (every class:
the inference walk of the segmentation model's probabilities). Reports the median time of one walk after a
warm-up one, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import write_result
from weakseg.masks.affinity import disk_offsets, random_walk, transition_weights


def unfold_walk(scores: torch.Tensor, weights: torch.Tensor, offsets, iterations: int) -> torch.Tensor:
    """The walk before the sparse product (weakseg until 2026-12-08)."""
    radius = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    side = 2 * radius + 1
    index = torch.tensor([(dy + radius) * side + (dx + radius) for dy, dx in offsets])
    k, (h, w) = scores.shape[0], scores.shape[-2:]
    flat_weights = weights.reshape(1, len(offsets), h * w)
    v = scores
    for _ in range(iterations):
        patches = F.unfold(v[:, None], kernel_size=side, padding=radius)
        v = (patches[:, index] * flat_weights).sum(dim=1).reshape(k, h, w)
    return v


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    offsets = disk_offsets(5)
    rows = []
    for grid, steps in ((40, 16), (56, 64)):
        for maps in (4, 21):
            g = torch.Generator().manual_seed(0)
            dist = torch.rand(len(offsets), grid, grid, generator=g)
            weights = transition_weights(dist, torch.ones_like(dist, dtype=torch.bool), beta=8.0)
            scores = torch.rand(maps, grid, grid, generator=g)
            row = {"grid": grid, "steps": steps, "maps": maps}
            for name, walk in (("sparse", random_walk), ("unfold", unfold_walk)):
                walk(scores, weights, offsets, steps)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    walk(scores, weights, offsets, steps)
                    times.append(time.perf_counter() - t0)
                row[f"{name}_ms"] = round(1000 * statistics.median(times), 2)
            row["max_abs_difference"] = float((random_walk(scores, weights, offsets, steps)
                                               - unfold_walk(scores, weights, offsets, steps)).abs().max())
            rows.append(row)
    write_result("random_walk", {"repeats": args.repeats, "radius": 5, "rows": rows})


if __name__ == "__main__":
    main()
