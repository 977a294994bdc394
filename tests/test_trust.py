"""Curves you can trust: what would train silently wrong is refused, grey values are scaled the
same way everywhere, one process at a time writes a run, and --resume touches only its own run
on the data it started with."""

import errno
import fcntl
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tifffile

import batches
import callbacks
import data
import predict
import rundir
import summaries
import tiffs
import train
from conftest import (
    ROOT,
    TINY,
    cells_and_membranes,
    raw_events,
    run_command,
    saved_at_step,
    steps,
    tiny_run,
    write_stack,
)
from rundir import CONFIG
from summaries import EPOCH_TAG


def one_line_exit_2(flags, capsys):
    assert train.main(flags) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    return error


# --- labels ---------------------------------------------------------------------------------------


def test_inverted_isbi_labels_are_refused_and_taken_with_the_polarity_flag(tmp_path, isbi_dir, capsys):
    inverted = write_stack(tmp_path / "inverted.tif", 255 - tifffile.imread(isbi_dir / "train-labels.tif"))
    error = one_line_exit_2(
        ["--images", str(isbi_dir / "train-volume.tif"), "--labels", str(inverted), "--logdir", str(tmp_path / "logs")],
        capsys,
    )
    assert "the cell value 255 (cells-high) covers 22% of the pixels" in error
    assert "this looks like membranes; pass --labels-polarity membranes-high if that is what they are" in error
    stacks = tiffs.load_training_stacks(isbi_dir / "train-volume.tif", inverted, polarity="membranes-high")
    straight = tiffs.load_training_stacks(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif")
    np.testing.assert_array_equal(stacks.mask(7), straight.mask(7))


@pytest.mark.parametrize("value", [0, 255])
def test_labels_of_one_value_are_refused(value, tmp_path):
    write_stack(tmp_path / "labels.tif", np.full((3, 32, 32), value, np.uint8))
    with pytest.raises(data.DataError, match=f"holds the value {value} only: a mask needs both cell and membrane"):
        tiffs.cell_value(tiffs.read_stack(tmp_path / "labels.tif"), tmp_path / "labels.tif")


def test_labels_with_a_nan_name_its_place(tmp_path):
    labels = cells_and_membranes(3).astype(np.float32)
    labels[1, 3, 5] = np.nan
    write_stack(tmp_path / "labels.tif", labels)
    with pytest.raises(data.DataError, match="labels.tif holds nan at slice 1, row 3, column 5"):
        tiffs.cell_value(tiffs.read_stack(tmp_path / "labels.tif"), tmp_path / "labels.tif")


def test_a_validation_slice_without_membrane_is_refused_and_a_training_one_warned_of(tmp_path, capsys):
    labels = cells_and_membranes(6)
    labels[1] = 255  # no membrane
    images = np.random.default_rng(0).integers(0, 256, labels.shape, dtype=np.uint8)
    flags = [
        "--images",
        str(write_stack(tmp_path / "i.tif", images)),
        "--labels",
        str(write_stack(tmp_path / "l.tif", labels)),
        "--crop",
        "64",
        "--logdir",
        str(tmp_path / "logs"),
    ]
    error = one_line_exit_2(flags + ["--val-slices", "1,3"], capsys)
    assert f"validation slice 1 of {tmp_path / 'l.tif'} has no membrane: its scores would mean nothing" in error
    stacks = tiffs.load_training_stacks(tmp_path / "i.tif", tmp_path / "l.tif")
    tiffs.check_masks(stacks, [0, 1, 2], [3], tmp_path / "l.tif")
    assert capsys.readouterr().err == f"warning: training slice 1 of {tmp_path / 'l.tif'} has no membrane\n"


# --- images ---------------------------------------------------------------------------------------

GREY = np.random.default_rng(1).random((4, 64, 64))


def percentiles_to_unit_range(stored):
    low, high = np.percentile(stored, tiffs.PERCENTILES)
    return np.clip((stored.astype(np.float64) - low) / (high - low), 0, 1)


@pytest.mark.parametrize(
    "stored, expected",
    [
        (np.round(GREY * 255).astype(np.uint8), np.round(GREY * 255) / 255),
        (np.round(GREY * 4095).astype(np.uint16), None),  # 12-bit data in uint16: percentiles
        ((GREY * 255).astype(np.float32), None),  # floats in 0..255: percentiles
        ((GREY * 0.8).astype(np.float32), GREY * 0.8),  # floats in [0, 1]: as stored
    ],
)
def test_one_scaling_for_training_crops_validation_and_predict(stored, expected, tmp_path):
    images = write_stack(tmp_path / "images.tif", stored)
    stacks = tiffs.load_training_stacks(images, write_stack(tmp_path / "labels.tif", cells_and_membranes(4)))
    validation = stacks.image(2)
    expected = percentiles_to_unit_range(stored) if expected is None else expected
    np.testing.assert_allclose(validation, expected[2], atol=1e-6)
    assert validation.min() >= 0 and validation.max() <= 1
    # Training: a whole-slice crop without augmentation is the slice as the net sees it.
    crop, _ = batches.augmented_crop(stacks, 2, 64, np.random.default_rng(0), batches.NO_AUGMENTATION)
    np.testing.assert_allclose(crop, validation, atol=1e-6)
    # predict.py: the scaling the run recorded in its config.json, applied to the same stack.
    rundir.save_config(tmp_path, {"image_scaling": stacks.scaling.describe()})
    scaling = predict.run_scaling(tmp_path / rundir.BEST)
    np.testing.assert_array_equal(scaling.apply(tiffs.read_stack(images))[2], validation)


@pytest.mark.parametrize("damage", ["one saturated pixel", "a detector offset", "a burned-in scale bar"])
def test_a_few_outlier_pixels_or_an_offset_do_not_set_the_scaling(damage):
    """The net sees a 12-bit stack the same (within a few grey levels of 255) whatever a handful of
    pixels or a constant offset added to it."""
    clean = np.round(np.random.default_rng(0).random((8, 128, 128)) * 4080).astype(np.uint16)
    damaged = clean.copy()
    if damage == "one saturated pixel":
        damaged[3, 10, 10] = 65535
    elif damage == "a detector offset":
        damaged += 30000
    else:
        damaged[:, 120:122, 4:16] = 65535  # 0.15 % of each slice, as 3x130 pixels of a 512x512 one
    seen = {
        name: tiffs.ImageScaling.of(stack, name).apply(stack)
        for name, stack in (("clean", clean), ("damaged", damaged))
    }
    # The damaged pixels themselves aside (the offset changes all of them, by the same amount).
    outside = np.zeros(clean.shape, bool) if damage == "a detector offset" else damaged != clean
    np.testing.assert_allclose(seen["damaged"][~outside], seen["clean"][~outside], atol=3 / 255)


def test_a_stack_of_one_float_value_is_not_divided_by_zero(tmp_path):
    stack = np.full((2, 16, 16), 7.0, np.float32)
    assert np.all(np.isfinite(tiffs.ImageScaling.of(stack, "flat.tif").apply(stack)))


def test_predict_refuses_a_nan_patch_even_with_the_runs_scaling(two_epoch_run, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64)).astype(np.float32)
    images[1, 20:30, 40:50] = np.nan
    assert (
        predict.main(
            [str(two_epoch_run), str(write_stack(tmp_path / "nan.tif", images)), "-o", str(tmp_path / "p.tif")]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        f"predict.py: error: {tmp_path / 'nan.tif'} holds nan at slice 1, row 20, column 40: "
        "replace the values that are not finite (e.g. by the slice's median) and save it again\n"
    )
    assert not (tmp_path / "p.tif").exists()


# --- stacks ---------------------------------------------------------------------------------------


def test_pages_appended_one_by_one_are_all_read(tmp_path):
    path = tmp_path / "appended.tif"
    pages = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    for page in pages:
        tifffile.imwrite(path, page, photometric="minisblack", append=True)
    with tifffile.TiffFile(path) as tiff:
        assert len(tiff.series) == 3  # what tifffile's series[0] alone would have read: one page
    np.testing.assert_array_equal(tiffs.read_stack(path), pages)
    with pytest.raises(data.DataError, match="3 slices as 3 separate series, which cannot be memory-mapped"):
        tiffs.read_stack(path, memory_map_above=0)


# --- one writer per run, and --resume -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, small_isbi_dir):
    logdir = tmp_path_factory.mktemp("trust")
    assert (
        train.main(TINY + ["--lr", "1e-3", "--eval-every", "0", "--data", str(small_isbi_dir), "--logdir", str(logdir)])
        == 0
    )
    return logdir / "bce_lr1e-3"


def copy_of(run_dir, tmp_path):
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.slow
def test_two_resumes_started_together_train_once(two_epoch_run, tmp_path):
    run_dir = copy_of(two_epoch_run, tmp_path)
    command = [sys.executable, "train.py", "--resume", str(run_dir), "--epochs", "4"]
    processes = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = sorted((process.wait(timeout=300), process.stderr.read()) for process in processes)
    assert [code for code, _ in results] == [0, 2], results
    assert results[1][1].startswith(f"train.py: error: {run_dir} is being trained by process ")
    assert results[1][1].count("\n") == 1
    for part, tags in raw_events(run_dir).items():
        for tag, series in tags.items():
            assert steps(series) == sorted(set(steps(series))), (part, tag)  # strictly increasing
    assert steps(raw_events(run_dir)["train"][EPOCH_TAG.format("loss")]) == [0, 1, 2, 3]


def test_a_run_held_by_a_process_is_refused_and_left_as_it_was(two_epoch_run, tmp_path, capsys):
    run_dir = copy_of(two_epoch_run, tmp_path)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with rundir.locked(run_dir):
        error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "3"], capsys)
    assert error.startswith(f"train.py: error: {run_dir} is being trained by process ")
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    # In its first epoch a run has no checkpoint yet: the lock still says who trains it.
    (run_dir / rundir.LAST).unlink()
    with rundir.locked(run_dir):
        error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "3"], capsys)
    assert error.startswith(f"train.py: error: {run_dir} is being trained by process ")


