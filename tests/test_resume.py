"""Never lose a run: resume, kill -9, non-finite loss, full disk, simultaneous starts."""

import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hparams_metadata

import callbacks
import checkpoints
import cli
import flags
import inputs
import resume
import rundir
import runs
import settings
import summaries
import train
import validation
import watcher
from conftest import ROOT, TINY, built_once, raw_events, read_events, saved_at_step, steps, tiny_run
from rundir import CONFIG
from summaries import BATCH_GROUP, BEST_TAG, EPOCH_TAG, SHOWN_GROUP, SLICE_GROUP

STRAIGHT_AND_RESUMED = ("--ema", "0.9", "--dropout", "0.5")  # the flags of straight_and_resumed's runs


@pytest.fixture(scope="session")
def straight_and_resumed(tmp_path_factory, small_isbi_dir, worker_id):
    """The same 3-epoch run twice: straight through, and stopped after 2 epochs then resumed. Both
    average their weights (--ema), whose checkpoints hold the average as the net's weights, and
    drop out (--dropout), whose random state no checkpoint holds. Read only."""

    def train_both(logdir):
        assert tiny_run(small_isbi_dir, logdir / "straight", "--epochs", "3", *STRAIGHT_AND_RESUMED) == 0
        assert tiny_run(small_isbi_dir, logdir / "resumed", "--epochs", "2", *STRAIGHT_AND_RESUMED) == 0
        assert train.main(["--resume", str(logdir / "resumed" / "bce_lr1e-3"), "--epochs", "3"]) == 0

    logdir = built_once(tmp_path_factory, worker_id, "straight_and_resumed", train_both)
    return logdir / "straight" / "bce_lr1e-3", logdir / "resumed" / "bce_lr1e-3"


def test_a_resumed_run_writes_the_same_curves_as_one_run_straight_through(straight_and_resumed):
    straight, resumed = map(raw_events, straight_and_resumed)
    assert straight.keys() == resumed.keys()
    # The Text tab's documents again where the run went on, telling how it was resumed.
    documents = runs.run_documents(json.loads((straight_and_resumed[1] / CONFIG).read_text()))
    for part in straight:
        assert {tag: steps(series) for tag, series in resumed[part].items()} == {
            tag: steps(series) + ([6] if part == "" and tag in documents else [])
            for tag, series in straight[part].items()
        }, part
    _, command = resumed[""]["run/command"][-1]
    assert command.item().decode().splitlines()[1:] == [
        f"    python train.py --resume {straight_and_resumed[1]} --epochs 3"
    ]
    # Same weights, optimizer state, average and crops in the same order after the restart: the same
    # losses, of the trained weights (train) and of their average (validation).
    for part, tag in (
        ("train", EPOCH_TAG.format("loss")),
        ("validation", EPOCH_TAG.format("loss")),
        ("train", f"{BATCH_GROUP}/loss"),
        ("validation", f"{SHOWN_GROUP}/misclassified_pixel_fraction"),
    ):
        np.testing.assert_allclose(
            [value for _, value in resumed[part][tag]],
            [value for _, value in straight[part][tag]],
            rtol=1e-6,
            err_msg=tag,
        )
    assert steps(resumed["train"][EPOCH_TAG.format("loss")]) == [0, 1, 2]
    assert steps(resumed["train"][f"{BATCH_GROUP}/loss"]) == [2, 4, 6, 8]
    assert steps(resumed[""][BEST_TAG.format("v_rand")]) == [3, 6, 9]


@pytest.mark.parametrize(
    "recorded, written_at",
    [
        ({"config_version": 1}, [0, 1, 2]),
        ({"config_version": rundir.CONFIG_VERSION, rundir.BEST_SCORES_AT: "step"}, [3, 6, 9]),
    ],
)
def test_resume_cuts_the_best_scores_where_the_run_writes_them(tmp_path, recorded, written_at):
    """A run started before config_version 2 wrote its best-so-far scalars at the epoch index; a
    newer one at the evaluation's step. Resumed after 2 epochs of 3 steps, each keeps its first two."""
    config = rundir.migrate({**settings.DEFAULTS, **rundir.UNVERSIONED, **recorded}, CONFIG)
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        for step in written_at:
            tf.summary.scalar(BEST_TAG.format("v_rand"), 0.5, step=step)
    resume.cut_event_files(tmp_path, 2, 6, resume.epoch_indexed(config), runs.hyperparameters(config))
    assert steps(raw_events(tmp_path)[""][BEST_TAG.format("v_rand")]) == written_at[:2]


