"""The Keras callbacks of a run: the curves and the net's insides (TrainingSummaries), the one
pass of the validation slices through the net that the others read (ValidationPass), the
validation scores (Validation), where the network is wrong on a few shown slices
(ValidationSliceSummaries), what a run was and how to compare runs (RunSummary), the event writers
they share (SummaryWriters), the averaged weights the epoch end sees (AveragedWeights), checkpoints a
kill cannot damage (Checkpoints), the epoch's scores told (EpochReport), a stop on a non-finite loss,
the steps' edges where a stop signal is raised (StopBetweenSteps) and the epoch end's jobs handed to
the watcher together (EpochEndHandOver).

On the training thread the callbacks do only what needs the net at that step (the validation
slices' forward pass, copies of the weights, the checkpoint's save) and hand the rest (scoring,
rendering, histograms, writing, promoting checkpoints) to the run's watcher (watcher.py) as jobs
holding copies of what they need; an epoch's jobs read its validation scores from `epoch_logs`,
which the first of them (Validation's) fills.

Tags are named so that TensorBoard's Time Series tab, which groups tags by their first `/` part
and sorts the groups by name, opens on the best-so-far scalars, then the epoch curves
(`epoch_*`, `evaluation_*`, Keras' names), the shown slices' scalars and images (`shown_slices/`,
`slice_NN/`), the per-batch curves (`train_batch/`) and last the histograms (`unet/`).
"""

import os
import shutil
import threading
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import config_pb2, summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.graph import metadata as graph_metadata
from tensorboard.plugins.histogram import summary as histogram_summary
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.pr_curve import summary as pr_curve_summary
from tensorboard.util import tensor_util

import files
from cli import InputError, stop_if_interrupted
from metrics import (LOSSES, THRESHOLD, isbi_scores, merges_and_splits, misclassified_pixel_fraction, thinned_segments,
                     training_metrics, true_cells_of)
from predict import CONTEXT, with_context
from rundir import BEST, LAST, TRAIN, VALIDATION, candidate_checkpoint
from settings import BEST_SCORES, CHECKPOINT_SCORE, CHECKPOINT_SCORE_WITHOUT_ISBI, DEPTH
from unet import averages_weights, block_outputs, swap_averaged_weights

BATCH_GROUP = "train_batch"   # the loss and metrics of single training batches
SHOWN_GROUP = "shown_slices"  # scalars over the slices shown as images
WEIGHTS_GROUP = "unet/weights"
ACTIVATIONS_GROUP = "unet/activations"

FALSE_MEMBRANE_RGB = (1.0, 0.0, 1.0)   # magenta: membrane predicted where the label says cell
MISSED_MEMBRANE_RGB = (0.0, 1.0, 0.0)  # green: label says membrane, prediction says cell
MERGE_RGB = (1.0, 0.5, 0.0)            # orange: one segment over two or more true cells
SPLIT_RGB = (0.0, 0.45, 1.0)           # blue: one true cell cut into two or more segments
ERROR_OPACITY = 0.75
TOPOLOGY_OPACITY = 0.6
# EM texture barely compresses: 16 grey levels under the colours keep the structure recognisable
# and make the PNG about 40 % smaller than full 8-bit grey.
OVERLAY_GREY_LEVELS = 16
PR_THRESHOLDS = 51
ACTIVATION_SAMPLE = 2**16


def error_overlay(image, label, probability):
    """(H, W, 3) in [0, 1]: the grey EM slice with false and missed membrane painted over it."""
    predicted_cell = probability >= THRESHOLD
    grey = np.round(image * (OVERLAY_GREY_LEVELS - 1)) / (OVERLAY_GREY_LEVELS - 1)
    overlay = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    for wrong, colour in ((predicted_cell < label, FALSE_MEMBRANE_RGB), (predicted_cell > label, MISSED_MEMBRANE_RGB)):
        overlay[wrong] = (1 - ERROR_OPACITY) * overlay[wrong] + ERROR_OPACITY * np.asarray(colour)
    return overlay


