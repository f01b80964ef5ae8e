"""Failures injected on purpose: hostile files, a full disk, a missing extra, no GPU, an empty class, damaged outputs.

Each case must stop with a message that names the problem and says what to do, leave nothing half-written under a
final name and no completion marker, and never run code from a file. docs/reliability.md lists every case, the
message a user sees and the test below that checks it.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import weakseg.io
from conftest import TINY_OVERRIDES as _TINY
from test_data_fixtures import make_folder
from weakseg.cli import main
from weakseg.config import ConfigError, DataCfg, load_config
from weakseg.data import build_dataset, imageio
from weakseg.data.base import DataError
from weakseg.data.imageio import read_header, read_image
from weakseg.dist import resolve_device
from weakseg.io import ArtifactWriteError, CheckpointError, read_json, write_bytes, write_json
from weakseg.pipeline import run_pipeline, run_stages
from weakseg.runs import StageError, begin_stage, checksum_files, stage_is_done
from weakseg.train.loop import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
SYSTEM = r"(posix|nt)\.system"  # how the weights-only unpickler names os.system
# Pinned here (not left to configs/demo.yaml) so the CRF test below can switch the method and the rest stay fast.
TINY_OVERRIDES = [*_TINY, "masks.method=threshold"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- shared: one completed tiny run, copied per test ---------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, one_torch_thread) -> Path:
    """A completed tiny demo run (all five stages); tests damage copies of it, never the original."""
    runs = tmp_path_factory.mktemp("reference") / "runs"
    cfg = load_config(DEMO, TINY_OVERRIDES + [f"runs_dir={runs}", "name=tiny"])
    run_pipeline(cfg)
    return cfg.run_dir


@pytest.fixture
def run_copy(reference_run, tmp_path):
    """(overrides, cfg) of a private copy of the reference run; its completion markers stay valid."""
    runs = tmp_path / "runs"
    shutil.copytree(reference_run, runs / "tiny")
    overrides = TINY_OVERRIDES + [f"runs_dir={runs}", "name=tiny"]
    cfg = load_config(DEMO, overrides)
    assert all(stage_is_done(cfg, s)[0] for s in ("train-cls", "cams", "masks", "train-seg", "evaluate"))
    return overrides, cfg


def _error_line(err: str) -> str:
    """The one `weakseg: error:` line of a CLI run's stderr (progress bars may precede it); no traceback."""
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("weakseg: error: ")]
    return line


def _statuses(results):
    return {k: v["status"] for k, v in results.items()}


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _reseal(stage_dir: Path) -> None:
    """Rewrite a stage's completion marker to match its current files (what an attacker could also do)."""
    info = read_json(stage_dir / "done.json")
    info["files"], info["checksum"] = checksum_files(stage_dir)
    write_json(stage_dir / "done.json", info)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


# --- checkpoints that would run code ------------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls os.system: the classic hostile checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def hostile_checkpoint(tmp_path):
    """(path, marker): a torch checkpoint whose unpickling touches `marker`; the payload is proven live."""
    marker, path = tmp_path / "PWNED", tmp_path / "hostile.pt"
    torch.save({"model": _Payload(marker), "epoch": 1}, path)
    torch.load(path, weights_only=False)  # an unsafe load runs it: these tests could fail
    assert marker.exists(), "the payload should run under an unsafe load"
    marker.unlink()
    return path, marker


