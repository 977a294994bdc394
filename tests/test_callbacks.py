"""Each callback on a tiny model of its own, read back from the event files it writes (or, for
the progress line, from the terminal it draws on)."""

import fcntl
import os
import re
import select
import struct
import termios
import threading
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary

import callbacks
import checkpoints
import metrics
import progress
import rundir
import summaries
import tiling
import unet
import validation
import watcher
from conftest import read_events
from rundir import BEST, LAST, TRAIN, VALIDATION
from summaries import (
    ACTIVATIONS_GROUP,
    BATCH_GROUP,
    BEST_TAG,
    EPOCH_TAG,
    PR_CURVE_TAG,
    SHOWN_GROUP,
    SLICE_GROUP,
    WEIGHTS_GROUP,
)

BATCHES, BATCH_SIZE, SIDE = 4, 2, 32


def tiny_model():
    keras.utils.set_random_seed(0)
    return unet.compiled_unet(2, "bce", 1e-2, jit_compile=False)


def crops():
    rng = np.random.default_rng(0)
    images = rng.random((BATCHES * BATCH_SIZE, SIDE, SIDE, 1), dtype=np.float32)
    labels = (rng.random((BATCHES * BATCH_SIZE, SIDE, SIDE, 1)) > 0.3).astype(np.float32)
    return images, labels


def logs_kept_in(epoch_logs):
    """A callback keeping each epoch's logs in `epoch_logs`, as validation.Validation does before scoring."""
    return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_logs.__setitem__(epoch, dict(logs)))


def test_training_summaries_batch_scalars_are_each_batchs_own_values(tmp_path):
    images, labels = crops()
    model = tiny_model()
    by_hand = keras.models.clone_model(model)
    by_hand.set_weights(model.get_weights())
    by_hand.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=metrics.LOSSES["bce"], metrics=metrics.training_metrics()
    )
    epoch_logs = {}
    with watcher.running() as watching:
        writers = callbacks.SummaryWriters(tmp_path, watching)
        model.fit(
            images,
            labels,
            batch_size=BATCH_SIZE,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[
                logs_kept_in(epoch_logs),
                callbacks.TrainingSummaries(writers, epoch_logs, update_freq=1, histogram_freq=2),
                writers,
            ],
        )
    expected = [
        by_hand.train_on_batch(images[i : i + BATCH_SIZE], labels[i : i + BATCH_SIZE], return_dict=True)
        for _ in range(2)
        for i in range(0, len(images), BATCH_SIZE)
    ]

    written, _ = read_events(tmp_path / TRAIN)
    for name in ("loss", "misclassified_pixel_fraction", "membrane_dice", "accuracy"):
        series = written[f"{BATCH_GROUP}/{name}"]
        assert [step for step, _ in series] == list(range(1, 2 * BATCHES + 1))
        assert [float(value) for _, value in series] == pytest.approx(
            [batch[name] for batch in expected], rel=1e-4, abs=1e-6
        )
    # Not the running means Keras reports: the epoch's mean differs from its last batch's own value.
    assert written[EPOCH_TAG.format("loss")][0][1] != pytest.approx(
        written[f"{BATCH_GROUP}/loss"][BATCHES - 1][1], rel=1e-3
    )
    assert [step for step, _ in written[EPOCH_TAG.format("learning_rate")]] == [0, 1]

    # Histograms every second epoch: only the first epoch's, at its last step.
    assert [step for step, _ in written[f"{WEIGHTS_GROUP}/enc1_conv1/kernel"]] == [BATCHES]
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


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).normal(size=(3, 3, 16, 32)).astype(np.float32),
        np.arange(1000) % 7,  # integers, and values exactly on the buckets' edges
        np.full(5, 0.25),
        np.array([2.0]),
        np.array([]),
        np.array([0.5, np.nan, 1.5]),
        np.full(4, np.nan),
        np.array([0.0, np.inf, 1.0]),
        np.array([-np.inf, 0.0]),
        np.full(3, np.inf),
    ],
    ids=["weights", "integers", "constant", "one", "empty", "nan", "all-nan", "inf", "-inf", "all-inf"],
)
def test_histograms_are_bucketed_as_tensorboards_histogram_pb(values, tmp_path):
    """summaries.histogram_buckets counts what TensorBoard's histogram_pb counts, and the record
    written is histogram_pb's, byte for byte."""
    with tf.summary.create_file_writer(str(tmp_path)).as_default(step=3):
        summaries.write_histogram("unet/weights/kernel", values)
    with np.errstate(invalid="ignore"):  # histogram_pb warns of NaN and infinities
        expected = histogram_summary.histogram_pb("unet/weights/kernel", values).value[0]
    events = [
        event_pb2.Event.FromString(raw) for path in tmp_path.iterdir() for raw in RawEventFileLoader(str(path)).Load()
    ]
    (written,) = [event for event in events if event.summary.value]
    assert written.step == 3
    assert written.summary.value[0].SerializeToString() == expected.SerializeToString()


