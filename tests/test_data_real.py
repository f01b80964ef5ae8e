"""Real-data layouts (Pet, VOC, COCO, folder) on tiny fixture trees: labels, masks, splits, modes, bad input."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from test_data_fixtures import (
    COCO_MASKS, H, VOC_MASKS, VOC_OBJECTS, W, block_mask, make_coco, make_folder, make_pet, make_voc, rgb_array,
    save_cls_labels, save_image, save_label, trimap, write_pet_list,
)
from weakseg.config import ConfigError, DataCfg
from weakseg.data import DATASETS, build_dataset
from weakseg.data.base import DataError
from weakseg.data.coco import COCO_CLASSES, CocoDataset
from weakseg.data.folder import FolderDataset
from weakseg.data.imageio import read_image
from weakseg.data.pet import PetDataset
from weakseg.data.voc import VOC_CLASSES, VocDataset


def pet_cfg(root, **kw) -> DataCfg:
    return DataCfg(name="pet", root=str(root), **kw)


def voc_cfg(root, **kw) -> DataCfg:
    return DataCfg(name="voc", root=str(root), **kw)


def folder_cfg(root, **kw) -> DataCfg:
    kw.setdefault("labels_csv", "../labels.csv")
    return DataCfg(name="folder", root=str(root / "images"), **kw)


def positives(ds, i) -> list[str]:
    return [ds.class_names[c + 1] for c in np.flatnonzero(ds.labels(i))]


# --- registry ---------------------------------------------------------------------------------------------------

def test_every_real_layout_is_registered_next_to_demo():
    assert {"demo", "voc", "pet", "coco", "folder"} <= set(DATASETS)


# --- Oxford-IIIT Pet ----------------------------------------------------------------------------------------------

def test_pet_binary_labels_and_trimap_border_ignored_by_default(tmp_path):
    ds = build_dataset(pet_cfg(make_pet(tmp_path)), "trainval")
    assert ds.class_names == ["background", "pet"]
    assert ds.ids == ["Abyssinian_1", "Abyssinian_2", "american_bulldog_1", "Bengal_1"]
    assert all(ds.labels(i).tolist() == [1.0] for i in range(len(ds)))
    mask = ds.mask(0)
    t = trimap()
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    assert (mask[t == 1] == 1).all() and (mask[t == 2] == 0).all() and (mask[t == 3] == 255).all()
    assert ds.describe()["trimap_border"] == "ignore"


@pytest.mark.parametrize("border, expected", [("pet", 1), ("background", 0), ("ignore", 255)])
def test_pet_trimap_border_option_decides_border_pixels(tmp_path, border, expected):
    ds = build_dataset(pet_cfg(make_pet(tmp_path), trimap_border=border), "trainval")
    mask = ds.mask(0)
    assert np.unique(mask[trimap() == 3]).tolist() == [expected]
    assert (mask[trimap() == 1] == 1).all()


def test_pet_species_mode_uses_the_species_column(tmp_path):
    ds = build_dataset(pet_cfg(make_pet(tmp_path), label_mode="species"), "trainval")
    assert ds.class_names == ["background", "cat", "dog"]
    assert [positives(ds, i) for i in range(len(ds))] == [["cat"], ["cat"], ["dog"], ["cat"]]
    dog = ds.ids.index("american_bulldog_1")
    assert np.unique(ds.mask(dog)).tolist() == [0, 2, 255]


def test_pet_breeds_mode_has_the_listed_breeds_sorted_by_class_id_for_both_splits(tmp_path):
    root = make_pet(tmp_path)
    train = build_dataset(pet_cfg(root, label_mode="breeds"), "trainval")
    test = build_dataset(pet_cfg(root, label_mode="breeds"), "test")
    assert train.class_names == test.class_names == ["background", "Abyssinian", "american_bulldog", "Bengal"]
    bengal = train.ids.index("Bengal_1")
    assert positives(train, bengal) == ["Bengal"]
    assert set(np.unique(train.mask(bengal)).tolist()) == {0, 3, 255}
    assert [positives(test, i) for i in range(len(test))] == [["Abyssinian"], ["american_bulldog"]]


def test_pet_train_is_an_alias_of_trainval_and_missing_test_list_is_named(tmp_path):
    root = make_pet(tmp_path, with_test=False)
    assert build_dataset(pet_cfg(root), "train").ids == build_dataset(pet_cfg(root), "trainval").ids
    with pytest.raises(DataError, match=r"annotations/test\.txt: list file not found"):
        build_dataset(pet_cfg(root), "test")
    with pytest.raises(DataError, match="pet has splits"):
        build_dataset(pet_cfg(root), "validation")


def test_pet_reads_png_and_gif_content_behind_jpg_names(tmp_path):
    root = make_pet(tmp_path)
    ds = build_dataset(pet_cfg(root), "trainval")
    png_as_jpg = ds.ids.index("Abyssinian_2")
    assert np.array_equal(ds.image(png_as_jpg), rgb_array(50))  # PNG is lossless: exact pixels
    everything = build_dataset(pet_cfg(root, label_mode="breeds"), "all")
    gif = everything.ids.index("Bengal_9")
    assert everything.image(gif).shape == (H, W, 3)
    assert positives(everything, gif) == ["Bengal"]  # unlisted: labelled from its file name
    assert everything.describe()["unlisted"] == ["Bengal_9"]


def test_pet_rejects_unknown_label_mode_and_border_option(tmp_path):
    root = make_pet(tmp_path)
    with pytest.raises(ConfigError, match="binary, species, breeds"):
        build_dataset(pet_cfg(root, label_mode="cats"), "trainval")
    with pytest.raises(ConfigError, match="ignore, pet, background"):
        build_dataset(pet_cfg(root, trimap_border="both"), "trainval")


def test_pet_trimap_value_outside_1_2_3_is_an_error_or_a_skip(tmp_path):
    root = make_pet(tmp_path)
    bad = trimap()
    bad[0, 0] = 7
    save_label(root / "annotations" / "trimaps" / "Abyssinian_1.png", bad, palette=False)
    ds = build_dataset(pet_cfg(root), "trainval")
    with pytest.raises(DataError, match=r"Abyssinian_1\.png: trimap values \[7\]"):
        ds.mask(0)
    with pytest.warns(UserWarning, match="skipped 1"):
        skipping = build_dataset(pet_cfg(root, on_error="skip"), "trainval")
    assert "Abyssinian_1" not in skipping.ids and len(skipping) == 3
    assert skipping.skipped[0]["id"] == "Abyssinian_1"
    assert skipping.skipped[0]["file"].endswith("Abyssinian_1.png")


def test_pet_list_file_with_inconsistent_breeds_is_an_error(tmp_path):
    root = make_pet(tmp_path)
    write_pet_list(root / "annotations" / "test.txt", [("Abyssinian_3", 2, 1, 1)])  # class 2 is a dog breed
    with pytest.raises(DataError, match="class_id 2"):
        build_dataset(pet_cfg(root, label_mode="breeds"), "trainval")


def test_pet_image_in_both_trainval_and_test_is_an_error(tmp_path):
    root = make_pet(tmp_path)
    write_pet_list(root / "annotations" / "test.txt", [("Abyssinian_1", 1, 1, 1)])
    with pytest.raises(DataError, match=r"test\.txt: 1 image\(s\) are also in .*trainval\.txt"):
        build_dataset(pet_cfg(root), "test")


# --- PASCAL VOC -----------------------------------------------------------------------------------------------------

def test_voc_trainval_uses_main_list_with_masks_only_where_a_png_exists(tmp_path):
    ds = build_dataset(voc_cfg(make_voc(tmp_path)), "trainval")
    assert ds.class_names == VOC_CLASSES and ds.num_classes == 21
    assert ds.ids == ["000001", "000002", "000003", "000004"]
    assert [ds.has_mask(i) for i in range(4)] == [True, True, False, False]
    assert ds.mask(2) is None
    assert positives(ds, 1) == ["bicycle", "bird"]  # the difficult bird counts
    assert positives(ds, 3) == ["person"]
    assert ds.describe()["list_file"].endswith("ImageSets/Main/trainval.txt")


def test_voc_masks_are_palette_indices_not_colours(tmp_path):
    ds = build_dataset(voc_cfg(make_voc(tmp_path)), "trainval")
    assert np.array_equal(ds.mask(0), VOC_MASKS["000001"])
    assert set(np.unique(ds.mask(0)).tolist()) == {0, 1, 255}


def test_voc_segmentation_split_wins_over_main_and_qualified_names_pick_either(tmp_path):
    root = make_voc(tmp_path)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000003\n")
    assert build_dataset(voc_cfg(root), "train").ids == list(VOC_MASKS)
    assert build_dataset(voc_cfg(root), "Main/train").ids == ["000003"]
    assert build_dataset(voc_cfg(root), "Segmentation/train").ids == list(VOC_MASKS)


def test_voc_missing_val_split_names_the_list_files(tmp_path):
    root = make_voc(tmp_path)
    with pytest.raises(DataError, match=r"Segmentation/val\.txt.*Main/val\.txt"):
        build_dataset(voc_cfg(root), "val")


def test_voc_labels_from_cls_labels_npy(tmp_path):
    root = make_voc(tmp_path)
    vec = np.zeros(20, dtype=np.float32)
    vec[VOC_CLASSES.index("dog") - 1] = 1
    save_cls_labels(tmp_path / "cls_labels.npy", {i: vec for i in VOC_OBJECTS})
    ds = build_dataset(voc_cfg(root, cls_labels=str(tmp_path / "cls_labels.npy")), "trainval")
    assert all(positives(ds, i) == ["dog"] for i in range(len(ds)))


def test_voc_cls_labels_with_missing_entry_or_wrong_length_is_an_error(tmp_path):
    root = make_voc(tmp_path)
    save_cls_labels(tmp_path / "short.npy", {"000001": np.zeros(20, np.float32)})
    with pytest.raises(DataError, match="no entry for id '000002'"):
        build_dataset(voc_cfg(root, cls_labels=str(tmp_path / "short.npy")), "trainval")
    save_cls_labels(tmp_path / "wrong.npy", {i: np.zeros(19, np.float32) for i in VOC_OBJECTS})
    with pytest.raises(DataError, match="19 values, expected 20"):
        build_dataset(voc_cfg(root, cls_labels=str(tmp_path / "wrong.npy")), "trainval")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_voc_cls_labels_pickle_cannot_run_code(tmp_path):
    root = make_voc(tmp_path)
    np.save(tmp_path / "evil.npy", np.array({"000001": _RunsCode()}, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        build_dataset(voc_cfg(root, cls_labels=str(tmp_path / "evil.npy")), "trainval")


def test_voc_sbd_masks_via_masks_dir(tmp_path):
    root = make_voc(tmp_path)
    save_label(root / "SegmentationClassAug" / "000003.png", block_mask(4))
    (root / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("000003\n")
    with pytest.raises(DataError, match="data.masks_dir=SegmentationClassAug"):
        build_dataset(voc_cfg(root), "train_aug")
    ds = build_dataset(voc_cfg(root, masks_dir="SegmentationClassAug"), "train_aug")
    assert np.array_equal(ds.mask(0), block_mask(4))


@pytest.mark.parametrize("xml, message", [
    ("<annotation><object><name>unicorn</name></object></annotation>", "'unicorn' is not a VOC class"),
    ("<annotation><object><name>dog</name>", "cannot parse annotation XML"),
])
def test_voc_bad_annotation_xml_is_named(tmp_path, xml, message):
    root = make_voc(tmp_path)
    (root / "Annotations" / "000003.xml").write_text(xml)
    with pytest.raises(DataError, match=message) as err:
        build_dataset(voc_cfg(root), "trainval")
    assert "000003.xml" in str(err.value)


# --- COCO ----------------------------------------------------------------------------------------------------------

def test_coco_weaktr_layout_with_cls_labels(tmp_path):
    root = make_coco(tmp_path)
    train = build_dataset(DataCfg(name="coco", root=str(root)), "train")
    assert train.num_classes == 81 and train.class_names == COCO_CLASSES
    assert train.ids == ["000000000009", "000000000025"]
    assert positives(train, 0) == ["person"] and positives(train, 1) == ["toothbrush"]
    assert np.array_equal(train.mask(1), COCO_MASKS["000000000025"])
    val = build_dataset(DataCfg(name="coco", root=str(root)), "val")
    assert positives(val, 0) == [COCO_CLASSES[17]]


def test_coco_without_cls_labels_derives_labels_from_masks(tmp_path):
    ds = CocoDataset(make_coco(tmp_path, with_cls_labels=False), "train")
    assert ds.describe()["labels"] == "masks"
    assert positives(ds, 0) == ["person"] and positives(ds, 1) == ["toothbrush"]


def test_coco_missing_mask_is_named(tmp_path):
    root = make_coco(tmp_path)
    (root / "voc_format" / "class_labels" / "000000000025.png").unlink()
    with pytest.raises(DataError, match=r"000000000025\.png: mask missing"):
        CocoDataset(root, "train")


# --- folder + CSV ------------------------------------------------------------------------------------------------

def test_folder_classes_from_csv_labels_and_optional_masks(tmp_path):
    root = make_folder(tmp_path, masks={"cat1.png": block_mask(1)})
    ds = build_dataset(folder_cfg(root, masks_dir="../masks"), "train")
    assert ds.class_names == ["background", "cat", "dog"]
    assert ds.ids == ["cat1", "dog1", "both", "sub__none"]
    assert [positives(ds, i) for i in range(4)] == [["cat"], ["dog"], ["cat", "dog"], []]
    assert [ds.has_mask(i) for i in range(4)] == [True, False, False, False]
    assert np.array_equal(ds.mask(0), block_mask(1))
    assert np.array_equal(ds.image(0), rgb_array(0))


def test_folder_classes_file_sets_order_and_must_start_with_background(tmp_path):
    root = make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("background\ndog\ncat\nbird\n")
    ds = build_dataset(folder_cfg(root, classes_file="../classes.txt"), "train")
    assert ds.class_names == ["background", "dog", "cat", "bird"]
    assert ds.labels(0).tolist() == [0.0, 1.0, 0.0]
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match="first class must be 'background'"):
        build_dataset(folder_cfg(root, classes_file="../classes.txt"), "train")


def test_folder_unknown_class_name_with_classes_file_is_named(tmp_path):
    root = make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("background\ncat\n")
    with pytest.raises(DataError, match=r"labels\.csv: line 3: unknown class name\(s\) \['dog'\]"):
        build_dataset(folder_cfg(root, classes_file="../classes.txt"), "train")


def test_folder_split_column_filters_and_without_it_only_train_exists(tmp_path):
    root = make_folder(tmp_path, split_column=["train", "train", "test", "test"])
    assert build_dataset(folder_cfg(root), "train").ids == ["cat1", "dog1"]
    assert build_dataset(folder_cfg(root), "test").ids == ["both", "sub__none"]
    assert len(build_dataset(folder_cfg(root), "all")) == 4
    with pytest.raises(DataError, match="split 'val' has no images"):
        build_dataset(folder_cfg(root), "val")
    plain = make_folder(tmp_path / "plain")
    with pytest.raises(DataError, match="needs a 'split' column"):
        build_dataset(folder_cfg(plain), "test")


def test_folder_bad_csv_header_is_named(tmp_path):
    root = make_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("file,classes\ncat1.png,cat\n")
    with pytest.raises(DataError, match=r"labels\.csv: header must be 'image,labels'"):
        build_dataset(folder_cfg(root), "train")


# --- background images --------------------------------------------------------------------------------------------

def test_background_images_join_the_train_split_only_as_negatives(tmp_path):
    root = make_folder(tmp_path)
    save_image(tmp_path / "bg" / "street.jpg", seed=7, fmt="JPEG")
    save_image(tmp_path / "bg" / "wall.png", seed=8, fmt="PNG", h=10, w=12)
    train = build_dataset(folder_cfg(root, background_dir=str(tmp_path / "bg")), "train")
    assert train.ids[-2:] == ["bg_street", "bg_wall"] and len(train) == 6
    assert train.labels(5).tolist() == [0.0, 0.0]
    assert not train.has_mask(5) and train.mask(5) is None
    with_masks = build_dataset(folder_cfg(root, background_dir=str(tmp_path / "bg"), background_masks=True),
                               "train")
    assert with_masks.has_mask(5) and np.array_equal(with_masks.mask(5), np.zeros((10, 12), np.uint8))
    assert np.array_equal(with_masks.image(5), rgb_array(8, 10, 12))
    other = build_dataset(folder_cfg(root, background_dir=str(tmp_path / "bg"), train_split="other"), "train")
    assert len(other) == 4


def test_background_folder_without_images_is_an_error(tmp_path):
    root = make_folder(tmp_path)
    (tmp_path / "bg").mkdir()
    with pytest.raises(DataError, match="no usable background images"):
        build_dataset(folder_cfg(root, background_dir=str(tmp_path / "bg")), "train")


# --- bad input: each with on_error=raise (named error) and on_error=skip (recorded skip + warning) -----------------

def expect_raise_then_skip(cfg_factory, split, message, bad_id, access=None):
    """Raise mode: DataError matching `message` (at build or on `access`); skip mode: `bad_id` recorded."""
    with pytest.raises(DataError, match=message):
        ds = build_dataset(cfg_factory(on_error="raise"), split)
        if access is not None:
            access(ds)
    with pytest.warns(UserWarning, match=r"skipped \d+"):
        ds = build_dataset(cfg_factory(on_error="skip"), split)
    assert bad_id not in ds.ids
    assert bad_id in [s["id"] for s in ds.skipped]
    skip = next(s for s in ds.skipped if s["id"] == bad_id)
    assert skip["file"] and skip["problem"]
    for i in range(len(ds)):  # what is left loads cleanly
        ds.image(i)
        ds.mask(i)
    return skip


def every_mask(ds):
    for i in range(len(ds)):
        ds.image(i)
        ds.mask(i)


def test_truncated_image(tmp_path):
    root = make_voc(tmp_path)
    path = root / "JPEGImages" / "000002.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    skip = expect_raise_then_skip(lambda **kw: voc_cfg(root, **kw), "trainval", r"000002\.jpg: cannot decode",
                                  "000002", every_mask)
    assert skip["file"].endswith("000002.jpg")


def test_corrupt_image_bytes(tmp_path):
    root = make_folder(tmp_path)
    (root / "images" / "dog1.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    expect_raise_then_skip(lambda **kw: folder_cfg(root, **kw), "train", r"dog1\.jpg: cannot decode image",
                           "dog1", every_mask)


def test_missing_mask_for_a_segmentation_list(tmp_path):
    root = make_voc(tmp_path)
    (root / "SegmentationClass" / "000002.png").unlink()
    skip = expect_raise_then_skip(lambda **kw: voc_cfg(root, **kw), "train", r"000002\.png: mask missing",
                                  "000002")
    assert "segmentation list" in skip["problem"]


def test_mask_of_a_different_size(tmp_path):
    root = make_voc(tmp_path)
    save_label(root / "SegmentationClass" / "000001.png", np.zeros((H, W + 1), np.uint8))
    expect_raise_then_skip(lambda **kw: voc_cfg(root, **kw), "train",
                           r"000001\.png: mask size 33x24 differs from image size 32x24", "000001", every_mask)


def test_mask_values_outside_the_class_set(tmp_path):
    root = make_voc(tmp_path)
    save_label(root / "SegmentationClass" / "000002.png", block_mask(21))
    expect_raise_then_skip(lambda **kw: voc_cfg(root, **kw), "train", r"mask values \[21\] are outside", "000002",
                           every_mask)


def test_duplicate_id_in_list_file(tmp_path):
    root = make_voc(tmp_path)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000001\n")
    with pytest.raises(DataError, match=r"trainval\.txt: line 3: duplicate id '000001' \(first on line 1\)"):
        build_dataset(voc_cfg(root), "trainval")
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = build_dataset(voc_cfg(root, on_error="skip"), "trainval")
    assert ds.ids == ["000001", "000002"]
    assert ds.skipped == [{"id": "000001", "file": str(root / "ImageSets" / "Main" / "trainval.txt"),
                           "problem": "line 3: duplicate id '000001' (first on line 1)"}]


def test_id_in_list_file_without_image(tmp_path):
    root = make_voc(tmp_path)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n999999\n")
    expect_raise_then_skip(lambda **kw: voc_cfg(root, **kw), "trainval", r"999999\.jpg: image missing", "999999")


@pytest.mark.parametrize("bad_id, message", [
    ("../../outside", "would escape the dataset folder"),
    ("/etc/passwd", "is an absolute path"),
])
def test_ids_that_try_to_escape_the_dataset_folder(tmp_path, bad_id, message):
    root = make_voc(tmp_path / "VOC2007")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(f"000001\n{bad_id}\n")
    save_image(tmp_path / "outside.jpg")
    expect_raise_then_skip(lambda **kw: voc_cfg(root, **kw), "trainval", message, bad_id)


def test_symlink_pointing_outside_the_dataset_folder(tmp_path):
    root = make_voc(tmp_path / "VOC2007")
    save_image(tmp_path / "secret.jpg", fmt="JPEG")
    (root / "JPEGImages" / "000003.jpg").unlink()
    (root / "JPEGImages" / "000003.jpg").symlink_to(tmp_path / "secret.jpg")
    skip = expect_raise_then_skip(lambda **kw: voc_cfg(root, **kw), "trainval", "outside the dataset folder",
                                  "000003")
    assert skip["file"].endswith("000003.jpg")


def test_folder_level_symlink_is_accepted(tmp_path):
    root = make_voc(tmp_path / "VOC2007")
    elsewhere = tmp_path / "sbd"
    save_label(elsewhere / "000003.png", block_mask(3))
    (root / "SegmentationClassAug").symlink_to(elsewhere, target_is_directory=True)
    ds = build_dataset(voc_cfg(root, masks_dir="SegmentationClassAug"), "trainval")
    assert np.array_equal(ds.mask(2), block_mask(3))


def test_folder_csv_path_escaping_and_duplicates(tmp_path):
    root = make_folder(tmp_path)
    with open(tmp_path / "labels.csv", "a") as f:
        f.write("../labels.csv,cat\ncat1.png,dog\n")
    with pytest.raises(DataError, match="would escape"):
        build_dataset(folder_cfg(root), "train")
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = build_dataset(folder_cfg(root, on_error="skip"), "train")
    assert len(ds) == 4 and positives(ds, 0) == ["cat"]
    assert [s["problem"].split(":")[0] for s in ds.skipped] == ["line 6", "line 7"]


def test_empty_list_file_and_all_samples_bad(tmp_path):
    root = make_voc(tmp_path)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n")
    with pytest.raises(DataError, match="split 'trainval' has no images"):
        build_dataset(voc_cfg(root), "trainval")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("777777\n888888\n")
    with pytest.raises(DataError, match="all 2 were skipped"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dataset(voc_cfg(root, on_error="skip"), "trainval")


# --- image modes and EXIF: these must load, as correct RGB -----------------------------------------------------------

def test_image_modes_load_as_rgb(tmp_path):
    gray = np.full((H, W), 100, np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png")[0, 0].tolist() == [100, 100, 100]

    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # one transparent pixel: composited onto black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out[1, 1].tolist() == [200, 0, 0] and out[0, 0].tolist() == [0, 0, 0]

    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", format="TIFF")  # TIFF named .jpg
    assert read_image(tmp_path / "cmyk.jpg")[0, 0].tolist() == [255, 0, 0]

    pal = Image.frombytes("P", (W, H), bytes([3]) * (W * H))
    pal.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    pal.save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png")[5, 5].tolist() == [10, 200, 30]

    sixteen = np.full((H, W), 257 * 100, np.uint16)
    sixteen[0, 0] = 65535
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    out16 = read_image(tmp_path / "sixteen.png")
    assert out16.dtype == np.uint8 and out16.shape == (H, W, 3)
    assert out16[1, 1].tolist() == [100, 100, 100] and out16[0, 0].tolist() == [255, 255, 255]


def exif_rotated_jpeg(path, orientation: int = 6) -> None:
    """Stored 32x24 image: top 6 rows red, the rest blue; EXIF says rotate (6 = 90 degrees clockwise)."""
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:6] = (255, 0, 0)
    arr[6:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif.tobytes())


def test_exif_rotated_jpeg_is_turned_upright_and_its_mask_must_match_upright(tmp_path):
    root = make_folder(tmp_path, rows=[("rot.jpg", "cat")])
    exif_rotated_jpeg(root / "images" / "rot.jpg")
    save_label(tmp_path / "masks" / "rot.png", np.zeros((W, H), np.uint8))  # upright: 24 wide, 32 high
    ds = build_dataset(folder_cfg(root, masks_dir="../masks"), "train")
    img = ds.image(0)
    assert img.shape == (W, H, 3)
    assert img[:, -1, 0].mean() > 200 and img[:, 0, 2].mean() > 200  # the red top edge is now the right edge
    assert ds.mask(0).shape == (W, H)
    save_label(tmp_path / "masks" / "rot.png", np.zeros((H, W), np.uint8))  # drawn on the unrotated pixels
    with pytest.raises(DataError, match="before its EXIF orientation 6 is applied"):
        ds.mask(0)


def test_decompression_bomb_is_refused(tmp_path):
    """A tiny PNG whose header claims 20000x20000 pixels."""
    png = bytearray(_tiny_png())
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(tmp_path / "bomb.png")


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_dataset_reads_subfolder_images_and_their_masks(tmp_path):
    root = make_folder(tmp_path, masks={"sub/none.png": block_mask(0)})
    ds = FolderDataset(root / "images", "../labels.csv", masks_dir="../masks")
    k = ds.ids.index("sub__none")
    assert ds.has_mask(k) and np.array_equal(ds.mask(k), block_mask(0))


def test_voc_dataset_class_can_be_used_directly(tmp_path):
    ds = VocDataset(make_voc(tmp_path), "train")
    assert ds.ids == list(VOC_MASKS) and all(ds.has_mask(i) for i in range(2))


def test_pet_dataset_class_can_be_used_directly(tmp_path):
    ds = PetDataset(make_pet(tmp_path), "test", label_mode="species")
    assert [positives(ds, i) for i in range(2)] == [["cat"], ["dog"]]


def test_skip_mode_with_every_image_corrupt_is_an_empty_dataset_error(tmp_path):
    root = make_folder(tmp_path)
    for path in (root / "images").rglob("*.*"):
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="every sample was skipped"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dataset(folder_cfg(root, on_error="skip"), "train")


def test_skip_mode_validation_is_reused_within_a_process_with_the_same_skip_list(tmp_path):
    root = make_folder(tmp_path)
    (root / "images" / "both.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1"):
        first = build_dataset(folder_cfg(root, on_error="skip"), "train")
    second = build_dataset(folder_cfg(root, on_error="skip"), "train")
    assert first.ids == second.ids == ["cat1", "dog1", "sub__none"]
    assert second.skipped == first.skipped and second.skipped[0]["id"] == "both"


def test_datasets_survive_pickling_for_dataloader_workers(tmp_path):
    root = make_voc(tmp_path)
    save_image(tmp_path / "bg" / "sky.png", seed=3)
    ds = build_dataset(voc_cfg(root, train_split="trainval", background_dir=str(tmp_path / "bg")), "trainval")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.ids == ds.ids and clone.ids[-1] == "bg_sky"
    assert np.array_equal(clone.mask(0), ds.mask(0)) and np.array_equal(clone.image(4), ds.image(4))


def test_demo_split_written_to_disk_reads_back_through_the_folder_dataset(tmp_path):
    from weakseg.data.demo import DemoDataset, write_demo_split

    out = write_demo_split(tmp_path / "demo", "test", n=3, seed=0, size=32)
    cfg = DataCfg(name="folder", root=str(out / "images"), labels_csv="../labels.csv", masks_dir="../masks",
                  classes_file="../classes.txt")
    ds = build_dataset(cfg, "train")
    demo = DemoDataset("test", 3, 0, 32)
    assert ds.class_names == demo.class_names and ds.ids == demo.ids
    for i in range(3):
        assert np.array_equal(ds.image(i), demo.image(i))
        assert np.array_equal(ds.mask(i), demo.mask(i))
        assert np.array_equal(ds.labels(i), demo.labels(i))
