"""Run-directory contract: one folder per stage, resolved config, metrics, completion marker.

runs/<name>/
    run.json                   git SHA, versions, seed, command line
    <stage>/config.yaml        the resolved config the stage ran with
    <stage>/metrics.json       the stage's final metrics
    <stage>/metrics.jsonl      its log (one JSON record per step / epoch)
    <stage>/done.json          completion marker: fingerprint, file count, checksum; written last

A stage is skipped only if its marker exists, its fingerprint (its config sections plus its upstream
markers) is unchanged, and the files it lists still match the recorded checksum. Otherwise it is redone;
partial work left by a killed run (per-image files, training checkpoints) is resumed when the
fingerprint of the interrupted attempt matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from weakseg import dist
from weakseg.config import PipelineCfg, dump_yaml, inference_only_keys, to_dict, with_recorded_once_hashed
from weakseg.io import append_jsonl, read_json, write_json, write_text

STAGES = ["train-cls", "cams", "masks", "train-seg", "evaluate"]
# Config sections each stage depends on (besides its upstream stages' outputs). `precision` is LATE (absent at
# auto, so older fingerprints hold) and belongs to the stages whose networks run under its autocast (masks: none).
STAGE_SECTIONS = {
    "train-cls": ["seed", "precision", "data", "train_cls"],
    "cams": ["precision", "cams"],
    "masks": ["seed", "masks"],
    "train-seg": ["seed", "precision", "train_seg"],
    "evaluate": ["precision", "evaluate"],
}
UPSTREAM = {
    "train-cls": [],
    "cams": ["train-cls"],
    "masks": ["cams"],
    "train-seg": ["masks"],
    "evaluate": ["train-cls", "cams", "masks", "train-seg"],
}
# Files that are logs or resume state rather than products: not part of the checksum.
_NOT_PRODUCTS = {"done.json", "metrics.jsonl", "attempt.json"}
_NOT_PRODUCT_DIRS = {"checkpoints", "tb"}


class StageError(RuntimeError):
    pass


def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment_info() -> dict[str, Any]:
    import numpy
    import timm
    import torchvision

    from weakseg import __version__

    return {
        "weakseg": __version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "world_size": dist.get_world_size(),
    }


def resolve_init_from(init_from: str, runs_dir: str | Path) -> Path:
    """train_cls.init_from = a run name under runs_dir, a run folder, its train-cls folder or a model.pt -> file."""
    tried = []
    for base in (Path(init_from), Path(runs_dir) / init_from):
        for candidate in (base, base / "model.pt", base / "train-cls" / "model.pt"):
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"train_cls.init_from={init_from!r}: no train-cls model.pt found (tried "
                            f"{', '.join(tried)}); run that preset first")


def _init_from_identity(init_from: str, runs_dir: str | Path) -> Optional[str]:
    """Checksum of the train-cls stage whose model `init_from` names (or of the file itself); None if absent."""
    try:
        path = resolve_init_from(init_from, runs_dir)
    except FileNotFoundError:
        return None  # the stage itself raises the clear error when it runs
    marker = read_marker(path.parent / "done.json")
    if marker and marker.get("checksum"):
        return marker["checksum"]
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stage_fingerprint(cfg: PipelineCfg, stage: str, legacy: bool = False) -> str:
    """Hash of the stage's config sections plus the checksums of its upstream stages' markers (`legacy`: as
    computed before some speed-only keys left the hash; see `accepted_fingerprints`)."""
    tree = to_dict(cfg, legacy)
    own = {k: tree[k] for k in STAGE_SECTIONS[stage] if k in tree}  # LATE top-level keys at their default: absent
    inference_only = {section: {k: tree[section].pop(k) for k in keys if k in tree[section]}
                      for section, keys in inference_only_keys(cfg).items()}
    if stage == "evaluate" and any(inference_only.values()):  # how the model predicts: scored, not trained
        own["inference_only"] = {section: keys for section, keys in inference_only.items() if keys}
    if stage == "train-seg" and tree["train_seg"].get("self_training_rounds"):  # its predictions become labels
        own["relabel_inference"] = inference_only["train_seg"]
    upstream = {}
    for up in UPSTREAM[stage]:
        upstream[up] = (read_marker(cfg.run_dir / up / "done.json") or {}).get("checksum")
    other = getattr(cfg.masks, "agnostic_cams_run", "")
    if stage == "masks" and other:  # fusion reads another run's CAMs: their checksum is an input too
        for marker in (Path(other) / "cams" / "done.json", Path(cfg.runs_dir) / other / "cams" / "done.json",
                       Path(other) / "done.json"):
            if marker.exists():
                upstream["agnostic_cams_run"] = (read_marker(marker) or {}).get("checksum")
                break
    if stage == "train-seg" and cfg.train_seg.encoder_from_classifier:  # the classifier is its starting point
        upstream["train-cls"] = (read_marker(cfg.run_dir / "train-cls" / "done.json") or {}).get("checksum")
    if stage == "train-cls" and cfg.train_cls.init_from:  # its starting weights are an input too
        upstream["init_from"] = _init_from_identity(cfg.train_cls.init_from, cfg.runs_dir)
    blob = json.dumps({"stage": stage, "config": own, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def accepted_fingerprints(cfg: PipelineCfg, stage: str) -> set[str]:
    """Fingerprints under which a recorded stage is up to date: the current one, and the one runs recorded before
    the speed-only keys (worker counts, cams.batch_size) left the hash, rebuilt with the values the stage
    recorded in its config.yaml, so a run is not redone for them whatever their values were or are."""
    recorded_yaml = cfg.run_dir / stage / "config.yaml"  # written with the attempt and marker it belongs to
    try:
        recorded = yaml.safe_load(recorded_yaml.read_text()) if recorded_yaml.exists() else None
    except (OSError, yaml.YAMLError):
        recorded = None
    as_recorded = with_recorded_once_hashed(cfg, recorded) if isinstance(recorded, dict) else cfg
    return {stage_fingerprint(cfg, stage), stage_fingerprint(as_recorded, stage, legacy=True)}


def product_files(stage_dir: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(stage_dir):
        dirs[:] = sorted(d for d in dirs if d not in _NOT_PRODUCT_DIRS)
        for n in sorted(names):
            if n in _NOT_PRODUCTS or n.endswith(".tmp"):
                continue
            files.append(Path(root) / n)
    return files


def checksum_files(stage_dir: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    files = product_files(stage_dir)
    for p in files:
        h.update(str(p.relative_to(stage_dir)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return len(files), h.hexdigest()


def read_marker(path: Path) -> Optional[dict]:
    """A marker / attempt JSON file as a dict, or None if it is missing, truncated, garbled or not an object."""
    try:
        info = read_json(path)
    except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return info if isinstance(info, dict) else None


def verify_outputs(stage_dir: Path) -> tuple[bool, str]:
    """(intact?, reason): the stage's product files still match the count and checksum its marker recorded."""
    marker = stage_dir / "done.json"
    if not marker.exists():
        return False, "no completion marker"
    info = read_marker(marker)
    if info is None:
        return False, "completion marker unreadable"
    count, digest = checksum_files(stage_dir)
    if count != info.get("files"):
        return False, f"outputs changed or incomplete ({count} files, marker says {info.get('files')})"
    if digest != info.get("checksum"):
        return False, f"outputs changed or incomplete (the {count} files no longer match the recorded checksum)"
    return True, "up to date"