def test_a_probe_of_the_lock_neither_marks_a_run_as_trained_nor_refuses_its_trainer(tmp_path):
    with rundir.locked(tmp_path):
        pass
    # A probe in flight (--summary's, or another --resume's check) holds the lock for a moment.
    probe = os.open(tmp_path / rundir.LOCK, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    assert rundir.trainer_of(tmp_path) is None
    threading.Timer(rundir.PROBE_WAIT_S / 5, os.close, [probe]).start()
    with rundir.locked(tmp_path):
        assert rundir.trainer_of(tmp_path) == f"process {os.getpid()} on {socket.gethostname()}"


def test_a_file_where_the_run_writes_its_curves_is_refused_before_tensorflow(two_epoch_run, tmp_path, capsys):
    run_dir = copy_of(two_epoch_run, tmp_path)
    shutil.rmtree(run_dir / rundir.VALIDATION)
    (run_dir / rundir.VALIDATION).write_text("not the run's curves")
    refused = run_command("train", ["--resume", run_dir, "--epochs", "3"])
    assert refused.returncode == 2 and refused.stdout.endswith("tensorflow imported: False\n")
    assert refused.stderr == (
        f"train.py: error: {run_dir / rundir.VALIDATION} is not a directory: move it out of the run directory, "
        "then resume the run\n"
    )
    said = one_line_exit_2(["--summary", str(tmp_path)], capsys)  # its only run
    assert said.startswith(f"train.py: error: {run_dir / rundir.VALIDATION} is not a directory")


def test_a_damaged_last_checkpoint_beside_a_whole_best_one_says_how_to_continue(two_epoch_run, tmp_path, capsys):
    run_dir = copy_of(two_epoch_run, tmp_path)
    (run_dir / rundir.LAST).write_bytes((run_dir / rundir.LAST).read_bytes()[:1000])
    error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "3"], capsys)
    last, best = run_dir / rundir.LAST, run_dir / rundir.BEST
    assert error.endswith(
        f"but {best} is whole: to continue from the run's best epoch, copy it over (cp {best} {last}) "
        "and resume again\n"
    )
    shutil.copyfile(best, last)
    assert train.main(["--resume", str(run_dir), "--epochs", "3"]) == 0