def topology_overlay(segments, true_cells, merging_segments, split_cells):
    """(H, W, 3) in [0, 1]: the proposed segments in shades of grey on black 1-pixel borders, the
    segments that merge true cells painted orange and the true cells that are split blue."""
    shades = np.random.default_rng(0).uniform(0.45, 0.9, segments.max() + 1)
    shades[0] = 0.0
    overlay = np.repeat(shades[segments][..., np.newaxis], 3, axis=-1)
    for wrong, colour in ((np.isin(segments, merging_segments), MERGE_RGB), (np.isin(true_cells, split_cells), SPLIT_RGB)):
        overlay[wrong] = (1 - TOPOLOGY_OPACITY) * overlay[wrong] + TOPOLOGY_OPACITY * np.asarray(colour)
    return overlay


def forward_pass(model):
    """`model` applied to a batch, as a graph run on this process's first device.

    Not `predict_on_batch`: under a tf.distribute strategy Keras (3.15) hands each replica the
    whole batch and returns one copy of the output per replica, and across workers it gathers
    the outputs, a collective that every worker would have to join.
    """
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def global_step(model):
    """The optimizer's iteration count: the step every summary but the `epoch_*` ones is written
    at, so that curves, images and histograms line up and continue across resumed runs."""
    return int(model.optimizer.iterations.numpy())


class StepCallback(keras.callbacks.Callback):
    """A callback whose batch hooks know the global step after each batch without asking the
    optimizer: read once as each epoch begins, then counted (one step per batch: Keras' default
    `steps_per_execution`). Reading the variable after every batch made the training thread give
    up the GIL, and often wait for the watcher to give it back, every step."""

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_begins_at = global_step(self.model)

    def step_after(self, batch):
        return self._epoch_begins_at + batch + 1


def sample_values(array, size=ACTIVATION_SAMPLE):
    """At most `size` values of `array`, drawn at the same positions every time.

    A histogram of all 40 million activations of three 512x512 slices takes 10 s on two cores;
    65,536 values put each of the 30 buckets within about 0.1 % of its true share, and the ten
    layers' histograms take 0.25 s.
    """
    values = np.asarray(array, dtype=np.float32).ravel()
    if values.size <= size:
        return values
    return values[np.random.default_rng(0).integers(values.size, size=size)]


def scalars(tag, values):
    """A summaries function for SummaryWriters.write: each of `values` ({name: value}) as a
    scalar tagged `tag.format(name)`."""
    def write():
        for name, value in values.items():
            tf.summary.scalar(tag.format(name), value)
    return write


class ValidationPass(keras.callbacks.Callback):
    """The validation slices through the net at most once per training step, for every callback
    that needs the net's output on them: Validation (loss, metrics, challenge scores) and
    ValidationSliceSummaries (images, activation histograms, PR curve) read it instead of each
    predicting. Must come before them.

    Each slice goes through the net whole, one at a time (so that large slices and the paper-size
    net fit in memory), with predict.CONTEXT mirrored pixels around it as `predict.py` predicts it:
    the scores logged at a step are those `predict.py --labels` prints for the checkpoint of that
    step. The blocks' outputs of the `shown` slices (positions in `images`) come along, sampled
    for the activation histograms.
    """

    def __init__(self, images, shown):
        super().__init__()
        self.images = images
        self.shown = list(shown)
        self._forward = None
        self._step = None
        self._probabilities = {}
        self._activations = {}

    def on_train_begin(self, logs=None):
        self._forward = forward_pass(keras.Model(self.model.inputs, [self.model.get_layer(name).output
                                                                     for name in block_outputs()]))

    def probabilities(self, positions=None):
        """(slices, H, W) float32 cell probabilities of the slices at `positions` (all by default)
        under the weights of the current step."""
        positions = range(len(self.images)) if positions is None else positions
        step = global_step(self.model)
        if step != self._step:
            self._step, self._probabilities, self._activations = step, {}, {}
        for position in positions:
            if position not in self._probabilities:
                self.predict(position)
        return np.stack([self._probabilities[position] for position in positions])

    def activations(self):
        """{block name (unet.block_outputs): ACTIVATION_SAMPLE sampled output values of the shown
        slices} under the weights of the current step."""
        self.probabilities(self.shown)
        return {name: np.concatenate([self._activations[position][name] for position in self.shown])
                for name in block_outputs()}

    def predict(self, position):
        image = self.images[position]
        padded = with_context(image)
        outputs = [np.asarray(output)[0] for output in self._forward(padded[np.newaxis, ..., np.newaxis])]

        def within_slice(output):
            """The part of a block's output over the slice itself, without the mirrored context."""
            scale = padded.shape[0] // output.shape[0]
            top, bottom = CONTEXT // scale, -(-(CONTEXT + image.shape[0]) // scale)
            left, right = CONTEXT // scale, -(-(CONTEXT + image.shape[1]) // scale)
            return output[top:bottom, left:right]

        self._probabilities[position] = within_slice(outputs[-1])[..., 0].astype(np.float32)
        if position in self.shown:
            share = ACTIVATION_SAMPLE // len(self.shown)
            self._activations[position] = {name: sample_values(within_slice(output), share)
                                           for name, output in zip(block_outputs(), outputs)}


