"""Wall time of a trained run's inference (network + dense CRF, as evaluate and predict run it) with the CRF in
0..N worker processes beside the network (`train_seg.infer_crf_workers`, `weakseg predict --crf-workers`).

    python -m bench.crf_workers --run runs/voc07-best --images ../shared/data/VOCdevkit/VOC2007/JPEGImages \
        [--count 40] [--workers 0 1 2] [--threads 2 1]

Each (workers, torch threads of the process) row predicts the same first `--count` images (sorted names) and is
checked against the first row's labels, pixel for pixel. Result: bench/out/crf_workers.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import write_result
from weakseg.data.imageio import list_images, read_image
from weakseg.predict import load_predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory with a trained train-seg stage and infer_crf")
    ap.add_argument("--images", required=True, help="folder of images")
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch threads of the process; iter_labels leaves max(1, threads - workers) to the network")
    args = ap.parse_args()
    images = [read_image(f) for f in list_images(args.images)[:args.count]]
    rows, reference = [], None
    for threads in args.threads:
        for workers in args.workers:
            torch.set_num_threads(threads)
            predictor, _ = load_predictor(args.run, "cpu", crf_workers=workers)
            if predictor.crf is None:
                raise SystemExit(f"{args.run}: its train-seg / evaluate config has no train_seg.infer_crf")
            t0 = time.perf_counter()
            labels = list(predictor.iter_labels(images))
            seconds = time.perf_counter() - t0
            if reference is None:
                reference = labels
            same = all(np.array_equal(a, b) for a, b in zip(labels, reference))
            rows.append({"crf_workers": workers, "torch_threads": threads, "seconds": round(seconds, 2),
                         "seconds_per_image": round(seconds / len(images), 3), "same_labels_as_first_row": same})
            print(rows[-1], flush=True)
    write_result("crf_workers", {"run": args.run, "images": len(images), "rows": rows})


if __name__ == "__main__":
    main()
