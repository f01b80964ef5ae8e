"""report.html and `compare` on fake run directories written file by file (tiny demo data, known numbers)."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.config import dump_yaml, load_config
from weakseg.data import build_dataset
from weakseg.evaluate.compare import compare_runs, format_markdown, write_compare
from weakseg.evaluate.report import best_and_worst, write_report
from weakseg.evaluate.stage import summary_rows
from weakseg.io import append_jsonl, save_cam, save_label_png, write_json, write_text
from weakseg.models.segmentation import build_seg_model
from weakseg.runs import STAGES
from weakseg.train.loop import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "disc", "square", "triangle", "star", "ring"]
# Distinctive per-class IoUs so each number can be found in the page.
SEG_IOUS = [0.9123, 0.6011, 0.5022, 0.4033, 0.3044, 0.2055]
EMBEDDED_PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _block(ious: list[float], names: list[str], miou: float) -> dict:
    """A metrics block in the evaluate stage's format (Dice etc. derived, pixel counts made up)."""
    return {
        "convention": "dataset-pooled confusion matrix, ignore_index=255",
        "pixels": 12288, "mIoU": miou, "mDice": 0.5, "pixel_accuracy": 0.8765, "mean_class_accuracy": 0.7,
        "per_class": {n: {"IoU": v, "Dice": 2 * v / (1 + v), "precision": 0.5, "recall": 0.5}
                      for n, v in zip(names, ious)},
    }


def _evaluate_metrics(train_ids: list[str], test_ids: list[str]) -> dict:
    cams = _block([0.8, 0.5, 0.4, 0.3, 0.35, 0.2575], CLASSES, 0.4321)
    masks = _block([0.81, 0.51, 0.41, 0.31, 0.36, 0.2764], CLASSES, 0.4444)
    masks["per_image_average"] = {"convention": "per-image IoU averaged over images (not dataset-pooled)",
                                  "mIoU": 0.3333, "per_class_IoU": dict(zip(CLASSES, [0.7] * 6))}
    masks["per_image_mIoU"] = [(sid, 0.05 * (k + 1)) for k, sid in enumerate(train_ids)]
    masks["per_image_mIoU"][3] = (train_ids[3], float("nan"))  # an image whose mIoU is undefined
    seg = _block(SEG_IOUS, CLASSES, 0.6543)
    seg["per_image_mIoU"] = [(sid, 0.1 * (k + 1)) for k, sid in enumerate(test_ids)]
    m = {
        "cams": {"images": len(train_ids), "threshold_used": 0.35, "at_threshold_used": cams,
                 "sweep": [{"threshold": t, "mIoU": v} for t, v in [(0.15, 0.30), (0.35, 0.4321), (0.55, 0.5678),
                                                                    (0.75, 0.41)]],
                 "best_threshold_oracle": 0.55, "best_mIoU_oracle": 0.5678,
                 "per_image_mIoU": masks["per_image_mIoU"]},
        "pseudo_masks": masks,
        "segmentation": {"split": "test", "images": len(test_ids), "segmentation": seg,
                         "baseline_all_background": _block([0.8888, 0, 0, 0, 0, 0], CLASSES, 0.1234),
                         "baseline_cam_threshold": _block([0.7, 0.3, 0.2, 0.1, 0.05, 0.057], CLASSES, 0.2345)},
    }
    m["summary"] = summary_rows(m)
    return m