def test_a_damaged_event_file_is_refused_by_resume_and_summary_and_a_record_a_kill_cut_short_is_not(
    two_epoch_run, tmp_path, capsys
):
    run_dir = copy_of(two_epoch_run, tmp_path)
    (events,) = (run_dir / rundir.VALIDATION).glob("events.out.tfevents.*")
    whole = events.read_bytes()
    records, _ = summaries.read_records(events)
    offset = sum(len(record) + summaries.RECORD_FRAMING for record in records[: len(records) // 3])
    flipped = offset + 20  # inside the serialized event of a record a third into the file
    events.write_bytes(whole[:flipped] + bytes([whole[flipped] ^ 1]) + whole[flipped + 1 :])
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    why = f"{events} is damaged at byte {offset} of {len(whole)} (a record fails its checksum): restore it from a copy"
    error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "3"], capsys)
    assert (
        error
        == f"train.py: error: {why}, or give up what follows by cutting it there (truncate -s {offset} {events})\n"
    )
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert one_line_exit_2(["--summary", str(tmp_path)], capsys).startswith(f"train.py: error: {why}")  # its only run
    # A kill while the last record was written: no damage, the record is left out (and --resume cuts it).
    for cut in (5, len(records[-1]) + 10):  # in its data, in its header
        events.write_bytes(whole[:-cut])
        assert summaries.read_records(events) == (records[:-1], None)


