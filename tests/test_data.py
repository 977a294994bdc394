import re
import shutil

import numpy as np
import pytest
import skimage.io
import skimage.transform
import tensorflow as tf
import tifffile
from scipy import ndimage

import batches
import data
import distribute
import inputs
import tiffs
from conftest import cells_and_membranes, write_stack

# --- download ---------------------------------------------------------------------------------


def test_download_writes_three_30_page_stacks_equal_to_the_pngs(isbi_dir, local_mirror):
    for tiff_name, source_dir in data.STACK_SOURCES.items():
        with tifffile.TiffFile(isbi_dir / tiff_name) as tiff:
            assert len(tiff.pages) == 30
            stack = tiff.asarray()
        assert stack.shape == (30, 512, 512) and stack.dtype == np.uint8
        for index in (0, 17, 29):
            np.testing.assert_array_equal(stack[index], skimage.io.imread(local_mirror / source_dir / f"{index}.png"))
    assert not list(isbi_dir.glob(".*.partial*"))


def test_labels_become_cell_ones_and_membrane_zeros(isbi_dir):
    stacks = tiffs.load_training_stacks(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif")
    image, labels = stacks.image(3), stacks.mask(3)
    assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert set(np.unique(labels)) == {0, 1}
    assert 0.7 < labels.mean() < 0.85  # ISBI: about 78 % of pixels are cells


@pytest.fixture
def copied_mirror(tmp_path, local_mirror):
    copy = tmp_path / "mirror"
    shutil.copytree(local_mirror, copy)
    return copy


def test_corrupted_mirror_file_gives_a_clear_error_and_no_tiff(copied_mirror, tmp_path):
    damaged = copied_mirror / "data/membrane/train/label/12.png"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    destination = tmp_path / "isbi"
    with pytest.raises(data.DataError, match=r"checksum mismatch for .*label/12\.png.*use another mirror"):
        data.download_isbi2012(destination, copied_mirror.as_uri(), verbose=False)
    assert not destination.exists() or not any(destination.iterdir())


def test_missing_mirror_file_gives_a_clear_error_and_no_tiff(copied_mirror, tmp_path):
    (copied_mirror / "data/membrane/test/29.png").unlink()
    destination = tmp_path / "isbi"
    with pytest.raises(data.DataError, match=r"could not fetch .*test/29\.png.*--mirror"):
        data.download_isbi2012(destination, copied_mirror.as_uri(), verbose=False)
    assert not destination.exists() or not any(destination.iterdir())


def test_download_keeps_the_tiffs_already_there(tmp_path, mirror_url):
    mine = tmp_path / "train-volume.tif"
    mine.write_bytes(b"my own stack")
    written = data.download_isbi2012(tmp_path, mirror_url, verbose=False)
    assert sorted(path.name for path in written) == ["test-volume.tif", "train-labels.tif"]
    assert mine.read_bytes() == b"my own stack"


@pytest.mark.parametrize("below", ["", "isbi"])
def test_data_that_is_a_file_is_refused_before_anything_is_fetched(tmp_path, below):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    message = f"{blocked} is a file, not a directory: give --data a directory to hold the ISBI 2012 stacks"
    with pytest.raises(data.DataError, match=f"^{re.escape(message)}$"):
        data.download_isbi2012(blocked / below, "file:///nowhere", verbose=False)  # nothing fetched
    assert blocked.read_text() == ""


def test_mirror_must_be_a_url():
    with pytest.raises(data.DataError, match="not a URL"):
        data.mirror_url("/just/a/path")


def test_data_py_command_downloads_once(tmp_path, mirror_url, capsys):
    assert data.main(["--data", str(tmp_path), "--mirror", mirror_url]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(data.STACK_SOURCES)
    assert data.main(["--data", str(tmp_path), "--mirror", mirror_url]) == 0
    assert "already" in capsys.readouterr().out


# --- reading stacks ---------------------------------------------------------------------------


def test_missing_stack_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DataError, match=r"not found: check the path \(`python data.py` downloads ISBI 2012"):
        tiffs.read_stack(tmp_path / "train-volume.tif")


def test_a_file_that_is_not_a_tiff_is_named(tmp_path):
    bogus = tmp_path / "train-volume.tif"
    bogus.write_text("not an image")
    with pytest.raises(data.DataError, match="is not a readable TIFF"):
        tiffs.read_stack(bogus)
    assert bogus.read_text() == "not an image"


def test_colour_tiff_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    with pytest.raises(data.DataError, match="colour pixels.*greyscale"):
        tiffs.read_stack(tmp_path / "rgb.tif")


def test_truncated_tiff_is_named(isbi_dir, tmp_path):
    truncated = tmp_path / "train-volume.tif"
    truncated.write_bytes((isbi_dir / "train-volume.tif").read_bytes()[:100_000])
    with pytest.raises(
        data.DataError,
        match=r"train-volume.tif is truncated \(100000 bytes; page 2's directory is at "
        r"byte \d+, past the end\): copy it again from its source",
    ):
        tiffs.read_stack(truncated)


def test_non_binary_labels_report_how_many_values(tmp_path):
    write_stack(tmp_path / "images.tif", np.zeros((2, 32, 32), np.uint8))
    write_stack(tmp_path / "labels.tif", np.arange(2 * 32 * 32).reshape(2, 32, 32) % 3 * 100)
    with pytest.raises(data.DataError, match="3 distinct values"):
        tiffs.load_training_stacks(tmp_path / "images.tif", tmp_path / "labels.tif")


def test_page_counts_and_slice_shapes_must_match(tmp_path):
    write_stack(tmp_path / "images.tif", np.zeros((3, 32, 32), np.uint8))
    write_stack(tmp_path / "labels.tif", np.zeros((2, 32, 32), np.uint8))
    write_stack(tmp_path / "wide.tif", np.zeros((3, 32, 48), np.uint8))
    with pytest.raises(data.DataError, match="has 3 slices but .* has 2"):
        tiffs.load_training_stacks(tmp_path / "images.tif", tmp_path / "labels.tif")
    with pytest.raises(data.DataError, match="same height and width"):
        tiffs.load_training_stacks(tmp_path / "images.tif", tmp_path / "wide.tif")


def test_any_stack_size_works_and_16_bit_images_are_scaled(tmp_path):
    write_stack(tmp_path / "images.tif", np.random.default_rng(0).integers(0, 2**16, (4, 40, 72), dtype=np.uint16))
    labels = cells_and_membranes(4, 40, 72) // 255
    write_stack(tmp_path / "labels.tif", labels)
    stacks = tiffs.load_training_stacks(tmp_path / "images.tif", tmp_path / "labels.tif")
    assert len(stacks) == 4 and stacks.slice_shape == (40, 72)
    assert (stacks.image(3).min(), stacks.image(3).max()) == (0.0, 1.0)
    np.testing.assert_array_equal(stacks.mask(3), labels[3])


def test_large_stacks_are_memory_mapped_and_read_the_same(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 80), dtype=np.uint8)
    write_stack(tmp_path / "images.tif", images)
    labels = cells_and_membranes(3, 64, 80)
    write_stack(tmp_path / "labels.tif", labels)
    loaded = tiffs.load_training_stacks(tmp_path / "images.tif", tmp_path / "labels.tif")
    mapped = tiffs.load_training_stacks(
        tmp_path / "images.tif", tmp_path / "labels.tif", memory_map_above=images.nbytes - 1
    )
    assert isinstance(mapped.images, np.memmap) and isinstance(mapped.labels, np.memmap)
    assert not isinstance(loaded.images, np.memmap)
    for index in range(3):
        np.testing.assert_array_equal(mapped.image(index), loaded.image(index))
        np.testing.assert_array_equal(mapped.mask(index), labels[index] == 255)
    crops = [
        batches.RandomCrops(stacks, [0, 2], batch_size=2, crop=32, seed=1).batch(1, 2) for stacks in (loaded, mapped)
    ]
    np.testing.assert_array_equal(crops[0][0], crops[1][0])


