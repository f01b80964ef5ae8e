"""Scan a dataset as a config describes it: decode every image and mask, count, and list every problem.

`check_dataset` never stops at the first bad file: it builds each split with on_error="skip" (so the
cheap construction-time problems are collected too), then decodes every sample. `format_check_report`
renders the result for humans; the dict itself is JSON-serialisable.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from weakseg.config import PipelineCfg
from weakseg.data import build_dataset
from weakseg.data.base import DataError
from weakseg.data.files import IGNORE, problem_from_error
from weakseg.data.imageio import read_header

MAX_LISTED = 20  # items of each list shown by format_check_report


def default_check_splits(cfg: PipelineCfg) -> list[str]:
    """The splits a run would read: train, eval and (if set) mask-eval, without repeats."""
    out: list[str] = []
    for split in (cfg.data.train_split, cfg.data.eval_split, cfg.data.mask_eval_split):
        if split and split not in out:
            out.append(split)
    return out


def _size_stats(values: list[int]) -> dict:
    if not values:
        return {}
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def _check_split(cfg: PipelineCfg, split: str, progress: Optional[Callable[[str, int, int], None]]) -> dict:
    data_cfg = dataclasses.replace(cfg.data, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skips are reported below, not warned about
        ds = build_dataset(data_cfg, split, validate=False)
    names = ds.class_names
    num_fg = len(names) - 1
    problems = [dict(p, split=split) for p in ds.skipped]
    disagreements: list[dict] = []
    heights: list[int] = []
    widths: list[int] = []
    formats: Counter = Counter()
    modes: Counter = Counter()
    mismatched_extensions: list[dict] = []
    exif_rotated = 0
    label_counts = np.zeros(num_fg, dtype=np.int64)
    masked_label_counts = np.zeros(num_fg, dtype=np.int64)
    no_label_images = 0
    masked = 0
    pixel_counts = np.zeros(256, dtype=np.int64)
    decoded = 0
    for i in range(len(ds)):
        if progress is not None:
            progress(split, i, len(ds))
        sample_id, source = ds.ids[i], ds.source(i)
        try:
            image = ds.image(i)
            if Path(source).is_file():
                header = read_header(source)
                formats[header.format] += 1
                modes[header.mode] += 1
                exif_rotated += header.orientation not in (0, 1)
                if not header.extension_matches(source):
                    mismatched_extensions.append({"id": sample_id, "file": source, "format": header.format})
            labels = ds.labels(i)
            mask = ds.mask(i) if ds.has_mask(i) else None
        except DataError as e:
            problems.append(dict(problem_from_error(e, sample_id, source), split=split))
            continue
        decoded += 1
        heights.append(image.shape[0])
        widths.append(image.shape[1])
        label_counts += labels.astype(bool)
        no_label_images += not labels.any()
        if mask is not None:
            masked += 1
            masked_label_counts += labels.astype(bool)
            counts = np.bincount(mask.ravel(), minlength=256)
            pixel_counts += counts
            in_mask = {int(c) for c in np.flatnonzero(counts[1:len(names)]) + 1}
            in_labels = {int(c) + 1 for c in np.flatnonzero(labels)}
            if in_mask != in_labels:
                parts = []
                if in_labels - in_mask:
                    parts.append(f"labelled classes {[names[c] for c in sorted(in_labels - in_mask)]} have no "
                                 "pixels in the mask")
                if in_mask - in_labels:
                    parts.append(f"mask classes {[names[c] for c in sorted(in_mask - in_labels)]} are not in the "
                                 "image labels")
                disagreements.append({"split": split, "id": sample_id, "file": source, "problem": "; ".join(parts)})
    labelled_pixels = int(pixel_counts[:IGNORE].sum())
    return {
        "classes": names,
        "problems": problems,
        "disagreements": disagreements,
        "summary": {
            "num_images": len(ds),
            "num_decoded": decoded,
            "num_skipped_at_build": len(ds.skipped),
            "num_masked": masked,
            "describe": {k: v for k, v in ds.describe().items() if k != "classes"},
            "image_height": _size_stats(heights),
            "image_width": _size_stats(widths),
            "formats": dict(formats),
            "modes": dict(modes),
            "exif_rotated": int(exif_rotated),
            "extension_mismatches": mismatched_extensions,
            "images_per_class": {names[c + 1]: int(label_counts[c]) for c in range(num_fg)},
            "images_without_labels": int(no_label_images),
            "masked_images_per_class": {names[c + 1]: int(masked_label_counts[c]) for c in range(num_fg)},
            "mask_pixel_fraction": {names[c]: (float(pixel_counts[c]) / labelled_pixels if labelled_pixels else 0.0)
                                    for c in range(len(names))},
            "mask_ignore_fraction": (float(pixel_counts[IGNORE]) / max(int(pixel_counts.sum()), 1)),
        },
    }


def check_dataset(cfg: PipelineCfg, splits: Optional[list[str]] = None,
                  progress: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Decode every image and mask of `splits` (default: the config's train/eval/mask-eval splits).

    Returns a JSON-serialisable dict: dataset, root, label_mode, trimap_border, classes, splits
    (per split: counts, image size stats, formats, per-class image-label counts, mask pixel fractions,
    or "error" if the split cannot be built), unavailable_splits ({split: error}: a missing list file, a
    split with no usable image), problems (every bad file / list line as {split, id, file, problem}),
    disagreements (image labels vs mask classes; informative) and ok (no problems; unavailable splits
    are listed separately and do not count).
    `progress(split, index, total)` is called before each sample if given.
    """
    splits = list(splits) if splits else default_check_splits(cfg)
    report: dict = {
        "dataset": cfg.data.name, "root": cfg.data.root, "label_mode": cfg.data.label_mode,
        "trimap_border": cfg.data.trimap_border, "on_error": cfg.data.on_error, "classes": None,
        "splits": {}, "problems": [], "disagreements": [],
    }
    for split in splits:
        try:
            result = _check_split(cfg, split, progress)
        except DataError as e:  # a config error (ConfigError) is raised: it concerns every split
            report["splits"][split] = {"error": str(e)}
            continue
        if report["classes"] is None:
            report["classes"] = result["classes"]
        elif report["classes"] != result["classes"]:
            report["problems"].append({"split": split, "id": None, "file": cfg.data.root,
                                       "problem": f"split {split!r} has classes {result['classes']}, other splits "
                                                  f"{report['classes']}"})
        report["splits"][split] = result["summary"]
        report["problems"].extend(result["problems"])
        report["disagreements"].extend(result["disagreements"])
    report["unavailable_splits"] = {k: v["error"] for k, v in report["splits"].items() if "error" in v}
    report["ok"] = not report["problems"]
    return report