def make_fake_run(runs_dir: Path, name: str = "fake") -> Path:
    """All five stages' files of a run on 12 + 6 demo images of 32x32, written directly (no training)."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        "data.demo_train=12", "data.demo_test=6", "data.demo_size=32", "train_seg.model=lraspp_test_efficientnet",
        "train_seg.pretrained=false", "train_seg.crop_size=32", f"runs_dir={runs_dir}", f"name={name}"])
    run = cfg.run_dir
    write_json(run / "run.json", {"name": name, "git_sha": "0123456789abcdef-dirty", "torch": torch.__version__})
    for stage in STAGES:
        write_text(run / stage / "config.yaml", dump_yaml(cfg))
        write_json(run / stage / "done.json", {"fingerprint": "fake", "files": 0, "checksum": ""})
    train = build_dataset(cfg.data, "train", validate=False)
    test = build_dataset(cfg.data, "test", validate=False)
    for i, sid in enumerate(train.ids):
        gt = train.mask(i)
        classes = np.flatnonzero(train.labels(i)) + 1
        cam = np.stack([np.where(gt == c, 0.9, 0.1) for c in classes]).astype(np.float32)
        save_cam(run / "cams" / "cams" / f"{sid}.npz", cam, classes, gt.shape)
        save_label_png(run / "masks" / "masks" / f"{sid}.png", gt)
    for stage, seconds, val in (("train-cls", 12.5, "val_mAP"), ("train-seg", 34.0, "val_loss_vs_pseudo")):
        for epoch in (1, 2, 3):
            append_jsonl(run / stage / "metrics.jsonl", {"step": 2 * epoch - 1, "epoch": epoch - 1,
                                                         "train_loss": 1.0 / epoch})
            append_jsonl(run / stage / "metrics.jsonl", {"step": 2 * epoch, "epoch": epoch,
                                                         "epoch_train_loss": 0.9 / epoch, val: 0.3 * epoch})
        write_json(run / stage / "metrics.json", {"best_epoch": 3, "train_seconds": seconds,
                                                  "stage_seconds": seconds + 1, val: 0.9})
    torch.manual_seed(0)
    model = build_seg_model("lraspp_test_efficientnet", len(CLASSES), pretrained=False)
    save_checkpoint(run / "train-seg" / "model.pt", {"model": model.state_dict(), "epoch": 3})
    write_json(run / "train-seg" / "classes.json", {"class_names": CLASSES})
    write_json(run / "masks" / "metrics.json", {"bg_threshold": 0.35, "threshold_rule": "label-free: Otsu"})
    write_json(run / "evaluate" / "metrics.json", _evaluate_metrics(train.ids, test.ids))
    return run


def make_binary_run(runs_dir: Path, name: str = "pets") -> Path:
    """Only run.json and evaluate/metrics.json of a two-class (background, pet) run."""
    run = runs_dir / name
    b = _block([0.8642, 0.7531], ["background", "pet"], (0.8642 + 0.7531) / 2)
    b["binary"] = {"positive_class": "pet", "negative_class": "background", "pet_IoU": 0.7531,
                   "background_IoU": 0.8642, "pet_Dice": 0.8591, "pet_precision": 0.8, "pet_recall": 0.9}
    m = {"cams": {"skipped": "no training image has a GT mask"},
         "pseudo_masks": {"skipped": "no training image has a GT mask"},
         "segmentation": {"split": "test", "images": 3, "segmentation": b,
                          "baseline_all_background": _block([0.6, 0.0], ["background", "pet"], 0.3),
                          "baseline_cam_threshold": _block([0.7, 0.5], ["background", "pet"], 0.6)}}
    m["summary"] = summary_rows(m)
    write_json(run / "evaluate" / "metrics.json", m)
    write_json(run / "run.json", {"name": name, "git_sha": "fedcba9876543210"})
    return run


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def report(fake_run) -> tuple[Path, str]:
    path = write_report(fake_run)
    return path, path.read_text()


def test_report_is_written_as_run_dir_report_html(fake_run, report):
    path, page = report
    assert path == fake_run / "report.html"
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_report_summary_table_holds_every_headline_number(report):
    _, page = report
    summary = page[page.index('<table class="summary">'):]
    summary = summary[:summary.index("</table>")]
    for value in ("43.21", "56.78", "44.44", "65.43", "12.34", "23.45"):
        assert f">{value}<" in summary, value
    assert "oracle" in summary and "0.35" in summary and "0.55" in summary
    assert "dataset-pooled" in summary


def test_report_per_class_tables_are_labelled_pooled_and_show_each_class_iou(report):
    _, page = report
    overview = page[page.index('<table class="classes">'):]
    overview = overview[:overview.index("</table>")]
    assert "dataset-pooled" in overview and "255 ignored" in overview
    for name, iou in zip(CLASSES, SEG_IOUS):
        assert f">{name}<" in overview
        assert f">{100 * iou:.2f}<" in overview
    assert "per-image average (not pooled)" in overview and ">33.33<" in overview
    assert page.count('<table class="detail">') == 5  # CAM, pseudo-masks, segmentation, two baselines


def test_report_embeds_every_figure_as_a_valid_png_and_writes_the_same_files(fake_run, report):
    _, page = report
    embedded = [base64.b64decode(b) for b in EMBEDDED_PNG.findall(page)]
    names = ["threshold_sweep", "training_curves", "examples_train", "examples_eval"]
    assert len(embedded) == len(names)
    for name, png in zip(names, embedded):
        assert f'<figure id="{name}">' in page
        assert (fake_run / "report" / f"{name}.png").read_bytes() == png
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_report_is_self_contained(report):
    _, page = report
    assert "<style>" in page
    assert not re.search(r'(src|href)="(?!data:)', page), "every resource must be inline"
    assert "<script" not in page and "<link" not in page


def test_report_has_a_class_colour_legend_with_palette_colours(report):
    _, page = report
    legend = page[page.index('id="legend"'):]
    legend = legend[:legend.index("</div>")]
    for name in CLASSES + ["ignore (255)"]:
        assert f"</span>{name}</span>" in legend
    assert "rgb(128, 0, 0)" in legend  # class 1 (disc) in the VOC palette


def test_example_grids_show_best_and_worst_rows_without_repeats(fake_run, report):
    # train: 11 images with a defined score -> 4 best + 4 worst rows; test: 6 images -> 4 best + the 2 others
    with Image.open(fake_run / "report" / "examples_train.png") as a, \
            Image.open(fake_run / "report" / "examples_eval.png") as b:
        rows_train, rows_eval = a.height, b.height
    assert rows_train - rows_eval == pytest.approx(2 * 156, abs=30)


@pytest.mark.parametrize("key, words", [("segmentation_unseen", "never saw"), ("segmentation_train", "flatter")])
def test_prediction_grid_falls_back_to_training_images_when_the_evaluation_split_is_withheld(
        tmp_path, fake_run, key, words):
    run = tmp_path / "withheld"
    shutil.copytree(fake_run, run)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    train_ids = [sid for sid, _ in metrics["pseudo_masks"]["per_image_mIoU"]]
    seg = metrics.pop("segmentation")
    metrics["segmentation"] = {"skipped": "evaluation split unavailable: withheld"}
    seg["split"] = "train (scored images)"
    seg["segmentation"]["per_image_mIoU"] = [(sid, 0.1 * k) for k, sid in enumerate(train_ids[:5])]
    metrics[key] = seg
    write_json(run / "evaluate" / "metrics.json", metrics)
    page = write_report(run).read_text()
    assert '<figure id="examples_eval">' in page and words in page and "no prediction grid" not in page
    # 5 scored training images -> 4 best + 1 worst rows, against 6 rows of the test split's grid
    with Image.open(run / "report" / "examples_eval.png") as a, \
            Image.open(fake_run / "report" / "examples_eval.png") as b:
        assert b.height - a.height == pytest.approx(156, abs=30)


def test_report_without_segmentation_scores_says_there_is_no_prediction_grid(tmp_path, fake_run):
    run = tmp_path / "noseg"
    shutil.copytree(fake_run, run)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    metrics["segmentation"] = {"skipped": "evaluation split unavailable: withheld"}
    write_json(run / "evaluate" / "metrics.json", metrics)
    page = write_report(run).read_text()
    assert "no prediction grid" in page and '<figure id="examples_eval">' not in page


def test_best_and_worst_orders_best_first_then_worst_and_skips_undefined_scores():
    scores = [("a", 0.5), ("b", float("nan")), ("c", 0.9), ("d", 0.1), ("e", 0.7), ("f", 0.3)]
    assert best_and_worst(scores, k=2) == [("best 1", "c", 0.9), ("best 2", "e", 0.7),
                                           ("worst 1", "d", 0.1), ("worst 2", "f", 0.3)]
    assert [i for _, i, _ in best_and_worst(scores, k=4)] == ["c", "e", "a", "f", "d"]


def test_binary_report_names_the_positive_class_and_shows_both_ious(tmp_path):
    page = write_report(make_binary_run(tmp_path)).read_text()
    summary = page[page.index('<table class="summary">'):]
    summary = summary[:summary.index("</table>")]
    assert "pet IoU (%)" in summary and "positive class" in summary and "background IoU (%)" in summary
    assert "<td class=n>75.31</td><td class=n>86.42</td>" in summary  # pet IoU, then background IoU
    assert "Positive class <b>pet</b>: pet IoU 75.31 %, background IoU 86.42 %" in page
    assert "not scored: no training image has a GT mask" in page
    assert "Examples need the run config: no config.yaml in the run directory" in page


def test_report_without_an_evaluate_stage_says_what_is_missing(tmp_path, fake_run):
    run = tmp_path / "partial"
    shutil.copytree(fake_run / "train-cls", run / "train-cls")
    page = write_report(run).read_text()
    assert "No evaluate/metrics.json" in page
    assert len(EMBEDDED_PNG.findall(page)) == 1  # the training curves only


def test_report_keeps_tables_and_says_why_when_the_dataset_is_not_on_this_machine(tmp_path, fake_run):
    run = tmp_path / "moved"
    shutil.copytree(fake_run / "evaluate", run / "evaluate")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["data.name=voc", f"data.root={tmp_path / 'no_voc'}"])
    write_text(run / "evaluate" / "config.yaml", dump_yaml(cfg))
    page = write_report(run).read_text()
    assert "Examples unavailable" in page and "VOC root folder not found" in page
    assert ">65.43<" in page and '<figure id="threshold_sweep">' in page


def test_report_of_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        write_report(tmp_path / "nope")


def test_compare_writes_markdown_and_csv_with_one_row_per_run(tmp_path, fake_run):
    pets = make_binary_run(tmp_path)
    md_path, csv_path = write_compare([fake_run, pets], tmp_path / "cmp" / "table")
    assert (md_path, csv_path) == (tmp_path / "cmp" / "table.md", tmp_path / "cmp" / "table.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["run"] for r in rows] == ["fake", "pets"]
    fake, pet = rows
    assert float(fake["cam_mIoU"]) == 0.4321 and float(fake["cam_threshold"]) == 0.35
    assert float(fake["cam_mIoU_oracle"]) == 0.5678 and float(fake["pseudo_mask_mIoU"]) == 0.4444
    assert float(fake["seg_mIoU"]) == 0.6543 and float(fake["baseline_background_mIoU"]) == 0.1234
    assert float(fake["baseline_cam_mIoU"]) == 0.2345
    assert float(fake["train_cls_seconds"]) == 12.5 and float(fake["train_seg_seconds"]) == 34.0
    assert fake["git_sha"] == "0123456789abcdef-dirty" and fake["seg_positive_IoU"] == ""
    assert pet["positive_class"] == "pet" and float(pet["seg_positive_IoU"]) == 0.7531
    assert float(pet["seg_background_IoU"]) == 0.8642 and pet["cam_mIoU"] == ""
    md = md_path.read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 2  # header, rule, one row per run
    assert "| fake | 43.21 | 0.35 | 56.78 | 0.55 | 44.44 | 65.43 | test | 12.34 | 23.45 | — | — | — | 12 | 34 |" \
        in md[2]
    assert "| pets | — |" in table[3] and "| pet | 75.31 | 86.42 |" in table[3]
    assert "0123456789-dirty" in md[2]


def test_compare_rows_match_format_markdown_and_reject_bad_input(tmp_path, fake_run):
    rows = compare_runs([fake_run])
    assert rows[0]["seg_mIoU"] == 0.6543 and rows[0]["positive_class"] is None
    assert "positive class" not in format_markdown(rows)  # columns no run has are left out
    with pytest.raises(ValueError, match="at least one"):
        compare_runs([])
    with pytest.raises(FileNotFoundError):
        compare_runs([tmp_path / "missing"])


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "bench" / "report_screenshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium (/usr/bin/chromium)")
def test_report_renders_in_headless_chromium_with_tables_and_images(report, tmp_path):
    shot = _screenshot_module()
    png = shot.screenshot(report[0], tmp_path / "shot.png", width=1400, height=3000)
    checks = shot.check_screenshot(png)
    assert checks["ok"], json.dumps(checks)


def test_screenshot_check_flags_a_blank_page(tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), "white").save(blank)
    checks = _screenshot_module().check_screenshot(blank)
    assert not checks["not_blank"] and not checks["has_tables"] and not checks["has_images"] and not checks["ok"]


def test_a_missing_report_extra_names_the_shell_safe_install_command(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r'^the report needs matplotlib: pip install "weakseg\[report\]"$'):
        write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []
