"""First touch, as a new user meets each command in a terminal: --help works, bad input is one
line on stderr with exit code 2 before TensorFlow loads, a run's terminal holds no TensorFlow
start-up lines, and a stop or Ctrl-C says on a line of its own what was kept."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

import cli
import data
import flags
import metrics
import predict
import settings
from conftest import ROOT, TINY, cells_and_membranes, run_command, write_stack
from rundir import CONFIG, LAST

ENTRY_POINTS = ["train.py", "predict.py", "bench.py", "data.py", "export.py", "sweep.py"]


def option_strings(script):
    import bench  # its parser is train.py's with the benchmark's flags added
    import export
    import sweep

    parser = {
        "train.py": flags.build_parser,
        "predict.py": predict.build_parser,
        "bench.py": bench.build_parser,
        "data.py": data.build_parser,
        "export.py": export.build_parser,
        "sweep.py": sweep.build_parser,
    }[script]()
    return [option for action in parser._actions for option in action.option_strings]


def test_every_setting_of_a_run_takes_its_default_from_settings():
    parsed = vars(flags.build_parser().parse_args([]))
    # --mirror says where the data came from, and --epochs defaults to the run's own on --resume.
    run_settings = {
        name: value
        for name, value in parsed.items()
        if name not in (*settings.COMMAND_FLAGS, *settings.PATHS, "mirror")
    }
    assert run_settings == {**settings.DEFAULTS, "epochs": None}


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_of_every_command_lists_every_flag(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}") and result.stderr == ""
    for option in option_strings(script):
        assert option in result.stdout, option


def test_help_text_is_printed_as_written_with_its_default():
    help_text = " ".join(flags.build_parser().format_help().split())
    assert f"larger than {settings.MEMMAP_SHARE:.0%} of this machine's memory" in help_text  # a literal %
    assert "(default: 200)" in help_text and "(default: 0)" in help_text  # --steps-per-epoch, --seed


def test_a_preset_sets_its_flags_and_each_flag_given_overrides_it():
    args, given = cli.parse_with_given(flags.build_parser(), ["--preset", "paper", "--crop", "512", "--lr", "3e-4"])
    args = flags.with_preset(args, given)
    assert (args.filters, args.loss, args.batch_size, args.dropout) == (64, "wbce", 1, 0.5)
    assert (args.crop, args.lr) == (512, 3e-4)
    plain, given = cli.parse_with_given(flags.build_parser(), [])
    assert flags.with_preset(plain, given) == plain


def test_the_losses_offered_are_those_metrics_implements():
    assert tuple(metrics.LOSSES) == settings.LOSSES


# What a subprocess runs: the command's main(), then whether TensorFlow was imported by then.
def own_stacks(tmp_path, images=None, labels=None, pages=4):
    images = np.random.default_rng(0).integers(0, 256, (pages, 64, 64), dtype=np.uint8) if images is None else images
    labels = cells_and_membranes(pages) if labels is None else labels
    return [
        "--images",
        write_stack(tmp_path / "images.tif", images),
        "--labels",
        write_stack(tmp_path / "labels.tif", labels),
    ]


def not_an_image(path):
    path.write_text("not an image")
    return path


def nan_patch(tmp_path, isbi_dir):
    images = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
    images[2, 10:20, 30:40] = np.nan
    return own_stacks(tmp_path, images=images)


def appended_pages_of_two_sizes(tmp_path, isbi_dir):
    path = tmp_path / "appended.tif"
    tifffile.imwrite(path, np.zeros((2, 64, 64), np.uint8), photometric="minisblack")
    tifffile.imwrite(path, np.zeros((80, 64), np.uint8), photometric="minisblack", append=True)
    return ["--images", path, "--labels", write_stack(tmp_path / "labels.tif", cells_and_membranes(3))]


def resume_with_a_flag_at_its_default(tmp_path, isbi_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG).write_text(json.dumps({"loss": "mse", "steps_per_epoch": 3}))
    (run_dir / LAST).write_bytes(b"")
    return ["--resume", run_dir, "--loss", "bce"]


def truncated_copy(tmp_path, isbi_dir):
    """ISBI's images as an interrupted copy leaves them: cut where the sixth page's directory starts."""
    path = tmp_path / "cut.tif"
    with tifffile.TiffFile(isbi_dir / data.TRAIN_IMAGES) as tiff:
        path.write_bytes((isbi_dir / data.TRAIN_IMAGES).read_bytes()[: tiff.pages[5].offset])
    return path


def a_run_with_a_linked_lock(tmp_path, isbi_dir):
    run_dir = resume_with_a_flag_at_its_default(tmp_path, isbi_dir)[1]
    (tmp_path / "victim.txt").write_text("a file of the user's")
    (run_dir / ".lock").symlink_to(tmp_path / "victim.txt")
    return ["--resume", run_dir]


TRAIN_CASES = {
    "truncated stack": (
        lambda tmp_path, isbi_dir: [
            "--images",
            truncated_copy(tmp_path, isbi_dir),
            "--labels",
            isbi_dir / "train-labels.tif",
        ],
        "cut.tif is truncated (",
    ),
    "a linked lock": (a_run_with_a_linked_lock, "/run/.lock is a symbolic link, not the run's lock file: remove it"),
    "bad flag value": (lambda tmp_path, isbi_dir: ["--lr", "inf"], "argument --lr: 'inf' must be a finite number"),
    "empty slice list": (lambda tmp_path, isbi_dir: ["--val-slices", ","], "argument --val-slices: ',' names no slice"),
    "missing TIFF": (
        lambda tmp_path, isbi_dir: ["--images", tmp_path / "missing.tif", "--labels", isbi_dir / "train-labels.tif"],
        "missing.tif not found",
    ),
    "not a TIFF": (
        lambda tmp_path, isbi_dir: [
            "--images",
            not_an_image(tmp_path / "no.tif"),
            "--labels",
            isbi_dir / "train-labels.tif",
        ],
        "no.tif is not a readable TIFF",
    ),
    "mismatched stacks": (
        lambda tmp_path, isbi_dir: [
            "--images",
            isbi_dir / "train-volume.tif",
            "--labels",
            write_stack(tmp_path / "l.tif", cells_and_membranes(3)),
        ],
        "has 30 slices but",
    ),
    "not a run directory": (
        lambda tmp_path, isbi_dir: ["--resume", tmp_path],
        "is not a run directory (no config.json)",
    ),
    "inverted labels": (
        lambda tmp_path, isbi_dir: own_stacks(tmp_path, labels=255 - cells_and_membranes(4)),
        "this looks like membranes; pass --labels-polarity membranes-high",
    ),
    "NaN in an image": (nan_patch, "images.tif holds nan at slice 2, row 10, column 30"),
    "pages of two sizes": (appended_pages_of_two_sizes, "appended.tif holds 2 image series of different shapes"),
    "resume with a default flag": (
        resume_with_a_flag_at_its_default,
        "drop --logdir --loss (start a new run to change them)",
    ),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_bad_input_is_one_line_exit_2_before_tensorflow(case, tmp_path, isbi_dir):
    make_flags, message = TRAIN_CASES[case]
    flags = make_flags(tmp_path, isbi_dir)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    result = run_command("train", [*flags, "--logdir", tmp_path / "logs"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("train.py: error: "), result.stderr
    assert message in result.stderr
    assert result.stdout.endswith("tensorflow imported: False\n")
    assert not (tmp_path / "logs").exists()
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


TWO_WORKERS = {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]}
CLUSTER_CASES = {
    "multiworker without TF_CONFIG": ("multiworker", "", "--strategy multiworker needs TF_CONFIG naming the cluster"),
    "not JSON": ("auto", "{not json", 'TF_CONFIG is not valid JSON with a "cluster" of host:port addresses'),
    "no cluster": ("auto", json.dumps({"task": {"type": "worker", "index": 0}}), "TF_CONFIG is not valid JSON"),
    "an address without a port": (
        "multiworker",
        json.dumps({"cluster": {"worker": ["node1"]}, "task": {"type": "worker", "index": 0}}),
        'TF_CONFIG is not valid JSON with a "cluster" of host:port addresses',
    ),
    "a task outside the cluster": (
        "auto",
        json.dumps({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": 2}}),
        'TF_CONFIG\'s "task" ({"type": "worker", "index": 2}) is not one of its cluster\'s 2',
    ),
    "no task": ("multiworker", json.dumps({"cluster": TWO_WORKERS}), 'TF_CONFIG\'s "task" (null) is not one of'),
}


@pytest.mark.parametrize("case", CLUSTER_CASES)
def test_a_tf_config_the_strategy_cannot_start_with_is_refused_before_tensorflow(case, tmp_path, isbi_dir):
    strategy, tf_config, message = CLUSTER_CASES[case]
    result = run_command(
        "train", ["--data", isbi_dir, "--strategy", strategy, "--logdir", tmp_path / "logs"], TF_CONFIG=tf_config
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert result.stdout.endswith("tensorflow imported: False\n")
    assert not (tmp_path / "logs").exists()


def test_predict_refuses_bad_input_before_tensorflow(tmp_path, isbi_dir):
    result = run_command(
        "predict", [tmp_path / "nothing.keras", isbi_dir / "test-volume.tif", "-o", tmp_path / "p.tif"]
    )
    assert result.returncode == 2
    assert (
        result.stderr == f"predict.py: error: {tmp_path / 'nothing.keras'} not found: give a run directory of train.py "
        "or a .keras checkpoint\n"
    )
    assert result.stdout.endswith("tensorflow imported: False\n")


def test_predict_refuses_a_checkpoint_that_is_no_model_before_tensorflow(tmp_path, isbi_dir):
    (tmp_path / "half.keras").write_bytes(b"half a checkpoint")
    result = run_command("predict", [tmp_path / "half.keras", isbi_dir / data.TEST_IMAGES, "-o", tmp_path / "p.tif"])
    assert result.returncode == 2 and result.stderr == (
        f"predict.py: error: {tmp_path / 'half.keras'} is not a Keras model (a .keras file is a zip archive, and this "
        "is none): give a .keras checkpoint written by train.py\n"
    )
    assert result.stdout.endswith("tensorflow imported: False\n")


def test_predict_refuses_a_truncated_stack_before_tensorflow(tmp_path, isbi_dir, two_run_logdir):
    cut = truncated_copy(tmp_path, isbi_dir)
    result = run_command("predict", [two_run_logdir / "bce_lr1e-3", cut, "-o", tmp_path / "p.tif"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"predict.py: error: {cut} is truncated (") and "copy it again" in result.stderr
    assert result.stdout.endswith("tensorflow imported: False\n") and not (tmp_path / "p.tif").exists()


def test_predict_refuses_a_destination_it_cannot_write_before_tensorflow(tmp_path, isbi_dir, two_run_logdir):
    result = run_command("predict", [two_run_logdir / "bce_lr1e-3", isbi_dir / data.TEST_IMAGES, "-o", "/proc/p.tif"])
    assert result.returncode == 2 and result.stderr.startswith("predict.py: error: cannot write /proc/p.tif (/proc: ")
    assert result.stderr.endswith("): choose another -o\n") and result.stderr.count("\n") == 1
    assert result.stdout.endswith("tensorflow imported: False\n")


def test_a_tiny_run_writes_nothing_to_stderr_one_line_per_epoch_when_piped_and_records_its_mirror(tmp_path, mirror_url):
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, "--data", str(tmp_path / "isbi"), "--logdir", str(tmp_path / "logs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, data.MIRROR_ENV: mirror_url},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert all("; validation: V_rand " in line and "pixel error" in line for line in epoch_lines), epoch_lines
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    config = json.loads((tmp_path / "logs" / "bce_lr1e-4" / CONFIG).read_text())
    assert config["mirror"] == data.mirror_url(mirror_url)
    assert config["image_scaling"] == {"offset": 0.0, "scale": 255.0, "rule": "uint8 values: 8-bit, divided by 255"}


# Slow (10-25 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_tensorflow_loads_without_its_start_up_lines_unless_its_log_level_is_0():
    load = [sys.executable, "-c", "import cli; cli.import_tensorflow()"]
    quiet = subprocess.run(load, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (quiet.returncode, quiet.stderr) == (0, "")
    # TensorFlow's verbose log (VLOG 1) writes lines while it loads on every machine.
    loud = subprocess.run(
        load,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_MAX_VLOG_LEVEL": "1"},
    )
    assert any(cli.LOG_LINE.match(line) for line in loud.stderr.splitlines()), loud.stderr


def test_tensorflows_lines_are_filtered_as_its_log_level_says_and_errors_kept():
    caught = (
        f"{cli.ABSL_NOTICE}\n"
        "I0000 00:00:1796172240.244737    2478 port.cc:153] oneDNN custom operations are on.\n"
        "W0000 00:00:1796172240.3    2478 gpu_device.cc:2] a warning\n"
        "E0000 00:00:1796172240.4    2478 cuda_dnn.cc:8] a real error\n"
        "a line of Python's own\n"
    )
    assert cli.tensorflow_log_lines(caught, "2").splitlines() == [caught.splitlines()[3], "a line of Python's own"]
    assert cli.tensorflow_log_lines(caught, "1").splitlines() == caught.splitlines()[2:]
    assert cli.tensorflow_log_lines(caught, "0") == caught


def interrupt_when(tmp_path, small_isbi_dir, ready, signum=signal.SIGINT):
    """Send `signum` (Ctrl-C's SIGINT unless told) to a training once `ready(run_dir)`; (exit code,
    stdout and stderr as one stream)."""
    run_dir = tmp_path / "logs" / "bce_lr1e-3"
    process = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *TINY,
            "--epochs",
            "50",
            "--lr",
            "1e-3",
            "--eval-every",
            "0",
            "--data",
            str(small_isbi_dir),
            "--logdir",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Under nohup SIGHUP is ignored, in a background shell job SIGINT, and
        # the child would inherit that instead of stopping.
        preexec_fn=lambda: [signal.signal(signum, signal.SIG_DFL) for signum in cli.STOP_SIGNALS],
    )
    deadline = time.monotonic() + 240
    while not ready(run_dir) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output, run_dir


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_kept(tmp_path, small_isbi_dir):
    code, output, run_dir = interrupt_when(tmp_path, small_isbi_dir, lambda run_dir: (run_dir / "train").is_dir())
    assert code == 130, output
    assert output.endswith(
        f"\ntrain.py: interrupted: no epoch of {run_dir} was checkpointed, so nothing was kept: start the run again\n"
    ), output[-400:]
    assert not run_dir.exists()


def test_ctrl_c_after_a_checkpoint_names_the_run_to_resume_on_a_line_of_its_own(tmp_path, small_isbi_dir):
    code, output, run_dir = interrupt_when(tmp_path, small_isbi_dir, lambda run_dir: (run_dir / LAST).is_file())
    assert code == 130, output
    assert output.endswith(
        f"\ntrain.py: interrupted: continue the run from its last checkpoint with --resume {run_dir}\n"
    )
    assert (run_dir / LAST).is_file()


# Slow: a third training stopped by a real signal. By default Ctrl-C after a checkpoint takes the same
# path, SIGHUP before one a signal Python does not handle itself, and the in-process test SIGTERM's code.
@pytest.mark.slow
def test_sigterm_after_a_checkpoint_stops_the_run_like_ctrl_c_with_exit_code_143(tmp_path, small_isbi_dir):
    code, output, run_dir = interrupt_when(
        tmp_path, small_isbi_dir, lambda run_dir: (run_dir / LAST).is_file(), signal.SIGTERM
    )
    assert code == 128 + signal.SIGTERM, output
    assert output.endswith(
        f"\ntrain.py: stopped by SIGTERM: continue the run from its last checkpoint with --resume {run_dir}\n"
    ), output[-400:]
    assert (run_dir / LAST).is_file()


# Slow (10-25 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_sighup_before_the_first_checkpoint_removes_the_run(tmp_path, small_isbi_dir):
    code, output, run_dir = interrupt_when(
        tmp_path, small_isbi_dir, lambda run_dir: (run_dir / "train").is_dir(), signal.SIGHUP
    )
    assert code == 128 + signal.SIGHUP, output
    assert output.endswith(
        f"\ntrain.py: stopped by SIGHUP: no epoch of {run_dir} was checkpointed, so nothing was kept: "
        "start the run again\n"
    ), output[-400:]
    assert not run_dir.exists()


def test_a_stop_signal_in_training_is_raised_between_steps_and_a_second_one_at_once(capsys, untouched_stop_signals):
    reached = []

    def training():
        with cli.stopping_between_steps():
            signal.raise_signal(signal.SIGHUP)
            reached.append("the step in flight ended")
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGTERM)  # a second signal: the user insists
            reached.append("the second signal raised")
            cli.stop_if_interrupted()
            reached.append("not reached")

    assert cli.run("train.py", training) == 143
    assert reached == ["the step in flight ended", "the second signal raised"]
    assert capsys.readouterr().err == "train.py: stopped by SIGTERM: nothing was written\n"
    assert cli.run("train.py", cli.stop_if_interrupted) == 0  # no signal this time

    def finished_before_a_step_edge():
        with cli.stopping_between_steps():
            signal.raise_signal(signal.SIGINT)
        reached.append("after the block")
        signal.raise_signal(signal.SIGINT)  # outside the block a signal raises at once

    assert cli.run("train.py", finished_before_a_step_edge) == 130
    assert reached[-1] == "after the block"


def test_an_error_raised_after_ctrl_c_is_told_as_the_interrupt(capsys, untouched_stop_signals):
    def interrupted_inside_tensorflow():
        # TensorFlow's C++ code, interrupted, can raise a SystemError in place of the KeyboardInterrupt.
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise SystemError("bad argument to internal function") from None

    assert cli.run("train.py", interrupted_inside_tensorflow) == 130
    assert capsys.readouterr().err == "train.py: interrupted: nothing was written\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def broken():
        raise SystemError("bad argument to internal function")

    with pytest.raises(SystemError):  # without Ctrl-C, an error is no interrupt
        cli.run("train.py", broken)

    def a_bug_after_ctrl_c():
        with cli.stopping_between_steps():
            signal.raise_signal(signal.SIGINT)  # noted, to be raised at the next step's edge
            raise ValueError("a bug of the step in flight")

    with pytest.raises(ValueError):  # after Ctrl-C too: a bug is told as itself, not as the interrupt
        cli.run("train.py", a_bug_after_ctrl_c)
