"""A tiny run on the real ISBI 2012 data, read back the way TensorBoard reads it."""

import collections
import contextlib
import hashlib
import itertools
import json
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorflow.core.protobuf.config_pb2 import RunMetadata
from tensorflow.tsl.profiler.protobuf import xplane_pb2

import batches
import callbacks
import metrics
import rundir
import runs
import tiffs
import tiling
import train
import validation
from conftest import ISBI_VALIDATION_SLICES, ROOT, TINY_STEPS, read_events, runs_in, tiny_run
from rundir import BEST, CONFIG, LAST
from settings import BEST_SCORES, CHECKPOINT_SCORE
from summaries import (
    ACTIVATIONS_GROUP,
    BATCH_GROUP,
    BEST_TAG,
    EPOCH_TAG,
    EVALUATION_TAG,
    PR_CURVE_TAG,
    SHOWN_GROUP,
    SLICE_GROUP,
    WEIGHTS_GROUP,
)


@pytest.fixture(scope="module")
def read_back(two_run_logdir):
    """{TensorBoard run: (series, plugins)} of the two-run log directory (conftest.read_events)."""
    return {run: read_events(directory) for run, directory in runs_in(two_run_logdir).items()}


@pytest.fixture(scope="module")
def events(read_back):
    """{run: {tag: [(step, value)]}} as TensorBoard reads the log directory."""
    return {run: series for run, (series, _) in read_back.items()}


def tags_of_plugin(read_back, plugin):
    """{run: {tag: plugin content}} of the tags written for `plugin`."""
    return {
        run: {tag: content for tag, (name, content) in plugins.items() if name == plugin}
        for run, (_, plugins) in read_back.items()
    }


def steps(series):
    return [step for step, _ in series]


def test_each_loss_is_its_own_run_with_train_and_validation_subdirectories(events):
    assert sorted(events) == sorted(
        f"{loss}_lr1e-3{part}" for loss in ("bce", "wbce") for part in ("", "/train", "/validation")
    )


@pytest.mark.parametrize("loss", ["bce", "wbce"])
def test_epoch_curves_for_training_and_validation(events, loss):
    for part in ("train", "validation"):
        run = events[f"{loss}_lr1e-3/{part}"]
        for metric in ("loss", "accuracy", "misclassified_pixel_fraction", "membrane_dice"):
            series = run[EPOCH_TAG.format(metric)]
            assert steps(series) == [0, 1]  # every epoch, although neither ends on an update_freq step
            assert all(np.isfinite(value) for _, value in series)
    fractions = [
        float(v) for _, v in events[f"{loss}_lr1e-3/validation"][EPOCH_TAG.format("misclassified_pixel_fraction")]
    ]
    assert all(0 <= f <= 1 for f in fractions)


def profiled_steps(run_dir):
    """The steps marked in the one trace under `run_dir`'s train run, in TensorFlow's layout
    (plugins/profile/<time>/<host>.xplane.pb), which TensorBoard's Profile tab reads."""
    (trace,) = (run_dir / rundir.TRAIN).glob(f"{rundir.PROFILES}/profile/*/*.xplane.pb")
    marked = []
    for plane in xplane_pb2.XSpace.FromString(trace.read_bytes()).planes:
        marks = {key for key, event in plane.event_metadata.items() if event.name == callbacks.PROFILED_STEP}
        step_num = {key for key, stat in plane.stat_metadata.items() if stat.name == "step_num"}
        marked += [
            stat.int64_value or stat.uint64_value
            for line in plane.lines
            for event in line.events
            if event.metadata_id in marks
            for stat in event.stats
            if stat.metadata_id in step_num
        ]
    return sorted(marked)


def test_profile_batch_traces_those_steps_where_the_profile_tab_reads_them(two_run_logdir):
    """The bce run's --profile-batch 2,3: a mark for each of the two steps, and no event file beside
    the run's own (a second one in a directory would stop curves on TensorBoard's older loader)."""
    assert profiled_steps(two_run_logdir / "bce_lr1e-3") == [2, 3]
    assert len(list((two_run_logdir / "bce_lr1e-3" / rundir.TRAIN).glob("events.out.tfevents.*"))) == 1
    assert not list((two_run_logdir / "wbce_lr1e-3").rglob("*.xplane.pb"))


