"""`report.html`: one self-contained page per run (metric tables, curves, example grid) that opens offline.

`write_report(run_dir)` reads what the stages left in ``runs/<name>/`` (``run.json``, each stage's
``metrics.json`` / ``metrics.jsonl``, CAMs, pseudo-masks, the segmentation model) and writes
``runs/<name>/report.html`` with CSS inline and every figure embedded as a base64 PNG data URI. The same
PNGs are written to ``runs/<name>/report/``. Sections whose inputs are missing say so instead of failing.
Needs matplotlib (the ``report`` extra); figures use the Agg canvas, no pyplot global state.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from weakseg.io import (IGNORE_INDEX, load_cam, load_label_png, read_json, read_jsonl, voc_palette, write_bytes,
                        write_text)

PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
EXAMPLES_PER_END = 4  # best k and worst k images in each example grid


# --------------------------------------------------------------------------------------------- formatting

def _num(x: Any) -> Optional[float]:
    """A finite float, or None for missing / None / NaN."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else x


def pct(x: Any) -> str:
    """0.3421 -> '34.21' (percent, 2 decimals); missing or NaN -> an em dash."""
    v = _num(x)
    return "—" if v is None else f"{100 * v:.2f}"


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _read_json_or_none(path: Path) -> Optional[dict]:
    return read_json(path) if path.is_file() else None


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _new_figure(w: float, h: float, dpi: int = 90):
    from matplotlib.figure import Figure  # Agg canvas on savefig; no pyplot, no global backend switch

    return Figure(figsize=(w, h), dpi=dpi)


# ------------------------------------------------------------------------------------------------- inputs

@dataclass
class RunFiles:
    """Everything the report reads from a run directory (None where a stage has not written it)."""

    run_dir: Path
    run_info: dict
    stage_metrics: dict[str, Optional[dict]]
    logs: dict[str, list[dict]]

    @property
    def evaluation(self) -> Optional[dict]:
        return self.stage_metrics.get("evaluate")

    @classmethod
    def load(cls, run_dir: Path) -> "RunFiles":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run directory")
        stages = ["train-cls", "cams", "masks", "train-seg", "evaluate"]
        return cls(
            run_dir=run_dir,
            run_info=_read_json_or_none(run_dir / "run.json") or {},
            stage_metrics={s: _read_json_or_none(run_dir / s / "metrics.json") for s in stages},
            logs={s: read_jsonl(run_dir / s / "metrics.jsonl") for s in ("train-cls", "train-seg")},
        )


def _products(ev: dict) -> list[tuple[str, str, dict, Optional[dict]]]:
    """(key, label, pooled metrics, per-image average or None) for every scored product in metrics.json."""
    out = []
    cams = ev.get("cams", {})
    if "at_threshold_used" in cams:
        t = _num(cams.get("threshold_used"))
        thr = "" if t is None else f" {t:.2f}"
        out.append(("cams", f"CAM, label-free threshold{thr} (train images with GT)", cams["at_threshold_used"],
                    None))
    masks = ev.get("pseudo_masks", {})
    if "per_class" in masks:
        out.append(("pseudo_masks", "pseudo-masks (train images with GT)", masks, masks.get("per_image_average")))
    for key in ("segmentation_train", "segmentation_unseen", "segmentation"):
        seg = ev.get(key, {})
        if "segmentation" not in seg:
            continue
        split = seg.get("split", "?")
        s = seg["segmentation"]
        out.append((f"{key}.segmentation", f"segmentation model ({split})", s, s.get("per_image_average")))
        if "baseline_all_background" in seg:
            out.append((f"{key}.baseline_all_background", f"baseline: all background ({split})",
                        seg["baseline_all_background"], None))
        if "baseline_cam_threshold" in seg:
            out.append((f"{key}.baseline_cam_threshold", f"baseline: raw CAM threshold ({split})",
                        seg["baseline_cam_threshold"], None))
    return out