def test_activation_samples_are_a_blocks_values_at_the_same_positions_every_time():
    """summaries.sample_values of a bf16 block output seen through a crop (as ValidationPass hands
    it over) are its values, converted, at flat positions drawn the same way every time."""
    output = np.random.default_rng(1).normal(size=(40, 48, 16)).astype(tf.bfloat16.as_numpy_dtype)
    crop = output[3:-5, 2:-6]
    sample = summaries.sample_values(crop, size=1000)
    positions = np.random.default_rng(0).integers(crop.size, size=1000)
    assert sample.dtype == np.float32
    np.testing.assert_array_equal(sample, crop.astype(np.float32).ravel()[positions])
    np.testing.assert_array_equal(summaries.sample_values(crop, size=1000), sample)
    np.testing.assert_array_equal(summaries.sample_values(crop, size=crop.size), crop.astype(np.float32).ravel())


def test_merges_and_splits_image_paints_them_in_two_colours():
    label, predicted_cell = label_with_a_merge_and_a_split()
    true_cells, segments = metrics.true_cells_of(label), metrics.thinned_segments(predicted_cell)
    overlay = summaries.topology_overlay(segments, true_cells, *metrics.merges_and_splits(true_cells, segments))
    red, green, blue = np.moveaxis(overlay, -1, 0)
    orange = (red - blue > 0.3) & (green > 0.2)
    painted_blue = blue - red > 0.3
    np.testing.assert_array_equal(orange, segments == segments[10, 10])
    np.testing.assert_array_equal(painted_blue, true_cells == true_cells[10, 80])
    grey = ~(orange | painted_blue)
    assert np.all(red[grey] == blue[grey]) and np.all(red[segments == 0][grey[segments == 0]] == 0)


def test_an_image_written_is_what_tf_summary_image_writes_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        "grey": rng.random((40, 56, 1), np.float32),
        "colour": rng.random((40, 56, 3)),  # the overlays are float64
        "saturated": np.linspace(-0.5, 1.5, 40 * 56).reshape(40, 56, 1),  # smooth: compresses
    }
    for way, write in (
        ("library", lambda tag, image: tf.summary.image(tag, image[np.newaxis], description=f"the {tag} one")),
        (
            "ours",
            lambda tag, image: summaries.write_image(tag, summaries.encoded_image(image), description=f"the {tag} one"),
        ),
    ):
        with tf.summary.create_file_writer(str(tmp_path / way)).as_default(step=7):
            for tag, image in images.items():
                write(tag, image)
    library, ours = (
        {
            value.tag: (event.step, value.metadata, tf.make_ndarray(value.tensor))
            for [path] in [list((tmp_path / way).glob("events.out.tfevents.*"))]
            for event in map(event_pb2.Event.FromString, summaries.read_records(path)[0])
            for value in event.summary.value
        }
        for way in ("library", "ours")
    )
    assert ours.keys() == library.keys() == images.keys()
    for tag, image in images.items():
        (library_step, library_metadata, library_value), (our_step, our_metadata, our_value) = library[tag], ours[tag]
        assert our_step == library_step == 7 and our_metadata == library_metadata
        assert our_value.shape == library_value.shape == (3,)
        assert our_value[:2].tolist() == library_value[:2].tolist() == [b"56", b"40"]  # width, height
        np.testing.assert_array_equal(tf.image.decode_png(our_value[2]), tf.image.decode_png(library_value[2]))
        pixels = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
        assert our_value[2] == tf.image.encode_png(pixels, compression=summaries.PNG_COMPRESSION).numpy()
    assert ours["saturated"][2][2] != library["saturated"][2][2]  # another compression of the same pixels


