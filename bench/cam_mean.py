"""The mean of several runs' CAMs on the masked training images: a CAM ensemble for `bench.mask_quality --cams`.

Reads `<run>/cams/cams/<id>.npz` of every `--run` for the training images that have pixel GT, checks the runs
agree on each image's classes and map size, and writes the per-pixel mean (each run's maps are already
max-normalised per class) in the same format to `--out`. Nothing is scored here.

    python -m bench.cam_mean --out /tmp/cams-ens --run runs/voc07-blend-s14 --run runs/voc07-lite2
    python -m bench.mask_quality --run runs/voc07-blend-s14 --cams /tmp/cams-ens --label ens-s14-lite2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import masked_training_images, run_context
from weakseg.io import load_cam, save_cam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="run directory with a finished cams stage "
                    "(give two or more)")
    ap.add_argument("--out", required=True, help="folder for the mean CAMs, one .npz per masked image")
    args = ap.parse_args()
    if len(args.run) < 2:
        ap.error("give at least two --run")
    runs = [Path(r) for r in args.run]
    ds, _, masked = masked_training_images(run_context(runs[0], "cams", "masks").cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in masked:
        image_id = ds.ids[i]
        maps = [load_cam(run / "cams" / "cams" / f"{image_id}.npz") for run in runs]
        cam0, classes0, size0 = maps[0]
        for run, (cam, classes, size) in zip(runs[1:], maps[1:]):
            if not np.array_equal(classes, classes0) or cam.shape != cam0.shape or size != size0:
                raise ValueError(f"{run}: the CAMs of {image_id} have other classes or another size than "
                                 f"{runs[0]}'s")
        save_cam(out / f"{image_id}.npz", np.mean([cam for cam, _, _ in maps], axis=0), classes0, size0)
    print(f"{len(masked)} mean CAMs of {len(runs)} runs -> {out}")


if __name__ == "__main__":
    main()