# Slow (10-25 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_resume_refuses_data_that_changed_unless_told(two_epoch_run, tmp_path, small_isbi_dir, capsys):
    run_dir = copy_of(two_epoch_run, tmp_path)
    labels = tmp_path / "labels.tif"
    shutil.copy(small_isbi_dir / "train-labels.tif", labels)
    config = json.loads((run_dir / CONFIG).read_text())
    config.update(labels=str(labels), images=str(small_isbi_dir / "train-volume.tif"))
    (run_dir / CONFIG).write_text(json.dumps(config))
    stack = tifffile.imread(labels)
    stack[3, :10, :10] = 255
    write_stack(labels, stack)
    error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "3"], capsys)
    assert f"{labels} has changed since the run started" in error and "--accept-new-data" in error
    moved = one_line_exit_2(
        [
            "--resume",
            str(run_dir),
            "--epochs",
            "3",
            "--images",
            str(small_isbi_dir / "train-volume.tif"),
            "--labels",
            str(labels),
        ],
        capsys,
    )
    assert moved == error
    assert train.main(["--resume", str(run_dir), "--epochs", "3", "--accept-new-data"]) == 0
    # The new data is now the run's: a later --resume takes it without the flag.
    assert json.loads((run_dir / CONFIG).read_text())["data_files"]["labels_sha256"] == tiffs.sha256_of(labels)
    assert train.main(["--resume", str(run_dir), "--epochs", "4"]) == 0


