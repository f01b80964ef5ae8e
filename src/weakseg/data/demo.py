"""Built-in demo dataset, generated procedurally and deterministically from a seed (no download).

Five object classes, each with its own shape, colour family and texture, placed 1-3 per image (with
occlusion) on textured, cluttered backgrounds. Clutter includes distractor blobs and strokes whose colours
overlap the object colours, so colour alone does not solve the task and CAMs are not trivially perfect.
Masks are exact: they are the rasterised visible object regions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from weakseg.data.base import WeakSegDataset

DEMO_CLASSES = ["background", "disc", "square", "triangle", "star", "ring"]
# Base hue (RGB) of each object class; jittered per instance.
_CLASS_COLOURS = {
    1: (220, 60, 50),  # disc: red
    2: (50, 90, 220),  # square: blue
    3: (60, 190, 70),  # triangle: green
    4: (235, 200, 40),  # star: yellow
    5: (170, 70, 200),  # ring: purple
}
_SPLIT_CODE = {"train": 1, "test": 2, "val": 3}
_MIN_VISIBLE_PIXELS = 40


def _polygon(cls: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if cls == 2:  # square
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
               for k in range(4)]
    elif cls == 3:  # triangle
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    elif cls == 4:  # star
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = angle + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    else:
        raise ValueError(cls)
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _shape_mask(cls: int, size: int, cx: float, cy: float, r: float, angle: float, aspect: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if cls == 1:  # disc (ellipse)
        draw.ellipse([cx - r, cy - r * aspect, cx + r, cy + r * aspect], fill=1)
    elif cls == 5:  # ring
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        ri = r * 0.5
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_polygon(cls, cx, cy, r, angle), fill=1)
    return np.array(canvas, dtype=bool)


def _texture(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) multiplicative texture in ~[0.55, 1.15] typical of each class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if cls == 1:  # concentric-ish fine noise
        t = 1.0 + 0.12 * rng.standard_normal((size, size))
    elif cls == 2:  # checkerboard
        p = rng.integers(4, 7)
        t = np.where(((xx // p + yy // p) % 2) == 0, 1.05, 0.7)
    elif cls == 3:  # stripes
        f = rng.uniform(0.5, 0.8)
        t = 0.85 + 0.25 * np.sign(np.sin(f * yy + phase))
    elif cls == 4:  # dots
        p = rng.integers(5, 8)
        t = np.where(((xx % p) < 2) & ((yy % p) < 2), 0.55, 1.05)
    else:  # ring: diagonal waves
        t = 0.9 + 0.2 * np.sin(0.6 * (xx + yy) + phase)
    return t.astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Textured, cluttered background (size, size, 3) float32 in [0, 255]."""
    low = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.float32)
    base = np.array(Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(2):  # gratings
        a, f, ph = rng.uniform(0, np.pi), rng.uniform(0.1, 0.5), rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(8, 25)
        base += amp * np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + ph)[..., None]
    base += rng.normal(0, 10, size=(size, size, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):  # clutter: blobs and strokes, some in object colours
        if rng.random() < 0.5:
            colour = np.array(_CLASS_COLOURS[int(rng.integers(1, 6))]) + rng.integers(-30, 30, 3)
        else:
            colour = rng.integers(0, 255, 3)
        colour = tuple(int(c) for c in np.clip(colour, 0, 255))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            x2, y2 = x + rng.uniform(-size / 2, size / 2), y + rng.uniform(-size / 2, size / 2)
            draw.line([x, y, x2, y2], fill=colour, width=int(rng.integers(1, 4)))
        else:  # irregular blob (random polygon), not one of the class shapes
            n = int(rng.integers(5, 9))
            r = rng.uniform(3, max(4.0, size / 10))
            pts = [(x + r * rng.uniform(0.4, 1.2) * math.cos(2 * math.pi * k / n),
                    y + r * rng.uniform(0.4, 1.2) * math.sin(2 * math.pi * k / n)) for k in range(n)]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    return np.asarray(img, dtype=np.float32)


def generate_sample(seed: int, split: str, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically generate one demo image and its exact mask.

    Returns:
        image (size, size, 3) uint8 and mask (size, size) uint8 with ids 0..5.
    """
    rng = np.random.default_rng([seed, _SPLIT_CODE.get(split, 9), index])
    img = _background(size, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    n_obj = int(rng.choice([1, 1, 2, 2, 3]))
    classes = rng.choice(np.arange(1, 6), size=n_obj, replace=rng.random() < 0.2)
    for cls in classes:
        cls = int(cls)
        r = rng.uniform(0.10, 0.24) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        region = _shape_mask(cls, size, cx, cy, r, rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.0))
        colour = np.array(_CLASS_COLOURS[cls], dtype=np.float32) * rng.uniform(0.75, 1.1) + rng.normal(0, 12, 3)
        shading = 0.85 + 0.3 * np.linspace(0, 1, size, dtype=np.float32)[None, :] if rng.random() < 0.5 else 1.0
        obj = colour[None, None, :] * (_texture(cls, size, rng) * shading)[..., None]
        obj += rng.normal(0, 6, size=obj.shape)
        img[region] = obj[region]
        mask[region] = cls
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, mask


class DemoDataset(WeakSegDataset):
    """`n` procedurally generated images of one split; images and masks are produced on access."""

    def __init__(self, split: str = "train", n: int = 400, seed: int = 0, size: int = 128):
        if split not in _SPLIT_CODE:
            raise ValueError(f"demo split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
        self.split, self.seed, self.size = split, seed, size
        self.class_names = list(DEMO_CLASSES)
        self.ids = [f"demo_{split}_{i:05d}" for i in range(n)]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[i] = generate_sample(self.seed, self.split, i, self.size)
        return self._cache[i]

    def image(self, i: int) -> np.ndarray:
        return self._sample(i)[0]

    def mask(self, i: int) -> Optional[np.ndarray]:
        return self._sample(i)[1]

    def has_mask(self, i: int) -> bool:
        return True

    def labels(self, i: int) -> np.ndarray:
        counts = np.bincount(self._sample(i)[1].ravel(), minlength=self.num_classes)
        return (counts[1:] >= _MIN_VISIBLE_PIXELS).astype(np.float32)


def write_demo_split(out_dir: str | Path, split: str = "test", n: int = 100, seed: int = 0, size: int = 128) -> Path:
    """Write a demo split to disk: images/<id>.png, masks/<id>.png (palette) and labels.csv."""
    from weakseg.io import save_label_png, write_bytes, write_text
    import io as _io

    out = Path(out_dir)
    ds = DemoDataset(split, n, seed, size)
    rows = ["image,labels"]
    for i, sid in enumerate(ds.ids):
        buf = _io.BytesIO()
        Image.fromarray(ds.image(i)).save(buf, format="PNG")
        write_bytes(out / "images" / f"{sid}.png", buf.getvalue())
        save_label_png(out / "masks" / f"{sid}.png", ds.mask(i))
        names = [ds.class_names[c + 1] for c in np.flatnonzero(ds.labels(i))]
        rows.append(f"{sid}.png,{' '.join(names)}")
    write_text(out / "labels.csv", "\n".join(rows) + "\n")
    write_text(out / "classes.txt", "\n".join(ds.class_names) + "\n")
    return out