class SummaryWriters(keras.callbacks.Callback):
    """The event-file writers of a run directory, one per TensorBoard run (`writers[""]` for the
    run itself, `writers[TRAIN]`, `writers[VALIDATION]`), created when first used, shared by the
    callbacks that write there, flushed at every epoch end and closed when training ends.

    Shared, so that a run directory gets one event file per process: TensorBoard reads the files
    of a directory one after the other, and a second file written at the same time would be read
    only up to the point it had reached when the first one grew.
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
        with tf.summary.record_if(True), self[part].as_default(step=step):
            summaries()

    def submit(self, part, step, summaries):
        """`write(part, step, summaries)` on the watcher, after everything handed to it before."""
        self.watcher.submit(lambda: self.write(part, step, summaries))

    def flush(self):
        for writer in list(self._writers.values()):
            writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        self.watcher.submit(self.flush)

    def on_train_end(self, logs=None):
        self.watcher.drain()
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


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

    Weight histograms are bucketed by TensorBoard's numpy `histogram_pb` (the same 30 buckets as
    `tf.summary.histogram`), a quarter of the time of `tf.summary.histogram`'s eager ops.
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
                    tf.summary.scalar(f"{BATCH_GROUP}/{name}", (batch + 1) * mean - batch * previous.get(name, 0.0),
                                      description="This training batch alone (not a mean since the epoch began).")
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
        self.writers.write(TRAIN, epoch, scalars("epoch_{}", {**training, "learning_rate": learning_rate}))
        self.writers.write(VALIDATION, epoch, scalars("epoch_{}", validation))
        self.writers.write(VALIDATION, step, scalars("evaluation_{}_vs_iterations", validation))
        if weights is not None:
            self.writers.write(TRAIN, step, lambda: write_weight_histograms(weights))

    def learning_rate(self):
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def write_forward_pass_graph(self):
        """The graph of one forward pass, as `tf.summary.trace_export` writes it (a RunMetadata of
        function graphs under the tag `unet`), taken from the function itself: tracing collects
        every function the process runs meanwhile, the watcher's summary writes included."""
        example = tf.TensorSpec((1, 2**DEPTH, 2**DEPTH, self.model.input_shape[-1]), tf.float32)
        graph = forward_pass(self.model).get_concrete_function(example).graph.as_graph_def()
        run_metadata = config_pb2.RunMetadata()
        run_metadata.function_graphs.add().pre_optimization_graph.ParseFromString(graph.SerializeToString())
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag="unet", tensor=tensor_util.make_tensor_proto([run_metadata.SerializeToString()]),
            metadata=summary_pb2.SummaryMetadata(
                # content "1": the version of TensorFlow's own graph summary, which the Graphs tab insists on.
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=graph_metadata.PLUGIN_NAME_RUN_METADATA_WITH_GRAPH,
                                                                   content=b"1"),
                data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE))])
        self.writers.write(TRAIN, 0, lambda: tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0))


