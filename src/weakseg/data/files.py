"""Shared machinery of the on-disk datasets: safe paths, id lists, problem collection, lazy loading.

Construction is cheap (ids, label files and file existence only); pixels are decoded on access, by
`drop_bad_samples` (on_error="skip") and by `weakseg.data.check`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

import numpy as np

from weakseg.config import ConfigError
from weakseg.data.base import DataError, Subset, WeakSegDataset
from weakseg.data.imageio import ImageHeader, read_header, read_image, read_label_map

ON_ERROR_MODES = ("raise", "skip")
IGNORE = 255
_AXIS_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


class ProblemLog:
    """Per-sample problems: raised at once (on_error="raise") or recorded as {id, file, problem} ("skip")."""

    def __init__(self, on_error: str):
        if on_error not in ON_ERROR_MODES:
            raise ConfigError(f"data.on_error must be one of {', '.join(ON_ERROR_MODES)}, got {on_error!r}")
        self.on_error = on_error
        self.items: list[dict] = []

    def add(self, sample_id: Optional[str], file: str | Path, problem: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{file}: {problem}", file=file)
        self.items.append({"id": sample_id, "file": str(file), "problem": problem})

    def warn(self, what: str) -> None:
        if self.items:
            first = self.items[0]
            warnings.warn(f"{what}: skipped {len(self.items)} bad sample(s) (data.on_error=skip); first: "
                          f"{first['file']}: {first['problem']}", stacklevel=3)


def problem_from_error(e: DataError, sample_id: Optional[str], default_file: str) -> dict:
    """DataError -> {id, file, problem} with the file prefix of the message removed."""
    file = e.file or default_file
    message = str(e)
    if message.startswith(f"{file}: "):
        message = message[len(file) + 2:]
    return {"id": sample_id, "file": file, "problem": message}


def config_path(root: Path, value: str) -> Path:
    """A path from the config: absolute as given, relative ones under the dataset root ("../x" lexically)."""
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else root / p))


def unsafe_name_reason(name: str) -> Optional[str]:
    """Why a relative name from a list/CSV file must not be joined to a folder (None if it is safe)."""
    if not name or not name.strip():
        return "empty name"
    if "\x00" in name:
        return "name contains a NUL byte"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"{name!r} is an absolute path; names must be relative to the dataset folder"
    parts = PureWindowsPath(name).parts  # splits on both / and \
    if ".." in parts:
        return f"{name!r} contains '..' and would escape the dataset folder"
    return None


def escapes(path: Path, allowed: list[Path]) -> Optional[str]:
    """Why `path` (possibly a symlink) leads outside every folder in `allowed` (None if it stays inside).

    `allowed` holds resolved folders: the dataset root and the folder each kind of file lives in, so a
    folder-level symlink set up on purpose (e.g. SegmentationClassAug -> elsewhere) is accepted, while a
    file-level symlink leaving its folder is not.
    """
    if not (path.exists() or path.is_symlink()):
        return None
    real = path.resolve()
    if any(real == a or a in real.parents for a in allowed):
        return None
    return f"resolves to {real}, outside the dataset folder"


def allowed_roots(*folders: Path) -> list[Path]:
    return [f.resolve() for f in folders]


def listed_sample_ok(sample_id: str, list_path: Path, image: Path, mask: Optional[Path], allowed: list[Path],
                     log: ProblemLog) -> bool:
    """Checks shared by the list-file datasets: a safe id, paths inside the dataset, an existing image.

    Logs the first problem to `log` and returns False; the caller checks its own mask rule and labels.
    """
    reason = unsafe_name_reason(sample_id)
    if reason:
        log.add(sample_id, list_path, reason)
        return False
    for path in (image, mask):
        problem = escapes(path, allowed) if path is not None else None
        if problem:
            log.add(sample_id, path, f"id {sample_id!r} of {list_path}: {problem}")
            return False
    if not image.is_file():
        log.add(sample_id, image, f"image missing for id {sample_id!r} listed in {list_path}")
        return False
    return True


def read_id_list(path: Path, log: ProblemLog) -> list[str]:
    """Ids of a one-column list file (blank and '#' lines ignored), duplicates reported and dropped.

    A missing file is a DataError whatever `on_error` says: the split itself does not exist.
    """
    if not path.is_file():
        raise DataError(f"{path}: list file not found", file=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read list file ({e})", file=path) from e
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        tokens = stripped.split()
        if len(tokens) != 1:
            log.add(tokens[0], path, f"line {lineno}: expected one id per line, got {stripped!r}")
            continue
        sample_id = tokens[0]
        if sample_id in first_line:
            log.add(sample_id, path, f"line {lineno}: duplicate id {sample_id!r} (first on line "
                                     f"{first_line[sample_id]})")
            continue
        first_line[sample_id] = lineno
        ids.append(sample_id)
    return ids


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts and builtins only: a cls_labels.npy cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def load_cls_labels(path: Path, num_foreground: int) -> dict[str, np.ndarray]:
    """WeakTr-style ``cls_labels.npy`` -> {id: (num_foreground,) float32 multi-hot}.

    The file is a pickled dict saved with np.save; it is read with an unpickler that only admits numpy
    arrays, so a hostile file cannot execute code. Every vector must have length `num_foreground`
    and hold only 0/1.
    """
    if not path.is_file():
        raise DataError(f"{path}: cls_labels file not found", file=path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                _, _, dtype = np.lib.format.read_array_header_2_0(f)
            if not dtype.hasobject:
                raise DataError(f"{path}: expected a pickled dict of id -> label vector, got a plain {dtype} "
                                "array", file=path)
            obj = _NumpyOnlyUnpickler(f).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read cls_labels ({type(e).__name__}: {e})", file=path) from e
    table = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected a dict of id -> label vector, got {type(table).__name__}", file=path)
    out: dict[str, np.ndarray] = {}
    for key, value in table.items():
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
        if vec.shape != (num_foreground,):
            raise DataError(f"{path}: entry {key!r} has {vec.size} values, expected {num_foreground}", file=path)
        if not np.isin(vec, (0.0, 1.0)).all():
            raise DataError(f"{path}: entry {key!r} holds values other than 0/1: {vec.tolist()}", file=path)
        out[str(key)] = vec
    return out


def lookup_cls_labels(table: dict[str, np.ndarray], sample_id: str) -> Optional[np.ndarray]:
    """Entry for `sample_id`, also under the ``<id>.jpg`` key some WeakTr files use."""
    vec = table.get(sample_id)
    return table.get(f"{sample_id}.jpg") if vec is None else vec


def multi_hot(indices: list[int], num_foreground: int) -> np.ndarray:
    """Foreground class ids 1..C-1 -> (C-1,) float32 multi-hot."""
    vec = np.zeros(num_foreground, dtype=np.float32)
    for c in indices:
        vec[c - 1] = 1.0
    return vec


def check_mask_against_header(mask: np.ndarray, header: ImageHeader, mask_path: Path, image_path: Path) -> None:
    """Raise DataError unless the (H, W) mask matches the upright (EXIF-applied) image size."""
    if mask.shape == header.size:
        return
    h, w = mask.shape
    ih, iw = header.size
    if mask.shape == header.stored_size and header.orientation in _AXIS_SWAPPING_ORIENTATIONS:
        raise DataError(f"{mask_path}: mask is {w}x{h}, the size of {image_path} before its EXIF orientation "
                        f"{header.orientation} is applied; images are used upright ({iw}x{ih}), so this mask "
                        "was drawn on the unrotated pixels and does not match", file=mask_path)
    raise DataError(f"{mask_path}: mask size {w}x{h} differs from image size {iw}x{ih} of {image_path}",
                    file=mask_path)


def check_mask_values(mask: np.ndarray, num_classes: int, mask_path: Path) -> None:
    """Raise DataError if the mask holds ids outside 0..num_classes-1 and 255."""
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != IGNORE]
    if bad:
        raise DataError(f"{mask_path}: mask values {bad} are outside the class set 0..{num_classes - 1} "
                        f"(+{IGNORE} ignore)", file=mask_path)


@dataclass
class Sample:
    """One image on disk: its id, image file, labels ((C-1,) float32; None = derived from the mask) and mask."""

    id: str
    image: Path
    labels: Optional[np.ndarray]
    mask: Optional[Path]


class FileDataset(WeakSegDataset):
    """A dataset of image files with optional label-map files; subclasses fill `samples` and may convert masks."""

    def __init__(self, class_names: list[str], samples: list[Sample], skipped: list[dict], root: Path,
                 split: str, where: str):
        self.class_names = list(class_names)
        self.samples = samples
        self.ids = [s.id for s in samples]
        self.skipped = skipped
        self.root = root
        self.split = split
        self._mask_labels: dict[int, np.ndarray] = {}
        if not samples:
            reason = f"; all {len(skipped)} were skipped as bad" if skipped else ""
            raise DataError(f"{where}: split {split!r} has no images{reason}", file=where)
        if skipped:
            first = skipped[0]
            warnings.warn(f"{type(self).__name__} split {split!r}: skipped {len(skipped)} bad sample(s) "
                          f"(data.on_error=skip); first: {first['file']}: {first['problem']}", stacklevel=3)

    def image(self, i: int) -> np.ndarray:
        """-> (H, W, 3) uint8 RGB, EXIF orientation applied."""
        return read_image(self.samples[i].image)

    def labels(self, i: int) -> np.ndarray:
        """-> (C-1,) float32 multi-hot."""
        vec = self.samples[i].labels
        if vec is not None:
            return vec.copy()
        if i not in self._mask_labels:
            mask = self.mask(i)
            if mask is None:
                raise DataError(f"{self.samples[i].image}: no image-level labels and no mask to derive them from",
                                file=self.samples[i].image)
            present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:self.num_classes]) + 1
            self._mask_labels[i] = multi_hot(present.tolist(), self.num_classes - 1)
        return self._mask_labels[i].copy()

    def has_mask(self, i: int) -> bool:
        return self.samples[i].mask is not None

    def mask(self, i: int) -> Optional[np.ndarray]:
        """-> (H, W) uint8 class ids (255 = ignore) matching `image(i)`, or None."""
        s = self.samples[i]
        if s.mask is None:
            return None
        raw = read_label_map(s.mask)
        check_mask_against_header(raw, read_header(s.image), s.mask, s.image)
        mask = self.convert_mask(raw, i)
        check_mask_values(mask, self.num_classes, s.mask)
        return mask

    def convert_mask(self, raw: np.ndarray, i: int) -> np.ndarray:
        """Label map as stored -> class ids; identity unless the format encodes classes differently."""
        return raw

    def source(self, i: int) -> str:
        return str(self.samples[i].image)

    def describe(self) -> dict:
        info = super().describe()
        info.update(root=str(self.root), split=self.split,
                    num_masked=sum(1 for s in self.samples if s.mask is not None))
        return info


def sample_problem(ds: WeakSegDataset, i: int) -> Optional[dict]:
    """Decode image, labels and mask of sample i; -> {id, file, problem} of the first failure, or None."""
    try:
        ds.image(i)
        ds.labels(i)
        if ds.has_mask(i):
            ds.mask(i)
    except DataError as e:
        return problem_from_error(e, ds.ids[i], ds.source(i))
    return None


def drop_bad_samples(ds: WeakSegDataset) -> WeakSegDataset:
    """Decode every sample; -> `ds` itself if all are good, else a Subset of the good ones whose `skipped`
    lists the removed ones (and a warning with the count)."""
    keep, problems = [], []
    for i in range(len(ds)):
        problem = sample_problem(ds, i)
        if problem is None:
            keep.append(i)
        else:
            problems.append(problem)
    if not problems:
        return ds
    sub = Subset(ds, keep)
    sub.skipped = list(ds.skipped) + problems
    warnings.warn(f"skipped {len(problems)} of {len(ds)} sample(s) that failed to decode (data.on_error=skip); "
                  f"first: {problems[0]['file']}: {problems[0]['problem']}", stacklevel=2)
    return sub
