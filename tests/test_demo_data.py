import numpy as np
import pytest

from weakseg.data import DemoDataset, build_dataset, train_val_indices
from weakseg.config import DataCfg
from weakseg.data.demo import _CLASS_COLOURS, generate_sample, write_demo_split


def test_deterministic_and_seed_dependent():
    a_img, a_mask = generate_sample(0, "train", 3, 64)
    b_img, b_mask = generate_sample(0, "train", 3, 64)
    c_img, _ = generate_sample(1, "train", 3, 64)
    d_img, _ = generate_sample(0, "test", 3, 64)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_img, d_img)


def test_shapes_values_and_labels_follow_masks():
    ds = DemoDataset("train", 30, seed=0, size=64)
    assert ds.class_names[0] == "background" and ds.num_classes == 6
    for i in range(len(ds)):
        img, mask, labels = ds.image(i), ds.mask(i), ds.labels(i)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= set(range(6))
        counts = np.bincount(mask.ravel(), minlength=6)[1:]
        assert np.array_equal(labels > 0, counts >= 40)
        assert labels.sum() >= 1, "every demo image has at least one visible object"


def test_masks_cover_the_objects_colour():
    """Pixels a mask assigns to a class have that class's colour family; background does not on average."""
    ds = DemoDataset("train", 60, seed=0, size=96)
    for cls, rgb in _CLASS_COLOURS.items():
        inside = []
        for i in range(len(ds)):
            m = ds.mask(i) == cls
            if m.sum() > 100:
                inside.append(ds.image(i)[m].astype(float).mean(0))
        assert inside, f"class {cls} never appears"
        mean = np.mean(inside, axis=0)
        dominant = int(np.argmax(rgb))
        assert np.argmax(mean) == dominant or abs(mean[dominant] - mean.max()) < 15, (cls, mean)


def test_backgrounds_are_cluttered_not_flat():
    img, mask = generate_sample(0, "train", 0, 128)
    bg = img[mask == 0].astype(float)
    assert bg.std(axis=0).mean() > 20


def test_builder_and_split():
    cfg = DataCfg(name="demo", demo_train=20, demo_test=5, demo_size=32)
    assert len(build_dataset(cfg, "train")) == 20
    assert len(build_dataset(cfg, "test")) == 5
    with pytest.raises(ValueError, match="valid names"):
        build_dataset(DataCfg(name="nope"), "train")
    tr, va = train_val_indices(20, 0.25, seed=0)
    assert len(va) == 5 and sorted(tr + va) == list(range(20))
    assert (tr, va) == train_val_indices(20, 0.25, seed=0)
    assert va != train_val_indices(20, 0.25, seed=1)[1]


def test_write_demo_split(tmp_path):
    from weakseg.io import load_label_png

    out = write_demo_split(tmp_path / "d", "test", n=3, seed=0, size=32)
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == 3
    ds = DemoDataset("test", 3, 0, 32)
    assert np.array_equal(load_label_png(out / "masks" / files[0].name), ds.mask(0))
    assert (out / "labels.csv").read_text().startswith("image,labels\n")


def test_binary_view_collapses_classes_and_keeps_ignore():
    from weakseg.data import BinaryView, collapse_to_binary

    m = np.array([[0, 1, 2], [255, 3, 0]], dtype=np.uint8)
    assert collapse_to_binary(m).tolist() == [[0, 1, 1], [255, 1, 0]]
    ds = DemoDataset("train", 5, 0, 32)
    view = BinaryView(ds, "object")
    assert view.class_names == ["background", "object"] and view.ids == ds.ids
    for i in range(5):
        assert view.labels(i).tolist() == [1.0]
        assert np.array_equal(view.mask(i), (ds.mask(i) > 0).astype(np.uint8))
