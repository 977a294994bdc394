"""A run's checkpoints: `best.keras` and `last.keras`, written by the run's watcher from a copy of
the net taken at each epoch's end and promoted once the epoch is scored and logged, each step
atomic, so that a kill or a full disk never leaves a damaged checkpoint (Checkpoints); which score
picks best.keras and when a score improves on it; and the one line that says how to go on when one
cannot be written (CheckpointError).
"""

import os
import shutil
from pathlib import Path

import keras
import numpy as np

import files
from cli import Stopped
from rundir import BEST, LAST, candidate_checkpoint, checkpoint_step
from settings import BEST_SCORES, CHECKPOINT_SCORE, CHECKPOINT_SCORE_WITHOUT_ISBI


class CheckpointError(Stopped):
    """A checkpoint that cannot be written (a full disk, ...): the run stops (exit code 1), and the
    line says how to go on."""


def checkpoint_error(path, error):
    how = (
        f"continue the run from its last checkpoint with --resume {path.parent}"
        if (path.parent / LAST).is_file()
        else "start the run again"
    )
    return CheckpointError(f"cannot write {path} ({error.strerror or error}): free some space, then {how}")


class Checkpoints(keras.callbacks.Callback):
    """`best.keras` when the validation `score` (settings.CHECKPOINT_SCORE, or
    CHECKPOINT_SCORE_WITHOUT_ISBI for a run that never scores V_rand) improves on `best_score`, and
    `last.keras`, after every epoch whose loss is finite (weights that produced NaN are no
    checkpoint to go back to). Must be the last callback that writes, after every summary of the
    epoch.

    At the epoch's end the training thread copies the values of the net's and its optimizer's
    variables (`saved_state`); the watcher writes them to a candidate (rundir.candidate_checkpoint)
    through its twin of the net, and promotes the candidate once it has scored the epoch and written
    everything the epoch logged: renamed to `last.keras`, and copied to `best.keras` if it is the
    best (`promote`). Writing the archive is most of a save (0.23 s an epoch at the defaults, 1.4 s
    with 64 filters, on a 2-core EPYC), and the copy a tenth of it. The twin is loaded from the
    process's first checkpoint, which the training thread saves itself. Each step is atomic; a kill
    leaves the former checkpoints and a candidate that --resume removes.
    """

    def __init__(self, watcher, run_dir, epoch_logs, score, best_score=None):
        super().__init__()
        self.watcher = watcher
        self.run_dir = Path(run_dir)
        self.epoch_logs = epoch_logs
        self.score = score
        self.best_score = best_score
        self.twin = None  # the watcher's own copy of the net and its optimizer
        self.twin_handed_over = False

    def improves(self, score):
        return improves(self.score, score, self.best_score)

    def on_epoch_end(self, epoch, logs=None):
        if not np.isfinite(logs["loss"]):
            return
        candidate = candidate_checkpoint(self.run_dir, epoch)
        first = not self.twin_handed_over
        if first:
            self.save_first(candidate)
        else:
            state = saved_state(self.model)
            self.watcher.submit(lambda: self.write(candidate, state))
        self.watcher.submit(lambda: self.promote(candidate, self.epoch_logs[epoch].get(f"val_{self.score}")))
        if first:  # once the checkpoint is in place: loading the twin takes seconds for a large net
            policy = self.model.dtype_policy.name
            self.watcher.submit(lambda: self.load_twin(self.run_dir / LAST, policy))
            self.twin_handed_over = True

    def save_first(self, candidate):
        """On the training thread: the process's first candidate, from which, once promoted to
        last.keras, the watcher loads its twin of the net."""
        try:
            saved(self.model, candidate)
        except OSError as error:
            try:
                self.watcher.drain()  # the advice depends on whether the former epoch's checkpoint is in place
            except Exception as watcher_error:  # the same full disk, say: this line still says what to do
                raise checkpoint_error(self.run_dir / LAST, error) from watcher_error
            raise checkpoint_error(self.run_dir / LAST, error) from error

    def load_twin(self, checkpoint, policy):
        """On the watcher: the twin loaded under the net's dtype policy, which Keras keeps per
        thread and which decides the optimizer (mixed_float16's scales the loss): loaded under
        another, the optimizer's saved variables would be skipped with a mere warning."""
        watchers_policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(policy)
        try:
            self.twin = keras.models.load_model(checkpoint)
        finally:
            keras.mixed_precision.set_global_policy(watchers_policy)

    def write(self, candidate, state):
        """On the watcher: `state` (saved_state of the net) written to `candidate` through the twin."""
        variables = saved_variables(self.twin)
        if state.keys() != {variable.path for variable in variables}:
            raise RuntimeError(f"the twin of the net in {self.run_dir} does not hold the net's variables")
        for variable in variables:
            variable.assign(state[variable.path])
        try:
            saved(self.twin, candidate)
        except OSError as error:
            raise checkpoint_error(self.run_dir / LAST, error) from error

    def promote(self, candidate, score):
        """On the watcher: `candidate` renamed to last.keras and, if `score` improves on the best,
        copied to best.keras: the copy first, to a temporary file, then the two renames, so that a
        full disk leaves both checkpoints as they were and a kill can fall only between two
        renames (where it leaves best.keras an epoch behind, which --resume puts right)."""
        path = self.run_dir / BEST
        try:
            if self.improves(score):
                with files.replaced_atomically(path) as temporary:  # renamed onto best.keras as the block ends
                    shutil.copyfile(candidate, temporary)
                    path = self.run_dir / LAST
                    os.replace(candidate, path)
                self.best_score = score
            else:
                path = self.run_dir / LAST
                os.replace(candidate, path)
        except OSError as error:
            candidate.unlink(missing_ok=True)
            raise checkpoint_error(path, error) from error