@pytest.mark.slow
def test_a_run_resumes_from_any_directory_and_after_its_data_moved(tmp_path, small_isbi_dir, monkeypatch, capsys):
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    (started / "isbi").mkdir(parents=True)
    for name in (data.TRAIN_IMAGES, data.TRAIN_LABELS):
        shutil.copy(small_isbi_dir / name, started / "isbi" / name)
    elsewhere.mkdir()
    monkeypatch.chdir(started)
    assert (
        train.main(TINY + ["--epochs", "1", "--lr", "1e-3", "--eval-every", "0", "--data", "isbi", "--logdir", "logs"])
        == 0
    )
    run_dir = started / "logs" / "bce_lr1e-3"
    config = json.loads((run_dir / rundir.CONFIG).read_text())
    assert config["images"] == str(started / "isbi" / data.TRAIN_IMAGES) and config["started_in"] == str(started)
    assert (config["logdir"], config["run_dir"]) == (str(started / "logs"), str(run_dir))

    monkeypatch.chdir(elsewhere)
    assert train.main(["--resume", str(run_dir), "--epochs", "2"]) == 0
    (started / "isbi").rename(tmp_path / "moved")
    capsys.readouterr()
    error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "3"], capsys)
    assert error == (
        f"train.py: error: the run's images, {started / 'isbi' / data.TRAIN_IMAGES}, is not there: if its "
        "data moved, give where it is now with --images and --labels (or --data for ISBI 2012); the same "
        "files continue the run, other data needs --accept-new-data too\n"
    )
    assert train.main(["--resume", str(run_dir), "--epochs", "3", "--data", str(tmp_path / "moved")]) == 0
    assert json.loads((run_dir / rundir.CONFIG).read_text())["images"] == str(tmp_path / "moved" / data.TRAIN_IMAGES)
    assert steps(raw_events(run_dir)["train"][EPOCH_TAG.format("loss")]) == [0, 1, 2]
    assert list(elsewhere.iterdir()) == []


def test_resume_takes_one_moved_stack_and_refuses_data_for_a_run_on_stacks_of_its_own(
    two_epoch_run, tmp_path, small_isbi_dir, capsys
):
    run_dir = copy_of(two_epoch_run, tmp_path)
    moved = shutil.copy(small_isbi_dir / data.TRAIN_IMAGES, tmp_path / "moved-images.tif")
    assert train.main(["--resume", str(run_dir), "--epochs", "3", "--images", str(moved)]) == 0
    config = json.loads((run_dir / rundir.CONFIG).read_text())
    assert (config["images"], config["labels"]) == (str(moved), str(small_isbi_dir / data.TRAIN_LABELS))
    capsys.readouterr()
    error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "4", "--data", str(small_isbi_dir)], capsys)
    assert error == (
        f"train.py: error: {run_dir} trained on stacks of its own, not ISBI 2012 in a --data directory: "
        "give where they are now with --images and --labels\n"
    )


def test_nothing_written_follows_a_link_planted_in_the_run_directory(two_epoch_run, tmp_path):
    run_dir = copy_of(two_epoch_run, tmp_path / "received")
    victims = {}
    # Where this process writes its config.json and checkpoints before renaming them into place.
    for written in (rundir.CONFIG, rundir.LAST, rundir.BEST):
        name = Path(written)
        victims[written] = tmp_path / f"victim-{name.stem}"
        victims[written].write_text("a file of the user's")
        (run_dir / f".{name.stem}.{os.getpid()}.partial{name.suffix}").symlink_to(victims[written])
    assert train.main(["--resume", str(run_dir), "--epochs", "3"]) == 0
    assert all(victim.read_text() == "a file of the user's" for victim in victims.values())
    assert steps(raw_events(run_dir)["train"][EPOCH_TAG.format("loss")]) == [0, 1, 2]


@pytest.mark.parametrize(
    "name, value, why",
    [
        ("steps_per_epoch", 0, "'0' must be a finite number greater than 0"),
        ("loss", "hinge", "invalid choice: 'hinge'"),
        ("val_slices", "5,15,25", "not a list"),
        ("seed", -1, "'-1' must be a finite number from 0 to 4294967295"),
    ],
)
def test_a_hand_edited_config_is_checked_as_its_flag_would_be(name, value, why, two_epoch_run, tmp_path, capsys):
    run_dir = copy_of(two_epoch_run, tmp_path)
    config = json.loads((run_dir / rundir.CONFIG).read_text())
    (run_dir / rundir.CONFIG).write_text(json.dumps({**config, name: value}))
    error = one_line_exit_2(["--resume", str(run_dir), "--epochs", "3"], capsys)
    assert (
        error
        == (f"train.py: error: {run_dir / rundir.CONFIG} records {name} {value!r}, which train.py refuses ({why}")
        + error.split(why, 1)[1]
    )
    assert error.endswith("): restore it, or move the run out of the way\n")


