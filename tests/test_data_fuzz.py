"""Property tests: corrupt bytes as image / mask files give a clean DataError or a clean skip, never another
exception type and never a wrong mask."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_data_fixtures import H, W, jpeg_bytes, make_folder, make_pet, png_bytes, rgb_array, trimap
from weakseg.data.base import DataError
from weakseg.data.files import drop_bad_samples
from weakseg.data.folder import FolderDataset
from weakseg.data.imageio import read_image, read_label_map
from weakseg.data.pet import PetDataset

FUZZ = settings(max_examples=120, deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
# Noisy label map (values 0, 1, 2, 255) so most of the PNG is compressed pixel data, where zlib alone
# lets corruption through as wrong pixels.
MASK = np.random.default_rng(1).choice(np.array([0, 1, 2, 255], np.uint8), size=(H, W), p=[0.7, 0.1, 0.1, 0.1])
MASK_PNG = png_bytes(MASK)
IMAGE_JPEG = jpeg_bytes(rgb_array(0))


@pytest.fixture(scope="module")
def folder_tree():
    """A folder dataset with one image (cat1.png) and its mask; tests overwrite the files."""
    tmp = Path(tempfile.mkdtemp(prefix="weakseg-fuzz-"))
    make_folder(tmp, rows=[("cat1.png", "cat dog")], masks={"cat1.png": MASK})
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def pet_tree():
    tmp = Path(tempfile.mkdtemp(prefix="weakseg-fuzz-pet-"))
    make_pet(tmp)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


edits_strategy = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=0, max_size=4)
cut_strategy = st.one_of(st.none(), st.integers(0, 2_000))


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_as_image_or_label_map_raise_only_data_error(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for reader in (read_image, read_label_map):
        try:
            out = reader(path)
        except DataError as e:
            assert str(path) in str(e)
        else:  # astronomically unlikely, but then it must at least be well-formed
            assert out.dtype == np.uint8 and out.ndim in (2, 3)


@FUZZ
@given(edits=edits_strategy, cut=cut_strategy)
def test_corrupted_mask_png_is_an_error_or_exactly_the_original_mask(folder_tree, edits, cut):
    mask_path = folder_tree / "masks" / "cat1.png"
    mask_path.write_bytes(mutate(MASK_PNG, edits, cut))
    (folder_tree / "images" / "cat1.png").write_bytes(png_bytes(rgb_array(0)))
    ds = FolderDataset(folder_tree / "images", "../labels.csv", masks_dir="../masks")
    try:
        mask = ds.mask(0)
    except DataError as e:
        assert str(mask_path) in str(e)
    else:
        assert np.array_equal(mask, MASK)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = drop_bad_samples(FolderDataset(folder_tree / "images", "../labels.csv", masks_dir="../masks",
                                                 on_error="skip"))
    if len(checked) == 1:
        assert np.array_equal(checked.mask(0), MASK)
    else:
        assert len(checked) == 0 and checked.skipped[0]["file"] == str(mask_path)


@FUZZ
@given(edits=edits_strategy, cut=cut_strategy)
def test_corrupted_jpeg_image_is_an_error_or_a_well_formed_rgb_image(folder_tree, edits, cut):
    image_path = folder_tree / "images" / "cat1.png"  # JPEG bytes behind a .png name: read by content
    image_path.write_bytes(mutate(IMAGE_JPEG, edits, cut))
    (folder_tree / "masks" / "cat1.png").write_bytes(MASK_PNG)
    ds = FolderDataset(folder_tree / "images", "../labels.csv", masks_dir="../masks")
    try:
        image = ds.image(0)
    except DataError as e:
        assert str(image_path) in str(e)
    else:  # JPEG has no checksum: damaged pixels can decode, but never a malformed array
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = drop_bad_samples(FolderDataset(folder_tree / "images", "../labels.csv", masks_dir="../masks",
                                                 on_error="skip"))
    assert len(checked) + len(checked.skipped) == 1


@FUZZ
@given(edits=edits_strategy, cut=cut_strategy)
def test_corrupted_trimap_is_an_error_or_the_correct_pet_mask(pet_tree, edits, cut):
    trimap_path = pet_tree / "annotations" / "trimaps" / "Abyssinian_1.png"
    trimap_path.write_bytes(mutate(png_bytes(trimap()), edits, cut))
    ds = PetDataset(pet_tree, "trainval")
    expected = np.select([trimap() == 1, trimap() == 2], [1, 0], 255).astype(np.uint8)
    try:
        mask = ds.mask(0)
    except DataError as e:
        assert str(trimap_path) in str(e)
    else:
        assert mask.shape == (H, W) and np.array_equal(mask, expected)
