"""Each callback on a tiny model of its own, read back from the event files it writes."""

import keras
import numpy as np
import pytest

import callbacks
import metrics
import unet
from conftest import read_events
from rundir import TRAIN

BATCHES, BATCH_SIZE, SIDE = 4, 2, 32


def tiny_model():
    keras.utils.set_random_seed(0)
    return unet.compiled_unet(2, "bce", 1e-2, jit_compile=False)


def crops():
    rng = np.random.default_rng(0)
    images = rng.random((BATCHES * BATCH_SIZE, SIDE, SIDE, 1), dtype=np.float32)
    labels = (rng.random((BATCHES * BATCH_SIZE, SIDE, SIDE, 1)) > 0.3).astype(np.float32)
    return images, labels


def test_training_summaries_batch_scalars_are_each_batchs_own_values(tmp_path):
    images, labels = crops()
    model = tiny_model()
    by_hand = keras.models.clone_model(model)
    by_hand.set_weights(model.get_weights())
    by_hand.compile(optimizer=keras.optimizers.Adam(1e-2), loss=metrics.LOSSES["bce"], metrics=metrics.training_metrics())
    writers = callbacks.SummaryWriters(tmp_path)
    model.fit(images, labels, batch_size=BATCH_SIZE, epochs=2, shuffle=False, verbose=0,
              callbacks=[callbacks.TrainingSummaries(writers, update_freq=1, histogram_freq=2), writers])
    expected = [by_hand.train_on_batch(images[i:i + BATCH_SIZE], labels[i:i + BATCH_SIZE], return_dict=True)
                for _ in range(2) for i in range(0, len(images), BATCH_SIZE)]

    written, _ = read_events(tmp_path / TRAIN)
    for name in ("loss", "misclassified_pixel_fraction", "membrane_dice", "accuracy"):
        series = written[f"train_batch/{name}"]
        assert [step for step, _ in series] == list(range(1, 2 * BATCHES + 1))
        assert [float(value) for _, value in series] == pytest.approx([batch[name] for batch in expected], rel=1e-4, abs=1e-6)
    # Not the running means Keras reports: the epoch's mean differs from its last batch's own value.
    assert written["epoch_loss"][0][1] != pytest.approx(written["train_batch/loss"][BATCHES - 1][1], rel=1e-3)
    assert [step for step, _ in written["epoch_learning_rate"]] == [0, 1]

    # Histograms every second epoch: only the first epoch's, at its last step.
    assert [step for step, _ in written["unet/weights/enc1_conv1/kernel"]] == [BATCHES]
    assert [step for step, _ in written["unet"]] == [0]  # the graph


def label_with_a_merge_and_a_split():
    """Three true cells side by side, with a prediction that merges the first two (no membrane
    between them) and splits the third (a false membrane across it)."""
    label = np.ones((64, 96), np.uint8)
    label[:, 30:34] = label[:, 62:66] = 0
    predicted_cell = np.ones((64, 96), bool)
    predicted_cell[:, 62:66] = False
    predicted_cell[30:33, 66:] = False
    return label, predicted_cell


def test_merges_and_splits_name_exactly_the_segments_and_cells_at_fault():
    label, predicted_cell = label_with_a_merge_and_a_split()
    true_cells, segments = metrics.true_cells_of(label), metrics.thinned_segments(predicted_cell)
    merging, split = metrics.merges_and_splits(true_cells, segments)
    assert list(merging) == [segments[10, 10]] and segments[10, 10] == segments[10, 40]
    assert list(split) == [true_cells[10, 80]]
    # A sliver of a cell across a border is no merge: shift the border 2 pixels into the third cell.
    shifted = np.ones_like(predicted_cell)
    shifted[:, 30:34] = False
    shifted[:, 66:68] = False
    assert [len(found) for found in metrics.merges_and_splits(true_cells, metrics.thinned_segments(shifted))] == [0, 0]


def test_merges_and_splits_image_paints_them_in_two_colours():
    label, predicted_cell = label_with_a_merge_and_a_split()
    true_cells, segments = metrics.true_cells_of(label), metrics.thinned_segments(predicted_cell)
    overlay = callbacks.topology_overlay(segments, true_cells, *metrics.merges_and_splits(true_cells, segments))
    red, green, blue = np.moveaxis(overlay, -1, 0)
    orange = (red - blue > 0.3) & (green > 0.2)
    painted_blue = blue - red > 0.3
    np.testing.assert_array_equal(orange, segments == segments[10, 10])
    np.testing.assert_array_equal(painted_blue, true_cells == true_cells[10, 80])
    grey = ~(orange | painted_blue)
    assert np.all(red[grey] == blue[grey]) and np.all(red[segments == 0][grey[segments == 0]] == 0)
