"""A tiny run on the real ISBI 2012 data, read back the way TensorBoard reads it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import plugin_event_multiplexer

import train
from conftest import ROOT, TINY, TINY_STEPS

@pytest.fixture(scope="module")
def events(two_run_logdir):
    """{run: {tag: [(step, value)]}} as TensorBoard's multiplexer reads the log directory."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    multiplexer.AddRunsFromDirectory(str(two_run_logdir))
    multiplexer.Reload()
    return {
        run: {tag: [(event.step, tf.make_ndarray(event.tensor_proto)) for event in multiplexer.Tensors(run, tag)]
              for tag in tags["tensors"]}
        for run, tags in multiplexer.Runs().items()
    }


def steps(series):
    return [step for step, _ in series]


def test_each_loss_is_its_own_run_with_train_validation_and_image_subdirectories(events):
    assert sorted(events) == sorted(f"{loss}_lr1e-3/{part}" for loss in ("bce", "mse")
                                    for part in ("train", "validation", "validation_slices"))


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_epoch_curves_for_training_and_validation(events, loss):
    for part in ("train", "validation"):
        run = events[f"{loss}_lr1e-3/{part}"]
        for metric in ("loss", "accuracy", "misclassified_pixel_fraction", "membrane_dice"):
            series = run[f"epoch_{metric}"]
            assert steps(series) == [0, 1]  # every epoch, although neither ends on an update_freq step
            assert all(np.isfinite(value) for _, value in series)
    fractions = [float(v) for _, v in events[f"{loss}_lr1e-3/validation"]["epoch_misclassified_pixel_fraction"]]
    assert all(0 <= f <= 1 for f in fractions)


def test_batch_scalars_at_the_global_step(events):
    run = events["bce_lr1e-3/train"]
    assert steps(run["batch_loss"]) == [2, 4, 6]
    assert steps(run["batch_misclassified_pixel_fraction"]) == [2, 4, 6]


def test_weight_histograms_for_every_layer_each_epoch(events):
    run = events["bce_lr1e-3/train"]
    for layer in ("enc1_conv1", "bottleneck_conv2", "dec1_up", "output"):
        histogram = run[f"{layer}/kernel/histogram"]
        assert steps(histogram) == [0, 1]
        assert histogram[0][1].shape[1] == 3  # (bucket left, bucket right, count) rows


def test_keras_model_graph_is_written(events):
    (step, value), = events["bce_lr1e-3/train"]["keras"]
    config = json.loads(value.item())
    assert [layer["name"] for layer in config["config"]["layers"]][-1] == "output"


def test_prediction_images_and_their_error_scalar_share_the_global_step(events):
    run = events["bce_lr1e-3/validation_slices"]
    image_steps = list(range(0, TINY_STEPS + 1, 2))
    assert steps(run["misclassified_pixel_fraction"]) == image_steps
    for index in (5, 15, 25):
        assert steps(run[f"slice_{index:02d}/prediction"]) == image_steps
        assert steps(run[f"slice_{index:02d}/error"]) == image_steps
        assert steps(run[f"slice_{index:02d}/input"]) == [0]
        assert steps(run[f"slice_{index:02d}/label"]) == [0]


def decode(image_summary_value):
    width, height, png = image_summary_value
    image = tf.io.decode_png(png).numpy()[..., 0]
    assert image.shape == (int(height), int(width))
    return image


def test_images_show_the_whole_slice_on_a_fixed_scale(events, isbi_dir):
    run = events["bce_lr1e-3/validation_slices"]
    label = decode(run["slice_15/label"][0][1])
    assert label.shape == (512, 512)
    assert set(np.unique(label)) == {0, 255} and 0.7 < (label == 255).mean() < 0.85
    error = decode(run["slice_15/error"][-1][1])
    assert set(np.unique(error)) <= {0, 255}
    # The scalar is the fraction of white error pixels over the shown slices.
    errors = np.concatenate([decode(run[f"slice_{i:02d}/error"][-1][1]).ravel() for i in (5, 15, 25)])
    assert float(run["misclassified_pixel_fraction"][-1][1]) == pytest.approx((errors == 255).mean(), abs=1e-6)


def test_run_directory_holds_config_and_best_checkpoint(two_run_logdir):
    run_dir = two_run_logdir / "bce_lr1e-3"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["loss"] == "bce" and config["lr"] == 1e-3 and config["filters"] == 4
    assert config["val_slices"] == [5, 15, 25] and len(config["train_slices"]) == 27
    assert config["precision"] == "float32"
    assert (run_dir / "best.keras").stat().st_size > 0


def test_a_second_run_with_the_same_name_gets_its_own_directory(tmp_path, isbi_dir):
    logdir = tmp_path / "logs"
    assert train.main(TINY + ["--epochs", "1", "--loss", "mse", "--lr", "1e-3",
                              "--data", str(isbi_dir), "--logdir", str(logdir)]) == 0
    before = {path: path.stat().st_mtime_ns for path in (logdir / "mse_lr1e-3").rglob("*")}
    assert train.main(TINY + ["--epochs", "1", "--loss", "mse", "--lr", "1e-3",
                              "--data", str(isbi_dir), "--logdir", str(logdir)]) == 0
    assert (logdir / "mse_lr1e-3_2" / "train").is_dir()
    assert {path: path.stat().st_mtime_ns for path in (logdir / "mse_lr1e-3").rglob("*")} == before


@pytest.mark.parametrize("lr, name", [(1e-4, "bce_lr1e-4"), (3e-4, "bce_lr3e-4"), (0.001, "bce_lr1e-3"),
                                      (1.5e-4, "bce_lr1.5e-4"), (1.00001e-4, "bce_lr1.00001e-4")])
def test_run_names_keep_distinct_learning_rates_apart(lr, name):
    assert train.run_name("bce", lr) == name


@pytest.mark.parametrize("flags, message", [
    (["--crop", "100"], "not a multiple of 16"),
    (["--lr", "-1"], "must be greater than 0"),
    (["--lr", "fast"], "is not a float"),
    (["--epochs", "0"], "must be greater than 0"),
    (["--loss", "hinge"], "invalid choice: 'hinge' (choose from"),
    (["--val-slices", "5,x"], "comma-separated list"),
])
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
        [sys.executable, "train.py", "--images", str(images), "--labels", str(images), "--logdir", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"train.py: error: {images} is not a readable TIFF" in result.stderr
    assert not (tmp_path / "logs").exists()
    assert images.read_bytes() == b"II*\x00garbage"


def test_crop_larger_than_the_slices_is_refused(isbi_dir, tmp_path, capsys):
    assert train.main(["--crop", "1024", "--data", str(isbi_dir), "--logdir", str(tmp_path)]) == 2
    assert "--crop 1024 is larger than the 512x512 slices: use --crop 512 or less" in capsys.readouterr().err