def test_resuming_again_from_the_same_checkpoint_writes_the_text_tabs_documents_there_once(tmp_path):
    """A resume from step 6 killed before its next checkpoint had written the documents at step 6,
    as the second resume from step 6 does again."""
    config = rundir.migrate({**settings.DEFAULTS, **rundir.UNVERSIONED}, CONFIG)
    document = summaries.DOCUMENT_TAG.format("command")
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        for step in (0, 6):
            tf.summary.text(document, "python train.py", step=step)
            tf.summary.scalar(summaries.EVALUATION_TAG.format("loss"), 0.5, step=step)
    resume.cut_event_files(tmp_path, 2, 6, resume.epoch_indexed(config), runs.hyperparameters(config))
    events = raw_events(tmp_path)[""]
    assert steps(events[document]) == [0] and steps(events[summaries.EVALUATION_TAG.format("loss")]) == [0, 6]


def test_the_watcher_writes_every_tag_step_and_value_that_watching_on_the_training_thread_writes(
    straight_and_resumed, small_isbi_dir, tmp_path, monkeypatch
):
    # The same run as the straight one, its watching done at once on the training thread (bench.py's
    # baseline): what the watcher wrote beside training is the same, in the same order.
    monkeypatch.setattr(watcher, "running", functools.partial(watcher.running, inline=True))
    assert tiny_run(small_isbi_dir, tmp_path, "--epochs", "3", *STRAIGHT_AND_RESUMED) == 0
    threaded, inline = raw_events(straight_and_resumed[0]), raw_events(tmp_path / "bce_lr1e-3")
    assert threaded.keys() == inline.keys()
    for part in threaded:
        assert list(threaded[part]) == list(inline[part]), part  # the tags in the order first written
        for tag, series in threaded[part].items():
            assert steps(series) == steps(inline[part][tag]), (part, tag)
            values, expected = [value for _, value in series], [value for _, value in inline[part][tag]]
            if values[0].dtype.kind == "f":
                np.testing.assert_allclose(values, expected, rtol=1e-6, err_msg=f"{part} {tag}")


def test_the_hparams_tab_shows_a_resumed_run_with_its_new_epochs(straight_and_resumed):
    def hyperparameters(run_dir):
        _, plugins = read_events(run_dir)
        _, content = plugins[hparams_metadata.SESSION_START_INFO_TAG]
        start = hparams_metadata.parse_session_start_info_plugin_data(content)
        return start.group_name, dict(start.hparams)

    straight, resumed = map(hyperparameters, straight_and_resumed)
    assert resumed == straight and resumed[1]["epochs"].number_value == 3


def test_a_resumed_run_records_how_it_was_continued(straight_and_resumed):
    config = json.loads((straight_and_resumed[1] / CONFIG).read_text())
    assert config["epochs"] == 3
    assert config["resumed"] == [f"python train.py --resume {straight_and_resumed[1]} --epochs 3"]


def test_resuming_a_finished_run_asks_for_more_epochs(straight_and_resumed, capsys):
    assert train.main(["--resume", str(straight_and_resumed[0])]) == 2
    assert "has finished its 3 epochs: give --epochs with more" in capsys.readouterr().err
    # Told before TensorFlow loads, from the step stored in the checkpoint's weights file.
    last = straight_and_resumed[0] / rundir.LAST
    assert rundir.checkpoint_step(last) == int(keras.models.load_model(last).optimizer.iterations.numpy()) == 3 * 3


def test_resume_keeps_the_runs_settings(straight_and_resumed, capsys):
    assert train.main(["--resume", str(straight_and_resumed[0]), "--lr", "0.1", "--epochs", "4"]) == 2
    assert "drop --lr (start a new run to change them)" in capsys.readouterr().err


def test_resume_refuses_to_profile_steps_the_run_has_trained(straight_and_resumed, capsys):
    config = (straight_and_resumed[1] / CONFIG).read_bytes()
    assert train.main(["--resume", str(straight_and_resumed[1]), "--epochs", "4", "--profile-batch", "9,10"]) == 2
    assert "--profile-batch 9,10: this run trains steps 10 to 12; pick steps among them" in capsys.readouterr().err
    assert (straight_and_resumed[1] / CONFIG).read_bytes() == config