# --- the other callbacks, each on its own, hooks called as Keras calls them ---------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def slices(count=2, side=48):
    """Validation slices as EM slices look: cells (1) in a grid of membranes (0), a grey image of them."""
    labels = (np.indices((count, side, side))[1:] % 12 != 0).all(axis=0).astype(np.uint8)
    images = (0.2 + 0.6 * labels + 0.1 * np.random.default_rng(1).random(labels.shape)).astype(np.float32)
    return images, labels


def attached(callback, model, steps=3):
    callback.set_model(model)
    callback.set_params({"steps": steps, "epochs": 1})
    return callback


def validation_pass_of(model, images, shown):
    validation_pass = attached(validation.ValidationPass(images, shown), model)
    validation_pass.on_train_begin()
    return validation_pass


def test_validation_adds_the_loss_metrics_and_challenge_scores_of_the_whole_slices_as_predict_py_predicts_them(model):
    images, labels = slices()
    epoch_logs = {}
    with watcher.running() as watching:
        scoring = attached(
            validation.Validation(
                watching,
                epoch_logs,
                validation_pass_of(model, images, [0]),
                labels,
                metrics.LOSSES["bce"],
                metrics.training_metrics(),
                1,
            ),
            model,
        )
        scoring.on_epoch_end(0, {"loss": 0.5})
        scoring.eval_every = 2
        scoring.on_epoch_end(1, {"loss": 0.5})  # not an evaluation epoch: the loss and metrics only
        watching.drain()
    logs = epoch_logs[0]
    probabilities = tiling.predict_stack(model, images)  # whole slices in mirrored context
    expected = np.mean(metrics.misclassified_pixel_fraction(labels[..., np.newaxis], probabilities[..., np.newaxis]))
    assert logs["val_misclassified_pixel_fraction"] == pytest.approx(float(expected), rel=1e-5)
    assert logs["val_v_rand"] == pytest.approx(metrics.isbi_scores(labels, probabilities)["v_rand"], rel=1e-5)
    assert "val_loss" in epoch_logs[1] and "val_v_rand" not in epoch_logs[1]


def scoring_and_images_of_slices_0_and_2(
    model, watching, writers, epoch_logs, validation_pass, labels, image_every, histogram_freq, shown_segments=None
):
    """Validation and ValidationSliceSummaries of three validation slices, the first and last shown
    (as slices 1 and 7 of a stack), evaluated every epoch."""
    scoring = validation.Validation(
        watching,
        epoch_logs,
        validation_pass,
        labels,
        metrics.LOSSES["bce"],
        metrics.training_metrics(),
        1,
        shown_segments=shown_segments,
    )
    slice_summaries = callbacks.ValidationSliceSummaries(
        writers,
        epoch_logs,
        validation_pass,
        summaries.ShownSlices.of([1, 7], validation_pass.images[[0, 2]], labels[[0, 2]]),
        image_every=image_every,
        histogram_freq=histogram_freq,
        shown_segments=shown_segments,
    )
    return attached(scoring, model), attached(slice_summaries, model)


def test_the_merges_and_splits_of_an_evaluated_epoch_are_drawn_from_the_scorings_own_segments(tmp_path, monkeypatch):
    model, (images, labels) = tiny_model(), slices(count=3)
    drawn = []  # the cell masks the images segmented themselves
    monkeypatch.setattr(
        summaries, "thinned_segments", lambda cells: drawn.append(cells) or metrics.thinned_segments(cells)
    )
    written = {}
    for way, shown_segments in (("the scoring's", {}), ("their own", None)):
        drawn.clear()
        model.optimizer.iterations.assign(0)
        epoch_logs = {}
        with watcher.running() as watching:
            writers = callbacks.SummaryWriters(tmp_path / way, watching)
            validation_pass = validation_pass_of(model, images, [0, 2])
            scoring, slice_summaries = scoring_and_images_of_slices_0_and_2(
                model, watching, writers, epoch_logs, validation_pass, labels, None, 0, shown_segments
            )
            slice_summaries.on_epoch_begin(0)
            model.optimizer.iterations.assign(3)
            slice_summaries.on_train_batch_end(2, {})  # the epoch's last step: its images wait for its end
            scoring.on_epoch_end(0, {"loss": 0.5})
            watching.drain()
            if shown_segments is not None:  # the segments of the two shown slices, at the best V_rand's threshold
                assert [segments.shape for segments in shown_segments[0]] == [images.shape[1:]] * 2
            slice_summaries.on_epoch_end(0, {"loss": 0.5})
            slice_summaries.on_epoch_begin(1)
            model.optimizer.iterations.assign(6)
            scoring.on_epoch_end(1, {"loss": 0.5})
            slice_summaries.on_epoch_end(1, {"loss": 0.5})  # no images due at its end
            writers.on_train_end()
        assert not shown_segments  # handed on and let go, images due or not
        assert len(drawn) == (2 if shown_segments is None else 0)
        written[way], _ = read_events(tmp_path / way / VALIDATION)
    assert written["the scoring's"].keys() == written["their own"].keys()
    for tag, points in written["their own"].items():
        assert [(step, value.tolist()) for step, value in written["the scoring's"][tag]] == [
            (step, value.tolist()) for step, value in points
        ], tag


