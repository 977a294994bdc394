"""What `python train.py --resume <run dir>` needs to continue a run where its last checkpoint
(callbacks.Checkpoints) left it.

A resumed run continues
from `last.keras`: epoch = global step / steps per epoch, and the training crops continue from
that epoch's seed. What the killed process logged after its last checkpoint is cut from the event
files first, so that TensorBoard's curves continue without a gap or a duplicated point.
"""

import re
from pathlib import Path

import keras
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

import checkpoints
import files
import rundir
import runs
import summaries
import unet
from cli import InputError
from rundir import LAST


class ResumeError(InputError):
    """A run that cannot continue; one line with the fix."""


# --- resuming ---------------------------------------------------------------------------------


def described(error):
    """`error` in one line: its type and the first line of its message, which says whether the file
    is damaged or the code cannot read it."""
    first = next(iter(str(error).strip().splitlines()), "")
    return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


def restore_model(run_dir, config):
    """(compiled model with its optimizer state, completed epochs) from the run's last checkpoint.
    A checkpoint of a run with --ema holds the averaged weights as the net's and the trained ones
    in the optimizer's average (unet.AveragedWeights): they are swapped back to train on."""
    path = Path(run_dir) / LAST
    try:
        model = keras.models.load_model(path)
    except Exception as error:  # Keras raises several types for files it cannot read
        # A whole archive it cannot read (train.py's --resume refused a damaged one before TensorFlow).
        why = rundir.why_damaged(path) or described(error)
        try:
            keras.models.load_model(Path(run_dir) / rundir.BEST)
        except Exception:
            raise ResumeError(rundir.unreadable_checkpoint(run_dir, why, best_whole=False)) from error
        raise ResumeError(rundir.unreadable_checkpoint(run_dir, why, best_whole=True)) from error
    if unet.averages_weights(model):
        unet.averaged_weights_swap(model)()
    return model, int(model.optimizer.iterations.numpy()) // config["steps_per_epoch"]


def epoch_indexed(config):
    """The tags a run writes at the epoch index: Keras' epoch scalars, the weight histograms of
    runs started before they moved to the global step, and the best-so-far scalars of runs started
    before config_version 2 (rundir.BEST_SCORES_AT). All others are at the global training step."""
    best = f"|{summaries.BEST_TAG.format('')}" if config[rundir.BEST_SCORES_AT] == "epoch" else ""
    return re.compile(rf"^({summaries.EPOCH_TAG.format('')}{best})|/histogram$")


def cut_event_files(run_dir, epoch, step, epoch_tags, hyperparameters):
    """Remove from the run's own event files (rundir.event_directories: never those of a run
    nested in it) what was written after the checkpoint of `epoch` epochs and `step` steps:
    epoch-indexed summaries (tags matching `epoch_tags`) of epoch `epoch` on, step-indexed ones
    after `step`, the Text tab's documents of a resume from `step`, and a record a kill cut short;
    and give the HParams tab the resumed run's `hyperparameters` (its --epochs). Each file is
    rewritten atomically, so a kill or a full disk during the cut leaves files that a second
    --resume cuts the same way."""
    paths = sorted(
        path for directory in rundir.event_directories(run_dir) for path in directory.glob(rundir.EVENT_FILES)
    )
    read = {path: summaries.read_records(path) for path in paths}
    for path, (_, damaged_at) in read.items():  # refused before anything is rewritten
        if damaged_at is not None:
            raise ResumeError(summaries.damaged_event_file(path, damaged_at))
    for path, (records, _) in read.items():
        kept = [
            summaries.with_hyperparameters(record, hyperparameters)
            for record in records
            if written_before(event_pb2.Event.FromString(record), epoch, step, epoch_tags)
        ]
        if kept == records and path.stat().st_size == sum(len(record) + summaries.RECORD_FRAMING for record in records):
            continue
        try:
            with files.replaced_atomically(path) as temporary, open(temporary, "wb") as file:
                writer = RecordWriter(file)
                for record in kept:
                    writer.write(record)
        except OSError as error:
            raise ResumeError(
                f"cannot rewrite {path} ({error.strerror}): free some space, then resume the run "
                "again (nothing was lost)"
            ) from None


def written_before(event, epoch, step, epoch_tags):
    tags = [value.tag for value in event.summary.value]
    if tags and all(epoch_tags.search(tag) for tag in tags):
        return event.step < epoch
    if tags and all(tag.startswith(summaries.DOCUMENT_TAG.format("")) for tag in tags):
        return event.step < step  # a resume's, at the step it went on from, which this one writes again
    return event.step <= step


def put_best_right(run_dir, config, last_epoch, validation):
    """best.keras as the run's `validation` scalars, cut back to last.keras, say it is
    (checkpoints.best_put_right), said in a line where it was not."""
    name = checkpoints.checkpoint_score(config["eval_every"])
    series = dict(validation.get(summaries.EPOCH_TAG.format(name), []))
    try:
        put_right = checkpoints.best_put_right(run_dir, name, series, last_epoch)
    except OSError as error:
        raise ResumeError(
            f"cannot write {Path(run_dir) / rundir.BEST} ({error.strerror or error}): free some space and resume again"
        ) from error
    if put_right:
        print(rundir.best_promoted(run_dir, last_epoch))


def continue_run(run_dir, config, epochs, command, setup):
    """The rundir.Run of a run to resume to `epochs` epochs, its event files cut back to its last
    checkpoint and its config.json updated. The caller holds the run's lock."""
    model, initial_epoch = restore_model(run_dir, config)
    if initial_epoch >= epochs:
        raise ResumeError(rundir.finished(run_dir, initial_epoch))
    files.remove_partial_files(rundir.event_directories(run_dir))
    step, hyperparameters = int(model.optimizer.iterations.numpy()), runs.hyperparameters({**config, "epochs": epochs})
    cut_event_files(run_dir, initial_epoch, step, epoch_indexed(config), hyperparameters)
    validation = runs.validation_scalars(run_dir)  # read once, after the cut
    put_best_right(run_dir, config, initial_epoch - 1, validation)
    config.update(epochs=epochs, resumed=[*config["resumed"], command], **setup)
    rundir.save_config(run_dir, config)
    return rundir.Run(Path(run_dir), config, model, initial_epoch, runs.reached(validation))