def test_resume_of_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path} is not a run directory (no config.json)" in error and error.count("\n") == 1


def test_resume_of_a_run_without_a_finished_epoch_is_refused(tmp_path, capsys):
    (tmp_path / CONFIG).write_text(json.dumps({"steps_per_epoch": 3}))
    assert train.main(["--resume", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "has no last.keras: it stopped before its first epoch ended" in error and error.count("\n") == 1


def test_resume_of_a_damaged_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / CONFIG).write_text(json.dumps({"steps_per_epoch": 3}))
    (tmp_path / rundir.LAST).write_bytes(b"half a checkpoint")
    with pytest.raises(resume.ResumeError, match="last.keras is unreadable .*start a new one"):
        resume.restore_model(tmp_path, {"steps_per_epoch": 3})


def test_kill_9_mid_epoch_is_recoverable(tmp_path, small_isbi_dir):
    logdir = tmp_path / "logs"
    run_dir = logdir / "bce_lr1e-3"
    epochs = 12  # the kill, a second after the first checkpoint, must fall well before the end
    command = [
        sys.executable,
        "train.py",
        *TINY,
        "--epochs",
        str(epochs),
        "--eval-every",
        "0",
        "--update-freq",
        "1",
        "--image-every",
        "1",
        "--lr",
        "1e-3",
        "--data",
        str(small_isbi_dir),
        "--logdir",
        str(logdir),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / rundir.LAST).exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # into the next epoch
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed = raw_events(run_dir)
    best_before = (run_dir / rundir.BEST).read_bytes()

    assert train.main(["--resume", str(run_dir)]) == 0
    events = raw_events(run_dir)
    assert [path.name for path in logdir.iterdir()] == ["bce_lr1e-3"]
    for part, tags in events.items():
        for tag, series in tags.items():
            assert steps(series) == sorted(set(steps(series))), (part, tag)  # strictly increasing
    assert steps(events["train"][EPOCH_TAG.format("loss")]) == list(range(epochs))
    assert steps(events["train"][f"{BATCH_GROUP}/loss"]) == list(range(1, epochs * 3 + 1))
    assert steps(events["validation"][f"{SLICE_GROUP.format(15)}/prediction"]) == list(range(epochs * 3 + 1))
    assert len(steps(killed["train"][f"{BATCH_GROUP}/loss"])) < epochs * 3  # it was killed before the end
    assert not list(run_dir.rglob(".*partial*"))
    model = keras.models.load_model(run_dir / rundir.BEST)  # intact, whichever epoch it is from
    assert model.output_shape == (None, None, None, 1)
    assert best_before != b""


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_a_non_finite_loss_stops_the_run_with_step_loss_and_lr(tmp_path, small_isbi_dir, capsys, precision):
    # A rate near float32's largest overflows the weights within a few steps in any precision; with
    # 1e30 the loss stayed finite where oneDNN is on (CPUs with AVX-512 bf16).
    assert (
        train.main(
            TINY
            + [
                "--loss",
                "mse",
                "--lr",
                "3e38",
                "--precision",
                precision,
                "--data",
                str(small_isbi_dir),
                "--logdir",
                str(tmp_path),
            ]
        )
        == 1
    )
    error = capsys.readouterr().err
    assert "the training loss became nan at step" in error and "with lr 3e+38" in error
    assert "before the run's first checkpoint: start again with a lower --lr" in error and "Traceback" not in error
    assert not (tmp_path / "mse_lr3e+38" / rundir.LAST).exists()
    # Its curves show where it diverged; no best score comes from the weights that did.
    assert [tag for tag in raw_events(tmp_path / "mse_lr3e+38")[""] if tag.startswith(BEST_TAG.format(""))] == []


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, small_isbi_dir, monkeypatch, capsys):
    real_save = keras.Model.save
    calls = []

    def save_until_the_disk_is_full(model, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == 1:  # best.keras of the first epoch, copied to last.keras
            return real_save(model, filepath, *args, **kwargs)
        Path(filepath).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(keras.Model, "save", save_until_the_disk_is_full)
    assert tiny_run(small_isbi_dir, tmp_path, "--eval-every", "0") == 1  # a run that stopped
    run_dir = tmp_path / "bce_lr1e-3"
    error = capsys.readouterr().err
    assert (
        f"cannot write {run_dir}/" in error
        and "(No space left on device): free some space, then continue "
        f"the run from its last checkpoint with --resume {run_dir}"
        in error
        and error.count("\n") == 1
    )
    monkeypatch.undo()
    last = keras.models.load_model(run_dir / rundir.LAST)
    assert int(last.optimizer.iterations.numpy()) == 3  # the first epoch's, whole
    assert not list(run_dir.glob(".*partial*"))


def test_training_waits_for_the_watcher_to_finish_the_former_epoch_so_a_kill_loses_at_most_one(
    tmp_path, small_isbi_dir, monkeypatch
):
    # Scoring slower than an epoch trains (an accelerator, or a watcher starved of CPU): at each
    # epoch's end the former epoch is scored and promoted before the next is handed over.
    real_score, real_save = validation.Validation.score, checkpoints.Checkpoints.on_epoch_end
    candidates_after_a_save = []

    def slow_score(self, logs, epoch, probabilities):
        time.sleep(0.5)
        real_score(self, logs, epoch, probabilities)

    def counted_save(self, epoch, logs=None):
        real_save(self, epoch, logs)
        candidates_after_a_save.append(len(list(self.run_dir.glob(rundir.candidate_checkpoint("", "*").name))))

    monkeypatch.setattr(validation.Validation, "score", slow_score)
    monkeypatch.setattr(checkpoints.Checkpoints, "on_epoch_end", counted_save)
    assert tiny_run(small_isbi_dir, tmp_path, "--epochs", "5", "--eval-every", "0") == 0
    assert len(candidates_after_a_save) == 5 and max(candidates_after_a_save) <= 2  # this epoch's and the former's
    assert rundir.checkpoint_step(tmp_path / "bce_lr1e-3" / rundir.LAST) == 5 * 3


# Slow (20-45 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_a_second_ctrl_c_skips_the_watchers_jobs_not_begun_and_leaves_a_run_that_resumes(
    tmp_path, small_isbi_dir, monkeypatch, capsys, untouched_stop_signals
):
    scoring, closing = threading.Event(), threading.Event()
    real_score, real_close = validation.Validation.score, watcher.Watcher.close
    real_epoch_begin = callbacks.StopBetweenSteps.on_epoch_begin

    def first_ctrl_c_while_epoch_1_is_scored(self, epoch, logs=None):
        if epoch == 2:
            assert scoring.wait(60)
            os.kill(os.getpid(), signal.SIGINT)  # kept back to the step's edge, just below
        real_epoch_begin(self, epoch, logs)

    def scored_slowly(self, logs, epoch, probabilities):
        if epoch == 1:
            scoring.set()
            assert closing.wait(60)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # the user insists while the watcher finishes
            time.sleep(0.3)
        real_score(self, logs, epoch, probabilities)

    def close(self):
        closing.set()
        real_close(self)

    monkeypatch.setattr(callbacks.StopBetweenSteps, "on_epoch_begin", first_ctrl_c_while_epoch_1_is_scored)
    monkeypatch.setattr(validation.Validation, "score", scored_slowly)
    monkeypatch.setattr(watcher.Watcher, "close", close)
    assert tiny_run(small_isbi_dir, tmp_path, "--epochs", "4", "--eval-every", "0") == 130
    run_dir = tmp_path / "bce_lr1e-3"
    assert capsys.readouterr().err.endswith(
        f"train.py: interrupted: continue the run from its last checkpoint with --resume {run_dir}\n"
    )
    # Epoch 1 was scored (the job in progress) but not promoted (a job not begun): epoch 0 is kept.
    assert rundir.checkpoint_step(run_dir / rundir.LAST) == 3
    assert not list(run_dir.glob(".*partial*"))
    monkeypatch.undo()
    assert train.main(["--resume", str(run_dir)]) == 0
    assert steps(raw_events(run_dir)["train"][EPOCH_TAG.format("loss")]) == [0, 1, 2, 3]


