"""The Keras callbacks of a run, in the order for_run gives them: what watching takes from the
training thread. The curves and the net's weights (TrainingSummaries), where the network is wrong
on a few shown slices (ValidationSliceSummaries), what a run was and its best scores (RunSummary),
the event writers they share (SummaryWriters), the epoch's scores told (EpochReport), a stop on a
non-finite loss (StopOnNonFiniteLoss), the steps' edges where a stop signal is raised
(StopBetweenSteps) and the epoch end's jobs handed to the watcher together (EpochEndHandOver). The
validation pass and scores are validation.py's, the checkpoints checkpoints.py's and the averaged
weights' swap unet.py's.

On the training thread the callbacks do only what needs the net at that step (the validation
slices' forward pass, copies of the weights, the checkpoint's save) and hand the rest (scoring,
rendering, histograms, writing, promoting checkpoints) to the run's watcher (watcher.py) as jobs
holding copies of what they need; an epoch's jobs read its validation scores from `epoch_logs`,
which the first of them (Validation's) fills. What is shown, and how it is made and written, is
summaries.py's; the tags are named there.
"""

import contextlib
import re
import threading
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import summaries
from checkpoints import Checkpoints, checkpoint_score
from cli import stop_if_interrupted
from metrics import LOSSES, THRESHOLD, training_metrics
from rundir import BEST_SCORES_AT, TRAIN, VALIDATION
from settings import BEST_SCORES, DEPTH
from summaries import BATCH_GROUP, BEST_TAG, EPOCH_TAG, EVALUATION_TAG
from unet import AveragedWeights, DropoutSeeds, averages_weights, drops_out
from validation import Validation, ValidationPass, forward_pass, global_step


class StepCallback(keras.callbacks.Callback):
    """A callback whose batch hooks know the global step after each batch without asking the
    optimizer: read once as each epoch begins, then counted (one step per batch: Keras' default
    `steps_per_execution`). Reading the variable after every batch made the training thread give
    up the GIL, and often wait for the watcher to give it back, every step."""

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_begins_at = global_step(self.model)

    def step_after(self, batch):
        return self._epoch_begins_at + batch + 1


class SummaryWriters(keras.callbacks.Callback):
    """The event-file writers of a run directory, one per TensorBoard run (`writers[""]` for the
    run itself, `writers[TRAIN]`, `writers[VALIDATION]`), created when first used, shared by the
    callbacks that write there, flushed at every epoch end and closed when training ends.

    Shared, so that a run directory gets one event file per process: TensorBoard's older loader
    polls only the newest file of a directory, so a second file written at the same time would
    stop the other's curves until TensorBoard restarts (docs/tensorboard.md says where it runs).
    Every summary but the graph is written by the run's watcher (watcher.py), one after the other
    in the order the callbacks handed them over; the writers are closed once it is drained. Must
    come after every callback that writes and before Checkpoints: a checkpoint is promoted only once
    everything the epoch logged is on disk.
    """

    def __init__(self, run_dir, watcher):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.watcher = watcher
        self._writers = {}
        self._creating = threading.Lock()  # the graph is written on the training thread, the rest on the watcher

    def __getitem__(self, part):
        with self._creating:
            if part not in self._writers:
                self._writers[part] = tf.summary.create_file_writer(str(self.run_dir / part))
            return self._writers[part]

    def write(self, part, step, summaries):
        """Call `summaries()` with `part`'s writer as the default at `step`. Recorded whatever an
        enclosing `record_if` says."""
        with writing_to(self.run_dir / part), tf.summary.record_if(True), self[part].as_default(step=step):
            summaries()

    def submit(self, part, step, summaries):
        """`write(part, step, summaries)` on the watcher, after everything handed to it before."""
        self.watcher.submit(lambda: self.write(part, step, summaries))

    def flush(self):
        for part, writer in list(self._writers.items()):
            with writing_to(self.run_dir / part):
                writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        self.watcher.submit(self.flush)

    def on_train_end(self, logs=None):
        self.watcher.drain()
        writers, self._writers = self._writers, {}
        for part, writer in writers.items():
            with writing_to(self.run_dir / part):
                writer.close()