# Slow (10-25 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_a_run_interrupted_while_profiling_keeps_the_steps_traced(tmp_path, small_isbi_dir, monkeypatch):
    """Ctrl-C before step 6 of a run profiling steps 4 to 6, in its second epoch (steps as
    TensorBoard counts them, not the epoch's batches): steps 4 and 5 are written, and the profiler
    is stopped, so that another can start in the process."""
    checks = itertools.count(1)

    def interrupted_before_step_6():
        # StopBetweenSteps checks at each epoch's start and before each step: the 8th is step 6's.
        if next(checks) == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks, "stop_if_interrupted", interrupted_before_step_6)
    assert tiny_run(small_isbi_dir, tmp_path, "--profile-batch", "4,6") == 130
    assert profiled_steps(tmp_path / "bce_lr1e-3") == [4, 5]
    tf.profiler.experimental.start(str(tmp_path / "another"))
    tf.profiler.experimental.stop()


def test_the_challenges_scores_are_due_at_the_first_epoch_every_nth_after_it_and_the_last():
    assert [epoch for epoch in range(15) if validation.evaluated(epoch, 5, 15)] == [0, 5, 10, 14]
    assert [epoch for epoch in range(11) if validation.evaluated(epoch, 5, 11)] == [0, 5, 10]
    assert [epoch for epoch in range(3) if validation.evaluated(epoch, 1, 3)] == [0, 1, 2]
    assert not any(validation.evaluated(epoch, 0, 3) for epoch in range(3))


def test_isbi_scores_every_eval_every_epochs_beside_the_validation_loss(events):
    # wbce's --eval-every 2 over 2 epochs: the first and the last.
    for run, expected_steps in (("bce_lr1e-3/validation", [0, 1]), ("wbce_lr1e-3/validation", [0, 1])):
        for score in ("v_rand", "v_info", "pixel_error"):
            series = events[run][EPOCH_TAG.format(score)]
            assert steps(series) == expected_steps
            assert all(0.0 <= float(value) <= 1.0 for _, value in series)
            assert all(
                float(value) in np.float32(metrics.ISBI_THRESHOLDS)
                for _, value in events[run][EPOCH_TAG.format(f"{score}_threshold")]
            )
    assert EPOCH_TAG.format("v_rand") not in events["bce_lr1e-3/train"]
    best = events["bce_lr1e-3"][BEST_TAG.format("v_rand")]
    # At the step each evaluation was made, as the dashboard's curves beside them.
    assert steps(best) == steps(events["bce_lr1e-3/validation"][EVALUATION_TAG.format("v_rand")]) == [3, TINY_STEPS]
    assert float(best[-1][1]) == max(
        float(value) for _, value in events["bce_lr1e-3/validation"][EPOCH_TAG.format("v_rand")]
    )