def test_an_event_file_that_cannot_be_written_stops_the_run_with_one_line(
    tmp_path, small_isbi_dir, monkeypatch, capsys
):
    def disk_full(*args):
        # What TensorFlow's summary writer raises on a full disk.
        raise tf.errors.ResourceExhaustedError(
            None,
            None,
            "{{function_node __wrapped__FlushSummaryWriter_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
            "/logs/validation/events.out.tfevents.1; No space left on device\n\tCould not flush events file.",
        )

    monkeypatch.setattr(summaries, "write_shown_slices", disk_full)
    assert tiny_run(small_isbi_dir, tmp_path) == 1
    run_dir = tmp_path / "bce_lr1e-3"
    assert capsys.readouterr().err == (
        f"train.py: stopped: a file error on {run_dir / rundir.VALIDATION} (No space left on device) stopped the "
        f"run; no epoch of {run_dir} was checkpointed, so nothing was kept: start the run again\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_a_checkpoint_is_said_so_when_the_watcher_failed_on_it_too(tmp_path, monkeypatch):
    watching = watcher.Watcher()
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    monkeypatch.setattr(
        model, "save", lambda path: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    )
    saving = checkpoints.Checkpoints(watching, tmp_path, {}, settings.CHECKPOINT_SCORE)
    saving.set_model(model)
    watching.submit(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "an event file")))
    with pytest.raises(checkpoints.CheckpointError, match="No space left on device.*start the run again"):
        saving.on_epoch_end(0, {"loss": 0.5})
    watching.close()  # the watcher's error was said: not again


