"""Bad input to train.py: one line naming the problem and the fix, exit code 2, nothing written.

Bad flag values are in test_train.py, a full disk and --resume in test_resume.py, a damaged
download in test_data.py.
"""

import pytest
import tifffile

import train
from conftest import cells_and_membranes, write_stack


def missing(tmp_path, isbi_dir):
    return ["--images", str(tmp_path / "missing.tif"), "--labels", str(isbi_dir / "train-labels.tif")]


def not_a_tiff(tmp_path, isbi_dir):
    (tmp_path / "notes.tif").write_text("not an image")
    return ["--images", str(tmp_path / "notes.tif"), "--labels", str(isbi_dir / "train-labels.tif")]


def truncated(tmp_path, isbi_dir):
    (tmp_path / "cut.tif").write_bytes((isbi_dir / "train-volume.tif").read_bytes()[:100_000])
    return ["--images", str(tmp_path / "cut.tif"), "--labels", str(isbi_dir / "train-labels.tif")]


def page_counts_differ(tmp_path, isbi_dir):
    return [
        "--images",
        str(write_stack(tmp_path / "i.tif", cells_and_membranes(4))),
        "--labels",
        str(write_stack(tmp_path / "l.tif", cells_and_membranes(3))),
    ]


def slice_shapes_differ(tmp_path, isbi_dir):
    return [
        "--images",
        str(write_stack(tmp_path / "i.tif", cells_and_membranes(4))),
        "--labels",
        str(write_stack(tmp_path / "l.tif", cells_and_membranes(4, width=80))),
    ]


def labels_not_binary(tmp_path, isbi_dir):
    labels = cells_and_membranes(4)
    labels[:, :, 3] = 128
    return [
        "--images",
        str(write_stack(tmp_path / "i.tif", cells_and_membranes(4))),
        "--labels",
        str(write_stack(tmp_path / "l.tif", labels)),
    ]


def crop_larger_than_a_slice(tmp_path, isbi_dir):
    return ["--data", str(isbi_dir), "--crop", "1024"]


def validation_slice_out_of_range(tmp_path, isbi_dir):
    return ["--data", str(isbi_dir), "--val-slices", "5,30"]


def no_training_slice_left(tmp_path, isbi_dir):
    return [
        "--images",
        str(write_stack(tmp_path / "i.tif", cells_and_membranes(2))),
        "--labels",
        str(write_stack(tmp_path / "l.tif", cells_and_membranes(2))),
        "--val-slices",
        "0,1",
        "--crop",
        "64",
    ]


def compressed_stack_to_memory_map(tmp_path, isbi_dir):
    tifffile.imwrite(tmp_path / "z.tif", cells_and_membranes(4), photometric="minisblack", compression="zlib")
    return [
        "--images",
        str(tmp_path / "z.tif"),
        "--labels",
        str(write_stack(tmp_path / "l.tif", cells_and_membranes(4))),
        "--memmap",
        "on",
        "--crop",
        "64",
    ]


def images_and_labels_swapped(tmp_path, isbi_dir):
    return ["--images", str(isbi_dir / "train-labels.tif"), "--labels", str(isbi_dir / "train-volume.tif")]


def a_directory_as_images(tmp_path, isbi_dir):
    return ["--images", str(isbi_dir), "--labels", str(isbi_dir / "train-labels.tif")]


def three_slices_stored_as_rgb(tmp_path, isbi_dir):
    # As tifffile before 2026 stored (3, H, W) unless told: one page of separate RGB planes.
    tifffile.imwrite(tmp_path / "i.tif", cells_and_membranes(3), photometric="rgb", planarconfig="separate")
    return [
        "--images",
        str(tmp_path / "i.tif"),
        "--labels",
        str(write_stack(tmp_path / "l.tif", cells_and_membranes(3))),
    ]


def one_slice(tmp_path, isbi_dir):
    tifffile.imwrite(tmp_path / "i.tif", cells_and_membranes(1)[0])  # a 2-D TIFF
    return [
        "--images",
        str(tmp_path / "i.tif"),
        "--labels",
        str(write_stack(tmp_path / "l.tif", cells_and_membranes(1))),
        "--crop",
        "64",
    ]


def mirror_unreachable(tmp_path, isbi_dir):
    return ["--data", str(tmp_path / "isbi"), "--mirror", "http://127.0.0.1:9/"]


def profiling_steps_beyond_the_run(tmp_path, isbi_dir):
    return ["--data", str(isbi_dir), "--epochs", "2", "--steps-per-epoch", "5", "--profile-batch", "8,12"]


CASES = [
    (missing, "missing.tif not found: check the path"),
    (not_a_tiff, "notes.tif is not a readable TIFF"),
    (truncated, "cut.tif is truncated ("),
    (page_counts_differ, "i.tif has 4 slices but"),
    (slice_shapes_differ, "must have the same height and width"),
    (labels_not_binary, "is not a binary mask: slice 0 holds 3 distinct values"),
    (crop_larger_than_a_slice, "--crop 1024 is larger than the 512x512 slices: use --crop 512 or less"),
    (validation_slice_out_of_range, "validation slice(s) [30] out of range: the stack has slices 0..29"),
    (no_training_slice_left, "all 2 slices are validation slices: leave at least one for training"),
    (compressed_stack_to_memory_map, "z.tif cannot be memory-mapped (its pixels are compressed"),
    (mirror_unreachable, "could not fetch http://127.0.0.1:9/"),
    (images_and_labels_swapped, "train-labels.tif looks like masks (two values) and"),
    (a_directory_as_images, "is a directory: give the multi-page TIFF file itself"),
    (
        three_slices_stored_as_rgb,
        "if these are 3 grey slices, write them with tifffile.imwrite(path, stack, photometric='minisblack')",
    ),
    (one_slice, "the stack holds one slice: a run needs at least two"),
    (profiling_steps_beyond_the_run, "--profile-batch 8,12: this run trains steps 1 to 10; pick steps among them"),
]


@pytest.mark.parametrize("case, message", CASES, ids=[case.__name__ for case, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, tmp_path, isbi_dir, capsys):
    logdir = tmp_path / "logs"
    flags = case(tmp_path, isbi_dir)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert train.main(flags + ["--logdir", str(logdir)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("train.py: error: ") and error.count("\n") == 1 and "Traceback" not in error
    assert message in error
    assert not logdir.exists()
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_an_unwritable_logdir_is_one_line_and_exit_2(tmp_path, isbi_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train.main(["--data", str(isbi_dir), "--logdir", str(blocker / "logs")]) == 2
    error = capsys.readouterr().err
    assert f"cannot create a run directory in {blocker / 'logs'}" in error and "choose a writable --logdir" in error
    assert error.count("\n") == 1 and blocker.read_text() == ""


def test_a_logdir_on_a_file_system_that_takes_no_files_is_refused_before_tensorflow(isbi_dir, capsys):
    # /proc takes no new files, for root too, whose permissions say nothing.
    assert train.main(["--data", str(isbi_dir), "--logdir", "/proc/x/logs"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("train.py: error: cannot create a run directory in /proc/x/logs (/proc: ")
    assert error.endswith("): choose a writable --logdir\n") and error.count("\n") == 1