def test_validation_scores_are_those_of_that_epochs_model_on_the_slices_as_predict_py_predicts_them(
    events, two_run_logdir, isbi_dir
):
    # validation.Validation stands in for Keras' validation_data, on whole slices in predict.py's mirrored context;
    # last.keras holds the last epoch's model.
    model = keras.models.load_model(two_run_logdir / "bce_lr1e-3" / LAST, compile=False)
    stacks = tiffs.load_training_stacks(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif")
    images, labels = (
        np.stack([read(index) for index in ISBI_VALIDATION_SLICES]) for read in (stacks.image, stacks.mask)
    )
    probabilities = tiling.predict_stack(model, images)[..., np.newaxis]
    truth = labels[..., np.newaxis].astype(np.float32)
    expected = {"loss": float(np.mean(keras.losses.binary_crossentropy(truth, probabilities)))}
    for metric in metrics.training_metrics():
        metric.update_state(truth, probabilities)
        expected[metric.name] = float(metric.result())
    validation = events["bce_lr1e-3/validation"]
    for name in ("loss", "accuracy", "misclassified_pixel_fraction", "membrane_dice"):
        ((step, value),) = [item for item in validation[EPOCH_TAG.format(name)] if item[0] == 1]
        assert float(value) == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert steps(validation[EVALUATION_TAG.format("loss")]) == [3, TINY_STEPS]


def test_logged_isbi_scores_are_those_of_the_model_at_that_epoch(events, two_run_logdir, isbi_dir):
    # best.keras is the model of the first epoch with the best checkpoint score (V_rand).
    validation = events["bce_lr1e-3/validation"]
    better, _ = BEST_SCORES[CHECKPOINT_SCORE]
    scores = [float(value) for _, value in validation[EPOCH_TAG.format(CHECKPOINT_SCORE)]]
    epoch = scores.index(better(scores))
    model = keras.models.load_model(two_run_logdir / "bce_lr1e-3" / BEST, compile=False)
    stacks = tiffs.load_training_stacks(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif")
    images, labels = (
        np.stack([read(index) for index in ISBI_VALIDATION_SLICES]) for read in (stacks.image, stacks.mask)
    )
    probabilities = tiling.predict_stack(model, images)
    expected = metrics.isbi_scores(labels, probabilities)
    for score in ("v_rand", "v_info", "pixel_error"):
        assert float(validation[EPOCH_TAG.format(score)][epoch][1]) == pytest.approx(expected[score], rel=1e-5)


def test_batch_scalars_at_the_global_step(events):
    run = events["bce_lr1e-3/train"]
    for name in ("loss", "misclassified_pixel_fraction", "membrane_dice", "accuracy", "learning_rate"):
        assert steps(run[f"{BATCH_GROUP}/{name}"]) == [2, 4, 6]
    assert [float(value) for _, value in run[f"{BATCH_GROUP}/learning_rate"]] == pytest.approx([1e-3] * 3)
    assert not any(tag.startswith("batch_") for tag in run)  # Keras' running means are not written


def test_validation_curves_also_against_the_global_step(events):
    run = events["wbce_lr1e-3/validation"]
    assert steps(run[EVALUATION_TAG.format("loss")]) == [3, 6]
    assert steps(run[EVALUATION_TAG.format("v_rand")]) == [3, 6]
    assert [value for _, value in run[EVALUATION_TAG.format("loss")]] == [
        value for _, value in run[EPOCH_TAG.format("loss")]
    ]


def test_weight_histograms_for_every_layer_each_epoch(events):
    run = events["bce_lr1e-3/train"]
    for layer in ("enc1_conv1", "bottleneck_conv2", "dec1_up", "output"):
        histogram = run[f"{WEIGHTS_GROUP}/{layer}/kernel"]
        assert steps(histogram) == [3, 6]
        assert histogram[0][1].shape[1] == 3  # (bucket left, bucket right, count) rows


def test_forward_pass_graph_with_the_layer_names(events):
    ((step, value),) = events["bce_lr1e-3/train"]["unet"]  # a RunMetadata, as trace_export writes it
    metadata = RunMetadata.FromString(value.item())  # a blob sequence of one, as the Graphs tab reads it
    nodes = [node.name for graph in metadata.function_graphs for node in graph.pre_optimization_graph.node]
    for layer in ("enc1_conv1", "enc4_pool", "bottleneck_conv2", "dec1_up", "dec1_concat", "output"):
        assert any(f"/{layer}" in name for name in nodes), layer
    assert len(metadata.function_graphs) == 1  # the forward pass alone, nothing else the process ran


def test_prediction_images_and_their_error_scalars_share_the_global_step(events):
    run = events["bce_lr1e-3/validation"]
    image_steps = list(range(0, TINY_STEPS + 1, 2))
    for name in ("misclassified_pixel_fraction", "merges", "splits"):
        assert steps(run[f"{SHOWN_GROUP}/{name}"]) == image_steps
    for index in ISBI_VALIDATION_SLICES:
        for kind in ("prediction", "error", "merges_and_splits"):
            assert steps(run[f"{SLICE_GROUP.format(index)}/{kind}"]) == image_steps
        assert steps(run[f"{SLICE_GROUP.format(index)}/input"]) == [0]
        assert steps(run[f"{SLICE_GROUP.format(index)}/label"]) == [0]


def test_a_weighted_loss_shows_its_weight_maps_and_logs_the_weighted_validation_loss(events, two_run_logdir, isbi_dir):
    run = events["wbce_lr1e-3/validation"]
    assert f"{SLICE_GROUP.format(15)}/loss_weights" not in events["bce_lr1e-3/validation"]
    stacks = tiffs.load_training_stacks(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif")
    weights = batches.border_weights(stacks.mask(15))
    assert steps(run[f"{SLICE_GROUP.format(15)}/loss_weights"]) == [0]
    shown = decode(run[f"{SLICE_GROUP.format(15)}/loss_weights"][0][1]) / 255.0
    assert np.abs(shown - weights / weights.max()).max() <= 1 / 255 + 1e-6
    model = keras.models.load_model(two_run_logdir / "wbce_lr1e-3" / LAST, compile=False)
    images, labels = (
        np.stack([read(index) for index in ISBI_VALIDATION_SLICES]) for read in (stacks.image, stacks.mask)
    )
    probabilities = tiling.predict_stack(model, images)[..., np.newaxis]
    per_pixel = keras.losses.binary_crossentropy(labels[..., np.newaxis].astype(np.float32), probabilities)
    expected = np.mean([batches.border_weights(label) for label in labels] * np.asarray(per_pixel))
    assert float(run[EPOCH_TAG.format("loss")][-1][1]) == pytest.approx(float(expected), rel=1e-5)


def decode(image_summary_value, channels=1):
    width, height, png = image_summary_value
    image = tf.io.decode_png(png, channels=channels).numpy()
    assert image.shape[:2] == (int(height), int(width))
    return image[..., 0] if channels == 1 else image


def test_images_show_the_whole_slice_on_a_fixed_scale(events):
    run = events["bce_lr1e-3/validation"]
    label = decode(run[f"{SLICE_GROUP.format(15)}/label"][0][1])
    assert label.shape == (512, 512)
    assert set(np.unique(label)) == {0, 255} and 0.7 < (label == 255).mean() < 0.85
    prediction = decode(run[f"{SLICE_GROUP.format(15)}/prediction"][-1][1])
    assert prediction.shape == (512, 512)


def test_images_at_an_epoch_end_are_the_prediction_of_that_epochs_model(events, two_run_logdir, isbi_dir):
    # The images of the epoch's last step come from the epoch end's validation pass (predict.py's mirrored
    # context), and last.keras holds the weights of that step.
    ((step, value),) = [
        item
        for item in events["bce_lr1e-3/validation"][f"{SLICE_GROUP.format(15)}/prediction"]
        if item[0] == TINY_STEPS
    ]
    model = keras.models.load_model(two_run_logdir / "bce_lr1e-3" / LAST, compile=False)
    stacks = tiffs.load_training_stacks(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif")
    probability = tiling.predict_slice(model, stacks.image(15))
    assert np.abs(decode(value) / 255.0 - probability).max() <= 1 / 255 + 1e-6


def test_error_overlay_paints_false_and_missed_membrane_on_the_em_slice(events):
    run = events["bce_lr1e-3/validation"]
    wrong = 0
    for index in ISBI_VALIDATION_SLICES:
        label = decode(run[f"{SLICE_GROUP.format(index)}/label"][0][1]) == 255
        prediction = decode(run[f"{SLICE_GROUP.format(index)}/prediction"][-1][1]).astype(int)
        predicted_cell = prediction >= 128
        clear = np.abs(prediction - 127.5) > 2  # 8-bit rounding may move values next to 0.5 across it
        red, green, blue = np.moveaxis(
            decode(run[f"{SLICE_GROUP.format(index)}/error"][-1][1], channels=3).astype(int), -1, 0
        )
        false_membrane, missed_membrane = red - green > 100, green - red > 100
        np.testing.assert_array_equal(false_membrane[clear], (label & ~predicted_cell)[clear])
        np.testing.assert_array_equal(missed_membrane[clear], (~label & predicted_cell)[clear])
        assert np.all(np.abs(red - blue)[~(false_membrane | missed_membrane)] == 0)  # grey elsewhere
        wrong += (false_membrane | missed_membrane).sum()
    # The scalar is the fraction of painted pixels over the shown slices.
    assert float(run[f"{SHOWN_GROUP}/misclassified_pixel_fraction"][-1][1]) == pytest.approx(
        wrong / (3 * 512 * 512), abs=1e-6
    )


def test_images_per_step_are_few_and_small(events):
    run = events["bce_lr1e-3/validation"]
    images = [(step, value) for tag in run if tag.startswith("slice_") for step, value in run[tag]]
    per_step = collections.Counter(step for step, _ in images)
    assert per_step == {0: 15, 2: 9, 4: 9, 6: 9}  # 3 slices: prediction, error, merges and splits; input and label once
    # A 512x512 RGB image is 768 KiB raw; the error overlay's 16 grey levels keep it far below.
    assert max(len(value[2]) for _, value in images) < 512 * 1024


def test_activation_histograms_and_membrane_pr_curve_at_each_epoch_end(events):
    run = events["bce_lr1e-3/validation"]
    for layer in ("enc1_conv2", "enc4_conv2", "bottleneck_conv2", "dec4_conv2", "dec1_conv2", "output"):
        assert steps(run[f"{ACTIVATIONS_GROUP}/{layer}"]) == [3, 6]
    output = run[f"{ACTIVATIONS_GROUP}/output"][-1][1]
    assert output[:, 0].min() >= 0 and output[:, 1].max() <= 1  # sigmoid outputs
    curves = run[f"{PR_CURVE_TAG}/pr_curves"]
    assert steps(curves) == [3, 6]
    precision, recall = curves[-1][1][4], curves[-1][1][5]
    assert len(recall) == 51 and np.all((0 <= recall) & (recall <= 1)) and recall[0] == pytest.approx(1.0)
    assert np.all((0 <= precision) & (precision <= 1))


def test_hparams_for_the_hparams_tab(read_back):
    for loss in ("bce", "wbce"):
        content = tags_of_plugin(read_back, hparams_metadata.PLUGIN_NAME)[f"{loss}_lr1e-3"]
        session = hparams_metadata.parse_session_start_info_plugin_data(
            content[hparams_metadata.SESSION_START_INFO_TAG]
        )
        assert session.hparams["loss"].string_value == loss
        assert session.hparams["lr"].number_value == pytest.approx(1e-3)
        assert session.hparams["filters"].number_value == 4
        assert session.hparams["augment_rotation_degrees"].number_value == 180
        experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
        assert {(metric.name.group, metric.name.tag) for metric in experiment.metric_infos} >= {
            ("", BEST_TAG.format("misclassified_pixel_fraction")),
            ("validation", EPOCH_TAG.format("misclassified_pixel_fraction")),
            ("", BEST_TAG.format("v_rand")),
            ("validation", EPOCH_TAG.format("v_rand")),
            ("validation", EPOCH_TAG.format("v_info")),
            ("validation", EPOCH_TAG.format("pixel_error")),
        }


def test_best_validation_fraction_per_epoch(events):
    for loss in ("bce", "wbce"):
        best = events[f"{loss}_lr1e-3"][BEST_TAG.format("misclassified_pixel_fraction")]
        epochs = [
            float(value)
            for _, value in events[f"{loss}_lr1e-3/validation"][EPOCH_TAG.format("misclassified_pixel_fraction")]
        ]
        evaluations = events[f"{loss}_lr1e-3/validation"][EVALUATION_TAG.format("misclassified_pixel_fraction")]
        assert steps(best) == steps(evaluations) == [3, TINY_STEPS]
        assert float(best[-1][1]) == pytest.approx(min(epochs))


def test_text_tab_records_command_versions_data_and_split(events, isbi_dir):
    run = events["bce_lr1e-3"]
    text = {
        tag: run[tag][0][1].item().decode()
        for tag in ("run/command", "run/configuration", "run/versions", "run/data", "run/split")
    }
    assert "python train.py" in text["run/command"] and "--loss bce" in text["run/command"]
    assert f"| tensorflow | `{tf.__version__}` |" in text["run/versions"]
    assert "project commit" in text["run/versions"]
    assert hashlib.sha256((isbi_dir / "train-volume.tif").read_bytes()).hexdigest() in text["run/data"]
    assert "| image scaling | `uint8 values: 8-bit, divided by 255` |" in text["run/data"]
    assert "| labels polarity | `cells-high` |" in text["run/data"]
    assert "| validation slices | `5,15,25` |" in text["run/split"]
    assert "| crop | `64` |" in text["run/configuration"]


def test_summary_prints_one_row_per_run(two_run_logdir, events, capsys):
    assert train.main(["--summary", str(two_run_logdir)]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == list(runs.COLUMNS)
    assert [row.split()[:4] for row in rows] == [
        ["bce_lr1e-3", "bce", "1e-3", "6/6"],
        ["wbce_lr1e-3", "wbce", "1e-3", "6/6"],
    ]
    bce = dict(zip(runs.COLUMNS, rows[0].split(), strict=True))
    epochs = [float(v) for _, v in events["bce_lr1e-3/validation"][EPOCH_TAG.format("misclassified_pixel_fraction")]]
    assert float(bce["best_val_mpf"]) == pytest.approx(min(epochs), abs=1e-4)
    assert float(bce["last_val_mpf"]) == pytest.approx(epochs[-1], abs=1e-4)
    v_rands = [float(v) for _, v in events["bce_lr1e-3/validation"][EPOCH_TAG.format("v_rand")]]
    assert float(bce["best_val_v_rand"]) == pytest.approx(max(v_rands), abs=1e-4)


@pytest.mark.parametrize("run", ["bce_lr1e-3", "wbce_lr1e-3"])
def test_best_checkpoint_is_the_epoch_of_the_best_v_rand_and_last_the_last_epoch(two_run_logdir, events, run):
    v_rands = events[f"{run}/validation"][EVALUATION_TAG.format("v_rand")]  # wbce's every second epoch only
    best_step = max(v_rands, key=lambda point: float(point[1]))[0]  # the first of equal ones
    assert rundir.checkpoint_step(two_run_logdir / run / rundir.BEST) == best_step
    assert rundir.checkpoint_step(two_run_logdir / run / rundir.LAST) == TINY_STEPS
    assert not list((two_run_logdir / run).glob(".*.partial*"))  # every candidate promoted or removed


def test_summary_groups_the_runs_that_differ_only_in_seed_and_marks_unfinished_ones(two_run_logdir, tmp_path, capsys):
    """Real event files under configs changed by hand: the wbce run stands in for a second seed of
    the bce setting, a copy of it planned for more epochs for an unfinished run of another."""
    for name, source, changes in (
        ("a", "bce_lr1e-3", {}),
        ("b", "wbce_lr1e-3", {"loss": "bce", "ema": 0.0, "seed": 1}),
        ("c", "wbce_lr1e-3", {"epochs": 4}),
        ("d", "wbce_lr1e-3", {"epochs": 4, "loss": "mse"}),
    ):
        shutil.copytree(two_run_logdir / source, tmp_path / name)
        config = json.loads((tmp_path / name / rundir.CONFIG).read_text())
        (tmp_path / name / rundir.CONFIG).write_text(json.dumps({**config, **changes}))
    (tmp_path / "d" / rundir.LAST).unlink()  # killed (by the kernel's OOM killer, say) before its first checkpoint
    assert train.main(["--summary", str(tmp_path)]) == 0
    runs_part, settings_part = capsys.readouterr().out.split("\n\nby setting (runs that differ only in --seed):\n")
    _, *rows, unfinished, no_checkpoint = runs_part.strip().splitlines()
    cells = {row.split()[0]: row.split() for row in rows}
    assert [cells[name][3] for name in "abcd"] == ["6/6", "6/6", "6/12*", "6/12!"]
    assert unfinished == "* unfinished: stopped before its epochs; continue it with python train.py --resume <run>"
    assert no_checkpoint == "! stopped before its first checkpoint: nothing to resume; remove it and start it anew"
    _, bce, wbce, mse = (re.split(r"\s{2,}", row) for row in settings_part.strip().splitlines())
    assert bce[:2] == ["loss bce ema 0.0 epochs 2", "2"]
    assert wbce[:2] == ["loss wbce ema 0.9 epochs 4", "1 (1 unfinished)"]
    assert mse[:2] == ["loss mse ema 0.9 epochs 4", "1 (1 unfinished)"]
    for column, first in ((4, 2), (6, 5)):  # best V_rand, best misclassified fraction: mean, lowest, highest
        best = [float(cells[name][column]) for name in ("a", "b")]
        assert [float(value) for value in bce[first : first + 3]] == pytest.approx(
            [sum(best) / 2, min(best), max(best)], abs=1e-4
        )
    assert float(cells["a"][6]) != float(cells["b"][6])
    with rundir.locked(tmp_path / "a"):  # trained further: --resume raises its planned steps once the net is loaded
        assert train.main(["--summary", str(tmp_path)]) == 0
    runs_part, settings_part = capsys.readouterr().out.split("\n\nby setting (runs that differ only in --seed):\n")
    assert runs_part.splitlines()[1].split()[:4] == ["a", "bce", "1e-3", "6/6+"]
    assert re.split(r"\s{2,}", settings_part.splitlines()[1])[:2] == ["loss bce ema 0.0 epochs 2", "2 (1 unfinished)"]
    # A third run of the setting in its first epoch, not evaluated yet: the statistics are of the others.
    shutil.copytree(tmp_path / "a", tmp_path / "0")
    shutil.rmtree(tmp_path / "0" / rundir.VALIDATION)
    assert train.main(["--summary", str(tmp_path)]) == 0
    _, settings_part = capsys.readouterr().out.split("\n\nby setting (runs that differ only in --seed):\n")
    with_it = re.split(r"\s{2,}", settings_part.splitlines()[1])
    assert with_it[0] == "loss bce ema 0.0 epochs 2" and with_it[2:] == bce[2:]


def test_summary_counts_the_steps_of_last_keras_which_a_kill_can_leave_an_epoch_behind_the_curves(
    two_run_logdir, tmp_path, capsys
):
    """Killed between its last epoch's summaries and that epoch's checkpoint: the curves reach the
    last step, last.keras the epoch before. --resume and sweep.py go on from last.keras, and
    --summary says the run is unfinished."""
    run_dir = tmp_path / "a"
    shutil.copytree(two_run_logdir / "bce_lr1e-3", run_dir)
    model = keras.models.load_model(run_dir / LAST)
    model.optimizer.iterations.assign(TINY_STEPS // 2)
    model.save(run_dir / LAST)
    assert train.main(["--summary", str(tmp_path)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:4] == ["a", "bce", "1e-3", f"{TINY_STEPS // 2}/{TINY_STEPS}*"]


def test_summary_of_an_empty_directory_says_so(tmp_path, capsys):
    assert train.main(["--summary", str(tmp_path)]) == 2
    assert "no runs in" in capsys.readouterr().err


def test_run_directory_holds_config_and_best_checkpoint(two_run_logdir):
    run_dir = two_run_logdir / "bce_lr1e-3"
    config = json.loads((run_dir / CONFIG).read_text())
    assert config["loss"] == "bce" and config["lr"] == 1e-3 and config["filters"] == 4
    assert config["val_slices"] == [5, 15, 25] and len(config["train_slices"]) == 27
    assert config["precision"] == "float32"
    assert (run_dir / BEST).stat().st_size > 0


def test_a_second_run_with_the_same_name_gets_its_own_directory(tmp_path):
    # Two real runs of one name starting together: tests/test_resume.py.
    with contextlib.ExitStack() as held:
        first = rundir.start(tmp_path, "wbce_lr1e-3", {"loss": "wbce"}, held)
        (first / LAST).write_bytes(b"weights")
        before = {path: path.read_bytes() for path in first.rglob("*")}
        second = rundir.start(tmp_path, "wbce_lr1e-3", {"loss": "wbce", "seed": 1}, held)
    assert second == tmp_path / "wbce_lr1e-3_2" and rundir.read_config(second)["seed"] == 1
    assert rundir.read_config(second)["run_dir"] == str(second)
    assert {path: path.read_bytes() for path in first.rglob("*")} == before


@pytest.mark.parametrize(
    "lr, name",
    [
        (1e-4, "bce_lr1e-4"),
        (3e-4, "bce_lr3e-4"),
        (0.001, "bce_lr1e-3"),
        (1.5e-4, "bce_lr1.5e-4"),
        (1.00001e-4, "bce_lr1.00001e-4"),
    ],
)
def test_run_names_keep_distinct_learning_rates_apart(lr, name):
    assert rundir.run_name("bce", lr) == name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--crop", "100"], "not a multiple of 16"),
        (["--lr", "-1"], "must be a finite number from 1.2e-38 to 3.403e+38 (what float32 holds)"),
        (["--lr", "1e39"], "must be a finite number from 1.2e-38 to 3.403e+38 (what float32 holds)"),
        (["--lr", "fast"], "is not a float"),
        (["--lr", "nan"], "must be a finite number from 1.2e-38"),
        (["--lr", "inf"], "must be a finite number from 1.2e-38"),
        (["--epochs", "0"], "must be a finite number greater than 0"),
        (["--seed", "-1"], "must be a finite number from 0 to 4294967295"),
        (["--val-slices", ","], "names no slice"),
        (["--val-slices", "3,3"], "names a slice twice"),
        (["--val-slices", "-2"], "holds a negative index"),
        (["--loss", "hinge"], "invalid choice: 'hinge' (choose from 'bce', 'mse', 'dice', 'bce_dice', 'wbce')"),
        (["--val-slices", "5,x"], "comma-separated list"),
        (["--profile-batch", "0"], "is not START,STOP with 1 <= START <= STOP"),
        (["--profile-batch", "15,10"], "is not START,STOP with 1 <= START <= STOP"),
        (["--profile-batch", "1,2,3"], "is not START,STOP with 1 <= START <= STOP"),
        (["--profile-batch", "ten"], "is not START,STOP with 1 <= START <= STOP"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_bad_data_is_reported_without_a_traceback(tmp_path):
    images = tmp_path / "images.tif"
    images.write_bytes(b"II*\x00garbage")
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--images",
            str(images),
            "--labels",
            str(images),
            "--logdir",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"train.py: error: {images} is not a readable TIFF" in result.stderr
    assert not (tmp_path / "logs").exists()
    assert images.read_bytes() == b"II*\x00garbage"


def test_comparison_dashboard_charts_only_tags_the_runs_have(events):
    layouts = [
        layout_pb2.Layout.FromString(events[run][custom_scalar_metadata.CONFIG_SUMMARY_TAG][0][1].item())
        for run in ("bce_lr1e-3", "wbce_lr1e-3")
    ]
    assert layouts[0] == layouts[1]
    first, *_ = layouts[0].category
    assert first.title.startswith("Which run learns better")
    assert [chart.title.split(" (")[0].split(":")[0] for chart in first.chart] == [
        "misclassified-pixel fraction",
        "V_rand, the ISBI challenge's main score",
        "V_info",
        "pixel error, 1 - best F-score of cells",
        "loss",
        "learning rate",
    ]
    scalar_tags = {
        tag
        for run in events.values()
        for tag, series in run.items()
        if series and series[0][1].ndim == 0 and series[0][1].dtype != object
    }
    for category in layouts[0].category:
        for chart in category.chart:
            for pattern in chart.multiline.tag:
                assert [tag for tag in scalar_tags if re.fullmatch(pattern, tag)], (chart.title, pattern)


def test_time_series_groups_put_curves_and_images_before_histograms(read_back):
    # The Time Series tab groups tags by their first "/" part, sorts the groups by name (the same
    # order as Python's for these names) and opens the first two.
    groups = {
        plugin: {tag.split("/")[0] for tags in tags_of_plugin(read_back, plugin).values() for tag in tags}
        for plugin in ("scalars", "images", "histograms")
    }
    order = sorted(set().union(*groups.values()))
    assert groups["histograms"] == {"unet"} and order[-1] == "unet"
    assert order[:2] == [BEST_TAG.format("misclassified_pixel_fraction"), BEST_TAG.format("v_rand")]
    assert {"slice_05", "slice_15", "slice_25"} <= groups["images"]


def test_summary_tells_apart_runs_on_other_data_or_other_validation_slices(two_run_logdir, tmp_path, capsys):
    recorded = json.loads((two_run_logdir / "bce_lr1e-3" / rundir.CONFIG).read_text())
    for name, changes, images_sha256 in (
        ("a", {}, recorded["data_files"]["images_sha256"]),
        ("b", {"seed": 1, "val_slices": [0, 7]}, recorded["data_files"]["images_sha256"]),
        ("c", {"seed": 2}, "0123456789abcdef"),  # another images stack
        ("d", {"seed": 3}, recorded["data_files"]["images_sha256"]),  # a's setting again
    ):
        shutil.copytree(two_run_logdir / "bce_lr1e-3", tmp_path / name)
        data_files = {**recorded["data_files"], "images_sha256": images_sha256}
        (tmp_path / name / rundir.CONFIG).write_text(json.dumps({**recorded, **changes, "data_files": data_files}))
    assert train.main(["--summary", str(tmp_path)]) == 0
    settings_part = capsys.readouterr().out.split("\n\nby setting (runs that differ only in --seed):\n")[1]
    _, *groups = (re.split(r"\s{2,}", row)[:2] for row in settings_part.strip().splitlines())
    images, labels = recorded["data_files"]["images_sha256"][:8], recorded["data_files"]["labels_sha256"][:8]
    assert groups == [
        [f"val_slices 5,15,25 data {images}/{labels}", "2"],
        [f"val_slices 0,7 data {images}/{labels}", "1"],
        [f"val_slices 5,15,25 data 01234567/{labels}", "1"],
    ]