# Slow (20-45 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_a_full_disk_at_best_keras_leaves_both_checkpoints_of_the_former_epoch(
    tmp_path, small_isbi_dir, monkeypatch, capsys
):
    copies, real_copyfile = [], shutil.copyfile

    def disk_full_at_the_second_copy(source, destination):
        copies.append(destination)
        if len(copies) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_copyfile(source, destination)

    monkeypatch.setattr(checkpoints.Checkpoints, "improves", lambda self, score: True)  # each epoch the best
    monkeypatch.setattr(checkpoints.shutil, "copyfile", disk_full_at_the_second_copy)
    assert tiny_run(small_isbi_dir, tmp_path, "--eval-every", "0") == 1
    run_dir = tmp_path / "bce_lr1e-3"
    assert capsys.readouterr().err.startswith(f"train.py: stopped: cannot write {run_dir / rundir.BEST} (No space")
    assert rundir.checkpoint_step(run_dir / rundir.LAST) == rundir.checkpoint_step(run_dir / rundir.BEST) == 3
    assert not list(run_dir.glob(".*partial*"))
    monkeypatch.undo()
    assert train.main(["--resume", str(run_dir)]) == 0  # epoch 2 again: the run had not finished


# Slow (10-25 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_a_kill_between_the_two_renames_is_put_right_by_resume(tmp_path, small_isbi_dir, capsys):
    assert tiny_run(small_isbi_dir, tmp_path, "--eval-every", "0", "--epochs", "1") == 0
    run_dir = tmp_path / "bce_lr1e-3"
    # Killed after last.keras's rename, before best.keras's: best.keras still under its temporary name.
    (run_dir / rundir.BEST).rename(run_dir / f".best.{os.getpid()}.partial.keras")
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir), "--epochs", "2"]) == 0
    assert (
        f"{run_dir / rundir.BEST} is now the net of epoch 1, the best so far: the run was stopped between "
        "saving it as last.keras and as best.keras\n" in capsys.readouterr().out
    )
    assert rundir.checkpoint_step(run_dir / rundir.BEST) in (3, 6)  # epoch 1's, unless epoch 2 beat it
    assert not list(run_dir.glob(".*partial*"))


@pytest.mark.parametrize(
    "scores, best_step, put_right",
    [
        ({0: 0.5, 1: 0.6}, 3, True),  # the last epoch is the best, best.keras an earlier one's
        ({0: 0.5, 1: 0.6}, 6, False),  # best.keras is the last epoch's already
        ({0: 0.6, 1: 0.6}, 3, False),  # a tie keeps the earlier epoch
        ({0: 0.6, 1: 0.5}, 3, False),  # the last epoch is not the best
        ({0: 0.6}, 3, False),  # the last epoch was not scored (--eval-every)
    ],
)
def test_resume_puts_best_right_only_where_the_curves_say_the_last_epoch_is_the_best(
    tmp_path, scores, best_step, put_right
):
    saved_at_step(tmp_path / rundir.LAST, 6)
    saved_at_step(tmp_path / rundir.BEST, best_step)
    assert checkpoints.best_put_right(tmp_path, "v_rand", scores, 1) == put_right
    assert rundir.checkpoint_step(tmp_path / rundir.BEST) == (6 if put_right else best_step)