def write_weight_histograms(weights):
    """`unet/weights/<path>` histograms of `weights` ({weight path: values}) at the default step."""
    # np.errstate: the weights of a run stopped by a NaN loss are NaN, bucketed as such without a warning.
    with np.errstate(invalid="ignore"):
        for path, values in weights.items():
            summary = histogram_summary.histogram_pb(f"{WEIGHTS_GROUP}/{path.replace(':', '_')}", values)
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=tf.summary.experimental.get_step())


class ValidationSliceSummaries(StepCallback):
    """What the network makes of a few fixed validation slices, written to the `validation` run.

    Every `image_every` training steps, per slice under the tag group `slice_<index>`: `prediction`,
    the probability of cell (black 0 to white 1 on a fixed scale, so a flat prediction shows as
    flat grey); `error`, the EM slice with false membrane in magenta and missed membrane in green;
    `merges_and_splits`, the segmentation the challenge's scorer sees (metrics.thinned_segments at
    the best V_rand threshold of the latest evaluation, 0.5 before the first) with the segments
    that merge true cells in orange and the true cells that are split in blue; `input` and `label`
    once, and `loss_weights` when the loss is weighted (`weights`, per shown slice). Under
    `shown_slices/`: the misclassified-pixel fraction over the slices and the number of merges and
    splits. Every `histogram_every` epochs: histograms of each block's activations
    (`unet/activations/...`) and the precision-recall curve of membrane detection (`membrane_pr`).
    The net's output on the slices comes from the run's ValidationPass.
    """

    def __init__(self, writers, epoch_logs, validation_pass, labels, slice_indices, image_every, histogram_every,
                 v_rand_threshold=THRESHOLD, weights=None):
        super().__init__()
        self.writers = writers
        self.epoch_logs = epoch_logs
        self.validation_pass = validation_pass
        self.images = validation_pass.images[validation_pass.shown][..., np.newaxis]
        self.labels = labels[..., np.newaxis].astype(np.float32)
        self.weights = weights
        self.true_cells = [true_cells_of(label) for label in labels]
        self.slice_indices = list(slice_indices)
        self.image_every = image_every
        self.histogram_every = histogram_every
        self.v_rand_threshold = v_rand_threshold
        self._images_deferred_to = None

    def on_train_begin(self, logs=None):
        if global_step(self.model) == 0:  # a resumed run wrote its start already
            self.submit_images(0)

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_after(batch)
        if step % self.image_every:
            return
        # Images due at the last step of an epoch wait for its end: they come from the epoch end's
        # validation pass, segmented at the threshold of its evaluation.
        if batch == self.params["steps"] - 1:
            self._images_deferred_to = step
        else:
            self.submit_images(step)

    def on_epoch_end(self, epoch, logs=None):
        step = global_step(self.model)
        histograms = self.histogram_every and epoch % self.histogram_every == 0 and np.isfinite(logs["loss"])
        activations = self.validation_pass.activations() if histograms else None
        probabilities = self.validation_pass.probabilities(self.validation_pass.shown)
        images = self._images_deferred_to == step

        def summaries():
            self.v_rand_threshold = self.epoch_logs[epoch].get("val_v_rand_threshold", self.v_rand_threshold)
            if histograms:
                self.write_activations_and_pr_curve(activations, probabilities)
            if images:
                self.write_images(probabilities)
        self.writers.submit(VALIDATION, step, summaries)

    def submit_images(self, step):
        """The images of `step` from the net's output now, rendered and written by the watcher."""
        probabilities = self.validation_pass.probabilities(self.validation_pass.shown)
        self.writers.submit(VALIDATION, step, lambda: self.write_images(probabilities))

    def write_images(self, probabilities):
        """The images and shown-slice scalars of the shown slices' `probabilities` (slices, H, W), at the
        default step, segmented at the V_rand threshold of the latest evaluation."""
        step = tf.summary.experimental.get_step()
        probabilities = probabilities[..., np.newaxis]
        tf.summary.scalar(f"{SHOWN_GROUP}/misclassified_pixel_fraction",
                          np.mean(misclassified_pixel_fraction(self.labels, probabilities)),
                          description="Misclassified-pixel fraction on the slices shown as images.")
        merges = splits = 0
        for position, index in enumerate(self.slice_indices):
            group = f"slice_{index:02d}"
            if step == 0:
                tf.summary.image(f"{group}/input", self.images[position:position + 1])
                tf.summary.image(f"{group}/label", self.labels[position:position + 1])
                if self.weights is not None:
                    weights = self.weights[position]
                    tf.summary.image(f"{group}/loss_weights", (weights / weights.max())[np.newaxis, ..., np.newaxis],
                                     description=f"The loss weight of each pixel (the U-Net paper's weight map), "
                                                 f"black 0 to white {weights.max():.1f}: the class balance plus a "
                                                 f"border term on membrane between close cells.")
            probability = probabilities[position, ..., 0]
            tf.summary.image(f"{group}/prediction", probabilities[position:position + 1],
                             description="Probability of cell: black 0, white 1.")
            overlay = error_overlay(self.images[position, ..., 0], self.labels[position, ..., 0], probability)
            tf.summary.image(f"{group}/error", overlay[np.newaxis],
                             description="Errors on the EM slice: magenta = false membrane, green = missed membrane.")
            # In double precision, as the challenge's scorer compares (metrics.isbi_scores_by_threshold).
            segments = thinned_segments(probability.astype(np.float64) > self.v_rand_threshold)
            merging_segments, split_cells = merges_and_splits(self.true_cells[position], segments)
            merges, splits = merges + len(merging_segments), splits + len(split_cells)
            tf.summary.image(f"{group}/merges_and_splits",
                             topology_overlay(segments, self.true_cells[position], merging_segments, split_cells)[np.newaxis],
                             description="The cells the ISBI scorer sees in the prediction (grey, black 1-pixel "
                                         "borders) at the best V_rand threshold of the latest evaluation: orange = a "
                                         "segment that merges true cells (missing membrane), blue = a true cell split "
                                         "into segments (false membrane). Both cost V_rand.")
        tf.summary.scalar(f"{SHOWN_GROUP}/merges", merges,
                          description="Segments that merge two or more true cells, over the shown slices.")
        tf.summary.scalar(f"{SHOWN_GROUP}/splits", splits,
                          description="True cells split into two or more segments, over the shown slices.")

    def write_activations_and_pr_curve(self, activations, probabilities):
        for name, values in activations.items():
            tf.summary.histogram(f"{ACTIVATIONS_GROUP}/{name}", values)
        membrane = self.labels[..., 0] < THRESHOLD
        membrane_probability = 1.0 - probabilities
        curve = pr_curve_summary.pb("membrane_pr", labels=membrane, predictions=membrane_probability,
                                    num_thresholds=PR_THRESHOLDS,
                                    description="Precision and recall of membrane at thresholds of 1 - p(cell).")
        tf.summary.experimental.write_raw_pb(curve.SerializeToString(), step=tf.summary.experimental.get_step())