# What TensorFlow raises where an event file cannot be written, when it notices: a full disk (often
# it does not: the events are lost silently), a directory made read-only or removed under the run.
EVENT_FILE_ERRORS = (
    tf.errors.ResourceExhaustedError,
    tf.errors.NotFoundError,
    tf.errors.PermissionDeniedError,
    tf.errors.FailedPreconditionError,
)


@contextlib.contextmanager
def writing_to(directory):
    """Raise the OSError that a TensorFlow error writing an event file in `directory` stands for,
    which the run's end tells in one line (train.stopped) instead of TensorFlow's traceback."""
    try:
        yield
    except EVENT_FILE_ERRORS as error:
        first_line = error.message.split("\n", 1)[0]
        if "Summary" not in first_line:  # the summary's own computation failed, not its file: a bug
            raise
        # "{{function_node __wrapped__FlushSummaryWriter...}} <event file>; No space left on device
        # [Op:FlushSummaryWriter] name: ": the reason, after the last "; ".
        reason = re.sub(r"\s*\[Op:.*$", "", first_line).rpartition("; ")[2]
        raise OSError(None, reason, str(directory)) from error


class TrainingSummaries(StepCallback):
    """The curves of a run and the net's weights, in place of Keras' TensorBoard callback, with
    Keras' tag names where it has them:

    - `epoch_<name>` at the epoch index, in `train` (the epoch means of the loss and metrics, and
      `epoch_learning_rate`) and `validation` (every `val_<name>` of the epoch logs);
    - `evaluation_<name>_vs_iterations` in `validation`: the same validation values at the
      global step, the axis of the comparison dashboard, on which runs with other batch sizes or
      epoch lengths line up;
    - `train_batch/<name>` in `train` every `update_freq` steps: the loss and metrics of that
      batch alone, and the learning rate it was trained with. (Keras' `batch_<name>` are running
      means since the epoch began: they jump at each epoch start.) Keras reports the running
      means; with batches of equal size the batch's own value is n m_n - (n - 1) m_(n-1).
    - every `histogram_freq` epochs, `unet/weights/<layer>/<weight>` histograms at the global step;
    - once, the op graph of one forward pass, drawn with a box per named layer (Keras' own graph
      opens in the Graphs tab as "Malformed GraphDef").

    Histograms are bucketed as summaries.write_histogram buckets them.
    """

    def __init__(self, writers, epoch_logs, update_freq, histogram_freq):
        super().__init__()
        self.writers = writers
        self.epoch_logs = epoch_logs
        self.update_freq = update_freq
        self.histogram_freq = histogram_freq
        self._previous_means = {}

    def on_train_begin(self, logs=None):
        if global_step(self.model) == 0:  # a resumed run has its graph
            self.write_forward_pass_graph()

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_after(batch)
        # The step before a written one keeps its means: the batch's own value needs them.
        if step % self.update_freq == 0:
            means, previous, learning_rate = dict(logs), self._previous_means, self.learning_rate()

            def summaries():
                for name, mean in means.items():
                    tf.summary.scalar(
                        f"{BATCH_GROUP}/{name}",
                        (batch + 1) * mean - batch * previous.get(name, 0.0),
                        description="This training batch alone (not a mean since the epoch began).",
                    )
                tf.summary.scalar(f"{BATCH_GROUP}/learning_rate", learning_rate)

            self.writers.submit(TRAIN, step, summaries)
        self._previous_means = logs if (step + 1) % self.update_freq == 0 else {}

    def on_epoch_end(self, epoch, logs=None):
        step, learning_rate = global_step(self.model), self.learning_rate()
        weights = None
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            weights = {weight.path: weight.numpy() for weight in self.model.weights}
        self.writers.watcher.submit(lambda: self.write_epoch(epoch, step, learning_rate, weights))

    def write_epoch(self, epoch, step, learning_rate, weights):
        """The epoch's scalars from its logs (epoch_logs[epoch], scored by Validation by now) and the
        weight histograms of `weights` ({path: values}, None when none are due)."""
        logs = self.epoch_logs[epoch]
        training = {name: value for name, value in logs.items() if not name.startswith("val_")}
        validation = {name[4:]: value for name, value in logs.items() if name.startswith("val_")}
        self.writers.write(TRAIN, epoch, summaries.scalars(EPOCH_TAG, {**training, "learning_rate": learning_rate}))
        self.writers.write(VALIDATION, epoch, summaries.scalars(EPOCH_TAG, validation))
        self.writers.write(VALIDATION, step, summaries.scalars(EVALUATION_TAG, validation))
        if weights is not None:
            self.writers.write(TRAIN, step, lambda: summaries.write_weight_histograms(weights))

    def learning_rate(self):
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def write_forward_pass_graph(self):
        """The graph of one forward pass, taken from the function itself: tracing
        (`tf.summary.trace_on`) collects every function the process runs meanwhile, the watcher's
        summary writes included."""
        example = tf.TensorSpec((1, 2**DEPTH, 2**DEPTH, self.model.input_shape[-1]), tf.float32)
        graph = forward_pass(self.model).get_concrete_function(example).graph.as_graph_def()
        self.writers.write(TRAIN, 0, lambda: summaries.write_graph(graph))


