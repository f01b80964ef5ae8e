"""COCO 2014 in the VOC-style layout WeakTr's data/parse_coco.py writes; root = .../coco.

    images/<id>.jpg                           <id> = the 12-digit image number, e.g. 000000057870
    voc_format/class_labels/<id>.png          grayscale class ids: 0 background, 1..80 the COCO categories
                                              in category-id order, 255 ignore
    voc_format/train.txt, voc_format/val.txt  one id per line (WeakTr copies coco/train_id.txt, val_id.txt)
    cls_labels.npy                            optional dict id (or "<id>.jpg") -> 80-d multi-hot

Classes: background + the 80 COCO categories (81 classes).

Splits: "train", "val" or any other voc_format/<name>.txt (e.g. val_5000), or a "<path>.txt" list
(relative paths are under root). When the mask folder exists every listed id must have a mask; without
it, labels must come from cls_labels.npy and no image has a mask.

Image-level labels: data.cls_labels if set, else root/cls_labels.npy or root/voc_format/cls_labels.npy
if present, else the classes present in each mask (decoded when first asked for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from weakseg.config import DataCfg
from weakseg.data.base import DataError
from weakseg.data.files import (
    FileDataset, ProblemLog, Sample, allowed_roots, config_path, listed_sample_ok, load_cls_labels,
    lookup_cls_labels, read_id_list, unsafe_name_reason,
)

COCO_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]


def coco_split_list(root: Path, split: str) -> Path:
    """Split name -> list file; DataError naming the file if it is missing."""
    if split.endswith(".txt"):
        path = Path(split).expanduser()
        path = path if path.is_absolute() else root / path
    else:
        if unsafe_name_reason(split) or "/" in split or "\\" in split:
            raise DataError(f"{root}: invalid split name {split!r}", file=root)
        path = root / "voc_format" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: list file not found (split {split!r})", file=path)
    return path


class CocoDataset(FileDataset):
    """COCO 2014 (WeakTr layout); labels (80,) float32, masks (H, W) uint8 ids 0..80 with 255 ignore."""

    def __init__(self, root: str | Path, split: str = "train", masks_dir: str = "", cls_labels: str = "",
                 on_error: str = "raise"):
        root = Path(root)
        images_dir = root / "images"
        if not images_dir.is_dir():
            raise DataError(f"{images_dir}: folder not found (expected WeakTr's COCO layout images/, "
                            "voc_format/)", file=images_dir)
        list_path = coco_split_list(root, split)
        mask_folder = config_path(root, masks_dir or "voc_format/class_labels")
        if masks_dir and not mask_folder.is_dir():
            raise DataError(f"{mask_folder}: mask folder (data.masks_dir) not found", file=mask_folder)
        has_masks = mask_folder.is_dir()
        label_file: Optional[Path] = config_path(root, cls_labels) if cls_labels else next(
            (p for p in (root / "cls_labels.npy", root / "voc_format" / "cls_labels.npy") if p.is_file()), None)
        if label_file is None and not has_masks:
            raise DataError(f"{root}: no image-level labels: neither a cls_labels.npy nor the mask folder "
                            f"{mask_folder} exists", file=root)
        table = load_cls_labels(label_file, len(COCO_CLASSES) - 1) if label_file is not None else None
        self.label_source = str(label_file) if label_file is not None else "masks"
        self.mask_folder = mask_folder if has_masks else None

        log = ProblemLog(on_error)
        allowed = allowed_roots(root, images_dir, mask_folder)
        samples: list[Sample] = []
        for sample_id in read_id_list(list_path, log):
            image = images_dir / f"{sample_id}.jpg"
            mask: Optional[Path] = mask_folder / f"{sample_id}.png" if has_masks else None
            if not listed_sample_ok(sample_id, list_path, image, mask, allowed, log):
                continue
            if mask is not None and not mask.is_file():
                log.add(sample_id, mask, f"mask missing for id {sample_id!r} listed in {list_path}")
                continue
            labels = None
            if table is not None:
                labels = lookup_cls_labels(table, sample_id)
                if labels is None:
                    log.add(sample_id, self.label_source, f"no entry for id {sample_id!r}")
                    continue
            samples.append(Sample(sample_id, image, labels, mask))
        self.list_file = list_path
        super().__init__(COCO_CLASSES, samples, log.items, root, split, str(list_path))

    def describe(self) -> dict:
        info = super().describe()
        info.update(list_file=str(self.list_file), mask_folder=str(self.mask_folder), labels=self.label_source)
        return info


def build_coco(cfg: DataCfg, split: str) -> CocoDataset:
    return CocoDataset(cfg.root, split, cfg.masks_dir, cfg.cls_labels, cfg.on_error)
