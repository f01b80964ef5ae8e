"""Side-by-side table of several runs (`weakseg compare RUN_DIR ...`): Markdown to print, Markdown + CSV to keep.

One row per run, read from its ``run.json`` and stage ``metrics.json`` files. IoU values in the rows and the CSV
are fractions in [0, 1] (full precision); the Markdown shows them in percent. A value a run does not have
(stage not run, split without GT, not a binary task) is None: empty in the CSV, an em dash in Markdown.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from weakseg.io import read_json, write_text

# (key, Markdown header, kind) — kind: "iou" shown in percent, "thr" 2 decimals, "sec" whole seconds, "sha" short,
# "text" as is, "csv" only in the CSV.
COLUMNS: list[tuple[str, str, str]] = [
    ("run", "run", "text"),
    ("cam_mIoU", "CAM mIoU, label-free thr", "iou"),
    ("cam_threshold", "thr", "thr"),
    ("cam_mIoU_oracle", "CAM mIoU, oracle thr (uses GT)", "iou"),
    ("cam_threshold_oracle", "oracle thr", "thr"),
    ("pseudo_mask_mIoU", "pseudo-mask mIoU", "iou"),
    ("seg_mIoU", "segmentation mIoU", "iou"),
    ("seg_split", "eval split", "text"),
    ("seg_unseen_mIoU", "segmentation mIoU, masked train images it never saw", "iou"),
    ("seg_unseen_images", "unseen images", "text"),
    ("baseline_background_mIoU", "baseline all-bg mIoU", "iou"),
    ("baseline_cam_mIoU", "baseline raw-CAM mIoU", "iou"),
    ("positive_class", "positive class", "text"),
    ("seg_positive_IoU", "seg positive-class IoU", "iou"),
    ("seg_background_IoU", "seg background IoU", "iou"),
    ("train_cls_seconds", "train-cls s", "sec"),
    ("train_seg_seconds", "train-seg s", "sec"),
    ("git_sha", "git SHA", "sha"),
    ("path", "path", "csv"),
]
KEYS = [k for k, _, _ in COLUMNS]


def _read(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def run_row(run_dir: Path) -> dict:
    """The comparison row of one run directory (missing values are None)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    info = _read(run_dir / "run.json")
    ev = _read(run_dir / "evaluate" / "metrics.json")
    seg = _get(ev, "segmentation") or {}
    seg_m = _get(seg, "segmentation") or {}
    binary = _get(seg_m, "binary") or {}
    positive = binary.get("positive_class")
    train_times = {s: _get(_read(run_dir / s / "metrics.json"), "train_seconds") for s in ("train-cls", "train-seg")}
    row = {
        "run": run_dir.name,
        "cam_mIoU": _get(ev, "cams", "at_threshold_used", "mIoU"),
        "cam_threshold": _get(ev, "cams", "threshold_used"),
        "cam_mIoU_oracle": _get(ev, "cams", "best_mIoU_oracle"),
        "cam_threshold_oracle": _get(ev, "cams", "best_threshold_oracle"),
        "pseudo_mask_mIoU": _get(ev, "pseudo_masks", "mIoU"),
        "seg_mIoU": seg_m.get("mIoU"),
        "seg_split": seg.get("split"),
        "seg_unseen_mIoU": _get(ev, "segmentation_unseen", "segmentation", "mIoU"),
        "seg_unseen_images": _get(ev, "segmentation_unseen", "images"),
        "baseline_background_mIoU": _get(seg, "baseline_all_background", "mIoU"),
        "baseline_cam_mIoU": _get(seg, "baseline_cam_threshold", "mIoU"),
        "positive_class": positive,
        "seg_positive_IoU": binary.get(f"{positive}_IoU") if positive else None,
        "seg_background_IoU": binary.get(f"{binary.get('negative_class', 'background')}_IoU") if positive else None,
        "train_cls_seconds": train_times["train-cls"],
        "train_seg_seconds": train_times["train-seg"],
        "git_sha": info.get("git_sha"),
        "path": str(run_dir),
    }
    return {k: _clean(v) for k, v in row.items()}


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def compare_runs(run_dirs: list[Path]) -> list[dict]:
    """One row (dict with the keys of `KEYS`) per run directory, in the order given."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    return [run_row(Path(d)) for d in run_dirs]


def _cell(v: Any, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "iou":
        return f"{100 * float(v):.2f}"
    if kind == "thr":
        return f"{float(v):.2f}"
    if kind == "sec":
        return f"{float(v):.0f}"
    if kind == "sha":
        sha = str(v)
        return sha[:10] + ("-dirty" if sha.endswith("-dirty") else "")
    return str(v).replace("|", "\\|")


def format_markdown(rows: list[dict]) -> str:
    """A Markdown table (IoUs in percent); columns no run has a value for are left out."""
    cols = [c for c in COLUMNS if c[2] != "csv" and (c[0] == "run" or any(r.get(c[0]) is not None for r in rows))]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if kind in ("text", "sha") else "---:" for _, _, kind in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), kind) for k, _, kind in cols) + " |")
    lines.append("")
    lines.append("IoU in %, dataset-pooled confusion matrix with 255 ignored. CAM and pseudo-mask scores are on the "
                 "training images that have pixel GT; the oracle threshold was chosen with that GT (an upper bound). "
                 "Train times are seconds of training (train_seconds).")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
    """CSV with every column of `KEYS`; IoUs as fractions in [0, 1] at full precision, missing values empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=KEYS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in KEYS})
    return buf.getvalue()


def write_compare(run_dirs: list[Path], out_prefix: Path) -> tuple[Path, Path]:
    """Write ``<out_prefix>.md`` and ``<out_prefix>.csv``; -> (markdown path, csv path)."""
    rows = compare_runs(run_dirs)
    out_prefix = Path(out_prefix)
    md, cs = Path(f"{out_prefix}.md"), Path(f"{out_prefix}.csv")
    write_text(md, format_markdown(rows))
    write_text(cs, format_csv(rows))
    return md, cs

