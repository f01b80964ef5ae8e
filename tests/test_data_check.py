"""`check_dataset` / `format_check_report` on fixture trees: counts, frequencies, sizes and every problem."""

from __future__ import annotations

import json

import numpy as np

from test_data_fixtures import H, W, block_mask, make_folder, make_pet, make_voc, save_image, save_label
from weakseg.config import DataCfg, PipelineCfg
from weakseg.data.check import check_dataset, format_check_report


def test_clean_voc_report_counts_labels_masks_and_sizes(tmp_path):
    root = make_voc(tmp_path)
    save_image(root / "JPEGImages" / "000004.jpg", seed=3, fmt="JPEG", h=40, w=50)
    cfg = PipelineCfg(data=DataCfg(name="voc", root=str(root), train_split="trainval", eval_split="train"))
    report = check_dataset(cfg)
    json.dumps(report)  # serialisable as is
    assert report["ok"] and report["problems"] == []
    assert list(report["splits"]) == ["trainval", "train"]
    s = report["splits"]["trainval"]
    assert s["num_images"] == 4 and s["num_masked"] == 2 and s["num_decoded"] == 4
    counts = s["images_per_class"]
    assert (counts["aeroplane"], counts["bicycle"], counts["bird"], counts["boat"], counts["person"]) == (1, 1, 1, 1, 1)
    assert sum(counts.values()) == 5
    assert s["image_height"] == {"min": H, "median": float(H), "max": 40}
    assert s["image_width"]["max"] == 50 and s["image_width"]["min"] == W
    assert s["formats"] == {"JPEG": 4}
    masked_pixels = 2 * H * W - (block_mask(1, ignore_ring=True) == 255).sum()
    assert np.isclose(s["mask_pixel_fraction"]["aeroplane"], (12 * 16) / masked_pixels)
    text = format_check_report(report)
    assert "Split 'trainval': 4 images, 2 with masks" in text
    assert "Problems: 0 (clean)" in text


def test_report_lists_every_problem_with_its_file(tmp_path):
    root = make_voc(tmp_path)
    (root / "JPEGImages" / "000003.jpg").write_bytes(b"garbage")
    save_label(root / "SegmentationClass" / "000002.png", block_mask(99))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000003\n000004\n000004\n424242\n")
    cfg = PipelineCfg(data=DataCfg(name="voc", root=str(root), train_split="trainval", eval_split="val"))
    report = check_dataset(cfg)
    assert not report["ok"]
    by_file = {p["file"].split("/")[-1]: p for p in report["problems"]}
    assert len(report["problems"]) == 4
    assert set(by_file) == {"trainval.txt", "424242.jpg", "000003.jpg", "000002.png"}
    assert "duplicate id '000004'" in by_file["trainval.txt"]["problem"]
    assert "cannot decode image" in by_file["000003.jpg"]["problem"]
    assert "[99]" in by_file["000002.png"]["problem"]
    assert report["splits"]["val"]["error"].endswith("Main/val.txt")
    assert list(report["unavailable_splits"]) == ["val"]
    s = report["splits"]["trainval"]
    assert s["num_images"] == 4 and s["num_decoded"] == 2  # 000002 (mask) and 000003 (image) fail
    text = format_check_report(report)
    assert "Problems: 4" in text and "Unavailable split 'val'" in text
    assert "000003.jpg: cannot decode image" in text


def test_pet_report_shows_content_read_behind_the_wrong_extension_and_label_mask_disagreements(tmp_path):
    root = make_pet(tmp_path)
    save_label(root / "annotations" / "trimaps" / "Bengal_9.png", np.full((H, W), 2, np.uint8), palette=False)
    cfg = PipelineCfg(data=DataCfg(name="pet", root=str(root), label_mode="breeds"))
    report = check_dataset(cfg, ["all"])
    s = report["splits"]["all"]
    assert report["ok"] and s["num_images"] == 7
    assert {m["file"].split("/")[-1]: m["format"] for m in s["extension_mismatches"]} == {
        "Abyssinian_2.jpg": "PNG", "Bengal_9.jpg": "GIF"}
    assert s["images_per_class"] == {"Abyssinian": 3, "american_bulldog": 2, "Bengal": 2}
    assert [d["id"] for d in report["disagreements"]] == ["Bengal_9"]
    text = format_check_report(report)
    assert "Bengal_9.jpg is GIF" in text and "1 image(s) in no list file" in text


def test_report_includes_background_images_of_the_train_split(tmp_path):
    root = make_folder(tmp_path)
    save_image(tmp_path / "bg" / "sky.png", seed=9)
    cfg = PipelineCfg(data=DataCfg(name="folder", root=str(root / "images"), labels_csv="../labels.csv",
                                   background_dir=str(tmp_path / "bg"), eval_split="train"))
    report = check_dataset(cfg)
    s = report["splits"]["train"]
    assert s["num_images"] == 5 and s["images_without_labels"] == 2
    assert "includes 1 background images" in format_check_report(report)