class Validation(keras.callbacks.Callback):
    """The validation scores of each epoch, from the ValidationPass of the epoch's last step, scored
    by the watcher into `epoch_logs[epoch]` (a copy of the epoch's logs, made here on the training
    thread): the loss and the compiled metrics every epoch (`val_loss`,
    `val_misclassified_pixel_fraction`, ...) and every `isbi_every` epochs the ISBI challenge's
    scores (`val_v_rand`, `val_v_info`, `val_pixel_error` and the thresholds that give them).
    With `weights` (per slice, data.border_weights), the loss is weighted as the training loss is.
    The callbacks after this one read the scores from `epoch_logs` in their watcher jobs.

    It stands in for Keras' `validation_data`, which would pass the slices through the net a
    second time, and which under a tf.distribute strategy (Keras 3.15) splits a batch of one
    slice across the replicas and fails on the empty share. TrainingSummaries, which must come
    after this one, writes the scores to the `validation` run as `epoch_loss`, `epoch_v_rand`,
    ...; the progress line (progress.py), the closing line and checkpoints see them too.
    """

    def __init__(self, watcher, epoch_logs, validation_pass, labels, loss, metrics, isbi_every, weights=None):
        super().__init__()
        self.watcher = watcher
        self.epoch_logs = epoch_logs
        self.validation_pass = validation_pass
        self.labels = labels[..., np.newaxis].astype(np.float32)
        self.loss = loss
        self.metrics = metrics
        self.isbi_every = isbi_every
        self.weights = np.ones(labels.shape, np.float32) if weights is None else weights

    def on_epoch_end(self, epoch, logs=None):
        probabilities = self.validation_pass.probabilities()
        self.epoch_logs[epoch] = dict(logs)
        self.watcher.submit(lambda: self.score(self.epoch_logs[epoch], epoch, probabilities))

    def score(self, logs, epoch, probabilities):
        """Add the validation scores of `probabilities` (slices, H, W) to `logs`."""
        losses = []
        for metric in self.metrics:
            metric.reset_state()
        # Slice by slice, as Keras' evaluate with batches of one would, each pixel's loss weighted
        # as in training (Keras' mean over the pixels of weight x loss).
        for label, probability, weights in zip(self.labels, probabilities[..., np.newaxis], self.weights):
            losses.append(float(np.mean(weights * self.loss(label[np.newaxis], probability[np.newaxis])[0])))
            for metric in self.metrics:
                metric.update_state(label[np.newaxis], probability[np.newaxis])
        logs["val_loss"] = float(np.mean(losses))
        logs.update({f"val_{metric.name}": float(metric.result()) for metric in self.metrics})
        if self.isbi_every and epoch % self.isbi_every == 0 and np.isfinite(logs["loss"]):
            scores = isbi_scores(self.labels[..., 0], probabilities)
            logs.update({f"val_{name}": value for name, value in scores.items()})


