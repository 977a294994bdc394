"""Never lose a run: checkpoints a kill cannot damage, a stop on a non-finite loss, and what
`python train.py --resume <run dir>` needs to continue a run where its last checkpoint left it.

After every epoch `last.keras` (weights, optimizer state and, with it, the global step) is written
to a temporary file and renamed, and so is `best.keras` when the validation misclassified
fraction improves; a kill at any moment leaves the previous file whole. A resumed run continues
from `last.keras`: epoch = global step / steps per epoch, and the training crops continue from
that epoch's seed. What the killed process logged after its last checkpoint is cut from the event
files first, so that TensorBoard's curves continue without a gap or a duplicated point.
"""

import json
import math
import re
from pathlib import Path

import keras
import numpy as np
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from data import replaced_atomically

LAST = "last.keras"
BEST = "best.keras"
MONITOR = "val_misclassified_pixel_fraction"
# Summaries written at the epoch index (Keras' epoch scalars and weight histograms, the best-so-far
# scalars); all others are written at the global training step.
EPOCH_TAG = re.compile(r"^(epoch_|best_)|/histogram$")


class ResumeError(Exception):
    """A run that cannot continue or a checkpoint that cannot be written; one line with the fix."""


# --- checkpoints ------------------------------------------------------------------------------

def save_atomically(model, path):
    """Save `model` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    try:
        with replaced_atomically(path) as temporary:
            model.save(temporary)
    except OSError as error:
        raise ResumeError(f"cannot write {path} ({error.strerror or error}): free some space, then continue "
                          f"the run with --resume {path.parent}") from None


class Checkpoints(keras.callbacks.Callback):
    """`best.keras` when the validation misclassified fraction improves on `best`, then
    `last.keras`, after every epoch whose loss is finite (weights that produced NaN are no
    checkpoint to go back to). Must be the last callback, after every summary of the epoch."""

    def __init__(self, run_dir, best=math.inf):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        if not np.isfinite(logs["loss"]):
            return
        if logs[MONITOR] < self.best:
            self.best = logs[MONITOR]
            save_atomically(self.model, self.run_dir / BEST)
        save_atomically(self.model, self.run_dir / LAST)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop training at the first batch whose loss is NaN or infinite, and say where it happened."""

    def __init__(self):
        super().__init__()
        self.message = None

    def on_train_batch_end(self, batch, logs=None):
        loss = logs.get("loss")
        if loss is not None and not np.isfinite(loss):
            step = int(self.model.optimizer.iterations.numpy())
            learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            self.message = f"the training loss became {loss} at step {step} with lr {learning_rate:g}"
            self.model.stop_training = True


# --- resuming ---------------------------------------------------------------------------------

def run_config(run_dir):
    """The config.json of a run directory to resume; ResumeError if it is none or has no checkpoint."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no config.json): give a directory that train.py created")
    if not (Path(run_dir) / LAST).is_file():
        raise ResumeError(f"{run_dir} has no {LAST}: it stopped before its first epoch ended (or an older train.py "
                          "ran it); start it anew")
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"{config_path} is unreadable ({error}): the run cannot be resumed; start a new one") from None


def restore_model(run_dir, config):
    """(compiled model with its optimizer state, completed epochs) from the run's last checkpoint."""
    path = Path(run_dir) / LAST
    try:
        model = keras.models.load_model(path)
    except Exception as error:  # Keras raises several types for files it cannot read
        raise ResumeError(f"{path} is unreadable ({type(error).__name__}): the run cannot be resumed; start a new one") from None
    return model, int(model.optimizer.iterations.numpy()) // config["steps_per_epoch"]


def cut_event_files(run_dir, epoch, step):
    """Remove from every event file under `run_dir` what was written after the checkpoint of
    `epoch` epochs and `step` steps: epoch-indexed summaries of epoch `epoch` on, step-indexed
    ones after `step`, and a record a kill cut short. Each file is rewritten atomically, so a kill
    during the cut leaves files that a second --resume cuts the same way."""
    for path in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [record for record in records if written_before(event_pb2.Event.FromString(record), epoch, step)]
        if len(kept) == len(records) and path.stat().st_size == sum(len(record) + 16 for record in records):
            continue
        with replaced_atomically(path) as temporary, open(temporary, "wb") as file:
            writer = RecordWriter(file)
            for record in kept:
                writer.write(record)


def remove_leftovers(run_dir):
    """Delete the temporary files of checkpoints and event files that a killed process left."""
    for path in Path(run_dir).rglob(".*.partial*"):
        path.unlink()


def written_before(event, epoch, step):
    tags = [value.tag for value in event.summary.value]
    if tags and all(EPOCH_TAG.search(tag) for tag in tags):
        return event.step < epoch
    return event.step <= step