def _positive_class(ev: dict) -> Optional[str]:
    for _, _, m, _ in _products(ev):
        if "binary" in m:
            return m["binary"]["positive_class"]
    return None


# ----------------------------------------------------------------------------------------------- tables

def _table(head: list[str], rows: list[list[str]], cls: str = "", caption: str = "",
           row_classes: Optional[list[str]] = None) -> str:
    """Cells are already-escaped HTML strings; numeric columns are right-aligned by CSS (class 'n')."""
    parts = [f'<table class="{cls}">']
    if caption:
        parts.append(f"<caption>{caption}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>")
    for k, r in enumerate(rows):
        rc = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        cells = "".join(f'<td{"" if j == 0 else " class=n"}>{c}</td>' for j, c in enumerate(r))
        parts.append(f"<tr{rc}>{cells}</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _summary_table(ev: dict) -> str:
    rows = ev.get("summary")
    if rows is None:
        from weakseg.evaluate.stage import summary_rows

        rows = summary_rows(ev)
    if not rows:
        return '<p class="note">No scored product: the evaluation found no pixel ground truth.</p>'
    positive = next((r["positive_class"] for r in rows if "positive_class" in r), None)
    head = ["result", "mIoU (%)"]
    if positive:
        head += [f"{_e(positive)} IoU (%) <span class=tag>positive class</span>", "background IoU (%)"]
    head.append("background threshold")
    body = []
    for r in rows:
        cells = [_e(r["what"]), pct(r.get("mIoU"))]
        if positive:
            cells += [pct(r.get("positive_IoU")), pct(r.get("background_IoU"))]
        t = _num(r.get("threshold"))
        cells.append("—" if t is None else f"{t:.2f}")
        body.append(cells)
    caption = ("Summary. All numbers are dataset-pooled (one confusion matrix over every pixel of the split, "
               "255 ignored), in percent.")
    if positive:
        caption += f" Binary task: the positive class is <b>{_e(positive)}</b>; its IoU and the background IoU " \
                   "are reported separately, the mIoU is their mean."
    return _table(head, body, "summary", caption)


def _class_names(products: list[tuple[str, str, dict, Optional[dict]]]) -> list[str]:
    names: list[str] = []
    for _, _, m, _ in products:
        for n in m.get("per_class", {}):
            if n not in names:
                names.append(n)
    return names


def _iou_overview_table(ev: dict) -> str:
    products = _products(ev)
    if not products:
        return ""
    names = _class_names(products)
    positive = _positive_class(ev)
    head = ["class"] + [_e(label) for _, label, _, _ in products]
    body, row_cls = [], []
    for n in names:
        tag = " <span class=tag>positive</span>" if n == positive else ""
        body.append([_e(n) + tag] + [pct(m.get("per_class", {}).get(n, {}).get("IoU")) for _, _, m, _ in products])
        row_cls.append("positive" if n == positive else "")
    body.append(["<b>mIoU</b> (mean over classes, undefined skipped)"] + [f"<b>{pct(m.get('mIoU'))}</b>"
                                                                          for _, _, m, _ in products])
    row_cls.append("total")
    body.append(["mIoU, per-image average (not pooled)"] +
                [pct(p.get("mIoU")) if p else "—" for _, _, _, p in products])
    row_cls.append("alt")
    caption = ("Per-class IoU (%), dataset-pooled confusion matrix, 255 ignored. — = undefined (class absent "
               "from both ground truth and prediction). The per-image-average row is the alternative convention, "
               "shown for comparison only.")
    return _table(head, body, "classes", caption, row_cls)


def _detail_table(label: str, m: dict, per_image: Optional[dict], positive: Optional[str]) -> str:
    head = ["class", "IoU (%)", "Dice / F1 (%)", "precision (%)", "recall (%)"]
    if per_image:
        head.append("IoU, per-image avg (%)")
    body, row_cls = [], []
    for n, c in m.get("per_class", {}).items():
        tag = " <span class=tag>positive</span>" if n == positive else ""
        row = [_e(n) + tag, pct(c.get("IoU")), pct(c.get("Dice")), pct(c.get("precision")), pct(c.get("recall"))]
        if per_image:
            row.append(pct(per_image.get("per_class_IoU", {}).get(n)))
        body.append(row)
        row_cls.append("positive" if n == positive else "")
    mean = ["<b>mean over classes</b>", f"<b>{pct(m.get('mIoU'))}</b>", pct(m.get("mDice")), "",
            pct(m.get("mean_class_accuracy"))]
    if per_image:
        mean.append(pct(per_image.get("mIoU")))
    body.append(mean)
    row_cls.append("total")
    extra = f"pixel accuracy {pct(m.get('pixel_accuracy'))} %, {int(m.get('pixels', 0)):,} scored pixels"
    note = f" — {_e(m['note'])}" if m.get("note") else ""
    caption = f"<b>{_e(label)}</b>: dataset-pooled, 255 ignored; {extra}{note}"
    if "binary" in m:
        b = m["binary"]
        pos, neg = b["positive_class"], b.get("negative_class", "background")
        caption += (f". Positive class <b>{_e(pos)}</b>: {_e(pos)} IoU {pct(b.get(f'{pos}_IoU'))} %, "
                    f"{_e(neg)} IoU {pct(b.get(f'{neg}_IoU'))} % (reported separately)")
    return _table(head, body, "detail", caption, row_cls)


def _run_info_table(rf: RunFiles, cfg) -> str:
    info = rf.run_info
    rows = [["run", _e(info.get("name", rf.run_dir.name))], ["git SHA", f"<code>{_e(info.get('git_sha', '?'))}</code>"]]
    done = _read_json_or_none(rf.run_dir / "evaluate" / "done.json")
    if done and _num(done.get("finished")):
        when = _dt.datetime.fromtimestamp(done["finished"], tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rows.append(["evaluated", when])
    if cfg is not None:
        d = cfg.data
        rows.append(["data", _e(f"{d.name}, train split {d.train_split!r}, evaluation split {d.eval_split!r}")])
        rows.append(["models", _e(f"classifier {cfg.train_cls.backbone}, CAM {cfg.cams.method}, "
                                  f"masks {cfg.masks.method}, segmentation {cfg.train_seg.model}")])
    if info.get("argv"):
        rows.append(["command", f"<code>{_e(' '.join(map(str, info['argv'])))}</code>"])
    versions = ", ".join(f"{k} {info[k]}" for k in ("weakseg", "torch", "torchvision", "timm", "python") if k in info)
    if versions:
        rows.append(["versions", _e(versions)])
    times = [f"{s} {m['stage_seconds']:.0f} s" for s, m in rf.stage_metrics.items()
             if m and _num(m.get("stage_seconds")) is not None]
    if times:
        rows.append(["stage times", _e(", ".join(times))])
    cls_m, masks_m = rf.stage_metrics.get("train-cls"), rf.stage_metrics.get("masks")
    if cls_m and "val_mAP" in cls_m:
        sel = f" ({cls_m['selection']})" if cls_m.get("selection") else ""
        rows.append(["classifier", _e(f"validation mAP {pct(cls_m['val_mAP'])} % at epoch {cls_m.get('best_epoch')}"
                                      f"{sel}")])
    if masks_m and masks_m.get("threshold_rule"):
        rows.append(["background threshold", _e(f"{masks_m.get('bg_threshold')} — {masks_m['threshold_rule']}")])
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="info">{body}</table>'


# ---------------------------------------------------------------------------------------------- figures

def sweep_figure(ev: dict) -> Optional[bytes]:
    """mIoU vs background threshold of the CAMs, with the label-free and the oracle thresholds marked."""
    cams = ev.get("cams", {})
    curve = [r for r in cams.get("sweep", []) if _num(r.get("mIoU")) is not None]
    if not curve:
        return None
    fig = _new_figure(7.5, 3.8)
    ax = fig.add_subplot()
    ts = [r["threshold"] for r in curve]
    ax.plot(ts, [100 * r["mIoU"] for r in curve], "o-", color="#1f77b4", ms=4, label="CAM mIoU (train images with GT)")
    used, used_m = _num(cams.get("threshold_used")), _num(cams.get("at_threshold_used", {}).get("mIoU"))
    if used is not None:
        ax.axvline(used, color="#2ca02c", ls="--", lw=1.2)
        if used_m is not None:
            ax.plot([used], [100 * used_m], "s", color="#2ca02c", ms=8,
                    label=f"label-free threshold {used:.2f}: {pct(used_m)} %")
    best_t, best_m = _num(cams.get("best_threshold_oracle")), _num(cams.get("best_mIoU_oracle"))
    if best_t is not None and best_m is not None:
        ax.plot([best_t], [100 * best_m], "*", color="#d62728", ms=13,
                label=f"oracle (uses GT) {best_t:.2f}: {pct(best_m)} %")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%), dataset-pooled")
    ax.set_title("CAM background-threshold sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _fig_png(fig)


def _split_keys(records: list[dict]) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in keys and k not in ("time", "step", "epoch", "lr") and _num(v) is not None:
                keys.append(k)
    losses = [k for k in keys if "loss" in k]
    metrics = [k for k in keys if "loss" not in k and k.startswith("val")]
    return losses, metrics


def training_figure(rf: RunFiles) -> Optional[bytes]:
    """One row per training stage: losses (left) and validation metrics (right) against optimizer steps."""
    stages = [s for s in ("train-cls", "train-seg") if any("step" in r for r in rf.logs.get(s, []))]
    if not stages:
        return None
    fig = _new_figure(12, 3.4 * len(stages))
    for row, stage in enumerate(stages):
        records = [r for r in rf.logs[stage] if "step" in r]
        losses, metrics = _split_keys(records)
        best = (rf.stage_metrics.get(stage) or {}).get("best_epoch")
        best_step = next((r["step"] for r in records if r.get("epoch") == best and any(k in r for k in metrics + [
            k for k in losses if k.startswith("val")])), None)
        first = None
        for col, (keys, ylabel) in enumerate([(losses, "loss"), (metrics, "validation metric")]):
            ax = fig.add_subplot(len(stages), 2, 2 * row + col + 1, sharex=first)
            first = first or ax
            if not keys:
                ax.text(0.5, 0.5, "no validation metric logged\n(model selected on the validation loss)",
                        ha="center", va="center", color="grey", transform=ax.transAxes)
                ax.set_yticks([])
            for k in keys:
                pts = [(r["step"], float(r[k])) for r in records if _num(r.get(k)) is not None]
                style = "-" if k == "train_loss" else "o-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, lw=1.2, label=k)
            if best_step is not None:
                ax.axvline(best_step, color="grey", ls=":", lw=1, label=f"selected epoch {best}")
            ax.set_title(f"{stage}: {ylabel}" + ("" if keys else " (none logged)"), fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if keys:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _fig_png(fig)


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) RGB with the VOC palette (255 = ignore in light grey)."""
    return PALETTE[labels.astype(np.uint8)]


def cam_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Heat-map of the top CAM score per pixel (K, H, W), blended over the image."""
    from matplotlib import colormaps

    top = cam.max(axis=0) if cam.shape[0] else np.zeros(image.shape[:2], np.float32)
    heat = colormaps["jet"](np.clip(top, 0, 1))[..., :3]
    return (0.45 * image.astype(np.float32) / 255 + 0.55 * heat).clip(0, 1)


def legend_entries(class_names: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
    entries = [(n, tuple(int(v) for v in PALETTE[i])) for i, n in enumerate(class_names)]
    entries.append(("ignore (255)", tuple(int(v) for v in PALETTE[IGNORE_INDEX])))
    return entries


def _fit_tile(tile: Optional[np.ndarray], size: int, nearest: bool) -> np.ndarray:
    """Resize an RGB tile (uint8, or float in [0, 1]) into a white size x size box, aspect ratio kept."""
    from PIL import Image

    box = np.full((size, size, 3), 255, np.uint8)
    if tile is None:
        box[:] = 240
        return box
    if tile.dtype != np.uint8:
        tile = (np.clip(tile, 0, 1) * 255).round().astype(np.uint8)
    h, w = tile.shape[:2]
    f = size / max(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    img = Image.fromarray(tile).resize((nw, nh), Image.NEAREST if nearest else Image.BILINEAR)
    y, x = (size - nh) // 2, (size - nw) // 2
    box[y:y + nh, x:x + nw] = np.asarray(img)
    return box


def grid_figure(rows: list[tuple[str, list[Optional[np.ndarray]]]], columns: list[str], title: str,
                legend: list[tuple[str, tuple[int, int, int]]], tile: int = 150) -> bytes:
    """rows: (row label, one RGB tile per column, None = not available); the legend is drawn under the grid.

    Columns whose header mentions 'image' or 'CAM' are resampled bilinearly, label maps with nearest.
    The tiles are pasted into one mosaic (fast: a single image in the figure, shown at 1:1 pixel size).
    """
    from matplotlib.patches import Patch

    gap = 6
    n_r, n_c = len(rows), len(columns)
    smooth = ["image" in c.lower() or "cam" in c.lower() for c in columns]
    mosaic = np.full((n_r * (tile + gap) - gap, n_c * (tile + gap) - gap, 3), 255, np.uint8)
    for r, (_, tiles) in enumerate(rows):
        for c, t in enumerate(tiles):
            y, x = r * (tile + gap), c * (tile + gap)
            mosaic[y:y + tile, x:x + tile] = _fit_tile(t, tile, nearest=not smooth[c])
    dpi, left, top = 100, 190, 62
    w_px = mosaic.shape[1] + left + 10
    ncol = min(len(legend), max(3, (w_px - 20) // 120))
    h_px = mosaic.shape[0] + top + 16 + 22 * math.ceil(len(legend) / ncol)
    bottom = h_px - top - mosaic.shape[0]
    fig = _new_figure(w_px / dpi, h_px / dpi, dpi=dpi)
    ax = fig.add_axes((left / w_px, bottom / h_px, mosaic.shape[1] / w_px, mosaic.shape[0] / h_px))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for c, name in enumerate(columns):
        ax.text(c * (tile + gap) + tile / 2, -8, name, ha="center", va="bottom", fontsize=10)
    for r, (label, tiles) in enumerate(rows):
        ax.text(-10, r * (tile + gap) + tile / 2, label, ha="right", va="center", fontsize=9)
        for c, t in enumerate(tiles):
            if t is None:
                ax.text(c * (tile + gap) + tile / 2, r * (tile + gap) + tile / 2, "n/a", ha="center",
                        va="center", color="grey", fontsize=10)
    fig.text(0.5, 1 - 10 / h_px, title, ha="center", va="top", fontsize=10.5)
    handles = [Patch(facecolor=np.array(rgb) / 255, edgecolor="black", label=n) for n, rgb in legend]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- examples

def best_and_worst(per_image: list, k: int = EXAMPLES_PER_END) -> list[tuple[str, str, float]]:
    """(tag, image id, score): the k best first ('best 1' highest), then the k worst ('worst 1' lowest).

    Images with an undefined (NaN) score are left out; an image is never shown twice.
    """
    scored = [(str(i), float(s)) for i, s in per_image if _num(s) is not None]
    scored.sort(key=lambda t: (-t[1], t[0]))
    best = scored[:k]
    rest = scored[len(best):]
    worst = sorted(rest, key=lambda t: (t[1], t[0]))[:k]
    return [(f"best {j + 1}", i, s) for j, (i, s) in enumerate(best)] + \
        [(f"worst {j + 1}", i, s) for j, (i, s) in enumerate(worst)]


def _single_threaded(fn):
    """Run `fn` with one torch CPU thread (a handful of small images: avoids thread contention), then restore."""
    def wrapped(*args):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(before)
    return wrapped


def _scored_dataset(cfg, split: str):
    """The dataset as the evaluate stage scored it (binary view when data.binary_masks); no full decode pass."""
    from weakseg.data import build_dataset

    ds = build_dataset(cfg.data, split, validate=False)
    if getattr(cfg.data, "binary_masks", False):
        from weakseg.data.base import BinaryView

        ds = BinaryView(ds, cfg.data.binary_name)
    return ds


# (metrics.json key, how the caption names its images), in order of preference for the prediction grid
PREDICTION_PRODUCTS = (
    ("segmentation", "Evaluation split"),
    ("segmentation_unseen", "Masked training images the segmentation model never saw"),
    ("segmentation_train", "Masked training images the segmentation model trained on (on their pseudo-masks, "
                           "so these predictions flatter it; the evaluation split was not scored)"),
)


def _prediction_product(ev: dict) -> Optional[tuple[str, dict, str]]:
    """(key, its evaluate block, caption words) of the first segmentation product with per-image scores, else None."""
    for key, what in PREDICTION_PRODUCTS:
        if ev.get(key, {}).get("segmentation", {}).get("per_image_mIoU"):
            return key, ev[key], what
    return None


def _example_grids(rf: RunFiles, cfg, device: str) -> tuple[list[tuple[str, str, bytes]], list[str], list[str]]:
    """-> ([(file stem, caption, png)], legend class names, notes)."""
    ev = rf.evaluation or {}
    notes: list[str] = []
    grids: list[tuple[str, str, bytes]] = []
    train_scores = ev.get("pseudo_masks", {}).get("per_image_mIoU") or ev.get("cams", {}).get("per_image_mIoU")
    class_names: list[str] = []
    if train_scores:
        ds = _scored_dataset(cfg, cfg.data.train_split)
        class_names = list(ds.class_names)
        index = {sid: i for i, sid in enumerate(ds.ids)}
        cam_dir, mask_dir = rf.run_dir / "cams" / "cams", rf.run_dir / "masks" / "masks"
        rows = []
        for tag, sid, score in best_and_worst(train_scores):
            if sid not in index:
                continue
            image, gt = ds.image(index[sid]), ds.mask(index[sid])
            cam_tile = mask_tile = None
            if (cam_dir / f"{sid}.npz").is_file():
                from weakseg.masks.stage import upsample_cam

                cam, _, _ = load_cam(cam_dir / f"{sid}.npz")
                cam_tile = cam_overlay(image, upsample_cam(cam, tuple(image.shape[:2])))
            if (mask_dir / f"{sid}.png").is_file():
                mask_tile = colorize(load_label_png(mask_dir / f"{sid}.png"))
            rows.append((f"{tag}\n{sid}\n{pct(score)} %", [image, None if gt is None else colorize(gt), cam_tile,
                                                          mask_tile]))
        if rows:
            cols = ["image", "ground truth", "CAM (top score)", "pseudo-mask"]
            caption = (f"Training images ({cfg.data.train_split}) with pixel GT, ranked by the pseudo-mask's "
                       f"per-image mIoU (%): {EXAMPLES_PER_END} best, then {EXAMPLES_PER_END} worst. The "
                       "segmentation model's predictions are shown on the evaluation split below.")
            title = f"{cfg.data.train_split}: best and worst pseudo-masks (per-image mIoU)"
            grids.append(("examples_train", caption, grid_figure(rows, cols, title, legend_entries(class_names))))
    else:
        notes.append("No per-image scores of training images in evaluate/metrics.json: no CAM / pseudo-mask grid.")

    product = _prediction_product(ev)
    has_model = (rf.run_dir / "train-seg" / "done.json").exists()
    if product and has_model:
        from weakseg.predict import load_predictor

        key, seg, what = product
        split = cfg.data.eval_split if key == "segmentation" else cfg.data.train_split
        predictor, _ = load_predictor(rf.run_dir, device)
        ds = _scored_dataset(cfg, split)
        predict = _single_threaded(predictor.labels)
        class_names = class_names or list(ds.class_names)
        index = {sid: i for i, sid in enumerate(ds.ids)}
        rows = []
        for tag, sid, score in best_and_worst(seg["segmentation"]["per_image_mIoU"]):
            if sid not in index:
                continue
            image, gt = ds.image(index[sid]), ds.mask(index[sid])
            rows.append((f"{tag}\n{sid}\n{pct(score)} %", [image, None if gt is None else colorize(gt),
                                                          colorize(predict(image))]))
        if rows:
            cols = ["image", "ground truth", "prediction"]
            scored = seg.get("split", split)
            caption = (f"{what} ({scored}), ranked by the segmentation model's per-image mIoU (%): "
                       f"{EXAMPLES_PER_END} best, then {EXAMPLES_PER_END} worst.")
            if key == "segmentation":
                caption += " CAMs and pseudo-masks are made for training images only."
            title = f"{split}: best and worst predictions (per-image mIoU)"
            grids.append(("examples_eval", caption, grid_figure(rows, cols, title, legend_entries(class_names))))
    elif not product:
        notes.append("No per-image scores of the segmentation model in evaluate/metrics.json: no prediction grid.")
    else:
        notes.append("No completed train-seg stage (no model): no prediction grid.")
    return grids, class_names, notes


# -------------------------------------------------------------------------------------------------- page

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif;margin:0;background:#f5f6f8;color:#222}
main{max-width:1320px;margin:0 auto;padding:20px 28px 40px;background:#fff}
h1{font-size:24px;margin:6px 0 4px} h2{font-size:19px;border-bottom:2px solid #dde;padding-bottom:4px;margin-top:30px}
p.lead{color:#555;margin:2px 0 14px} p.note{color:#8a5a00;background:#fff6e0;padding:6px 10px;border-radius:4px}
table{border-collapse:collapse;margin:10px 0 18px;font-size:13px}
caption{caption-side:top;text-align:left;color:#444;padding:4px 0;font-size:12.5px;max-width:1200px}
th,td{border:1px solid #d6d8de;padding:4px 9px} thead th{background:#eef0f5;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;font-family:'DejaVu Sans Mono',Menlo,monospace}
tbody tr:nth-child(even){background:#fafbfc} tr.total td{background:#eef6ee} tr.alt td{color:#666;font-style:italic}
tr.positive td{background:#fff3d6} table.info th{text-align:left;background:#f3f4f7;font-weight:600}
span.tag{font-size:10.5px;background:#c9730a;color:#fff;border-radius:3px;padding:1px 5px;margin-left:4px}
.legend{display:flex;flex-wrap:wrap;gap:14px;margin:8px 0 14px;font-size:13px}
.legend span.sw{display:inline-block;width:16px;height:16px;border:1px solid #333;vertical-align:-3px;margin-right:5px}
figure{margin:12px 0 22px} figure img{max-width:100%;border:1px solid #e0e2e8}
figcaption{font-size:12.5px;color:#555;margin-top:4px} details{margin:8px 0} summary{cursor:pointer;font-weight:600}
"""


def _legend_html(class_names: list[str]) -> str:
    items = "".join(f'<span class="item"><span class="sw" style="background:rgb{rgb}"></span>{_e(n)}</span>'
                    for n, rgb in legend_entries(class_names))
    return f'<div class="legend" id="legend"><b>Class colours:</b>{items}</div>'


def _figure_html(name: str, png: bytes, caption: str) -> str:
    return (f'<figure id="{_e(name)}"><img alt="{_e(caption)}" src="{_png_uri(png)}">'
            f"<figcaption>{_e(caption)} (also in report/{_e(name)}.png)</figcaption></figure>")


def write_report(run_dir: Path, device: str = "cpu") -> Path:
    """Write ``run_dir/report.html`` (self-contained) and its PNGs into ``run_dir/report/``; -> the HTML path."""
    from weakseg.config import ConfigError, load_config

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError('the report needs matplotlib: pip install "weakseg[report]"') from None
    rf = RunFiles.load(Path(run_dir))
    cfg_path = next((p for p in (rf.run_dir / "evaluate" / "config.yaml", rf.run_dir / "config.yaml") if p.is_file()),
                    None)
    cfg, cfg_problem = None, "no config.yaml in the run directory"
    if cfg_path:
        try:
            cfg = load_config(cfg_path)
        except ConfigError as e:  # e.g. written by another weakseg version: the tables do not need it
            cfg_problem = f"{cfg_path} could not be read: {e}"
    ev = rf.evaluation
    pngs: dict[str, bytes] = {}
    name = rf.run_info.get("name", rf.run_dir.name)
    parts = [f"<h1>weakseg run report: {_e(name)}</h1>",
             '<p class="lead">Weakly-supervised segmentation from image-level labels: classifier → CAMs → '
             "pseudo-masks → segmentation model. Metrics use a confusion matrix pooled over the whole split "
             "(the field's convention) with 255 ignored; per-image averages are labelled as such.</p>",
             _run_info_table(rf, cfg)]

    parts.append("<h2>Results</h2>")
    if ev is None:
        parts.append('<p class="note">No evaluate/metrics.json: run the evaluate stage for the metric tables.</p>')
    else:
        parts.append(_summary_table(ev))
        parts.append(_iou_overview_table(ev))
        positive = _positive_class(ev)
        details = "".join(_detail_table(label, m, per, positive) for _, label, m, per in _products(ev))
        if details:
            parts.append("<details><summary>Per-class IoU, Dice, precision and recall of each product (click to open)"
                         f"</summary>{details}</details>")
        for key, what in (("cams", "CAMs"), ("pseudo_masks", "pseudo-masks"), ("segmentation", "segmentation")):
            if isinstance(ev.get(key), dict) and "skipped" in ev[key]:
                parts.append(f'<p class="note">{_e(what)} not scored: {_e(ev[key]["skipped"])}</p>')

    parts.append("<h2>Curves</h2>")
    sweep = sweep_figure(ev) if ev else None
    if sweep:
        pngs["threshold_sweep"] = sweep
        cams = ev["cams"]
        parts.append(_figure_html("threshold_sweep", sweep,
                                  f"CAM mIoU against the background threshold. The pipeline used "
                                  f"{cams.get('threshold_used')} (chosen without pixel labels); the oracle "
                                  f"{cams.get('best_threshold_oracle')} was picked with GT and is an upper bound."))
    else:
        parts.append('<p class="note">No threshold sweep in evaluate/metrics.json.</p>')
    train = training_figure(rf)
    if train:
        pngs["training_curves"] = train
        parts.append(_figure_html("training_curves", train, "Training curves from train-cls and train-seg "
                                  "metrics.jsonl (dotted line: the epoch kept as model.pt)."))
    else:
        parts.append('<p class="note">No training logs (metrics.jsonl) found.</p>')

    parts.append("<h2>Examples: best and worst images first</h2>")
    if ev is None:
        parts.append('<p class="note">Examples need evaluate/metrics.json.</p>')
    elif cfg is None:
        parts.append(f'<p class="note">Examples need the run config: {_e(cfg_problem)}.</p>')
    else:
        from weakseg.data.base import DataError

        try:
            grids, class_names, notes = _example_grids(rf, cfg, device)
        except (DataError, OSError) as e:  # e.g. the dataset is not on this machine: keep the tables and curves
            grids, class_names, notes = [], [], [f"Examples unavailable: {e}"]
        if class_names:
            parts.append(_legend_html(class_names))
        for stem, caption, png in grids:
            pngs[stem] = png
            parts.append(_figure_html(stem, png, caption))
        parts.extend(f'<p class="note">{_e(n)}</p>' for n in notes)

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>weakseg report: {_e(name)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")
    for stem, png in pngs.items():
        write_bytes(rf.run_dir / "report" / f"{stem}.png", png)
    out = rf.run_dir / "report.html"
    write_text(out, page)
    return out