@pytest.mark.parametrize("image_every", [3, None])  # None: at each epoch's end, the default
def test_the_validation_slices_go_through_the_net_once_per_training_step(tmp_path, image_every):
    model = tiny_model()
    images, labels = slices(count=3)
    validation_pass = validation_pass_of(model, images, [0, 2])
    forward, calls = validation_pass._forward, []
    validation_pass._forward = lambda batch: calls.append(batch.shape) or forward(batch)
    epoch_logs = {}
    with watcher.running() as watching:
        writers = callbacks.SummaryWriters(tmp_path, watching)
        scoring, slice_summaries = scoring_and_images_of_slices_0_and_2(
            model, watching, writers, epoch_logs, validation_pass, labels, image_every, 1
        )
        slice_summaries.on_train_begin()
        assert len(calls) == 2  # the shown slices' images at step 0
        slice_summaries.on_epoch_begin(0)
        model.optimizer.iterations.assign(3)
        slice_summaries.on_train_batch_end(2, {})  # images due at the epoch's last step wait for its end
        logs = {"loss": 0.5}
        scoring.on_epoch_end(0, logs)
        slice_summaries.on_epoch_end(0, logs)  # images, activation histograms and PR curve of the same pass
        writers.on_train_end()
    assert len(calls) == 2 + 3
    assert calls[-1] == (1, 48 + 2 * tiling.CONTEXT, 48 + 2 * tiling.CONTEXT, 1)
    written, _ = read_events(tmp_path / VALIDATION)
    assert [step for step, _ in written[f"{SLICE_GROUP.format(7)}/prediction"]] == [0, 3]
    assert [step for step, _ in written[f"{ACTIVATIONS_GROUP}/output"]] == [3]


def test_validation_slice_summaries_write_images_counts_and_histograms_into_validation(model, tmp_path):
    images, labels = slices()
    epoch_logs = {0: {"loss": 0.5, "val_v_rand_threshold": 0.3}}
    with watcher.running() as watching:
        writers = callbacks.SummaryWriters(tmp_path, watching)
        slice_summaries = attached(
            callbacks.ValidationSliceSummaries(
                writers,
                epoch_logs,
                validation_pass_of(model, images, [0, 1]),
                summaries.ShownSlices.of([4, 9], images, labels),
                image_every=1,
                histogram_freq=1,
            ),
            model,
        )
        slice_summaries.on_train_begin()
        slice_summaries.on_epoch_end(0, epoch_logs[0])
        writers.on_epoch_end(0)
        # TrainingSummaries writes the epoch's scalars there too, through the same writer.
        writers.submit(VALIDATION, 1, lambda: tf.summary.scalar(EPOCH_TAG.format("loss"), 0.5))
        writers.on_train_end()
    assert len(list((tmp_path / VALIDATION).glob("events.out.tfevents.*"))) == 1  # one file per directory and process
    written, plugins = read_events(tmp_path / VALIDATION)
    # In the file, slice by slice in the order shown, each slice's images in this order: the slices'
    # images are made on threads of their own and written after.
    assert [tag for tag in written if tag.startswith("slice_")] == [
        f"{SLICE_GROUP.format(index)}/{kind}"
        for index in (4, 9)
        for kind in ("input", "label", "prediction", "error", "merges_and_splits")
    ]
    assert list(written).index(f"{SHOWN_GROUP}/misclassified_pixel_fraction") < list(written).index("slice_04/input")
    assert list(written).index("slice_09/merges_and_splits") < list(written).index(f"{SHOWN_GROUP}/merges")
    assert slice_summaries.v_rand_threshold == 0.3
    assert {tag for tag, (plugin, _) in plugins.items() if plugin == "histograms"} == {
        f"{ACTIVATIONS_GROUP}/{name}" for name in unet.block_outputs()
    }
    assert [step for step, _ in written[f"{SHOWN_GROUP}/merges"]] == [0]
    assert plugins[f"{PR_CURVE_TAG}/pr_curves"][0] == "pr_curves"