def pending_shard(folder: Path, stems: list[str], suffix: str) -> list[int]:
    """This rank's share of the indices of `stems` whose `folder/<stem><suffix>` file is not written yet (the
    files already there come from an interrupted attempt and are kept: writes are atomic)."""
    return [i for i in dist.shard(list(range(len(stems)))) if not (folder / f"{stems[i]}{suffix}").exists()]


def require_all_written(folder: Path, stems: list[str], suffix: str, what: str) -> None:
    """The merge check of a sharded per-image stage: after every rank has written its share (barrier), each
    of `stems` must have its `folder/<stem><suffix>` file, or the stage fails naming the missing ones."""
    dist.barrier()
    missing = [stem for stem in stems if not (folder / f"{stem}{suffix}").exists()]
    if missing:
        raise StageError(f"{what}: {len(missing)} of {len(stems)} files missing after all ranks finished, "
                         f"e.g. {missing[:5]}")


def stage_is_done(cfg: PipelineCfg, stage: str) -> tuple[bool, str]:
    """(done?, reason) — verifies fingerprint, file count and checksum, so corrupt output is never trusted."""
    sdir = cfg.run_dir / stage
    marker = sdir / "done.json"
    if not marker.exists():
        return False, "no completion marker"
    info = read_marker(marker)
    if info is None:
        return False, "completion marker unreadable"
    if info.get("fingerprint") not in accepted_fingerprints(cfg, stage):
        return False, "config or upstream outputs changed"
    return verify_outputs(sdir)


