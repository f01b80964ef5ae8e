"""Reading images and label maps safely: by content (not extension), EXIF-rotated, bounded in size."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from weakseg.data.base import DataError

# Refuse images above this many pixels (decompression bombs); PIL's own default warns at ~89 Mpx.
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
                                "(possible decompression bomb)")
            img.load()
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return img


def read_image(path: str | Path) -> np.ndarray:
    """-> (H, W, 3) uint8 RGB. Format detected from content; EXIF orientation applied; gray/RGBA/CMYK/P/16-bit
    converted to 8-bit RGB (alpha is dropped onto black)."""
    path = Path(path)
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # malformed EXIF block
        raise DataError(f"{path}: corrupt EXIF orientation data ({e})") from e
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        arr = (arr / (65535.0 if hi > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        raise DataError(f"{path}: floating-point images are not supported")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_label_map(path: str | Path) -> np.ndarray:
    """-> (H, W) uint8 label ids from a palette or grayscale PNG (palette indices, never colours)."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if arr.max() > 255:
            raise DataError(f"{path}: 16-bit label map has values up to {int(arr.max())} (> 255)")
        return arr.astype(np.uint8)
    raise DataError(f"{path}: a label map must be a palette or grayscale image, got mode {img.mode}")


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of a folder (by extension; content is checked when read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
