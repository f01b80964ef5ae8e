"""Shared helpers for the bench scripts (not tests): timing, JSON output."""

from __future__ import annotations

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