def saved_variables(model):
    """The variables whose values a .keras archive of `model` holds: the net's weights and its
    optimizer's variables. Not `model.variables`: dropout's random-seed state, which the archive
    does not hold, is named by how many were made before on the thread that built the model."""
    return [*model.weights, *model.optimizer.variables]


def saved_state(model):
    """Copies of the values of `model`'s saved_variables in host memory, by the variables' paths."""
    return {variable.path: keras.ops.convert_to_numpy(variable) for variable in saved_variables(model)}


def saved(model, path):
    """`model` saved to `path`, never through a link planted there; nothing left at `path` if the
    save fails."""
    try:
        path.unlink(missing_ok=True)
        model.save(path)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def checkpoint_score(eval_every):
    """The validation score that picks best.keras: V_rand, or for a run that never scores it
    (--eval-every 0) the misclassified fraction."""
    return CHECKPOINT_SCORE if eval_every else CHECKPOINT_SCORE_WITHOUT_ISBI


def improves(name, score, best):
    """Whether `score`, a value of the validation score `name` (settings.BEST_SCORES), improves on
    `best` (None: no epoch had it); a tie keeps the earlier epoch."""
    better, _ = BEST_SCORES[name]
    return score is not None and np.isfinite(score) and (best is None or better(score, best) != best)


def best_put_right(run_dir, name, scores, last_epoch):
    """Copy last.keras over best.keras where the run's validation curve of the score `name`
    ({epoch: value}, cut back to last.keras) says that its last epoch, `last_epoch`, is the best
    and best.keras holds another: a kill came between the two renames of promoting it
    (Checkpoints.promote). Say whether it did."""
    run_dir = Path(run_dir)
    best_before = None
    for epoch in sorted(scores):
        if epoch < last_epoch and improves(name, scores[epoch], best_before):
            best_before = scores[epoch]
    if last_epoch not in scores or not improves(name, scores[last_epoch], best_before):
        return False
    last, best = run_dir / LAST, run_dir / BEST
    if best.is_file() and checkpoint_step(best) == checkpoint_step(last):
        return False
    with files.replaced_atomically(best) as temporary:
        shutil.copyfile(last, temporary)
    return True
