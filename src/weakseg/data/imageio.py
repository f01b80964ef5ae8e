"""Reading images and label maps safely: by content (not extension), EXIF-rotated, bounded in size."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from weakseg.data.base import DataError

# Refuse images above this many pixels (decompression bombs); PIL's own default warns at ~89 Mpx.
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_AXIS_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
# What each container format is usually named, to report files whose extension lies about their content.
_FORMAT_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg"}, "PNG": {".png"}, "GIF": {".gif"}, "BMP": {".bmp"}, "TIFF": {".tif", ".tiff"},
    "WEBP": {".webp"}, "MPO": {".jpg", ".jpeg"},
}


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says about itself without decoding its pixels."""

    format: str  # container format detected from content (JPEG, PNG, GIF, ...)
    mode: str  # PIL mode of the stored pixels (RGB, L, P, RGBA, CMYK, I;16, ...)
    stored_size: tuple[int, int]  # (H, W) of the stored pixel array
    orientation: int  # EXIF orientation tag (1 = upright; 0 when absent)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image as `read_image` returns it (EXIF orientation applied)."""
        h, w = self.stored_size
        return (w, h) if self.orientation in _AXIS_SWAPPING_ORIENTATIONS else (h, w)

    def extension_matches(self, path: str | Path) -> bool:
        return Path(path).suffix.lower() in _FORMAT_EXTENSIONS.get(self.format, {Path(path).suffix.lower()})


def _check_pixels(path: Path, img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
                        "(possible decompression bomb)", file=path)
    if w == 0 or h == 0:
        raise DataError(f"{path}: image has zero size {w}x{h}", file=path)


def _decode_error(path: Path, e: BaseException) -> DataError:
    if isinstance(e, (Image.DecompressionBombWarning, Image.DecompressionBombError)):  # PIL's check fired first
        return DataError(f"{path}: refused as a possible decompression bomb: more pixels than the limit of "
                         f"{MAX_IMAGE_PIXELS} ({e})", file=path)
    if isinstance(e, UnidentifiedImageError):
        return DataError(f"{path}: cannot decode image (not an image in any supported format)", file=path)
    return DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})", file=path)


def _open(path: Path) -> Image.Image:
    """Fully decoded image (first frame), read from memory so no file handle stays open.

    PNG files also have every chunk checksum verified: zlib alone lets many bit flips in the pixel data
    decode to wrong pixels without an error, which for a label map would be a silently wrong mask.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found", file=path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})", file=path) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(path, img)
            if img.format == "PNG":
                img.verify()  # checks the CRC of every chunk; the image must be reopened afterwards
                img = Image.open(io.BytesIO(data))
            img.load()
    except DataError:
        raise
    except Exception as e:  # decoders raise many types on hostile bytes (OSError, SyntaxError, struct.error, ...)
        raise _decode_error(path, e) from e
    return img


def read_header(path: str | Path) -> ImageHeader:
    """Format, mode and size of an image file from its header only (cheap; pixels are not decoded)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found", file=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(path, img)
                orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 0)
                w, h = img.size
                return ImageHeader(str(img.format), img.mode, (h, w), int(orientation) if isinstance(
                    orientation, int) else 0)
    except DataError:
        raise
    except Exception as e:
        raise _decode_error(path, e) from e


def read_image(path: str | Path) -> np.ndarray:
    """-> (H, W, 3) uint8 RGB. Format detected from content; EXIF orientation applied; gray/RGBA/CMYK/P/16-bit
    converted to 8-bit RGB (alpha is dropped onto black; 16-bit values are divided by 257)."""
    path = Path(path)
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # malformed EXIF block
        raise DataError(f"{path}: corrupt EXIF orientation data ({e})", file=path) from e
    try:
        return _to_rgb(path, img)
    except DataError:
        raise
    except Exception as e:
        raise _decode_error(path, e) from e


def _to_rgb(path: Path, img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16"):  # 16 bits per sample by construction
        arr = np.asarray(img, dtype=np.float64) / 257.0
        return np.repeat(np.rint(arr).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "I":  # 32-bit integer container: 16-bit data if any value exceeds 8 bits
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if float(arr.max(initial=0)) > 255 else 1.0
        return np.repeat(np.rint(arr / scale).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":
        raise DataError(f"{path}: floating-point images are not supported", file=path)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
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
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if arr.size and (arr.max() > 255 or arr.min() < 0):
            raise DataError(f"{path}: 16-bit label map has values in {int(arr.min())}..{int(arr.max())} "
                            "(label ids must be 0..255)", file=path)
        return arr.astype(np.uint8)
    raise DataError(f"{path}: a label map must be a palette or grayscale image, got mode {img.mode}", file=path)


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of a folder (by extension; content is checked when read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder", file=folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
