"""Wall time of the dense CRF's two-pass ignore band (`masks.ignore_low / ignore_high`, also the affinity seeds'
passes) with the pairwise kernels built once for both passes (weakseg's `crf` maker) against two separate CRFs.

    python -m bench.crf_band --run runs/voc07-best --images ../shared/data/VOCdevkit/VOC2007/JPEGImages \
        [--count 60] [--low 0.15] [--high 0.4]

The first `--count` CAM files of the run's cams stage (sorted names), bilinearly resized to their images; the
run's CRF kernels, unary and temperature. Both ways must give the same labels, pixel for pixel. One process, one
torch thread (the masks stage runs one CRF per worker). Result: bench/out/crf_band.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import write_result
from weakseg.config import load_config
from weakseg.data.imageio import read_image
from weakseg.io import load_cam
from weakseg.masks.makers import CrfMaker, confident_regions
from weakseg.masks.stage import upsample_cam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory with a finished cams stage")
    ap.add_argument("--images", required=True, help="folder of the training images (<id>.jpg)")
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--low", type=float, default=0.15)
    ap.add_argument("--high", type=float, default=0.4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = load_config(run / "cams" / "config.yaml", [])
    maker = CrfMaker(replace(cfg.masks, method="crf", crf_unary="softmax", ignore_low=args.low,
                             ignore_high=args.high))
    samples = []
    for path in sorted((run / "cams" / "cams").glob("*.npz"))[:args.count]:
        cams, classes, size = load_cam(path)
        samples.append((upsample_cam(cams, size), classes, read_image(Path(args.images) / f"{path.stem}.jpg")))

    def separate(cams, classes, image):  # one CRF per pass, each building its own pairwise kernels
        passes = (maker.crf_labels(cams, classes, image, [bg])[0] for bg in (args.high, args.low))
        return confident_regions(*passes)

    rows, labels = [], {}
    for name, make in (("two separate CRFs", separate), ("one CRF, two passes (weakseg)", maker.make)):
        t0 = time.perf_counter()
        labels[name] = [make(*sample) for sample in samples]
        seconds = time.perf_counter() - t0
        rows.append({"way": name, "seconds": round(seconds, 2), "seconds_per_image": round(seconds / len(samples), 3)})
        print(rows[-1], flush=True)
    same = all(np.array_equal(a, b) for a, b in zip(*labels.values()))
    write_result("crf_band", {"run": args.run, "images": len(samples), "band": [args.low, args.high],
                              "rows": rows, "same_labels": same})


if __name__ == "__main__":
    main()