def test_a_finished_run_or_a_damaged_checkpoint_is_refused_before_tensorflow_and_a_refusal_after_it_is_one_line(
    two_epoch_run, tmp_path
):
    finished = run_command("train", ["--resume", two_epoch_run])
    assert finished.returncode == 2 and finished.stdout.endswith("tensorflow imported: False\n")
    assert finished.stderr == f"train.py: error: {rundir.finished(two_epoch_run, 2)}\n"
    run_dir = copy_of(two_epoch_run, tmp_path)
    last, best = run_dir / rundir.LAST, run_dir / rundir.BEST
    whole = last.read_bytes()
    flipped = whole.index(b"\x89HDF") + 5000  # a byte of the stored (uncompressed) model.weights.h5
    how_to_continue = f"to continue from the run's best epoch, copy it over (cp {best} {last}) and resume again\n"
    for damage, why in (
        (whole[:1000], "not a whole .keras archive"),
        (
            whole[:flipped] + bytes([whole[flipped] ^ 1]) + whole[flipped + 1 :],
            "model.weights.h5 in it fails its checksum",
        ),
    ):
        last.write_bytes(damage)
        damaged = run_command("train", ["--resume", run_dir, "--epochs", "3"])
        assert damaged.returncode == 2 and damaged.stdout.endswith("tensorflow imported: False\n")
        assert (
            damaged.stderr == f"train.py: error: {last} is unreadable ({why}), but {best} is whole: {how_to_continue}"
        )
    # A whole archive that Keras cannot load is found only by loading it, after TensorFlow: still one line.
    with zipfile.ZipFile(io.BytesIO(whole)) as archive, zipfile.ZipFile(last, "w") as rewritten:
        for member in archive.namelist():
            rewritten.writestr(
                member, b'{"class_name": "NoSuchLayer"}' if member == "config.json" else archive.read(member)
            )
    unloadable = run_command("train", ["--resume", run_dir, "--epochs", "3"])
    assert unloadable.returncode == 2 and unloadable.stdout.endswith("tensorflow imported: True\n")
    assert unloadable.stderr.count("\n") == 1
    assert unloadable.stderr.startswith(f"train.py: error: {last} is unreadable (")
    assert unloadable.stderr.endswith(f"but {best} is whole: {how_to_continue}")


def test_resume_of_a_finished_run_finishes_a_promotion_that_a_kill_cut_between_its_two_renames(
    two_epoch_run, tmp_path, capsys
):
    run_dir = copy_of(two_epoch_run, tmp_path)
    last, best = run_dir / rundir.LAST, run_dir / rundir.BEST
    whole = last.read_bytes()
    flipped = whole.index(b'"class_name"')  # a byte of the stored config.json, not of model.weights.h5
    saved_at_step(best, 3)  # the former best epoch's
    refused = f"train.py: error: {rundir.finished(run_dir, 2)}\n"
    # Killed after the last epoch's rename to last.keras, before its copy's to best.keras.
    waiting = run_dir / ".best.4242.partial.keras"

    def refused_as_it_is():
        assert train.main(["--resume", str(run_dir)]) == 2
        assert capsys.readouterr() == ("", refused)
        assert rundir.checkpoint_step(best) == 3

    waiting.write_bytes(whole[:flipped] + bytes([whole[flipped] ^ 1]) + whole[flipped + 1 :])
    assert rundir.checkpoint_step(waiting) == 6  # its step reads, but a member fails its checksum
    refused_as_it_is()
    waiting.unlink()
    waiting.symlink_to(last)  # planted: best.keras would follow last.keras
    refused_as_it_is()
    waiting.unlink()
    shutil.copyfile(last, waiting)
    with rundir.locked(run_dir):  # another process holds the run (--resume refuses it before, as being trained)
        assert rundir.finish_promotion(run_dir) is None
    assert rundir.checkpoint_step(best) == 3
    assert train.main(["--resume", str(run_dir)]) == 2
    assert capsys.readouterr() == (rundir.best_promoted(run_dir, 1) + "\n", refused)
    assert best.read_bytes() == whole and not list(run_dir.glob(".best.*"))