def comparison_layout():
    """The Custom Scalars tab's dashboard: one chart per question, every run on it, all against the
    global training step. TensorBoard merges the layouts that the runs of a logdir carry."""
    def chart(title, *tags):
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
            tag=[f"^{tag}$" for tag in tags]))

    def evaluation(name):
        return f"evaluation_{name}_vs_iterations"
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title="Which run learns better (validation slices, against the training step)", chart=[
            chart("misclassified-pixel fraction (lower is better)", evaluation("misclassified_pixel_fraction")),
            chart("V_rand, the ISBI challenge's main score (higher is better)", evaluation("v_rand")),
            chart("V_info (higher is better)", evaluation("v_info")),
            chart("pixel error, 1 - best F-score of cells (lower is better)", evaluation("pixel_error")),
            chart("loss: training batches and validation", f"{BATCH_GROUP}/loss", evaluation("loss")),
            chart("learning rate", f"{BATCH_GROUP}/learning_rate"),
        ]),
        layout_pb2.Category(title="Where the net is wrong (slices shown as images)", chart=[
            chart("merges (missing membrane) and splits (false membrane)", f"{SHOWN_GROUP}/merges", f"{SHOWN_GROUP}/splits"),
            chart("misclassified-pixel fraction", f"{SHOWN_GROUP}/misclassified_pixel_fraction"),
        ]),
        layout_pb2.Category(title="Training batches, each alone", closed=True, chart=[
            chart("misclassified-pixel fraction", f"{BATCH_GROUP}/misclassified_pixel_fraction"),
            chart("membrane Dice", f"{BATCH_GROUP}/membrane_dice"),
            chart("accuracy", f"{BATCH_GROUP}/accuracy"),
        ]),
    ])


