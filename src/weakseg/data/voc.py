"""PASCAL VOC (2007 or 2012) in the standard VOCdevkit layout; root = .../VOCdevkit/VOC2007 (or VOC2012).

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                      image-level labels: every <object><name>, difficult ones included
    SegmentationClass/<id>.png                palette PNG of class ids (indices, not colours), 255 = void
    SegmentationClassAug/<id>.png             SBD masks, used when data.masks_dir = SegmentationClassAug
    ImageSets/Segmentation/<split>.txt, ImageSets/Main/<split>.txt

Classes: background + the 20 VOC classes in the usual order (21 classes).

Image-level labels come from the XML files, or from a WeakTr-style ``cls_labels.npy`` (dict id -> 20-d
multi-hot) when data.cls_labels names one. XML labels include objects marked difficult: they are in
the image, and their pixels are in the masks.

Split names:
- "train", "val", "trainval", "trainaug" (alias "train_aug"): ImageSets/Segmentation/<split>.txt if it
  exists, else ImageSets/Main/<split>.txt (trainaug also tries Segmentation/train_aug.txt).
- "Segmentation/<name>" or "Main/<name>": that exact list under ImageSets/.
- "<path>.txt": any list file (relative paths are under root), e.g. WeakTr's train_aug_id.txt.
A list under ImageSets/Segmentation requires a mask for every id (missing = error). Other lists use a
mask where one exists (has_mask True only there): with the VOC2007 subset in ../shared/data,
train_split=trainval reads Main/trainval.txt (4,798 images, 209 with masks), and eval_split=val names
the missing list files in its DataError.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

from weakseg.config import DataCfg
from weakseg.data.base import DataError
from weakseg.data.files import (
    FileDataset, ProblemLog, Sample, allowed_roots, config_path, escapes, listed_sample_ok, load_cls_labels,
    lookup_cls_labels, multi_hot, read_id_list, unsafe_name_reason,
)

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
VOC_SPLIT_ALIASES = {"train_aug": "trainaug"}


def voc_split_list(root: Path, split: str) -> tuple[Path, bool]:
    """Split name -> (list file, whether every id must have a mask). Raises DataError naming the files tried."""
    if split.endswith(".txt"):
        path = Path(split).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DataError(f"{path}: list file not found (split {split!r})", file=path)
        return path, False
    sets = root / "ImageSets"
    if "/" in split:
        kind, name = split.split("/", 1)
        if kind not in ("Segmentation", "Main") or not name or "/" in name or unsafe_name_reason(name):
            raise DataError(f"{root}: split {split!r} must be Segmentation/<name> or Main/<name>", file=root)
        path = sets / kind / f"{name}.txt"
        if not path.is_file():
            raise DataError(f"{path}: list file not found (split {split!r})", file=path)
        return path, kind == "Segmentation"
    if unsafe_name_reason(split):
        raise DataError(f"{root}: invalid split name {split!r}", file=root)
    name = VOC_SPLIT_ALIASES.get(split, split)
    candidates = [(sets / "Segmentation" / f"{name}.txt", True)]
    if name == "trainaug":
        candidates.append((sets / "Segmentation" / "train_aug.txt", True))
    candidates.append((sets / "Main" / f"{name}.txt", False))
    for path, needs_masks in candidates:
        if path.is_file():
            return path, needs_masks
    tried = ", ".join(str(p) for p, _ in candidates)
    raise DataError(f"{root}: split {split!r} not found: none of these list files exist: {tried}", file=root)


def xml_labels(path: Path) -> tuple[Optional[list[int]], str]:
    """Annotations XML -> (foreground class ids of its objects, "") or (None, problem)."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError, ValueError) as e:
        return None, f"cannot parse annotation XML ({e})"
    classes: set[int] = set()
    for obj in tree.getroot().iter("object"):
        name_el = obj.find("name")
        name = (name_el.text or "").strip() if name_el is not None else ""
        if name not in VOC_CLASSES[1:]:
            return None, f"object name {name!r} is not a VOC class"
        classes.add(VOC_CLASSES.index(name))
    return sorted(classes), ""


class VocDataset(FileDataset):
    """PASCAL VOC split; labels (20,) float32, masks (H, W) uint8 ids 0..20 with 255 void."""

    def __init__(self, root: str | Path, split: str = "train", masks_dir: str = "", cls_labels: str = "",
                 on_error: str = "raise"):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: VOC root folder not found (expected .../VOCdevkit/VOC2007 or VOC2012)",
                            file=root)
        list_path, needs_masks = voc_split_list(root, split)
        images_dir, xml_dir = root / "JPEGImages", root / "Annotations"
        mask_folder = config_path(root, masks_dir or "SegmentationClass")
        if not mask_folder.is_dir():
            if masks_dir:
                raise DataError(f"{mask_folder}: mask folder (data.masks_dir) not found", file=mask_folder)
            if needs_masks:
                raise DataError(f"{mask_folder}: mask folder not found, but split {split!r} ({list_path}) is a "
                                "segmentation list", file=mask_folder)
        table = load_cls_labels(config_path(root, cls_labels), len(VOC_CLASSES) - 1) if cls_labels else None
        self.label_source = str(config_path(root, cls_labels)) if cls_labels else "Annotations/*.xml"
        self.mask_folder = mask_folder

        log = ProblemLog(on_error)
        allowed = allowed_roots(root, images_dir, xml_dir, mask_folder)
        samples: list[Sample] = []
        for sample_id in read_id_list(list_path, log):
            image = images_dir / f"{sample_id}.jpg"
            mask: Optional[Path] = mask_folder / f"{sample_id}.png"
            if not listed_sample_ok(sample_id, list_path, image, mask, allowed, log):
                continue
            if not mask.is_file():
                if needs_masks:
                    hint = "" if masks_dir else " (for SBD masks set data.masks_dir=SegmentationClassAug)"
                    log.add(sample_id, mask, f"mask missing for id {sample_id!r} of segmentation list "
                                             f"{list_path}{hint}")
                    continue
                mask = None
            if table is not None:
                labels = lookup_cls_labels(table, sample_id)
                if labels is None:
                    log.add(sample_id, self.label_source, f"no entry for id {sample_id!r}")
                    continue
            else:
                xml = xml_dir / f"{sample_id}.xml"
                problem = escapes(xml, allowed)
                if problem or not xml.is_file():
                    log.add(sample_id, xml, problem or f"annotation missing for id {sample_id!r}")
                    continue
                classes, problem = xml_labels(xml)
                if classes is None:
                    log.add(sample_id, xml, problem)
                    continue
                labels = multi_hot(classes, len(VOC_CLASSES) - 1)
            samples.append(Sample(sample_id, image, labels, mask))
        self.list_file = list_path
        super().__init__(VOC_CLASSES, samples, log.items, root, split, str(list_path))

    def describe(self) -> dict:
        info = super().describe()
        info.update(list_file=str(self.list_file), mask_folder=str(self.mask_folder), labels=self.label_source)
        return info


def build_voc(cfg: DataCfg, split: str) -> VocDataset:
    return VocDataset(cfg.root, split, cfg.masks_dir, cfg.cls_labels, cfg.on_error)