def test_accept_new_data_goes_with_resume(tmp_path, capsys):
    error = one_line_exit_2(["--accept-new-data", "--logdir", str(tmp_path)], capsys)
    assert "--accept-new-data goes with --resume" in error


@pytest.mark.slow
def test_resume_leaves_a_run_nested_in_it_alone(two_epoch_run, tmp_path):
    longer = copy_of(two_epoch_run, tmp_path / "longer")
    assert train.main(["--resume", str(longer), "--epochs", "3"]) == 0
    run_dir = copy_of(two_epoch_run, tmp_path)
    # A run with an epoch more than the one around it: resuming the outer run after its second
    # epoch would cut the nested run's third.
    nested = shutil.copytree(longer, run_dir / "old" / "bce_lr1e-3")
    before = {path: path.read_bytes() for path in nested.rglob("*") if path.is_file()}
    assert train.main(["--resume", str(run_dir), "--epochs", "3"]) == 0
    assert {path: path.read_bytes() for path in nested.rglob("*") if path.is_file()} == before


def test_summary_of_a_damaged_config_is_one_line(two_epoch_run, tmp_path, capsys):
    run_dir = copy_of(two_epoch_run, tmp_path)
    (run_dir / CONFIG).write_text("{ half")
    error = one_line_exit_2(["--summary", str(tmp_path)], capsys)
    assert f"{run_dir / 'config.json'} is unreadable" in error
    whole = copy_of(two_epoch_run, tmp_path / "another")
    shutil.move(whole, tmp_path / "bce_lr1e-3_2")
    assert train.main(["--summary", str(tmp_path)]) == 0
    table, said = capsys.readouterr()
    assert [line.split()[0] for line in table.splitlines()] == ["run", "bce_lr1e-3_2"]
    assert said == f"train.py: skipped: {run_dir / 'config.json'} is unreadable" + said.split("is unreadable", 1)[1]
    assert said.count("\n") == 1


def test_a_full_disk_at_the_first_checkpoint_advises_a_new_start_and_keeps_nothing(
    tmp_path, small_isbi_dir, monkeypatch, capsys
):
    def disk_full(model, filepath, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(keras.Model, "save", disk_full)
    assert tiny_run(small_isbi_dir, tmp_path, "--eval-every", "0") == 1  # a run that stopped
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("train.py: stopped: cannot write ")
    assert error.endswith("(No space left on device): free some space, then start the run again\n")
    assert list(tmp_path.iterdir()) == []  # no run directory without a checkpoint left behind


def test_a_run_stopped_by_an_unexpected_error_is_kept_for_its_logs_and_summary_says_it_cannot_resume(
    tmp_path, small_isbi_dir, monkeypatch, capsys
):
    def failing_step(self, batch, logs=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(callbacks.StopBetweenSteps, "on_train_batch_begin", failing_step)
    with pytest.raises(RuntimeError, match="a bug"):  # its traceback, to find out why
        tiny_run(small_isbi_dir, tmp_path)
    monkeypatch.undo()
    run_dir = tmp_path / "bce_lr1e-3"
    assert (run_dir / CONFIG).is_file() and not (run_dir / rundir.LAST).exists()
    capsys.readouterr()
    assert train.main(["--summary", str(tmp_path)]) == 0
    _, row, footnote = capsys.readouterr().out.strip().splitlines()
    assert row.split()[:4] == ["bce_lr1e-3", "bce", "1e-3", "0/6!"]
    assert footnote == "! stopped before its first checkpoint: nothing to resume; remove it and start it anew"
    with rundir.locked(run_dir):  # as a process training it holds it: not a run to remove
        assert train.main(["--summary", str(tmp_path)]) == 0
    _, row, footnote = capsys.readouterr().out.strip().splitlines()
    assert row.split()[3] == "0/6+" and footnote == "+ being trained now"
    (run_dir / rundir.LOCK).unlink()
    os.mkfifo(run_dir / rundir.LOCK)  # planted in a run received from someone: read without waiting for a writer
    assert train.main(["--summary", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1].split()[3] == "0/6!"