class ValidationSliceSummaries(StepCallback):
    """What the network makes of a few fixed validation slices, written to the `validation` run.

    At each epoch's end (every `image_every` training steps if given), per slice under the tag group
    `slice_<index>`: `prediction`, the probability of cell (black 0 to white 1 on a fixed scale, so
    a flat prediction shows as flat grey); `error`, the EM slice with false membrane in magenta and
    missed membrane in green; `merges_and_splits`, the segmentation the challenge's scorer sees
    (metrics.thinned_segments at the best V_rand threshold of the latest evaluation, 0.5 before the
    first) with the segments that merge true cells in orange and the true cells that are split in
    blue; `input` and `label` once, and `loss_weights` when the loss is weighted (`weights`, per
    shown slice). Under `shown_slices/`: the misclassified-pixel fraction over the slices and the
    number of merges and splits. Every `histogram_freq` epochs: histograms of each block's
    activations (`unet/activations/...`) and the precision-recall curve of membrane detection
    (`membrane_pr`). The net's output on the slices comes from the run's ValidationPass, and at an
    evaluated epoch's end their segments from its scoring (`shown_segments`, Validation's).
    """

    def __init__(
        self,
        writers,
        epoch_logs,
        validation_pass,
        shown,
        image_every,
        histogram_freq,
        v_rand_threshold=THRESHOLD,
        shown_segments=None,
    ):
        super().__init__()
        self.writers = writers
        self.epoch_logs = epoch_logs
        self.validation_pass = validation_pass
        self.shown = shown
        self.image_every = image_every
        self.histogram_freq = histogram_freq
        self.v_rand_threshold = v_rand_threshold
        self.shown_segments = shown_segments
        self._images_deferred_to = None

    def on_train_begin(self, logs=None):
        if global_step(self.model) == 0:  # a resumed run wrote its start already
            self.submit_images(0)

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_after(batch)
        if step % (self.image_every or self.params["steps"]):
            return
        # Images due at the last step of an epoch wait for its end: they come from the epoch end's
        # validation pass, segmented at the threshold of its evaluation.
        if batch == self.params["steps"] - 1:
            self._images_deferred_to = step
        else:
            self.submit_images(step)

    def on_epoch_end(self, epoch, logs=None):
        step = global_step(self.model)
        histograms = self.histogram_freq and epoch % self.histogram_freq == 0 and np.isfinite(logs["loss"])
        activations = self.validation_pass.activations() if histograms else None
        probabilities = self.validation_pass.probabilities(self.validation_pass.shown)
        images = self._images_deferred_to == step

        def summaries():
            self.v_rand_threshold = self.epoch_logs[epoch].get("val_v_rand_threshold", self.v_rand_threshold)
            # At that threshold, where the epoch was evaluated; taken out whether images are due or not.
            segments = None if self.shown_segments is None else self.shown_segments.pop(epoch, None)
            if histograms:
                self.write_activations_and_pr_curve(activations, probabilities)
            if images:
                self.write_images(probabilities, segments)

        self.writers.submit(VALIDATION, step, summaries)

    def submit_images(self, step):
        """The images of `step` from the net's output now, rendered and written by the watcher."""
        probabilities = self.validation_pass.probabilities(self.validation_pass.shown)
        self.writers.submit(VALIDATION, step, lambda: self.write_images(probabilities))

    def write_images(self, probabilities, segments=None):
        summaries.write_shown_slices(self.shown, probabilities, self.v_rand_threshold, segments)

    def write_activations_and_pr_curve(self, activations, probabilities):
        summaries.write_activations_and_pr_curve(activations, self.shown.labels, probabilities)


