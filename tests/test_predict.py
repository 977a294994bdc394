"""predict.py: tiles, test-time augmentation, the submission TIFF and its scores."""

import keras
import numpy as np
import pytest
import tifffile

import data
import predict
import rundir
import tiffs
import tiling
from conftest import read_events, tiny_run
from rundir import BEST
from summaries import EPOCH_TAG, SLICE_GROUP

ISOTROPIC = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16
ASYMMETRIC = np.array([[0, 1, 3], [0, 2, 0], [-1, 0, 0]], np.float32)


def convolution_model(kernel, activation=None):
    """A one-layer fully convolutional model on slices of any size: its receptive field is 3x3."""
    model = keras.Sequential(
        [keras.Input((None, None, 1)), keras.layers.Conv2D(1, 3, padding="same", activation=activation)]
    )
    model.layers[0].set_weights([kernel[:, :, np.newaxis, np.newaxis], np.zeros(1, np.float32)])
    return model


def test_overlapping_tiles_give_the_whole_slice_prediction():
    image = np.random.default_rng(0).random((100, 130), np.float32)
    model = convolution_model(ASYMMETRIC, "sigmoid")
    whole = tiling.predict_slice(model, image, tile=256)
    tiled = tiling.predict_slice(model, image, tile=64)  # 3 x 3 tiles of which 40 px are kept
    assert whole.shape == tiled.shape == image.shape and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_tta_leaves_a_flip_and_rotation_invariant_model_unchanged():
    images = np.random.default_rng(1).random((2, 48, 80), np.float32)
    model = convolution_model(ISOTROPIC, "sigmoid")
    np.testing.assert_allclose(
        tiling.predict_stack(model, images, tta=True), tiling.predict_stack(model, images), atol=1e-6
    )


def test_tta_of_a_linear_model_is_the_model_with_the_symmetrised_kernel():
    images = np.random.default_rng(2).random((1, 48, 48), np.float32)
    symmetrised = np.mean(
        [
            np.rot90(np.fliplr(ASYMMETRIC) if flip else ASYMMETRIC, turns)
            for flip in (False, True)
            for turns in range(4)
        ],
        axis=0,
    )
    augmented = tiling.predict_stack(convolution_model(ASYMMETRIC), images, tta=True)
    expected = tiling.predict_stack(convolution_model(symmetrised), images)
    assert not np.allclose(augmented, tiling.predict_stack(convolution_model(ASYMMETRIC), images), atol=1e-3)
    # Away from the zero-padded edge, where flipping moves the padding.
    np.testing.assert_allclose(augmented[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5)


@pytest.fixture
def identity_checkpoint(tmp_path):
    """A saved model whose cell probability is its input pixel."""
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(1, 1)])
    model.layers[0].set_weights([np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)])
    path = tmp_path / "identity.keras"
    model.save(path)
    return path


def test_submission_tiff_has_the_pages_shape_dtype_and_polarity_of_the_input(
    isbi_dir, identity_checkpoint, tmp_path, capsys
):
    # Four label slices as input: an identity model turns cells (255) into probability 1.
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, tifffile.imread(isbi_dir / "train-labels.tif")[:4], photometric="minisblack")
    output = tmp_path / "probs.tif"
    assert predict.main([str(identity_checkpoint), str(labels), "-o", str(output), "--labels", str(labels)]) == 0
    with tifffile.TiffFile(output) as tiff:
        assert len(tiff.pages) == 4
        probabilities = tiff.asarray()
    assert probabilities.shape == (4, 512, 512) and probabilities.dtype == np.float32
    cells = tifffile.imread(labels) == 255
    assert np.all(probabilities[cells] == 1.0) and np.all(probabilities[~cells] == 0.0)
    assert "V_rand 1.0000 (threshold 0.0), V_info 1.0000 (threshold 0.0), pixel error 0.0000" in capsys.readouterr().out


def test_a_trained_run_turns_test_volume_into_a_30_page_float32_tiff(two_run_logdir, isbi_dir, tmp_path):
    output = tmp_path / "test-probs.tif"
    assert predict.main([str(two_run_logdir / "bce_lr1e-3"), str(isbi_dir / "test-volume.tif"), "-o", str(output)]) == 0
    probabilities = tifffile.imread(output)
    assert probabilities.shape == (30, 512, 512) and probabilities.dtype == np.float32
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0


@pytest.mark.parametrize("run_name", ["bce_lr1e-3", "wbce_lr1e-3"])  # the second with averaged weights
def test_the_v_rand_a_run_logged_is_what_predict_py_prints_for_its_checkpoint(
    two_run_logdir, isbi_dir, tmp_path, capsys, run_name
):
    run = two_run_logdir / run_name
    written, _ = read_events(run / rundir.VALIDATION)
    logged = float(written[EPOCH_TAG.format("v_rand")][-1][1])
    slices = rundir.read_config(run)["val_slices"]
    for name in ("train-volume.tif", "train-labels.tif"):
        tifffile.imwrite(tmp_path / name, tifffile.imread(isbi_dir / name)[slices], photometric="minisblack")
    assert (
        predict.main(
            [
                str(run / rundir.LAST),
                str(tmp_path / "train-volume.tif"),
                "-o",
                str(tmp_path / "probs.tif"),
                "--labels",
                str(tmp_path / "train-labels.tif"),
            ]
        )
        == 0
    )
    assert f"V_rand {logged:.4f}" in capsys.readouterr().out


