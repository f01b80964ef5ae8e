"""Shared helpers for the bench scripts (not tests): timing, JSON output."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls of fn() in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write_result(name: str, result: dict) -> Path:
    out = Path(__file__).parent / "out" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return out


def quality_args(doc: str, needs: str, prefix: str, **extra: tuple[str, dict]) -> argparse.Namespace:
    """--run, --label and config overrides: the command line of the *_quality bench scripts (`extra`: more
    options, name -> (flag, add_argument keywords))."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--run", required=True, help=f"run directory with {needs}")
    ap.add_argument("--label", required=True, help=f"row name; the result goes to bench/out/{prefix}-<label>.json")
    for flag, kwargs in extra.values():
        ap.add_argument(flag, **kwargs)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's resolved config")
    args = ap.parse_args()
    from weakseg import dist

    args.kept_freed_heap = dist.keep_freed_heap_memory()  # as the `weakseg` command does
    return args


def run_context(run_dir: Path, config_of: str, stage: str, overrides: list[str] | None = None):
    """A `StageContext` for `stage` of an existing run, from the resolved config its `config_of` stage recorded
    (plus `overrides`), so `ctx.upstream(...)` finds that run's finished stages."""
    from weakseg import dist
    from weakseg.config import load_config
    from weakseg.runs import StageContext

    cfg = load_config(run_dir / config_of / "config.yaml", overrides or [])
    cfg.runs_dir, cfg.name = str(run_dir.parent), run_dir.name
    return StageContext(cfg, stage, dist.resolve_device(cfg.device))


def masked_training_images(cfg):
    """(training dataset in the classifier's label space, its scored view, indices of the images with pixel GT)."""
    from weakseg.data import build_dataset, seg_dataset
    from weakseg.evaluate.stage import masked_indices

    scored = seg_dataset(cfg.data, cfg.data.train_split)
    return build_dataset(cfg.data, cfg.data.train_split), scored, masked_indices(scored)