class RunSummary(keras.callbacks.Callback):
    """What the run was, in the run directory itself: HParams and Text tabs, the comparison
    dashboard, and its best epochs.

    At the start of a run: the hyperparameters for the HParams tab (with the metrics it should show
    for every run), the markdown `documents` for the Text tab and the Custom Scalars layout
    (comparison_layout); at the start of a resumed one, which has them (its --epochs put into the
    HParams tab by resume.cut_event_files), the documents again at its step. After each epoch: the best
    validation value so far of each score in settings.BEST_SCORES (`best_misclassified_pixel_fraction`,
    `best_v_rand`), when the epoch has it, starting from those `reached` when resuming; at the
    training step of the evaluation, as the `evaluation_*` curves, or `at_epoch` at the epoch index
    (a run started before config_version 2: rundir.BEST_SCORES_AT).
    """

    def __init__(self, writers, epoch_logs, trial_id, hyperparameters, documents, reached=None, at_epoch=False):
        super().__init__()
        self.writers = writers
        self.epoch_logs = epoch_logs
        self.trial_id = trial_id
        self.hyperparameters = hyperparameters
        self.documents = documents
        self.best = {name: value for name, value in (reached or {}).items() if name in BEST_SCORES}
        self.at_epoch = at_epoch

    def on_train_begin(self, logs=None):
        if (step := global_step(self.model)) == 0:
            self.writers.submit("", 0, self.write_run)
        else:  # resumed: the Text tab tells how, at the step it went on from
            self.writers.submit("", step, lambda: summaries.write_documents(self.documents))

    def write_run(self):
        summaries.write_run(self.trial_id, self.hyperparameters, self.documents)

    def on_epoch_end(self, epoch, logs=None):
        step = epoch if self.at_epoch else global_step(self.model)
        self.writers.submit("", step, lambda: self.write_best(self.epoch_logs[epoch]))

    def write_best(self, logs):
        if not np.isfinite(logs["loss"]):  # scores of weights that no checkpoint keeps
            return
        for name, (better, description) in BEST_SCORES.items():
            if f"val_{name}" in logs:
                value = logs[f"val_{name}"]
                self.best[name] = better(self.best.get(name, value), value)
                tf.summary.scalar(BEST_TAG.format(name), self.best[name], description=f"The {description} so far.")


# --- stops and hand-overs ----------------------------------------------------------------------


class EpochReport(keras.callbacks.Callback):
    """Hands each epoch's logs with its validation scores to `report(epoch, logs)` once the watcher
    has scored the epoch, written its summaries and promoted its checkpoints (the progress line's
    validation line). Must come after Checkpoints."""

    def __init__(self, watcher, epoch_logs, report):
        super().__init__()
        self.watcher = watcher
        self.epoch_logs = epoch_logs
        self.report = report

    def on_epoch_end(self, epoch, logs=None):
        self.watcher.submit(lambda: self.report(epoch, self.epoch_logs[epoch]))


class EpochEndHandOver(keras.callbacks.Callback):
    """The first (`first`) and the last callback of a run: the watcher's jobs of an epoch's end are
    handed over together once the training thread has done its own part of it (the forward pass,
    the weights' copies, the checkpoint's save), and once the watcher has done the former epoch's
    (Watcher.catch_up: a kill loses at most the epoch being scored). A watcher that began scoring
    at the first job held the GIL between its numpy calls while the epoch end's Python waited for
    it (docs/performance.md, "What limits them")."""

    def __init__(self, watcher, first):
        super().__init__()
        self.watcher = watcher
        self.first = first

    def on_epoch_end(self, epoch, logs=None):
        if self.first:
            self.watcher.hold()
        else:
            self.watcher.catch_up()
            self.watcher.release()


class StopBetweenSteps(keras.callbacks.Callback):
    """Where a stop signal that cli.stopping_between_steps kept back is raised: before a training
    step, and at an epoch's start, so that an epoch whose last step was done ends and keeps its
    checkpoint."""

    def on_epoch_begin(self, epoch, logs=None):
        stop_if_interrupted()

    def on_train_batch_begin(self, batch, logs=None):
        stop_if_interrupted()


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


PROFILED_STEP = "train"  # the name of a profiled step's mark in the trace