class RunSummary(keras.callbacks.Callback):
    """What the run was, in the run directory itself: HParams and Text tabs, the comparison
    dashboard, and its best epochs.

    At the start of a run (not of a resumed one, which has them): the hyperparameters for the
    HParams tab (with the metrics it should show for every run), the markdown `documents` for the
    Text tab and the Custom Scalars layout (comparison_layout). After each epoch: the best
    validation value so far of each score in settings.BEST_SCORES (`best_misclassified_pixel_fraction`,
    `best_v_rand`), when the epoch has it, starting from those `reached` when resuming.
    """

    METRICS = [
        *(("", f"best_{name}", description) for name, (_, description) in BEST_SCORES.items()),
        (VALIDATION, "epoch_v_rand", "last validation V_rand"),
        (VALIDATION, "epoch_v_info", "last validation V_info"),
        (VALIDATION, "epoch_pixel_error", "last validation pixel error"),
        (VALIDATION, "epoch_misclassified_pixel_fraction", "last validation misclassified-pixel fraction"),
        (VALIDATION, "epoch_loss", "last validation loss"),
        (VALIDATION, "epoch_membrane_dice", "last validation membrane Dice"),
        (TRAIN, "epoch_loss", "last training loss"),
    ]

    def __init__(self, writers, epoch_logs, trial_id, hyperparameters, documents, reached=None):
        super().__init__()
        self.writers = writers
        self.epoch_logs = epoch_logs
        self.trial_id = trial_id
        self.hyperparameters = hyperparameters
        self.documents = documents
        self.best = {name: value for name, value in (reached or {}).items() if name in BEST_SCORES}

    @classmethod
    def reached(cls, validation_scalars):
        """What a run to resume had reached, from its validation scalars {tag: [(step, value)]}: the
        best value so far of each score in settings.BEST_SCORES, and the V_rand threshold of its latest evaluation
        (`v_rand_threshold`), where it has them."""
        reached = {name: better(value for _, value in validation_scalars[f"epoch_{name}"])
                   for name, (better, _) in BEST_SCORES.items() if validation_scalars.get(f"epoch_{name}")}
        if validation_scalars.get("epoch_v_rand_threshold"):
            reached["v_rand_threshold"] = validation_scalars["epoch_v_rand_threshold"][-1][1]
        return reached

    def on_train_begin(self, logs=None):
        if global_step(self.model) == 0:
            self.writers.submit("", 0, self.write_run)

    def write_run(self):
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in self.hyperparameters],
            metrics=[hp.Metric(tag, group=group or None, display_name=name) for group, tag, name in self.METRICS])
        hp.hparams(self.hyperparameters, trial_id=self.trial_id)
        for name, markdown in self.documents.items():
            tf.summary.text(name, markdown)
        layout = custom_scalar_summary.pb(comparison_layout())
        tf.summary.experimental.write_raw_pb(layout.SerializeToString(), step=0)

    def on_epoch_end(self, epoch, logs=None):
        self.writers.submit("", epoch, lambda: self.write_best(self.epoch_logs[epoch]))

    def write_best(self, logs):
        for name, (better, description) in BEST_SCORES.items():
            if f"val_{name}" in logs:
                value = logs[f"val_{name}"]
                self.best[name] = better(self.best.get(name, value), value)
                tf.summary.scalar(f"best_{name}", self.best[name], description=f"The {description} so far.")


# --- checkpoints and stops ----------------------------------------------------------------------

class CheckpointError(InputError):
    """A checkpoint that cannot be written (a full disk, ...): the run stops, and the line says
    how to go on."""


def checkpoint_error(path, error):
    how = (f"continue the run from its last checkpoint with --resume {path.parent}"
           if (path.parent / LAST).is_file() else "start the run again")
    return CheckpointError(f"cannot write {path} ({error.strerror or error}): free some space, then {how}")