OOM = (
    "OOM when allocating tensor with shape[100000,64,64,4] and type float on "
    "/job:localhost/replica:0/task:0/device:CPU:0"
)


@pytest.mark.parametrize(
    "error, said",
    [
        (
            tf.errors.ResourceExhaustedError(None, None, OOM + " by allocator cpu\n\t [[{{node conv}}]]"),
            "out of memory (OOM when allocating tensor with shape[100000,64,64,4])",
        ),
        (  # what --batch-size 100000 at the defaults gets (TensorFlow 2.21, CPU)
            tf.errors.InvalidArgumentError(
                None,
                None,
                "Graph execution error:\n\nDetected at node gradient_tape/compile_loss/binary_crossentropy/"
                "logistic_loss/zeros_like defined at (most recent call last):\nCannot parse tensor from proto: "
                "goo.gle/debugonly \ndtype: DT_FLOAT\ntensor_shape {\n  dim {\n    size: 100000\n  }\n}",
            ),
            "a tensor of the training step too large for TensorFlow (over 2 GB in its graph)",
        ),
    ],
    ids=["out of memory", "tensor too large"],
)
def test_a_run_out_of_memory_stops_with_one_line_that_says_what_to_lower(
    tmp_path, small_isbi_dir, monkeypatch, capsys, error, said
):
    def first_step_out_of_memory(self, batch, logs=None):
        raise error

    monkeypatch.setattr(callbacks.StopBetweenSteps, "on_train_batch_begin", first_step_out_of_memory)
    assert tiny_run(small_isbi_dir, tmp_path) == 1
    assert capsys.readouterr().err == (
        f"train.py: stopped: {said}: lower --batch-size, --crop or --filters; no epoch of "
        f"{tmp_path / 'bce_lr1e-3'} was checkpointed, so nothing was kept: start the run again\n"
    )
    assert list(tmp_path.iterdir()) == []  # a run that --summary would list but --resume refuse


# As `--logdir logs/bce_lr1e-3` and `--logdir logs/bce_lr1e-3/train` make them.
@pytest.mark.parametrize("inside", ["", "train/"])
def test_removing_a_run_stopped_before_its_first_checkpoint_keeps_a_run_started_inside_it(
    inside, tmp_path, small_isbi_dir, monkeypatch, capsys
):
    nested = tmp_path / "bce_lr1e-3" / inside / "dice_lr1e-3"

    def run_nested_then_stop(self, batch, logs=None):
        (nested / "train").mkdir(parents=True)
        for name in (CONFIG, rundir.LAST, "train/events.out.tfevents.1.host"):
            (nested / name).write_text(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.StopBetweenSteps, "on_train_batch_begin", run_nested_then_stop)
    assert tiny_run(small_isbi_dir, tmp_path) == 130
    assert capsys.readouterr().err.endswith("so nothing was kept: start the run again\n")
    kept = f"bce_lr1e-3/{inside}dice_lr1e-3"
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "bce_lr1e-3",
        *(["bce_lr1e-3/train"] if inside else []),
        kept,
        f"{kept}/config.json",
        f"{kept}/last.keras",
        f"{kept}/train",
        f"{kept}/train/events.out.tfevents.1.host",
    ]


# Slow: two processes train at once; test_trust's two resumes started together check the same lock by default.
@pytest.mark.slow
def test_two_runs_started_together_get_two_directories(tmp_path, small_isbi_dir):
    command = [
        sys.executable,
        "train.py",
        *TINY,
        "--epochs",
        "1",
        "--eval-every",
        "0",
        "--lr",
        "1e-3",
        "--data",
        str(small_isbi_dir),
        "--logdir",
        str(tmp_path),
    ]
    processes = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bce_lr1e-3", "bce_lr1e-3_2"]
    # The second says so, since the README's commands name the first.
    assert (
        sum(
            f"run directory: {tmp_path / 'bce_lr1e-3_2'} ({tmp_path / 'bce_lr1e-3'} holds an earlier run: name "
            "bce_lr1e-3_2 in the commands for this one)" in output
            for output in outputs
        )
        == 1
    )
    for run_dir in tmp_path.iterdir():
        assert json.loads((run_dir / CONFIG).read_text())["run_dir"] == str(run_dir)
        assert len(list((run_dir / "train").glob("events.out.tfevents.*"))) == 1
        assert (run_dir / rundir.LAST).is_file()