class Profiler(StepCallback):
    """TensorFlow's profiler over the training steps `first` to `last` (--profile-batch): the
    TensorFlow ops of every thread (training, tf.data's workers, the watcher's writes) in
    `logdir/plugins/profile/<time>/`, where TensorBoard's Profile tab finds them, each step marked
    from its training step to the end of its batch-end hooks: the last callback of a run. `stop`
    writes what was traced so far; the run calls it however it ends (train.fit), before `last`
    too (a non-finite loss, Ctrl-C, an error).

    Not Keras' TensorBoard(profile_batch=...), which would also write the epoch curves and the
    traced graph through writers of its own (docs/tensorboard.md says why the run has none)."""

    def __init__(self, logdir, first, last):
        super().__init__()
        self.logdir = str(logdir)
        self.first, self.last = first, last
        self._profiling = False
        self._step_mark = None

    def on_train_batch_begin(self, batch, logs=None):
        step = self.step_after(batch)
        if step == self.first:
            tf.profiler.experimental.start(self.logdir)
            self._profiling = True
        if self._profiling:
            # _r=1: a step of its own for the Profile tab's step-time breakdown, not just a span.
            self._step_mark = tf.profiler.experimental.Trace(PROFILED_STEP, step_num=step, _r=1)
            self._step_mark.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        if self._step_mark is not None:
            self._step_mark.__exit__(None, None, None)
            self._step_mark = None
        if self.step_after(batch) == self.last:
            self.stop()

    def stop(self):
        """Write the trace if the profiler runs, and stop it (a second profiler cannot start while
        it runs)."""
        if self._profiling:
            tf.profiler.experimental.stop()
            self._profiling = False


# --- a run's callbacks --------------------------------------------------------------------------


def for_run(args, run, inputs, stop, hyperparameters, documents, watcher, epoch_logs, report):
    """The callbacks of `run` (rundir.Run) on `inputs` (inputs.RunInputs) in the order they must
    run; `stop` is the run's StopOnNonFiniteLoss, `watcher` the watcher.Watcher that does their work
    off the training thread, `epoch_logs` the {epoch: logs with validation scores} they fill (the
    run's history), `report(epoch, logs)` what is told of each epoch once it is scored."""
    indices, shown = inputs.val_indices, inputs.shown()
    validation_pass = ValidationPass(inputs.val_images, shown)
    weights = inputs.val_weights(args.loss)
    writers = SummaryWriters(run.directory, watcher)
    score = checkpoint_score(args.eval_every)
    shown_segments = {}  # Validation's segments of the shown slices, for ValidationSliceSummaries' images
    return [
        EpochEndHandOver(watcher, first=True),
        *([AveragedWeights()] if averages_weights(run.model) else []),
        *([DropoutSeeds(args.seed)] if drops_out(run.model) else []),
        validation_pass,
        # Before the summaries, whose watcher jobs read the scores it adds to the epoch logs.
        Validation(
            watcher,
            epoch_logs,
            validation_pass,
            inputs.val_labels,
            LOSSES[args.loss],
            training_metrics(),
            args.eval_every,
            weights,
            shown_segments,
        ),
        TrainingSummaries(writers, epoch_logs, args.update_freq, args.histogram_freq),
        ValidationSliceSummaries(
            writers,
            epoch_logs,
            validation_pass,
            summaries.ShownSlices.of(
                [indices[i] for i in shown],
                inputs.val_images[shown],
                inputs.val_labels[shown],
                None if weights is None else weights[shown],
            ),
            image_every=args.image_every,
            histogram_freq=args.histogram_freq,
            v_rand_threshold=run.reached.get("v_rand_threshold", THRESHOLD),
            shown_segments=shown_segments,
        ),
        RunSummary(
            writers,
            epoch_logs,
            run.directory.name,
            hyperparameters,
            documents,
            run.reached,
            at_epoch=run.config[BEST_SCORES_AT] == "epoch",
        ),
        stop,
        # Its epoch end flushes what the epoch logged, its training end drains the watcher.
        writers,
        # After it: a checkpoint is promoted only once everything the epoch logged is on disk.
        Checkpoints(watcher, run.directory, epoch_logs, score, run.reached.get(score)),
        EpochReport(watcher, epoch_logs, report),
        EpochEndHandOver(watcher, first=False),
    ]
