"""Peak resident memory of the cams stage on N vs 4N images (streaming: should stay flat).

    python bench/cam_memory.py [--small 1000] [--large 4000]

Each size runs train-cls (tiny, 1 epoch on 32 images) once, then the cams stage over N demo images in a
fresh subprocess; the child's peak RSS (ru_maxrss) is reported. Target growth under 10%.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_result

ROOT = Path(__file__).resolve().parents[1]
BASE = ["data.demo_size=64", "train_cls.backbone=test_efficientnet", "train_cls.pretrained=false",
        "train_cls.epochs=1", "train_cls.image_size=64", "cams.batch_size=16", "cams.scales=[1.0,1.5]"]


def peak_rss_mb(cmd: list[str]) -> float:
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=4000)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.large):
            common = [*BASE, f"data.demo_train={n}", f"runs_dir={tmp}", f"name=m{n}", "data.max_images=0"]
            cfg = str(ROOT / "configs" / "demo.yaml")
            # Train on a fixed 32-image prefix so only the CAM stage sees N images.
            subprocess.run([sys.executable, "-m", "weakseg.cli", "train-cls", cfg, *common], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[n] = peak_rss_mb([sys.executable, "-m", "weakseg.cli", "cams", cfg, *common])
    growth = results[args.large] / results[args.small] - 1
    write_result("cam_memory", {"peak_rss_mb": results, "growth": growth, "target_growth": 0.10})


if __name__ == "__main__":
    main()
