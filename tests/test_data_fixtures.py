"""Helpers (no tests): tiny on-disk dataset trees in each supported layout, never the real data.

Images are 32 wide x 24 high. Each mask has a known layout so tests can assert exact values.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 32, 24
VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [7] * (256 * 3 - 15)


def rgb_array(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_image(path: Path, seed: int = 0, fmt: str = "PNG", h: int = H, w: int = W) -> np.ndarray:
    """Write a random RGB image in container `fmt` (whatever the file extension says); -> its pixels."""
    arr = rgb_array(seed, h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def save_label(path: Path, labels: np.ndarray, palette: bool = True) -> None:
    """Write a (H, W) uint8 label map as a palette PNG (colours != indices) or a grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    if palette:
        img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
        img.putpalette(VOC_PALETTE)
    else:
        img = Image.fromarray(labels)
    img.save(path, format="PNG")


def block_mask(fg: int, h: int = H, w: int = W, ignore_ring: bool = False) -> np.ndarray:
    """(H, W) zeros with class `fg` in rows 6..17, cols 8..23 (and a 255 ring around it if asked)."""
    m = np.zeros((h, w), dtype=np.uint8)
    if ignore_ring:
        m[5:19, 7:25] = 255
    m[6:18, 8:24] = fg
    return m


def trimap() -> np.ndarray:
    """Oxford trimap: 1 = pet in the block, 3 = a one-pixel border around it, 2 elsewhere."""
    t = np.full((H, W), 2, dtype=np.uint8)
    t[5:19, 7:25] = 3
    t[6:18, 8:24] = 1
    return t


# --- Oxford-IIIT Pet ----------------------------------------------------------------------------------------
PET_TRAINVAL = [("Abyssinian_1", 1, 1, 1), ("Abyssinian_2", 1, 1, 1), ("american_bulldog_1", 2, 2, 1),
                ("Bengal_1", 6, 1, 6)]
PET_TEST = [("Abyssinian_3", 1, 1, 1), ("american_bulldog_2", 2, 2, 1)]


def write_pet_list(path: Path, entries) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#Image CLASS-ID SPECIES BREED ID\n" + "".join(f"{n} {c} {s} {b}\n" for n, c, s, b in entries))


def make_pet(root: Path, with_test: bool = True) -> Path:
    """Pet tree: trainval (4 images, 3 breeds with class_ids 1, 2, 6), test (2), and an unlisted GIF named .jpg."""
    names = [e[0] for e in PET_TRAINVAL + PET_TEST] + ["Bengal_9"]
    for k, name in enumerate(names):
        save_image(root / "images" / f"{name}.jpg", seed=k, fmt="JPEG")
        save_label(root / "annotations" / "trimaps" / f"{name}.png", trimap(), palette=False)
    # Quirks of the real archive: content that is not JPEG behind a .jpg name.
    save_image(root / "images" / "Abyssinian_2.jpg", seed=50, fmt="PNG")
    Image.fromarray(rgb_array(51)).convert("P").save(root / "images" / "Bengal_9.jpg", format="GIF")
    write_pet_list(root / "annotations" / "trainval.txt", PET_TRAINVAL)
    if with_test:
        write_pet_list(root / "annotations" / "test.txt", PET_TEST)
    return root


# --- PASCAL VOC -----------------------------------------------------------------------------------------------
VOC_OBJECTS = {  # id -> [(class name, difficult)]
    "000001": [("aeroplane", 0)],
    "000002": [("bicycle", 0), ("bird", 1)],
    "000003": [("boat", 0)],
    "000004": [("person", 1)],
}
VOC_MASKS = {"000001": block_mask(1, ignore_ring=True), "000002": block_mask(2)}


def voc_xml(objects) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
    return f"<annotation><size><width>{W}</width><height>{H}</height></size>{objs}</annotation>"


def make_voc(root: Path) -> Path:
    """VOC2007-like tree: Main/trainval (4 ids), Segmentation/train (the 2 ids with masks)."""
    for k, (sample_id, objects) in enumerate(VOC_OBJECTS.items()):
        save_image(root / "JPEGImages" / f"{sample_id}.jpg", seed=k, fmt="JPEG")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{sample_id}.xml").write_text(voc_xml(objects))
    for sample_id, mask in VOC_MASKS.items():
        save_label(root / "SegmentationClass" / f"{sample_id}.png", mask)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in VOC_OBJECTS))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in VOC_MASKS))
    return root


# --- COCO (WeakTr layout) -------------------------------------------------------------------------------------
COCO_MASKS = {"000000000009": block_mask(1), "000000000025": block_mask(80), "000000000030": block_mask(17)}


def save_cls_labels(path: Path, table: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, table, allow_pickle=True)


def make_coco(root: Path, with_cls_labels: bool = True) -> Path:
    for k, (sample_id, mask) in enumerate(COCO_MASKS.items()):
        save_image(root / "images" / f"{sample_id}.jpg", seed=k, fmt="JPEG")
        save_label(root / "voc_format" / "class_labels" / f"{sample_id}.png", mask, palette=False)
    ids = list(COCO_MASKS)
    (root / "voc_format" / "train.txt").write_text("".join(f"{i}\n" for i in ids[:2]))
    (root / "voc_format" / "val.txt").write_text(f"{ids[2]}\n")
    if with_cls_labels:
        table = {}
        for sample_id, mask in COCO_MASKS.items():
            vec = np.zeros(80, dtype=np.float32)
            vec[int(mask.max()) - 1] = 1
            table[sample_id] = vec
        save_cls_labels(root / "cls_labels.npy", table)
    return root


# --- Folder + CSV ---------------------------------------------------------------------------------------------
def make_folder(root: Path, rows: list[tuple[str, str]] | None = None, split_column: list[str] | None = None,
                masks: dict[str, np.ndarray] | None = None) -> Path:
    """images/ with a labels.csv ("image,labels[,split]") and optional masks/ (same relative path, .png)."""
    rows = rows if rows is not None else [("cat1.png", "cat"), ("dog1.jpg", "dog"), ("both.png", "cat dog"),
                                          ("sub/none.png", "")]
    for k, (name, _) in enumerate(rows):
        save_image(root / "images" / name, seed=k, fmt="JPEG" if name.endswith(".jpg") else "PNG")
    header = "image,labels" + (",split" if split_column else "")
    lines = [header] + [f"{n},{lab}" + (f",{split_column[k]}" if split_column else "")
                        for k, (n, lab) in enumerate(rows)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    for name, mask in (masks or {}).items():
        save_label(root / "masks" / name, mask)
    return root


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