def test_run_summary_writes_the_run_once_and_the_best_scores_each_epoch(tmp_path):
    model = tiny_model()  # its step is set here, which the module's model must not keep
    epoch_logs = {
        0: {"loss": 0.6, "val_misclassified_pixel_fraction": 0.2, "val_v_rand": 0.8},
        1: {"loss": 0.5, "val_misclassified_pixel_fraction": 0.1, "val_v_rand": 0.95},
        2: {"loss": float("nan"), "val_misclassified_pixel_fraction": 0.05},  # the run stops: not its best
    }
    with watcher.running() as watching:
        writers = callbacks.SummaryWriters(tmp_path, watching)
        summary = attached(
            callbacks.RunSummary(
                writers, epoch_logs, "trial", {"loss": "bce"}, {"run/command": "python train.py"}, {"v_rand": 0.9}
            ),
            model,
        )
        summary.on_train_begin()
        for epoch, logs in epoch_logs.items():
            model.optimizer.iterations.assign(100 * (epoch + 1))  # the epoch's last step
            summary.on_epoch_end(epoch, logs)
        writers.on_train_end()
    written, plugins = read_events(tmp_path)
    assert [step for step, _ in written[BEST_TAG.format("v_rand")]] == [100, 200]
    assert [float(value) for _, value in written[BEST_TAG.format("v_rand")]] == pytest.approx([0.9, 0.95])  # from 0.9
    assert [float(value) for _, value in written[BEST_TAG.format("misclassified_pixel_fraction")]] == pytest.approx(
        [0.2, 0.1]
    )
    assert plugins["run/command"][0] == "text"
    assert {plugin for plugin, _ in plugins.values()} >= {"hparams", "custom_scalars"}


def test_checkpoints_keep_the_best_v_rand_and_the_last_finite_epoch_once_the_watcher_scored_it(model, tmp_path):
    epoch_logs = {
        0: {"loss": 0.5, "val_v_rand": 0.8, "val_misclassified_pixel_fraction": 0.2},
        1: {"loss": 0.4, "val_v_rand": 0.7, "val_misclassified_pixel_fraction": 0.1},  # worse V_rand: last only
        2: {"loss": float("nan"), "val_v_rand": 0.9},
    }  # NaN: neither
    scored = threading.Event()
    with watcher.running() as watching:
        checkpointing = attached(checkpoints.Checkpoints(watching, tmp_path, epoch_logs, "v_rand"), model)
        watching.submit(scored.wait)  # the watcher still scoring: the candidate waits, no checkpoint yet
        checkpointing.on_epoch_end(0, epoch_logs[0])
        assert not (tmp_path / LAST).exists() and not (tmp_path / BEST).exists()
        assert [path.name for path in tmp_path.iterdir()] == [rundir.candidate_checkpoint(tmp_path, 0).name]
        scored.set()
        watching.drain()
        best = (tmp_path / BEST).read_bytes()
        assert (tmp_path / LAST).read_bytes() == best  # one save, copied
        checkpointing.on_epoch_end(1, epoch_logs[1])
        watching.drain()
        assert (tmp_path / BEST).read_bytes() == best and (tmp_path / LAST).is_file()
        saved = {name: (tmp_path / name).read_bytes() for name in (BEST, LAST)}
        checkpointing.on_epoch_end(2, epoch_logs[2])
        watching.drain()
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved and checkpointing.best_score == 0.8
    assert sorted(path.name for path in tmp_path.iterdir()) == [BEST, LAST]