def _size_line(stats: dict) -> str:
    h, w = stats.get("image_height"), stats.get("image_width")
    if not h:
        return "no decodable images"
    return (f"height min {h['min']} / median {h['median']:g} / max {h['max']}, "
            f"width min {w['min']} / median {w['median']:g} / max {w['max']}")


def format_check_report(report: dict) -> str:
    """Human-readable rendering of a `check_dataset` report."""
    lines = [f"Dataset {report['dataset']!r} at {report['root'] or '(built-in)'}"]
    if report["dataset"] == "pet":
        lines.append(f"  label_mode={report['label_mode']}, trimap_border={report['trimap_border']}")
    classes = report.get("classes")
    if classes:
        lines.append(f"Classes ({len(classes)}): " + ", ".join(f"{k} {n}" for k, n in enumerate(classes)))
    for split, s in report["splits"].items():
        lines.append("")
        if "error" in s:
            lines.append(f"Split {split!r}: NOT AVAILABLE (see below)")
            continue
        d = s["describe"]
        where = d.get("list_file") or d.get("labels_csv") or ""
        lines.append(f"Split {split!r}: {s['num_images']} images, {s['num_masked']} with masks, "
                     f"{s['num_decoded']} decoded cleanly, {s['num_skipped_at_build']} skipped while building"
                     + (f"  [{where}]" if where else ""))
        if d.get("num_background"):
            lines.append(f"  includes {d['num_background']} background images from {d['background_dir']}")
        if d.get("unlisted"):
            lines.append(f"  {len(d['unlisted'])} image(s) in no list file, labelled from their file names: "
                         + ", ".join(d["unlisted"][:MAX_LISTED]))
        lines.append(f"  image size: {_size_line(s)}")
        lines.append("  formats: " + (", ".join(f"{k} {v}" for k, v in sorted(s["formats"].items())) or "-")
                     + "; modes: " + (", ".join(f"{k} {v}" for k, v in sorted(s["modes"].items())) or "-")
                     + f"; EXIF-rotated: {s['exif_rotated']}")
        for m in s["extension_mismatches"][:MAX_LISTED]:
            lines.append(f"  content differs from extension (read by content): {m['file']} is {m['format']}")
        n = max(s["num_decoded"], 1)
        masked_columns = "; among masked images: images, % of mask pixels" if s["num_masked"] else ""
        lines.append(f"  image labels per class: images (% of decoded){masked_columns}")
        lines.append(f"  ({s['images_without_labels']} images have no positive label)")
        width = max((len(c) for c in s["images_per_class"]), default=10)
        for name, count in s["images_per_class"].items():
            extra = ""
            if s["num_masked"]:
                extra = (f"   | {s['masked_images_per_class'][name]:5d} "
                         f"{100 * s['mask_pixel_fraction'][name]:5.1f}%")
            lines.append(f"    {name:<{width}} {count:6d} ({100 * count / n:5.1f}%){extra}")
        if s["num_masked"]:
            lines.append(f"  mask pixels: background {100 * s['mask_pixel_fraction'].get(classes[0], 0.0):.1f}% "
                         f"of labelled pixels; ignore (255) {100 * s['mask_ignore_fraction']:.1f}% of all pixels")
    problems = report["problems"]
    lines.append("")
    for split, error in report.get("unavailable_splits", {}).items():
        lines.append(f"Unavailable split {split!r}: {error}")
    if report.get("unavailable_splits"):
        lines.append("")
    lines.append(f"Problems: {len(problems)}" + ("" if problems else " (clean)"))
    for p in problems[:MAX_LISTED]:
        lines.append(f"  [{p['split']}] " + (f"{p['file']}: {p['problem']}" if p["file"] else p["problem"]))
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    dis = report["disagreements"]
    if dis:
        lines.append(f"Image labels vs mask classes disagree on {len(dis)} image(s) (not errors; listed for review):")
        for p in dis[:MAX_LISTED]:
            lines.append(f"  [{p['split']}] {p['id']}: {p['problem']}")
        if len(dis) > MAX_LISTED:
            lines.append(f"  ... and {len(dis) - MAX_LISTED} more")
    return "\n".join(lines)