class Checkpoints(keras.callbacks.Callback):
    """`best.keras` when the validation `score` (settings.CHECKPOINT_SCORE, or
    CHECKPOINT_SCORE_WITHOUT_ISBI for a run that never scores V_rand) improves on `best`, and
    `last.keras`, after every epoch whose loss is finite (weights that produced NaN are no
    checkpoint to go back to). Must be the last callback that writes, after every summary of the
    epoch.

    The epoch's net is saved on the training thread to a candidate (rundir.candidate_checkpoint),
    and promoted by the watcher once it has scored the epoch and written everything the epoch
    logged: copied to `best.keras` if it is the best, then renamed to `last.keras`. Each step is
    atomic; a kill leaves the former checkpoints and a candidate that --resume removes.
    """

    def __init__(self, watcher, run_dir, epoch_logs, score, best=None):
        super().__init__()
        self.watcher = watcher
        self.run_dir = Path(run_dir)
        self.epoch_logs = epoch_logs
        self.score = score
        self.best = best

    def improves(self, score):
        better, _ = BEST_SCORES[self.score]
        return score is not None and np.isfinite(score) and (self.best is None or better(score, self.best) != self.best)

    def on_epoch_end(self, epoch, logs=None):
        if not np.isfinite(logs["loss"]):
            return
        candidate = candidate_checkpoint(self.run_dir, epoch)
        try:
            candidate.unlink(missing_ok=True)  # never written through a link planted there
            self.model.save(candidate)
        except OSError as error:
            candidate.unlink(missing_ok=True)
            self.watcher.drain()  # the advice depends on whether the former epoch's checkpoint is in place
            raise checkpoint_error(self.run_dir / LAST, error) from None
        self.watcher.submit(lambda: self.promote(candidate, self.epoch_logs[epoch].get(f"val_{self.score}")))

    def promote(self, candidate, score):
        """On the watcher: `candidate` copied to best.keras if `score` improves on the best, then
        renamed to last.keras."""
        path = self.run_dir / BEST
        try:
            if self.improves(score):
                with files.replaced_atomically(path) as temporary:
                    shutil.copyfile(candidate, temporary)
                self.best = score
            path = self.run_dir / LAST
            os.replace(candidate, path)
        except OSError as error:
            candidate.unlink(missing_ok=True)
            raise checkpoint_error(path, error) from None


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
    the weights' copies, the checkpoint's save). A watcher that began scoring at the first job
    held the GIL between its numpy calls while the epoch end's Python waited for it
    (docs/performance.md, "What limits them")."""

    def __init__(self, watcher, first):
        super().__init__()
        self.watcher = watcher
        self.first = first

    def on_epoch_end(self, epoch, logs=None):
        if self.first:
            self.watcher.hold()
        else:
            self.watcher.release()


class AveragedWeights(keras.callbacks.Callback):
    """With `--ema`: from each epoch's end to the next epoch's start the net holds the moving
    average of its weights, and the optimizer the weights it trains, so that everything the epoch
    end writes (scores, images, histograms, checkpoints) is of the averaged net. Must come before
    every callback that reads the net. Training itself never sees the average: each epoch swaps the weights back first."""

    def __init__(self):
        super().__init__()
        self.swapped = False

    def swap(self):
        swap_averaged_weights(self.model)
        self.swapped = not self.swapped

    def on_epoch_begin(self, epoch, logs=None):
        if self.swapped:
            self.swap()

    def on_epoch_end(self, epoch, logs=None):
        if not self.swapped:
            self.swap()


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
    score = CHECKPOINT_SCORE if args.eval_every else CHECKPOINT_SCORE_WITHOUT_ISBI
    return [
        EpochEndHandOver(watcher, first=True),
        *([AveragedWeights()] if averages_weights(run.model) else []),
        validation_pass,
        # Before the summaries, whose watcher jobs read the scores it adds to the epoch logs.
        Validation(watcher, epoch_logs, validation_pass, inputs.val_labels, LOSSES[args.loss], training_metrics(),
                   args.eval_every, weights),
        TrainingSummaries(writers, epoch_logs, args.update_freq, args.histogram_freq),
        ValidationSliceSummaries(writers, epoch_logs, validation_pass, inputs.val_labels[shown], [indices[i] for i in shown],
                                 image_every=args.image_every, histogram_every=args.histogram_freq,
                                 v_rand_threshold=run.reached.get("v_rand_threshold", THRESHOLD),
                                 weights=None if weights is None else weights[shown]),
        RunSummary(writers, epoch_logs, run.directory.name, hyperparameters, documents, run.reached),
        stop,
        # Its epoch end flushes what the epoch logged, its training end drains the watcher.
        writers,
        # After it: a checkpoint is promoted only once everything the epoch logged is on disk.
        Checkpoints(watcher, run.directory, epoch_logs, score, run.reached.get(score)),
        EpochReport(watcher, epoch_logs, report),
        EpochEndHandOver(watcher, first=False),
    ]