def archived_arrays(path):
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as stored, h5py.File(stored) as weights:
        arrays = {}
        weights.visititems(
            lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None
        )
    return arrays


@pytest.mark.parametrize(
    "precision, ema, dropout", [("float32", 0.99, 0.5), ("mixed_float16", 0.0, 0.0)], ids=["ema-dropout", "float16"]
)
def test_the_watchers_checkpoints_hold_what_the_net_itself_saves(tmp_path, precision, ema, dropout):
    # The first candidate is saved by the training thread, the others by the watcher's twin of the
    # net from the values copied at the epoch's end: every variable of the archive must be the net's.
    keras.mixed_precision.set_global_policy(precision)
    try:
        # One built before on this thread: Keras numbers what each thread builds on its own.
        unet.compiled_unet(2, "bce", 1e-2, jit_compile=False, ema=ema, dropout=dropout)
        net = unet.compiled_unet(2, "bce", 1e-2, jit_compile=False, ema=ema, dropout=dropout)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    images = np.random.default_rng(0).random((2, 32, 32, 1), np.float32)
    logs = {"loss": 0.5, "val_misclassified_pixel_fraction": 0.1}
    saved_by_the_net = []
    with watcher.running() as watching:
        saving = attached(
            checkpoints.Checkpoints(watching, tmp_path, {0: logs, 1: logs}, "misclassified_pixel_fraction"), net
        )
        for epoch in (0, 1):
            net.fit(images, images > 0.5, epochs=1, verbose=0)
            saving.on_epoch_end(epoch, logs)
            saved_by_the_net.append(tmp_path / f"net_{epoch}.keras")
            net.save(saved_by_the_net[-1])
            net.fit(images, images > 0.5, epochs=1, verbose=0)  # trains on while the watcher writes
            watching.drain()
            written = archived_arrays(tmp_path / LAST)
            expected = archived_arrays(saved_by_the_net[-1])
            assert written.keys() == expected.keys()
            assert all(np.array_equal(written[name], expected[name]) for name in expected), epoch
    assert not all(np.array_equal(value, archived_arrays(saved_by_the_net[0])[name]) for name, value in written.items())


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_the_step_of_a_checkpoint_read_without_tensorflow_is_the_nets_in_every_precision(tmp_path, precision):
    keras.mixed_precision.set_global_policy(precision)
    try:
        net = unet.compiled_unet(2, "bce", 1e-2, jit_compile=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    images = np.random.default_rng(0).random((3, 32, 32, 1), np.float32)
    net.fit(images, images > 0.5, batch_size=1, epochs=1, verbose=0)
    net.save(tmp_path / LAST)
    assert rundir.checkpoint_step(tmp_path / LAST) == int(net.optimizer.iterations.numpy()) == 3


def test_stop_on_non_finite_loss_names_the_step_and_learning_rate(model):
    stop = attached(callbacks.StopOnNonFiniteLoss(), model)
    stop.on_train_batch_end(0, {"loss": 0.7})
    assert stop.message is None and not model.stop_training
    stop.on_train_batch_end(1, {"loss": float("inf")})
    assert stop.message == "the training loss became inf at step 0 with lr 0.01" and model.stop_training
    model.stop_training = False


def test_averaged_weights_show_the_epoch_end_the_moving_average_and_train_on_the_weights(tmp_path):
    images, labels = crops()
    momentum = 0.8
    keras.utils.set_random_seed(0)
    model = unet.compiled_unet(2, "bce", 1e-2, jit_compile=False, ema=momentum)
    trained, seen_at_epoch_end, seen_at_epoch_begin = [], [], []
    output_bias = lambda: keras.ops.convert_to_numpy(model.get_layer("output").bias).copy()  # noqa: E731
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: trained.append(output_bias()),
        on_epoch_end=lambda epoch, logs: seen_at_epoch_end.append(output_bias()),
        on_epoch_begin=lambda epoch, logs: seen_at_epoch_begin.append(output_bias()),
    )
    model.fit(
        images,
        labels,
        batch_size=BATCH_SIZE,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[unet.AveragedWeights(), recorder],
    )

    average, by_hand = trained[0], []  # Keras starts the average at the first step's weights
    for weights in trained[1:]:
        average = momentum * average + (1 - momentum) * weights
        by_hand.append(average)
    np.testing.assert_allclose(seen_at_epoch_end, [by_hand[BATCHES - 2], by_hand[2 * BATCHES - 2]], rtol=1e-5)
    assert not np.allclose(seen_at_epoch_end[0], trained[BATCHES - 1])
    # The second epoch trains on from the weights of the first one's last step, not from their average.
    np.testing.assert_array_equal(seen_at_epoch_begin[1], trained[BATCHES - 1])


