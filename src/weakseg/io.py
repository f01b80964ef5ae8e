"""Atomic file writes, label-map PNGs and compact CAM files.

Every artifact is written to a temporary name in the same folder and renamed into place, so a file that
exists under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give artifacts the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


class ArtifactWriteError(OSError):
    """A file could not be written (disk full, quota, read-only folder); nothing was left under its final name."""


def _write_error(path: str | Path, e: OSError) -> OSError:
    if isinstance(e, ArtifactWriteError):
        return e
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        advice = ("the disk (or your quota) is full: free some space there, or point runs_dir=... at a disk with "
                  "room, then run the same command again")
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "the folder is not writable: fix its permissions or point runs_dir=... elsewhere, then run again"
    else:
        advice = "check the disk, then run the same command again"
    err = ArtifactWriteError(f"cannot write {path}: {reason}; {advice} (`weakseg run` keeps completed stages and "
                             "resumes training from its last checkpoint)")
    err.errno = e.errno  # (not strerror/filename: OSError.__str__ would then replace the message)
    return err


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically; on failure (e.g. disk full) no file is left under either name."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(path, e) from e


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


class CheckpointError(RuntimeError):
    """A checkpoint was refused (it is not plain tensors: loading it could run code) or cannot be read."""


def load_weights_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with errors that name the file and say what to do.

    The weights-only unpickler admits tensors and plain containers only: a pickle that would import a
    function or class (os.system, a custom class with __reduce__, ...) is refused before anything runs.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (f"it references the Python object {found.group(1)}" if found else
                f"the weights-only unpickler rejected it ({_last_line(e)})")
        raise CheckpointError(
            f"{path}: refused: not a plain-tensor checkpoint, {what}. Loading such a file can run arbitrary code, "
            "so weakseg only loads weights-only checkpoints (torch.load(weights_only=True)). If you trust the "
            "file, load it yourself and re-save the plain state_dict: torch.save(model.state_dict(), PATH)."
        ) from e
    except Exception as e:  # truncated zip (RuntimeError), empty file (EOFError), unreadable (OSError), ...
        raise CheckpointError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {_last_line(e)}); it is "
                              "truncated, corrupt or not a PyTorch file. Replace it with a good copy (a resume "
                              "checkpoint, checkpoints/last.pt, can be deleted: its stage then starts over).") from e


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "torch.load to learn more" not in ln]
    line = lines[-1] if lines else type(e).__name__
    return line.split(". ")[0][:300]  # the first sentence: torch appends paragraphs of generic advice


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (a log; partial last lines are tolerated by `read_jsonl`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
    except OSError as e:
        raise _write_error(path, e) from e


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 entries, flat RGB list); 255 (void) is light grey-white."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend([r, g, b])
    palette[255 * 3 : 256 * 3] = [224, 224, 192]
    return palette


def save_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write an (H, W) uint8 label map as a palette PNG (values are the class ids, 255 = ignore)."""
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def load_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 class ids without any palette conversion."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path}: label map must be a palette or grayscale PNG, got mode {img.mode}")
        return np.array(img, dtype=np.uint8)


def save_cam(path: str | Path, cam: np.ndarray, classes: np.ndarray, image_size: tuple[int, int]) -> None:
    """Store a CAM compactly: float16 (K, h, w) of the K present classes (1-based class ids)."""
    buf = io.BytesIO()
    np.savez(buf, cam=cam.astype(np.float16), classes=np.asarray(classes, dtype=np.int16),
             size=np.asarray(image_size, dtype=np.int32))
    write_bytes(path, buf.getvalue())


def load_cam(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """-> (cam float32 (K, h, w) in [0, 1], class ids (K,), original (H, W))."""
    with np.load(path, allow_pickle=False) as z:
        return z["cam"].astype(np.float32), z["classes"].astype(np.int64), tuple(int(v) for v in z["size"])
