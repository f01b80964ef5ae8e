"""DDP with 2 CPU processes (gloo) vs 1 process on the same work: same results, and the time of each.

    python bench/ddp_scaling.py [--images 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=256)
    args = p.parse_args()
    over = [f"data.demo_train={args.images}", "data.demo_size=96", "train_cls.backbone=efficientnet_lite0",
            "train_cls.epochs=1", "train_cls.image_size=96", "train_cls.batch_size=16"]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cfg = str(ROOT / "configs" / "demo.yaml")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher in (("1proc", [sys.executable, "-m", "weakseg.cli"]),
                               ("2proc", [torchrun, "--standalone", "--nproc_per_node=2", "-m", "weakseg.cli"])):
            env_threads = "2" if name == "1proc" else "1"
            t0 = time.time()
            for stage in ("train-cls", "cams"):
                subprocess.run([*launcher, stage, cfg, *over, f"runs_dir={tmp}", f"name={name}"], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={"OMP_NUM_THREADS": env_threads, "TQDM_DISABLE": "1",
                                    "PATH": str(Path(sys.executable).parent)})
            m = json.loads((Path(tmp) / name / "train-cls" / "metrics.json").read_text())
            c = json.loads((Path(tmp) / name / "cams" / "metrics.json").read_text())
            out[name] = {"seconds": round(time.time() - t0, 1), "val_loss": m["val_loss"], "val_mAP": m["val_mAP"],
                         "cam_files": len(list((Path(tmp) / name / "cams" / "cams").iterdir())),
                         "cam_seconds": c["seconds"]}
    out["val_loss_difference"] = abs(out["1proc"]["val_loss"] - out["2proc"]["val_loss"])
    write_result("ddp_scaling", {"images": args.images, **out})


if __name__ == "__main__":
    main()
