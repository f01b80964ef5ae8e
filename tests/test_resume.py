"""Kill `weakseg run` with SIGKILL mid-stage, resume, and get exactly the uninterrupted run's results."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "data.demo_train=64", "data.demo_test=8", "data.demo_size=48", "data.val_fraction=0.25",
    "train_cls.backbone=test_efficientnet", "train_cls.pretrained=false", "train_cls.epochs=3",
    "train_cls.batch_size=4", "train_cls.image_size=48", "train_cls.checkpoint_every=2",
    "cams.batch_size=1", "cams.scales=[1.0,1.5]",
    "train_seg.model=lraspp_test_efficientnet", "train_seg.pretrained=false", "train_seg.epochs=2",
    "train_seg.batch_size=4", "train_seg.crop_size=48", "train_seg.checkpoint_every=2",
    "evaluate.thresholds=[0.3,0.5]",
]


def _cmd(runs: Path) -> list[str]:
    return [sys.executable, "-m", "weakseg.cli", "run", str(ROOT / "configs" / "demo.yaml"), *OVERRIDES,
            f"runs_dir={runs}", "name=r"]


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items()
                if "seconds" not in k and "this_attempt" not in k and k != "images_per_second"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _kill_when(cmd: list[str], condition, what: str, log: Path, timeout: float = 300) -> str:
    """Start `cmd`, SIGKILL it as soon as `condition()` holds; -> what it printed until then."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if condition():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return log.read_text()
                if proc.poll() is not None:
                    pytest.fail(f"the run ended before it could be killed {what}")
                time.sleep(0.005)
            pytest.fail(f"timed out waiting to kill {what}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _identities(folder: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns): an atomic rewrite gives a file a new identity."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob(pattern)}


def _kept(before: dict[str, tuple[int, int]], folder: Path) -> bool:
    return all((folder / n).exists() and _identities(folder, n)[n] == ident for n, ident in before.items())


def _env():
    import os

    return {**os.environ, "TQDM_DISABLE": "1"}


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


@pytest.mark.slow
def test_sigkill_at_four_points_then_resume_equals_uninterrupted(tmp_path):
    ref_runs, kill_runs = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run(_cmd(ref_runs), capture_output=True, text=True, timeout=600, env=_env())
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = kill_runs / "r"
    cmd = _cmd(kill_runs)
    _kill_when(cmd, lambda: (run / "train-cls" / "checkpoints" / "last.pt").exists()
               and _count(run / "train-cls", "model.pt") == 1 and not (run / "train-cls" / "done.json").exists(),
               "mid classifier training", tmp_path / "1.log")
    out = _kill_when(cmd, lambda: 3 <= _count(run / "cams" / "cams", "*.npz") < 64, "mid CAM generation",
                     tmp_path / "2.log")
    # Resumed, not restarted: training continued from the checkpoint of the killed attempt.
    assert "[train-cls] resuming from epoch" in out, out[-3000:]
    cams_before = _identities(run / "cams" / "cams", "*.npz")
    _kill_when(cmd, lambda: 3 <= _count(run / "masks" / "masks", "*.png") < 64, "mid pseudo-mask writing",
               tmp_path / "3.log")
    masks_before = _identities(run / "masks" / "masks", "*.png")
    _kill_when(cmd, lambda: (run / "train-seg" / "checkpoints" / "last.pt").exists()
               and not (run / "train-seg" / "done.json").exists(), "mid segmentation training", tmp_path / "4.log")
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert final.returncode == 0, final.stderr[-3000:]
    assert "[train-cls] skipped" in final.stdout and "[cams] skipped" in final.stdout
    assert "[train-seg] resuming from epoch" in final.stdout, final.stdout[-3000:]
    # The CAMs and masks written before their kill were kept, not recomputed.
    assert len(cams_before) >= 3 and _kept(cams_before, run / "cams" / "cams")
    assert len(masks_before) >= 3 and _kept(masks_before, run / "masks" / "masks")

    for stage in ("train-cls", "cams", "masks", "train-seg", "evaluate"):
        a = json.loads((ref_runs / "r" / stage / "metrics.json").read_text())
        b = json.loads((run / stage / "metrics.json").read_text())
        assert _without_timings(a) == _without_timings(b), f"{stage} metrics differ after resume"
    for stage in ("train-cls", "train-seg"):
        sa = torch.load(ref_runs / "r" / stage / "model.pt", weights_only=True)["model"]
        sb = torch.load(run / stage / "model.pt", weights_only=True)["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{stage} weights differ after resume"


def test_same_seed_same_metrics_in_process(tmp_path):
    from weakseg.config import load_config
    from weakseg.pipeline import run_pipeline

    small = [o for o in OVERRIDES if not o.startswith("data.demo_train")] + ["data.demo_train=16"]
    results, runs = [], []
    for name in ("a", "b"):
        cfg = load_config(ROOT / "configs" / "demo.yaml", small + [f"runs_dir={tmp_path}", f"name={name}"])
        run_pipeline(cfg)
        runs.append(cfg.run_dir)
        results.append(json.loads((cfg.run_dir / "evaluate" / "metrics.json").read_text()))
    # Real numbers, not a constant: the comparison below could fail.
    miou = results[0]["segmentation"]["segmentation"]["mIoU"]
    assert isinstance(miou, float) and 0.0 < miou < 1.0
    assert _without_timings(results[0]) == _without_timings(results[1])
    for stage in ("train-cls", "train-seg"):
        sa, sb = (torch.load(r / stage / "model.pt", weights_only=True)["model"] for r in runs)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{stage} weights differ between identical runs"
    from weakseg.io import load_cam

    cams = sorted((runs[0] / "cams" / "cams").glob("*.npz"))  # every CAM identical (npz bytes hold a timestamp)
    assert len(cams) == 16
    for f in cams:
        (a, ca, sa_), (b, cb, sb_) = load_cam(f), load_cam(runs[1] / "cams" / "cams" / f.name)
        assert np.array_equal(a, b) and np.array_equal(ca, cb) and sa_ == sb_, f.name
    masks = sorted((runs[0] / "masks" / "masks").glob("*.png"))  # and every pseudo-mask, byte for byte
    assert len(masks) == 16
    assert all(f.read_bytes() == (runs[1] / "masks" / "masks" / f.name).read_bytes() for f in masks)
    other = load_config(ROOT / "configs" / "demo.yaml", small + [f"runs_dir={tmp_path}", "name=c", "seed=1"])
    run_pipeline(other)
    changed = json.loads((other.run_dir / "evaluate" / "metrics.json").read_text())
    assert _without_timings(changed) != _without_timings(results[0])