@dataclass
class StageContext:
    """What a stage function receives: the config, its own folder, the device and a logger."""

    cfg: PipelineCfg
    stage: str
    device: torch.device
    out: Path = field(init=False)
    _tb: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = self.cfg.run_dir / self.stage

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def upstream(self, stage: str) -> Path:
        d = self.run_dir / stage
        if not (d / "done.json").exists():
            raise StageError(f"stage {self.stage!r} needs the output of {stage!r}, which has not completed in "
                             f"{self.run_dir}; run `weakseg {stage}` (or `weakseg run`) first")
        return d

    def log(self, record: dict[str, Any]) -> None:
        """Append to metrics.jsonl (and TensorBoard if installed); rank 0 only."""
        if not dist.is_main_process():
            return
        record = {"time": round(time.time(), 3), **record}
        append_jsonl(self.out / "metrics.jsonl", record)
        tb = self._tensorboard()
        if tb is not None and "step" in record:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    tb.add_scalar(f"{self.stage}/{k}", v, record["step"])
            tb.flush()

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.out / "tb"))
        return self._tb or None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        self._tb = None


def begin_stage(cfg: PipelineCfg, stage: str) -> None:
    """Prepare the stage folder: keep a killed attempt's partial work only if it ran with the same fingerprint."""
    sdir = cfg.run_dir / stage
    fp = stage_fingerprint(cfg, stage)
    attempt = sdir / "attempt.json"
    if dist.is_main_process():
        if sdir.exists():
            # Keep partial work only from an interrupted attempt with the same fingerprint. A stage that had
            # completed (marker present) but failed verification, or ran with other inputs, starts afresh.
            interrupted = attempt.exists() and not (sdir / "done.json").exists()
            recorded = (read_marker(attempt) or {}).get("fingerprint")
            same = interrupted and recorded in accepted_fingerprints(cfg, stage)
            if not same:
                shutil.rmtree(sdir)
            else:  # a killed writer (SIGKILL, a terminated worker process) leaves its atomic_path temporary
                for tmp in sdir.rglob(".*.tmp"):
                    tmp.unlink()
        sdir.mkdir(parents=True, exist_ok=True)
        write_json(attempt, {"fingerprint": fp, "started": time.time()})
        write_text(sdir / "config.yaml", dump_yaml(cfg))
    dist.barrier()


def finish_stage(cfg: PipelineCfg, stage: str, metrics: dict[str, Any]) -> None:
    """Write metrics.json, then the completion marker (last)."""
    sdir = cfg.run_dir / stage
    if dist.is_main_process():
        write_json(sdir / "metrics.json", metrics)
        count, digest = checksum_files(sdir)
        write_json(sdir / "done.json", {"fingerprint": stage_fingerprint(cfg, stage), "files": count,
                                        "checksum": digest, "finished": time.time()})
    dist.barrier()


def write_run_info(cfg: PipelineCfg, argv: Optional[list[str]] = None) -> None:
    if not dist.is_main_process():
        return
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    info = {"name": cfg.name, "seed": cfg.seed, "argv": argv or sys.argv, **environment_info()}
    write_json(cfg.run_dir / "run.json", info)
    write_text(cfg.run_dir / "config.yaml", dump_yaml(cfg))