def test_a_run_started_before_a_setting_existed_resumes_with_what_it_ran_with():
    args, given = cli.parse_with_given(flags.build_parser(), ["--resume", "run"])
    older = rundir.migrate({"loss": "bce", "lr": 1e-4, "crop": 128, "batch_size": 4}, CONFIG)
    resumed = train.resumed_arguments(args, given, older)
    assert (resumed.ema, resumed.crop, resumed.batch_size) == (0.0, 128, 4)  # not today's defaults
    assert resumed.dropout == 0.0


# Slow (20-45 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_a_run_started_before_its_settings_existed_resumes_and_records_them(tmp_path, small_isbi_dir):
    assert tiny_run(small_isbi_dir, tmp_path, "--epochs", "1", "--ema", "0") == 0
    run_dir = tmp_path / "bce_lr1e-3"
    config = json.loads((run_dir / CONFIG).read_text())
    # As config.json was before it had a version, or these settings.
    del config["config_version"], config["ema"], config["dropout"], config["preset"], config["resumed"]
    del config[rundir.BEST_SCORES_AT]
    (run_dir / CONFIG).write_text(json.dumps(config))
    assert train.main(["--resume", str(run_dir), "--epochs", "2"]) == 0
    resumed = json.loads((run_dir / CONFIG).read_text())
    assert (resumed["ema"], resumed["dropout"], resumed["preset"]) == (0.0, 0.0, None)
    assert resumed[rundir.BEST_SCORES_AT] == "epoch"  # where it wrote them before
    assert resumed["config_version"] == rundir.CONFIG_VERSION and len(resumed["resumed"]) == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"config_version": 99}, "has config_version 99, which this version of the project does not know"),
        ({"config_version": "1"}, "has config_version '1', which this version of the project does not know"),
        ({"config_version": True}, "has config_version True, which this version of the project does not know"),
        ({"lr": None}, "lacks lr: restore it from a copy"),
    ],
)
def test_a_config_of_a_newer_version_or_lacking_a_setting_is_refused(tmp_path, edit, message):
    config = {
        **settings.DEFAULTS,
        **rundir.UNVERSIONED,
        rundir.BEST_SCORES_AT: "step",
        "config_version": rundir.CONFIG_VERSION,
        **edit,
    }
    config = {name: value for name, value in config.items() if name not in edit or edit[name] is not None}
    (tmp_path / rundir.CONFIG).write_text(json.dumps(config))
    with pytest.raises(cli.InputError, match=re.escape(f"{tmp_path / rundir.CONFIG} {message}")):
        rundir.read_config(tmp_path)


@pytest.mark.slow
def test_a_resumed_run_scales_its_images_as_recorded(tmp_path, small_isbi_dir):
    """A run started under another scaling rule goes on seeing its images as it did."""
    assert tiny_run(small_isbi_dir, tmp_path, "--epochs", "1", "--eval-every", "0") == 0
    run_dir = tmp_path / "bce_lr1e-3"
    config = json.loads((run_dir / rundir.CONFIG).read_text())
    older = {"offset": 10.0, "scale": 200.0, "rule": "an older rule"}
    (run_dir / rundir.CONFIG).write_text(json.dumps({**config, "image_scaling": older}))
    args, given = cli.parse_with_given(flags.build_parser(), ["--resume", str(run_dir), "--epochs", "2"])
    resumed = train.resumed_arguments(args, given, rundir.read_config(run_dir))
    assert inputs.load(resumed, resumed_config=rundir.read_config(run_dir)).stacks.scaling.rule == "an older rule"
    assert train.main(["--resume", str(run_dir), "--epochs", "2"]) == 0
    assert json.loads((run_dir / rundir.CONFIG).read_text())["image_scaling"] == older