def test_a_compressed_stack_cannot_be_memory_mapped(tmp_path):
    tifffile.imwrite(tmp_path / "images.tif", np.zeros((2, 32, 32), np.uint8), compression="zlib")
    with pytest.raises(data.DataError, match="cannot be memory-mapped .*save it uncompressed.*--memmap off"):
        tiffs.read_stack(tmp_path / "images.tif", memory_map_above=0)


# --- split ------------------------------------------------------------------------------------


def test_default_split_of_isbi_validates_on_three_spread_slices():
    training, validation = inputs.split_slices(30)
    assert validation == [5, 15, 25]
    assert training == [i for i in range(30) if i not in (5, 15, 25)]


def test_split_rejects_out_of_range_and_leaves_a_training_slice():
    assert inputs.split_slices(4, [0, 3]) == ([1, 2], [0, 3])
    with pytest.raises(data.DataError, match=r"\[30\] out of range.*0\.\.29"):
        inputs.split_slices(30, [5, 30])
    with pytest.raises(data.DataError, match="at least one for training"):
        inputs.split_slices(2, [0, 1])


# --- augmentation -----------------------------------------------------------------------------


def stripes_and_blobs(size=128):
    """A binary test pattern with no symmetry, so any misalignment shows."""
    rows, cols = np.mgrid[:size, :size]
    return (((rows // 9 + cols // 13) % 2 == 0) | ((rows - 40) ** 2 + (cols - 70) ** 2 < 300)).astype(np.uint8)


SHAPE_ONLY = batches.Augmentation(brightness=0.0, contrast=0.0)


def one_slice(image, mask):
    return in_memory(image[np.newaxis], mask[np.newaxis])


def in_memory(images, masks):
    """TrainingStacks of float images in [0, 1], taken as stored, and {0, 1} masks."""
    return tiffs.TrainingStacks(
        images,
        masks,
        cell_value=1,
        cell_pixels=masks.sum(axis=(1, 2)),
        scaling=tiffs.ImageScaling(0.0, 1.0, "as stored"),
    )


def test_image_and_mask_stay_aligned_through_every_transform():
    mask = stripes_and_blobs()
    image = mask.astype(np.float32)  # the image is the mask: after augmentation they must agree
    rng = np.random.default_rng(1)
    for _ in range(10):
        image_crop, mask_crop = batches.augmented_crop(one_slice(image, mask), 0, 64, rng, SHAPE_ONLY)
        np.testing.assert_array_equal(image_crop >= 0.5, mask_crop == 1)


def test_masks_stay_strictly_binary():
    rng = np.random.default_rng(2)
    mask = stripes_and_blobs()
    for _ in range(5):
        _, mask_crop = batches.augmented_crop(one_slice(rng.random(mask.shape, dtype=np.float32), mask), 0, 64, rng)
        assert set(np.unique(mask_crop)) <= {0.0, 1.0}


def test_augmentation_changes_the_geometry_and_intensity():
    mask = stripes_and_blobs()
    image = mask * 0.5 + 0.25
    plain = batches.augmented_crop(one_slice(image, mask), 0, 128, np.random.default_rng(3), batches.NO_AUGMENTATION)
    np.testing.assert_array_equal(plain[1], mask)  # no augmentation, whole slice: the identity
    np.testing.assert_allclose(plain[0], image, atol=1e-6)
    augmented = batches.augmented_crop(one_slice(image, mask), 0, 128, np.random.default_rng(3))
    assert np.mean(augmented[1] != mask) > 0.2
    assert not np.isclose(augmented[0].mean(), image.mean(), atol=1e-3)


def test_elastic_deformation_alone_moves_pixels_by_about_sigma():
    elastic_only = batches.Augmentation(0, 0, 0, 0, False, elastic_sigma=10.0, brightness=0, contrast=0)
    coordinates = batches.sample_coordinates(np.random.default_rng(4), (128, 128), 128, elastic_only)
    identity = np.mgrid[:128, :128].astype(float)
    displacement = np.abs(coordinates - identity)
    assert 2 < displacement.mean() < 20


def test_elastic_displacements_are_the_bicubic_resize_of_the_coarse_grid():
    for seed in range(20):
        coarse = np.random.default_rng(seed).normal(0.0, 10.0, size=(2, 3, 3))
        expected = np.stack([skimage.transform.resize(grid, (96, 128), order=3, mode="edge") for grid in coarse])
        displacement = batches.elastic_displacement(np.random.default_rng(seed), (96, 128), 10.0, 3)
        np.testing.assert_allclose(displacement, expected, rtol=0, atol=1e-9)


def test_crops_outside_the_slice_are_mirrored_in_as_scipy_does():
    # Only the region a crop covers is read; folding the coordinates into the slice first must give
    # what interpolating the whole slice in scipy's 'mirror' mode gives.
    rng = np.random.default_rng(6)
    image = rng.random((40, 56), dtype=np.float32)
    coordinates = rng.uniform(-30, 80, size=(2, 16, 16))
    folded = batches.mirrored(coordinates, image.shape)
    assert folded.min() >= 0 and (folded.max(axis=(1, 2)) <= np.array([39, 55])).all()
    np.testing.assert_allclose(
        ndimage.map_coordinates(image, folded, order=1, mode="nearest"),
        ndimage.map_coordinates(image, coordinates, order=1, mode="mirror"),
        atol=1e-6,
    )


def test_random_crops_are_reproducible_and_differ_between_batches_epochs_and_streams():
    images = np.random.default_rng(5).random((3, 96, 96), dtype=np.float32)
    crops = batches.RandomCrops(
        in_memory(images, (images > 0.5).astype(np.uint8)), [0, 2], batch_size=2, crop=32, seed=7
    )
    x, y = crops.batch(epoch=0, index=1)
    assert x.shape == y.shape == (2, 32, 32, 1) and x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(crops.batch(0, 1)[0], x)
    for other in ((0, 2, 0), (1, 1, 0), (0, 1, 1)):
        assert not np.array_equal(crops.batch(*other)[0], x)


def test_replica_batches_take_each_replica_its_own_stream_in_order():
    images = np.random.default_rng(8).random((2, 64, 64), dtype=np.float32)
    crops = batches.RandomCrops(
        in_memory(images, (images > 0.5).astype(np.uint8)), [0, 1], batch_size=2, crop=16, seed=3
    )
    # Worker 1 of 2 with 2 replicas each: its replicas are streams 2 and 3; from epoch 1 of 3-step epochs.
    replica_batches = distribute.replica_batches(
        crops, steps_per_epoch=3, first_epoch=1, input_context=tf.distribute.InputContext(2, 1, 4), workers=2
    )
    elements = [images.numpy() for images, _ in replica_batches.take(8)]
    expected = [
        crops.batch(epoch, index, stream)[0] for epoch, index in ((1, 0), (1, 1), (1, 2), (2, 0)) for stream in (2, 3)
    ]
    for element, batch in zip(elements, expected, strict=True):
        np.testing.assert_array_equal(element, batch)
    # A single replica draws stream 0 from step 0.
    single = distribute.replica_batches(crops, 3, 0, tf.distribute.InputContext(1, 0, 1), workers=2)
    np.testing.assert_array_equal(next(iter(single))[0].numpy(), crops.batch(0, 0)[0])


# --- the U-Net paper's loss weights ----------------------------------------------------------


def test_border_weights_peak_between_two_close_cells_and_balance_the_classes():
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 10:27] = mask[10:30, 31:50] = 1  # two square cells 4 pixels apart
    weights = batches.border_weights(mask)
    cells, membrane = np.count_nonzero(mask), np.count_nonzero(mask == 0)
    # w_c by hand: each class carries half of the total class weight.
    assert weights[20, 15] == pytest.approx(mask.size / (2 * cells))
    assert weights[0, 0] == pytest.approx(mask.size / (2 * membrane), abs=1e-3)  # far from both cells
    # Between the cells, d1 + d2 = 5 at every pixel of the gap (pixel centres): w_c + w0 exp(-25 / 50).
    gap = weights[10:30, 27:31]
    assert gap == pytest.approx(np.full(gap.shape, mask.size / (2 * membrane) + 10 * np.exp(-25 / 50)), rel=1e-6)
    assert np.unravel_index(np.argmax(weights), weights.shape)[1] in range(27, 31)
    # Beside one cell only, d2 is the far side of the other cell: a small border term.
    assert weights[20, 5] < weights[20, 28] / 3


def test_weights_stay_aligned_with_masks_through_every_transform():
    mask = stripes_and_blobs()
    weights = {0: mask.astype(np.float32)}  # weights that are the mask: after augmentation they must agree
    crops = batches.RandomCrops(
        one_slice(np.random.default_rng(2).random(mask.shape, dtype=np.float32), mask),
        [0],
        batch_size=4,
        crop=64,
        seed=1,
        augmentation=SHAPE_ONLY,
        weights=weights,
    )
    for index in range(3):
        _, mask_crops, weight_crops = crops.batch(0, index)
        assert weight_crops.shape == mask_crops.shape == (4, 64, 64, 1)
        np.testing.assert_array_equal(weight_crops >= 0.5, mask_crops == 1)
