"""Your own data: a folder of images, a CSV of image-level labels, optional masks and class list.

    root/                      the images (any depth; formats detected by content)
    labels_csv                 header "image,labels[,split]"; image = path under root, labels = class names
                               separated by spaces (empty = no object), split = optional split name
    masks_dir/<image>.png      optional label maps (same relative path, .png) of class ids, 255 = ignore;
                               an image without one simply has no mask (has_mask False)
    classes_file               optional, one class name per line, the first line "background"; without it the
                               classes are background + the sorted names found anywhere in the CSV

Relative labels_csv / masks_dir / classes_file paths are under root.

Splits: without a split column, "train" and "all" are every row. With one, "all" is every row and any
other name selects the rows whose split equals it.

Ids are the image paths without extension, with "/" replaced by "__" so they are valid file names.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import Optional

from weakseg.config import DataCfg
from weakseg.data.base import DataError
from weakseg.data.files import (
    FileDataset, ProblemLog, Sample, allowed_roots, config_path, escapes, multi_hot, unsafe_name_reason,
)

FOLDER_COLUMNS = ("image", "labels", "split")


def read_classes_file(path: Path) -> list[str]:
    """One class name per line, first = background; -> class names (index 0 = background)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read classes file ({e})", file=path) from e
    names = [ln.strip() for ln in lines if ln.strip()]
    if not names or names[0] != "background":
        raise DataError(f"{path}: the first class must be 'background', got "
                        f"{names[0] if names else 'an empty file'!r}", file=path)
    for name in names:
        if len(name.split()) != 1:
            raise DataError(f"{path}: class name {name!r} contains whitespace", file=path)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate class names {dupes}", file=path)
    if len(names) < 2:
        raise DataError(f"{path}: needs at least one class besides background", file=path)
    if len(names) > 255:
        raise DataError(f"{path}: {len(names)} classes do not fit in a uint8 mask with 255 = ignore", file=path)
    return names


def read_labels_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """-> (header, [(line number, cells)]) of a labels CSV; header problems are a DataError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = []
            for row in reader:
                rows.append((reader.line_num, row))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read labels CSV ({e})", file=path) from e
    rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: labels CSV is empty (expected a header 'image,labels')", file=path)
    header = [c.strip().lower() for c in rows[0][1]]
    if header[:2] != ["image", "labels"] or len(header) > 3 or (len(header) == 3 and header[2] != "split"):
        raise DataError(f"{path}: header must be 'image,labels' or 'image,labels,split', got "
                        f"{','.join(rows[0][1])!r}", file=path)
    return header, rows[1:]


def folder_sample_id(image_name: str) -> str:
    """"sub/dir/x.jpg" -> "sub__dir__x"."""
    return "__".join(PurePosixPath(image_name.replace("\\", "/")).with_suffix("").parts)


class FolderDataset(FileDataset):
    """Images + labels CSV (+ optional masks / class list); labels (C-1,) float32, masks (H, W) uint8."""

    def __init__(self, root: str | Path, labels_csv: str, split: str = "train", masks_dir: str = "",
                 classes_file: str = "", on_error: str = "raise"):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found", file=root)
        if not labels_csv:
            raise DataError(f"{root}: the folder dataset needs data.labels_csv (a CSV 'image,labels')", file=root)
        csv_path = config_path(root, labels_csv)
        header, rows = read_labels_csv(csv_path)
        has_split = len(header) == 3
        if not has_split and split not in ("train", "all"):
            raise DataError(f"{csv_path}: split {split!r} needs a 'split' column; without one the splits are "
                            "'train' and 'all' (every row)", file=csv_path)
        mask_folder: Optional[Path] = config_path(root, masks_dir) if masks_dir else None
        if mask_folder is not None and not mask_folder.is_dir():
            raise DataError(f"{mask_folder}: mask folder (data.masks_dir) not found", file=mask_folder)
        if classes_file:
            class_names = read_classes_file(config_path(root, classes_file))
        else:
            found = {name for _, cells in rows if len(cells) > 1 for name in cells[1].split()}
            class_names = ["background"] + sorted(found - {"background"})
            if len(class_names) < 2:
                raise DataError(f"{csv_path}: no class names in the labels column", file=csv_path)
        index = {name: k for k, name in enumerate(class_names)}

        log = ProblemLog(on_error)
        allowed = allowed_roots(*(p for p in (root, mask_folder) if p is not None))
        samples: list[Sample] = []
        first_line: dict[str, int] = {}
        for lineno, cells in rows:
            image_name = cells[0].strip() if cells else ""
            where = f"{csv_path}: line {lineno}"
            if len(cells) != len(header):
                log.add(image_name or None, csv_path, f"line {lineno}: expected {len(header)} columns "
                                                      f"({','.join(header)}), got {len(cells)}")
                continue
            if has_split and split != "all" and cells[2].strip() != split:
                continue
            reason = unsafe_name_reason(image_name)
            if reason:
                log.add(image_name or None, csv_path, f"line {lineno}: {reason}")
                continue
            sample_id = folder_sample_id(image_name)
            if sample_id in first_line:
                log.add(sample_id, csv_path, f"line {lineno}: duplicate id {sample_id!r} (first on line "
                                             f"{first_line[sample_id]})")
                continue
            first_line[sample_id] = lineno
            names = cells[1].split()
            unknown = [n for n in names if n not in index or n == "background"]
            if unknown:
                log.add(sample_id, csv_path, f"line {lineno}: unknown class name(s) {unknown}; classes are "
                                             f"{', '.join(class_names[1:])}")
                continue
            image = root / image_name
            mask = mask_folder / PurePosixPath(image_name.replace("\\", "/")).with_suffix(".png") \
                if mask_folder is not None else None
            escaping = [(p, r) for p in (image, mask) if p is not None and (r := escapes(p, allowed))]
            if escaping:
                log.add(sample_id, escaping[0][0], f"{where}: {escaping[0][1]}")
                continue
            if not image.is_file():
                log.add(sample_id, image, f"image missing (listed on line {lineno} of {csv_path})")
                continue
            if mask is not None and not mask.is_file():
                mask = None
            samples.append(Sample(sample_id, image, multi_hot([index[n] for n in names], len(class_names) - 1),
                                  mask))
        self.labels_csv = csv_path
        self.mask_folder = mask_folder
        super().__init__(class_names, samples, log.items, root, split, str(csv_path))

    def describe(self) -> dict:
        info = super().describe()
        info.update(labels_csv=str(self.labels_csv), mask_folder=str(self.mask_folder or ""))
        return info


def build_folder(cfg: DataCfg, split: str) -> FolderDataset:
    return FolderDataset(cfg.root, cfg.labels_csv, split, cfg.masks_dir, cfg.classes_file, cfg.on_error)