def test_slices_of_a_size_the_net_does_not_take_are_scored_whole_as_predict_py_scores_them(
    small_isbi_dir, tmp_path, capsys
):
    for name in data.STACK_SOURCES:  # 100x90: no side a multiple of 16
        tifffile.imwrite(
            tmp_path / name, tifffile.imread(small_isbi_dir / name)[:, :100, :90], photometric="minisblack"
        )
    assert tiny_run(tmp_path, tmp_path / "logs", "--epochs", "1", "--val-slices", "2") == 0
    run = tmp_path / "logs" / "bce_lr1e-3"
    written, _ = read_events(run / rundir.VALIDATION)
    logged = float(written[EPOCH_TAG.format("v_rand")][-1][1])
    assert written[f"{SLICE_GROUP.format(2)}/prediction"][-1][1][:2].tolist() == [b"90", b"100"]  # width, height
    for name in ("train-volume.tif", "train-labels.tif"):
        tifffile.imwrite(tmp_path / f"val-{name}", tifffile.imread(tmp_path / name)[[2]], photometric="minisblack")
    command = [str(run / rundir.LAST), str(tmp_path / "val-train-volume.tif"), "-o", str(tmp_path / "probs.tif")]
    capsys.readouterr()
    assert predict.main([*command, "--labels", str(tmp_path / "val-train-labels.tif")]) == 0
    assert f"V_rand {logged:.4f}" in capsys.readouterr().out


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_an_existing_output_is_kept(isbi_dir, identity_checkpoint, tmp_path, capsys):
    output = tmp_path / "probs.tif"
    output.write_bytes(b"yesterday's submission")
    assert predict.main([str(identity_checkpoint), str(isbi_dir / "test-volume.tif"), "-o", str(output)]) == 2
    assert "exists: choose another -o or add --overwrite" in one_error_line(capsys)
    assert output.read_bytes() == b"yesterday's submission"


def test_a_directory_that_is_not_a_run_is_refused(isbi_dir, tmp_path, capsys):
    assert predict.main([str(tmp_path), str(isbi_dir / "test-volume.tif"), "-o", str(tmp_path / "p.tif")]) == 2
    assert "holds no best.keras: give a run directory" in one_error_line(capsys)


def test_a_file_that_is_not_a_model_is_refused(isbi_dir, tmp_path, capsys):
    bogus = tmp_path / BEST
    bogus.write_bytes(b"not a zip")
    assert predict.main([str(bogus), str(isbi_dir / "test-volume.tif"), "-o", str(tmp_path / "p.tif")]) == 2
    assert "is not a Keras model" in one_error_line(capsys)
    assert not (tmp_path / "p.tif").exists()


def test_labels_of_other_slices_are_refused(isbi_dir, identity_checkpoint, tmp_path, capsys):
    few = tmp_path / "few-labels.tif"
    tifffile.imwrite(few, tifffile.imread(isbi_dir / "train-labels.tif")[:3], photometric="minisblack")
    arguments = [str(identity_checkpoint), str(isbi_dir / "test-volume.tif"), "-o", str(tmp_path / "p.tif")]
    assert predict.main(arguments + ["--labels", str(few)]) == 2
    assert "give the masks of the same slices" in one_error_line(capsys)


def test_a_tile_that_the_net_cannot_take_is_refused(identity_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        predict.main([str(identity_checkpoint), "in.tif", "-o", str(tmp_path / "p.tif"), "--tile", "100"])
    assert exit_.value.code == 2
    assert "100 is not a multiple of 16" in one_error_line(capsys)


def test_a_stack_stored_unlike_the_runs_data_is_refused_unless_told_how_to_scale_it(
    two_run_logdir, isbi_dir, tmp_path, capsys
):
    run_dir = two_run_logdir / "bce_lr1e-3"
    stored = tiffs.read_stack(isbi_dir / data.TEST_IMAGES)[:2]
    as_uint8 = tmp_path / "uint8.tif"
    as_float = tmp_path / "float.tif"
    tifffile.imwrite(as_uint8, stored, photometric="minisblack")
    tifffile.imwrite(as_float, stored.astype(np.float32) / 255, photometric="minisblack")
    assert predict.main([str(run_dir), str(as_float), "-o", str(tmp_path / "p.tif")]) == 2
    assert capsys.readouterr().err == (
        f"predict.py: error: {as_float} is stored unlike the run's training data (float32 values in [0, 1]: as stored; "
        "the run's: uint8 values: 8-bit, divided by 255): add --scaling own to scale it by its own values (right for "
        "the same kind of images stored otherwise), or --scaling run to apply the run's\n"
    )
    assert not (tmp_path / "p.tif").exists()
    assert predict.main([str(run_dir), str(as_float), "-o", str(tmp_path / "own.tif"), "--scaling", "own"]) == 0
    assert predict.main([str(run_dir), str(as_uint8), "-o", str(tmp_path / "run.tif")]) == 0
    np.testing.assert_allclose(tifffile.imread(tmp_path / "own.tif"), tifffile.imread(tmp_path / "run.tif"), atol=1e-6)