def scores_told_to(line):
    """A callback telling `line` each epoch's validation scores, as callbacks.EpochReport does."""
    return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: line.validated(epoch, logs))


@pytest.mark.parametrize("columns", [200, 60])
def test_the_progress_line_on_a_terminal_is_redrawn_in_place_within_its_width(columns):
    images, labels = crops()
    model = tiny_model()
    controller, terminal_end = os.openpty()
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with open(terminal_end, "w") as terminal:
        line = progress.ProgressLine(2, terminal)
        model.fit(
            images,
            labels,
            batch_size=BATCH_SIZE,
            epochs=2,
            shuffle=False,
            verbose=0,
            validation_data=(images, labels),
            callbacks=[line, scores_told_to(line)],
        )
    output = b""
    while select.select([controller], [], [], 5)[0]:
        try:
            read = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's other end is closed and everything was read
            break
        if not read:
            break
        output += read
    os.close(controller)
    width = min(progress.WIDTH, columns - 1)
    # The terminal turns each newline into \r\n; a lone \r returns to the line's start to redraw it.
    lines = output.decode().replace("\r\n", "\n").removesuffix("\n").split("\n")
    assert len(lines) == 4, lines  # per epoch: the live line, left as its last drawing, and the validation line
    for epoch, (live, validation_line) in enumerate(zip(lines[::2], lines[1::2], strict=True), start=1):
        drawings = [drawing.removesuffix("\x1b[K") for drawing in live.split("\r") if drawing]
        assert all(len(drawing) <= width for drawing in drawings), drawings
        assert drawings[-1].startswith(f"epoch {epoch}/2  step {BATCHES}/{BATCHES}  ")
        if columns < 100:  # cut short to the terminal, between two values
            assert re.search(r"( s/step|\d\.\d{4}) \.\.\.$", drawings[-1]), drawings[-1]
        else:
            assert re.search(r" s/step  loss \d\.\d{4}  misclassified \d\.\d{4}$", drawings[-1]), drawings[-1]
        shown = validation_line.removeprefix("\r").removesuffix("\x1b[K")
        assert re.fullmatch(rf"  epoch {epoch} validation: misclassified \d\.\d{{4}}, loss \d\.\d{{4}}", shown), shown


def test_a_line_cut_to_the_terminal_loses_whole_values_not_digits():
    line = "epoch 1 validation: V_rand 0.2023, V_info 0.5000, pixel error 0.1000, misclassified 0.7532, loss 0.4321"
    assert progress.fitted(line, 200) == line
    assert (
        progress.fitted(line, 100)
        == "epoch 1 validation: V_rand 0.2023, V_info 0.5000, pixel error 0.1000, misclassified 0.7532 ..."
    )
    step = "epoch 1/15  step 20/200  0.550 s/step  loss 0.1234  misclassified 0.0567"
    assert progress.fitted(step, 60) == "epoch 1/15  step 20/200  0.550 s/step  loss 0.1234 ..."
    assert all(len(progress.fitted(step, width)) <= width for width in range(1, 80))


def test_an_event_file_error_is_told_as_the_os_error_it_stands_for_and_a_computations_error_as_itself(tmp_path):
    read_only = tf.errors.PermissionDeniedError(
        None,
        None,
        "{{function_node __wrapped__CreateSummaryFileWriter_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
        f"{tmp_path}/validation; Read-only file system [Op:CreateSummaryFileWriter] name: ",
    )
    with pytest.raises(OSError) as raised, callbacks.writing_to(tmp_path / "validation"):
        raise read_only
    assert (raised.value.strerror, raised.value.filename) == ("Read-only file system", str(tmp_path / "validation"))
    out_of_memory = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[9] [Op:Mul]")
    with pytest.raises(tf.errors.ResourceExhaustedError), callbacks.writing_to(tmp_path / "validation"):
        raise out_of_memory