def test_hostile_resume_checkpoint_is_refused(run_copy, hostile_checkpoint, capsys):
    overrides, cfg = run_copy
    path, marker = hostile_checkpoint
    cls_dir = cfg.run_dir / "train-cls"
    (cls_dir / "done.json").unlink()  # now an interrupted attempt, whose checkpoints/last.pt is resumed
    shutil.copy(path, cls_dir / "checkpoints" / "last.pt")
    assert main(["train-cls", DEMO, *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{cls_dir / 'checkpoints' / 'last.pt'}: refused: not a plain-tensor checkpoint" in err
    assert re.search(SYSTEM, err) and "weights_only=True" in err
    assert not marker.exists()
    assert not (cls_dir / "done.json").exists()


def test_hostile_model_for_predict_is_refused(run_copy, hostile_checkpoint, tmp_path, capsys):
    overrides, cfg = run_copy
    path, marker = hostile_checkpoint
    seg = cfg.run_dir / "train-seg"
    images, out = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    (images / "a.png").write_bytes(_png(20, 12))
    predict = ["predict", "--run", str(cfg.run_dir), "--images", str(images), "--out", str(out)]
    shutil.copy(path, seg / "model.pt")
    # As dropped in: model.pt no longer matches the checksum train-seg recorded, so it is not even opened.
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert "the trained model cannot be trusted: outputs changed or incomplete" in err and "weakseg run" in err
    # With the marker re-sealed to match (a checksum is not a signature): the weights-only loader refuses it.
    _reseal(seg)
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert f"{seg / 'model.pt'}: refused: not a plain-tensor checkpoint" in err
    assert re.search(SYSTEM, err)
    assert not marker.exists()
    assert not out.exists()


@pytest.mark.parametrize("backbone", ["test_efficientnet", "hybrid_test"])
def test_hostile_backbone_checkpoint_is_refused(hostile_checkpoint, backbone):
    from weakseg.models.backbones import build_backbone

    path, marker = hostile_checkpoint
    with pytest.raises(CheckpointError, match=f"refused: not a plain-tensor checkpoint, it references the Python "
                                              f"object {SYSTEM}") as e:
        build_backbone(backbone, pretrained=False, checkpoint=str(path))
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_hostile_backbone_checkpoint_through_the_cli(hostile_checkpoint, tmp_path, capsys):
    path, marker = hostile_checkpoint
    runs = tmp_path / "runs"
    code = main(["train-cls", DEMO, *TINY_OVERRIDES, f"runs_dir={runs}", "name=b", f"train_cls.checkpoint={path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert _error_line(err).startswith(f"weakseg: error: {path}: refused")
    assert not marker.exists()
    assert not (runs / "b" / "train-cls" / "done.json").exists()


@pytest.mark.parametrize("content,message", [
    ("truncated", "cannot read this checkpoint"),
    (b"", "cannot read this checkpoint"),
    (b"garbage" * 20, "refused: not a plain-tensor checkpoint"),
    ("tensor", "not a weakseg checkpoint"),
])
def test_damaged_checkpoints_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "last.pt"
    if content == "truncated":
        torch.save({"model": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[:400])
    elif content == "tensor":
        torch.save(torch.ones(3), path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(str(path))
    assert isinstance(e.value, RuntimeError)  # the CLI reports it as an error (exit code 2)


# --- YAML that would build Python objects --------------------------------------------------------------------------

def test_yaml_python_tags_are_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    yaml.unsafe_load(payload)  # the payload is live: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"seed: 0\nname: {payload}\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: refused the YAML tag 'tag:yaml\.org,2002:python/object/"
                                          r"apply:os\.system' \(line 2, column 7\).*safe_load.*remove the tag"):
        load_config(evil)
    (tmp_path / "child.yaml").write_text("base: evil.yaml\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: refused the YAML tag"):
        load_config(tmp_path / "child.yaml")
    with pytest.raises(ConfigError, match=r"override 'name=.*': refused the YAML tag"):
        load_config(None, [f"name={payload}"])
    assert main(["run", str(evil), "--dry-run"]) == 2
    assert "weakseg: error:" in capsys.readouterr().err
    assert not marker.exists()


# --- decompression bombs ------------------------------------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims width x height pixels (valid CRC)."""
    png = bytearray(_png(1, 1))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(png)


@pytest.mark.parametrize("side", [8500, 20000])  # 72 Mpx: weakseg's own check; 400 Mpx: PIL's fires first
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(side, side))  # a 70-byte file that would decode to side * side * 3 bytes
    for reader in (read_image, read_header):
        with pytest.raises(DataError, match="decompression bomb") as e:
            reader(bomb)
        assert str(e.value).startswith(f"{bomb}: ") and e.value.file == str(bomb)
        assert "limit of 64000000" in str(e.value)
    # weakseg's limit is the lower one, so no image above it is ever decoded
    assert imageio.MAX_IMAGE_PIXELS <= Image.MAX_IMAGE_PIXELS


def test_pixel_limit_is_enforced_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_IMAGE_PIXELS", 110)
    (tmp_path / "ok.png").write_bytes(_png(11, 10))
    (tmp_path / "over.png").write_bytes(_png(11, 11))
    assert read_image(tmp_path / "ok.png").shape == (10, 11, 3)
    with pytest.raises(DataError, match=r"over\.png: 11x11 = 121 pixels exceeds the limit of 110"):
        read_image(tmp_path / "over.png")


def test_bomb_in_a_dataset_is_an_error_or_a_recorded_skip(tmp_path):
    root = make_folder(tmp_path)
    bomb = root / "images" / "cat1.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    cfg = DataCfg(name="folder", root=str(root / "images"), labels_csv="../labels.csv")
    ds = build_dataset(cfg, "train")
    with pytest.raises(DataError, match=f"{bomb}: .*decompression bomb"):
        ds.image(ds.ids.index("cat1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = build_dataset(DataCfg(**{**cfg.__dict__, "on_error": "skip"}), "train")
    assert "cat1" not in skipped.ids and len(skipped) == 3
    (entry,) = skipped.skipped
    assert entry["id"] == "cat1" and entry["file"] == str(bomb) and "decompression bomb" in entry["problem"]


def test_predict_refuses_a_bomb_naming_the_file(run_copy, tmp_path, capsys):
    _, cfg = run_copy
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png(20, 12))
    (images / "b.png").write_bytes(_png_claiming(20000, 20000))
    assert main(["predict", "--run", str(cfg.run_dir), "--images", str(images), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"weakseg: error: {images / 'b.png'}: refused as a possible decompression bomb" in err


# --- out of disk space --------------------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_disk_full_message(msg: str, path: Path) -> None:
    assert f"cannot write {path}: {os.strerror(errno.ENOSPC)}" in msg
    assert "free some space" in msg and "runs_dir=" in msg and "run the same command again" in msg


def test_disk_full_at_rename_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"version": 1})
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(ArtifactWriteError) as e:
        write_json(target, {"version": 2})
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    _assert_disk_full_message(str(e.value), target)
    assert json.loads(target.read_text()) == {"version": 1}  # the complete old file, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the temporary file was removed


class _HalfWriter:
    """A file whose write stores half the data, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_mid_write_leaves_no_file(tmp_path, monkeypatch):
    def half_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _HalfWriter(f) if "w" in mode else f

    monkeypatch.setattr(weakseg.io, "open", half_open, raising=False)  # only weakseg.io's writes are affected
    target = tmp_path / "masks" / "x.png"
    with pytest.raises(ArtifactWriteError) as e:
        write_bytes(target, b"\x89PNG" + bytes(1000))
    _assert_disk_full_message(str(e.value), target)
    assert list((tmp_path / "masks").iterdir()) == []


def test_disk_full_while_appending_to_a_log_is_the_same_clear_error(tmp_path, monkeypatch):
    from weakseg.io import append_jsonl

    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 1})
    monkeypatch.setattr(weakseg.io, "open", _enospc, raising=False)
    with pytest.raises(ArtifactWriteError) as e:
        append_jsonl(log, {"step": 2})
    monkeypatch.undo()
    _assert_disk_full_message(str(e.value), log)
    assert log.read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("fail_on", ["6th mask", "done.json"])
def test_disk_full_during_a_stage_stops_then_the_same_command_finishes(run_copy, reference_run, monkeypatch,
                                                                       capsys, fail_on):
    overrides, cfg = run_copy
    masks = cfg.run_dir / "masks"
    real_replace = os.replace
    pngs_written, failed = [], []

    def replace(src, dst):
        dst = Path(dst)
        if (fail_on == "6th mask" and dst.parent == masks / "masks" and len(pngs_written) == 5) or (
                fail_on == "done.json" and dst == masks / "done.json"):
            failed.append(dst)
            _enospc()
        if dst.parent == masks / "masks":
            pngs_written.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    overrides = [*overrides, "masks.num_workers=0"]  # in-process: the write counter above is this process's
    assert main(["masks", DEMO, *overrides, "--force"]) == 2
    monkeypatch.setattr(os, "replace", real_replace)
    err = capsys.readouterr().err
    assert _error_line(err).startswith(f"weakseg: error: cannot write {masks}/")
    assert len(failed) == 1
    _assert_disk_full_message(err, failed[0])
    assert not (masks / "done.json").exists() and not stage_is_done(cfg, "masks")[0]
    assert not list(masks.rglob("*.tmp")), "a temporary file was left behind"
    written = sorted((masks / "masks").glob("*.png"))
    assert len(written) == (5 if fail_on == "6th mask" else 24)
    for p in written:  # whatever exists under a final name is complete and correct
        assert p.read_bytes() == (reference_run / "masks" / "masks" / p.name).read_bytes()
    # Space freed: the same command finishes, keeping what was written, with the uninterrupted run's masks.
    kept = {p.name: p.stat().st_ino for p in written}
    assert main(["masks", DEMO, *overrides]) == 0
    assert stage_is_done(cfg, "masks")[0]
    assert all((masks / "masks" / n).stat().st_ino == ino for n, ino in kept.items()), "finished masks were redone"
    ref = sorted(p.name for p in (reference_run / "masks" / "masks").iterdir())
    assert sorted(p.name for p in (masks / "masks").iterdir()) == ref
    assert all((masks / "masks" / n).read_bytes() == (reference_run / "masks" / "masks" / n).read_bytes() for n in ref)


def test_disk_full_while_checkpointing_then_resume_matches_uninterrupted(run_copy, reference_run, monkeypatch,
                                                                        capsys):
    overrides, cfg = run_copy
    cls_dir = cfg.run_dir / "train-cls"
    real_replace = os.replace
    saves = []

    def replace(src, dst):
        if Path(dst).name == "last.pt":
            saves.append(dst)
            if len(saves) == 2:  # the end-of-epoch-2 checkpoint: epoch 1's is on disk
                _enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["train-cls", DEMO, *overrides, "--force"]) == 2
    monkeypatch.setattr(os, "replace", real_replace)
    err = capsys.readouterr().err
    _assert_disk_full_message(err, cls_dir / "checkpoints" / "last.pt")
    assert not (cls_dir / "done.json").exists()
    assert main(["train-cls", DEMO, *overrides]) == 0
    assert "[train-cls] resuming from epoch 1, batch 0" in capsys.readouterr().out
    assert _same_weights(cls_dir / "model.pt", reference_run / "train-cls" / "model.pt")
    a, b = (read_json(d / "train-cls" / "metrics.json") for d in (cfg.run_dir, reference_run))
    assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}


# --- a missing optional dependency --------------------------------------------------------------------------------

def _block_pydensecrf(monkeypatch):
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pydensecrf...` now raises ImportError


def test_missing_crf_extra_stops_with_the_install_command(run_copy, monkeypatch, capsys):
    overrides, cfg = run_copy
    crf = [*overrides, "masks.method=crf"]
    _block_pydensecrf(monkeypatch)
    before = (cfg.run_dir / "masks" / "done.json").read_bytes()
    assert main(["masks", DEMO, *crf]) == 2
    err = capsys.readouterr().err
    line = _error_line(err)
    assert line.startswith("weakseg: error: the dense CRF needs pydensecrf2: pip install \"weakseg[crf]\"")
    assert "masks.method" in line
    # refused before the stage began: the other method's masks stay as they were, and none count for the CRF's
    assert (cfg.run_dir / "masks" / "done.json").read_bytes() == before
    assert stage_is_done(cfg, "masks")[0] and not stage_is_done(load_config(DEMO, crf), "masks")[0]
    monkeypatch.undo()
    pytest.importorskip("pydensecrf.densecrf")
    assert main(["masks", DEMO, *crf]) == 0  # installed: the same command finishes


def test_crf_install_command_is_shell_safe(monkeypatch):
    from weakseg.masks.crf import CrfUnavailable, crf_from_labels

    _block_pydensecrf(monkeypatch)
    with pytest.raises(CrfUnavailable) as e:
        crf_from_labels(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64), 2)
    assert 'pip install "weakseg[crf]"' in str(e.value)


# --- CUDA requested on a machine without one ----------------------------------------------------------------------

def test_cuda_request_without_a_gpu_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=f"device='{name}' was requested but this machine has no usable "
                                               "CUDA GPU; set device=cpu"):
            resolve_device(name)
    with pytest.raises(RuntimeError, match="device='gpu' is not a device name; use device=auto, cpu, cuda"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu")
    runs = tmp_path / "runs"
    assert main(["run", DEMO, *TINY_OVERRIDES, f"runs_dir={runs}", "name=c", "device=cuda"]) == 2
    assert capsys.readouterr().err == ("weakseg: error: device='cuda' was requested but this machine has no usable "
                                       "CUDA GPU; set device=cpu (or device=auto).\n")
    assert not runs.exists()  # stopped before writing anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_exit_code_and_stderr_of_the_real_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "weakseg.cli", "run", DEMO, f"runs_dir={tmp_path}", "device=cuda"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 2
    assert "weakseg: error: device='cuda' was requested but this machine has no usable CUDA GPU" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


# --- a class that no image carries ---------------------------------------------------------------------------------

def test_class_that_no_image_carries_stops_before_training(tmp_path, capsys):
    root = make_folder(tmp_path)  # images labelled cat and/or dog
    classes = tmp_path / "classes.txt"
    classes.write_text("background\ncat\ndog\nbird\n")
    runs = tmp_path / "runs"
    args = ["train-cls", DEMO, *TINY_OVERRIDES, "data.name=folder", f"data.root={root / 'images'}",
            "data.labels_csv=../labels.csv", "data.classes_file=../classes.txt", f"runs_dir={runs}", "name=e"]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = _error_line(err)
    assert "class 'bird' is carried by none of the 4 images of the training split 'train'" in line
    assert "add training images labelled with it" in line and "data.classes_file" in line
    assert not (runs / "e" / "train-cls" / "done.json").exists()
    assert not (runs / "e" / "train-cls" / "model.pt").exists()  # stopped before any training
    classes.write_text("background\ncat\ndog\n")  # control: without the empty class the same command trains
    assert main(args) == 0
    assert (runs / "e" / "train-cls" / "done.json").exists()


def test_empty_class_from_a_max_images_prefix_suggests_raising_it(tmp_path):
    cfg = load_config(DEMO, TINY_OVERRIDES + [f"runs_dir={tmp_path}", "name=m", "data.max_images=4"])
    with pytest.raises(DataError, match=r"class 'disc' is carried by none of the 4 images.*raise data.max_images "
                                        r"\(now 4"):
        run_stages(cfg, ["train-cls"])


# --- outputs damaged after their stage completed ------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "one byte flipped"])
def test_damaged_classifier_is_refused_downstream_and_redone(run_copy, reference_run, damage):
    _, cfg = run_copy
    model = cfg.run_dir / "train-cls" / "model.pt"
    data = bytearray(model.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01  # same size, still a loadable file: only the checksum can tell
    model.write_bytes(bytes(data))
    done, reason = stage_is_done(cfg, "train-cls")
    assert not done and reason.startswith("outputs changed or incomplete")
    with pytest.raises(StageError, match=r"stage 'cams' needs the output of 'train-cls'.*cannot be trusted: outputs "
                                         r"changed or incomplete.*Run `weakseg train-cls` \(or `weakseg run`\)"):
        run_stages(cfg, ["cams"], force={"cams"})  # a stage that has to run refuses the damaged input
    assert _statuses(run_stages(cfg, ["cams"])) == {"cams": "skipped"}  # CAMs made from the intact model stay valid
    assert _statuses(run_stages(cfg, ["train-cls"])) == {"train-cls": "ran"}
    assert _same_weights(model, reference_run / "train-cls" / "model.pt")  # redone, and deterministic


def test_damaged_pseudo_mask_is_refused_downstream_and_redone(run_copy, reference_run):
    _, cfg = run_copy
    png = sorted((cfg.run_dir / "masks" / "masks").glob("*.png"))[3]
    png.write_bytes(png.read_bytes()[:40])
    with pytest.raises(StageError, match=r"stage 'train-seg' needs the output of 'masks'.*cannot be trusted"):
        run_stages(cfg, ["train-seg"], force={"train-seg"})
    st = _statuses(run_pipeline(cfg))
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "ran", "train-seg": "ran", "evaluate": "ran"}
    assert png.read_bytes() == (reference_run / "masks" / "masks" / png.name).read_bytes()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00 not utf-8", b"[1, 2]", b'{"files": 3', b""])
def test_unreadable_completion_marker_means_redo_not_crash(run_copy, content):
    _, cfg = run_copy
    (cfg.run_dir / "masks" / "done.json").write_bytes(content)
    assert stage_is_done(cfg, "masks") == (False, "completion marker unreadable")
    assert not stage_is_done(cfg, "train-seg")[0]  # its fingerprint hashed the old masks checksum


def test_unreadable_attempt_record_starts_the_stage_afresh(run_copy):
    _, cfg = run_copy
    sdir = cfg.run_dir / "masks"
    (sdir / "done.json").unlink()
    (sdir / "attempt.json").write_bytes(b"\xff\x00")
    begin_stage(cfg, "masks")
    assert not (sdir / "masks").exists()  # partial work of an attempt that cannot be identified is not reused
    assert read_json(sdir / "attempt.json")["fingerprint"]


def test_disk_full_in_a_mask_worker_process_is_the_same_clear_error(run_copy, reference_run, monkeypatch, capsys,
                                                                    tmp_path):
    overrides, cfg = run_copy
    masks = cfg.run_dir / "masks"
    victim = sorted((reference_run / "masks" / "masks").iterdir())[7].name
    tripped = tmp_path / "tripped"  # shared by the forked workers through the file system
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == victim and not tripped.exists():
            tripped.touch()
            _enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)  # inherited by the forked workers
    overrides = [*overrides, "masks.num_workers=2"]
    assert main(["masks", DEMO, *overrides, "--force"]) == 2
    monkeypatch.setattr(os, "replace", real_replace)
    err = capsys.readouterr().err
    assert _error_line(err).startswith(f"weakseg: error: cannot write {masks}/masks/{victim}")
    _assert_disk_full_message(err, masks / "masks" / victim)
    assert not (masks / "done.json").exists() and not (masks / "masks" / victim).exists()
    assert main(["masks", DEMO, *overrides]) == 0
    ref = sorted(p.name for p in (reference_run / "masks" / "masks").iterdir())
    assert sorted(p.name for p in (masks / "masks").iterdir()) == ref
    assert all((masks / "masks" / n).read_bytes() == (reference_run / "masks" / "masks" / n).read_bytes() for n in ref)


def test_resumed_attempt_drops_the_temporaries_of_killed_writes(run_copy):
    _, cfg = run_copy
    sdir = cfg.run_dir / "masks"
    (sdir / "done.json").unlink()  # an interrupted attempt with the same fingerprint: its masks are kept
    kept = sorted((sdir / "masks").iterdir())
    stale = sdir / "masks" / f".{kept[0].name}.k3x9q.tmp"  # what atomic_path leaves when its writer is killed
    stale.write_bytes(b"half a png")
    begin_stage(cfg, "masks")
    assert not stale.exists()
    assert sorted((sdir / "masks").iterdir()) == kept


# --- worker counts and cams.batch_size are speed-only ----------------------------------------------------------------

SPEED_ONLY_OVERRIDES = ["train_cls.num_workers=2", "train_seg.num_workers=2", "cams.batch_size=3"]


def test_speed_only_keys_leave_recorded_stages_up_to_date_including_runs_recorded_before(run_copy):
    from weakseg.runs import STAGES, stage_fingerprint

    overrides, cfg = run_copy
    faster = load_config(DEMO, overrides + SPEED_ONLY_OVERRIDES)
    assert [stage_is_done(faster, s) for s in STAGES] == [(True, "up to date")] * len(STAGES)
    # Runs recorded while these keys were still hashed carry the older fingerprint: still up to date, at the
    # values they ran with and at any other (rebuilt from the values in the stage's recorded config.yaml).
    for stage in STAGES:
        marker = cfg.run_dir / stage / "done.json"
        info = read_json(marker)
        assert info["fingerprint"] == stage_fingerprint(cfg, stage)
        legacy = stage_fingerprint(cfg, stage, legacy=True)
        # the legacy hash does include them (the training stages' worker counts, the cams batch size)
        assert (legacy != info["fingerprint"]) == (stage in ("train-cls", "cams", "train-seg"))
        write_json(marker, {**info, "fingerprint": legacy})
    assert all(stage_is_done(cfg, s)[0] for s in STAGES)
    assert stage_fingerprint(faster, "cams", legacy=True) != read_json(cfg.run_dir / "cams" / "done.json")["fingerprint"]
    assert [stage_is_done(faster, s) for s in STAGES] == [(True, "up to date")] * len(STAGES)
    # ...and a real change is still a change under either hash.
    other = load_config(DEMO, overrides + SPEED_ONLY_OVERRIDES + ["train_seg.epochs=3", "cams.flip=false"])
    assert stage_is_done(other, "train-seg") == (False, "config or upstream outputs changed")
    assert stage_is_done(other, "cams") == (False, "config or upstream outputs changed")
    assert stage_is_done(other, "train-cls")[0]


def test_cams_do_not_depend_on_the_batch_size(run_copy, reference_run):
    """What makes cams.batch_size speed-only: each image's CAM is computed alone, bit for bit."""
    overrides, _ = run_copy
    for batch_size in (1, 3):
        cfg = load_config(DEMO, overrides + [f"cams.batch_size={batch_size}"])
        run_stages(cfg, ["cams"], force={"cams"})
        written = sorted((cfg.run_dir / "cams" / "cams").iterdir())
        assert [p.name for p in written] == sorted(p.name for p in (reference_run / "cams" / "cams").iterdir())
        for path in written:
            ours, reference = np.load(path), np.load(reference_run / "cams" / "cams" / path.name)
            for key in reference.files:
                np.testing.assert_array_equal(ours[key], reference[key])


@pytest.mark.parametrize("variable", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_"])
def test_freed_heap_memory_setting_defers_to_the_users_malloc_variables(variable):
    code = "from weakseg.dist import keep_freed_heap_memory; print(keep_freed_heap_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert ours.stdout.strip() == ("True" if platform.libc_ver()[0] == "glibc" else "False")
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, variable: "0"},
                            capture_output=True, text=True, check=True)
    assert theirs.stdout.strip() == "False"


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_training_samples_do_not_depend_on_the_worker_count(kind, tmp_path):
    """What makes the worker counts speed-only: every sample's augmentation is seeded by (seed, epoch, index)."""
    from weakseg.data import seg_dataset
    from weakseg.data.torch_datasets import ClassificationDataset, SegmentationDataset

    cfg = load_config(DEMO, TINY_OVERRIDES + [f"runs_dir={tmp_path}"])
    if kind == "classification":
        ds = build_dataset(cfg.data, cfg.data.train_split)
        train_set = ClassificationDataset(ds, list(range(8)), 32, train=True, seed=3)
    else:
        ds = seg_dataset(cfg.data, cfg.data.eval_split)
        train_set = SegmentationDataset(ds, list(range(8)), ds.mask, 32, train=True, seed=3)
    train_set.epoch = 2
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=False, num_workers=workers)
        batches[workers] = [tuple(t.clone() for t in b) for b in loader]
    for b0, b2 in zip(batches[0], batches[2], strict=True):
        for t0, t2 in zip(b0, b2, strict=True):
            torch.testing.assert_close(t0, t2, rtol=0, atol=0)
    train_set.epoch = 3
    again = next(iter(torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=False)))
    assert not torch.equal(again[0], batches[0][0][0])
