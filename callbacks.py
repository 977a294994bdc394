"""The Keras callbacks of a run: where the network is wrong, what a run was, Keras' own TensorBoard
callback mended, checkpoints a kill cannot damage, and a stop on a non-finite loss."""

import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import summary as histogram_summary
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.pr_curve import summary as pr_curve_summary

import files
from cli import InputError
from metrics import LOSSES, THRESHOLD, isbi_scores, misclassified_pixel_fraction, training_metrics
from rundir import BEST, LAST, VALIDATION_SLICES
from settings import DEPTH

MONITOR = "val_misclassified_pixel_fraction"  # the validation score that makes a checkpoint best.keras


# Block outputs whose activations are histogrammed: the last convolution of each level.
ACTIVATION_LAYERS = [f"enc{level}_conv2" for level in range(1, DEPTH + 1)] + ["bottleneck_conv2"] + [
    f"dec{level}_conv2" for level in range(DEPTH, 0, -1)] + ["output"]
FALSE_MEMBRANE_RGB = (1.0, 0.0, 1.0)   # magenta: membrane predicted where the label says cell
MISSED_MEMBRANE_RGB = (0.0, 1.0, 0.0)  # green: label says membrane, prediction says cell
ERROR_OPACITY = 0.75
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


def forward_pass(model):
    """`model` applied to a batch, as a graph run on this process's first device.

    Not `predict_on_batch`: under a tf.distribute strategy Keras (3.15) hands each replica the
    whole batch and returns one copy of the output per replica, and across workers it gathers
    the outputs, a collective that every worker would have to join.
    """
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def sample_values(array):
    """At most ACTIVATION_SAMPLE values of `array`, drawn at the same positions every time.

    A histogram of all 40 million activations of three 512x512 slices takes 10 s on two cores;
    65,536 values put each of the 30 buckets within about 0.1 % of its true share, and the ten
    layers' histograms take 0.25 s.
    """
    values = np.asarray(array, dtype=np.float32).ravel()
    if values.size <= ACTIVATION_SAMPLE:
        return values
    return values[np.random.default_rng(0).integers(values.size, size=ACTIVATION_SAMPLE)]


class ValidationSliceSummaries(keras.callbacks.Callback):
    """What the network makes of a few fixed validation slices, written to one run directory.

    Every `image_every` training steps, per slice under the tag group `slice_<index>`: `prediction`,
    the probability of cell (black 0 to white 1 on a fixed scale, so a flat prediction shows as
    flat grey); `error`, the EM slice with false membrane in magenta and missed membrane in green;
    `input` and `label` once; and the misclassified-pixel fraction over the slices as a scalar.
    Every `histogram_every` epochs: histograms of each block's activations (`activations/...`) and
    the precision-recall curve of membrane detection (`membrane_pr`).

    The step is always the optimizer's iteration count, the global training step of Keras'
    batch-level scalars, so images, curves and histograms line up and continue across `fit` calls
    and resumed runs.
    """

    def __init__(self, log_dir, images, labels, slice_indices, image_every, histogram_every):
        super().__init__()
        self.log_dir = str(log_dir)
        self.images = images[..., np.newaxis]
        self.labels = labels[..., np.newaxis].astype(np.float32)
        self.slice_indices = list(slice_indices)
        self.image_every = image_every
        self.histogram_every = histogram_every
        self.writer = None
        self._predict = None
        self._activations = None
        self._epoch = 0
        self._images_deferred_to = None

    def global_step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(self.log_dir)
        self._predict = forward_pass(self.model)
        self._activations = forward_pass(keras.Model(self.model.inputs, [self.model.get_layer(name).output
                                                                         for name in ACTIVATION_LAYERS]))
        if self.global_step() == 0:  # a resumed run wrote its start already
            self.write(lambda: self.write_images(self.predict()), 0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def histograms_due(self, epoch):
        return self.histogram_every and epoch % self.histogram_every == 0

    def on_train_batch_end(self, batch, logs=None):
        step = self.global_step()
        if step % self.image_every:
            return
        # Images due at the last step of an epoch with histograms come from the epoch end's pass
        # through the net (the weights are the same): one forward pass of the slices instead of two.
        if batch == self.params["steps"] - 1 and self.histograms_due(self._epoch):
            self._images_deferred_to = step
        else:
            self.write(lambda: self.write_images(self.predict()), step)

    def on_epoch_end(self, epoch, logs=None):
        step = self.global_step()
        histograms = self.histograms_due(epoch) and np.isfinite(logs["loss"])
        images = self._images_deferred_to == step
        if not (histograms or images):
            return
        outputs = self._activations(self.images)

        def summaries():
            if histograms:
                self.write_activations_and_pr_curve(outputs)
            if images:
                self.write_images(np.asarray(outputs[-1], dtype=np.float32))
        self.write(summaries, step)

    def on_train_end(self, logs=None):
        self.writer.close()

    def write(self, summaries, step):
        # Recorded whatever Keras' batch-level `record_if` says about this step.
        with tf.summary.record_if(True), self.writer.as_default(step=step):
            summaries()
        self.writer.flush()

    def predict(self):
        return np.asarray(self._predict(self.images), dtype=np.float32)

    def write_images(self, probabilities):
        step = tf.summary.experimental.get_step()
        tf.summary.scalar("misclassified_pixel_fraction", np.mean(misclassified_pixel_fraction(self.labels, probabilities)),
                          description="Misclassified-pixel fraction on the slices shown as images.")
        for position, index in enumerate(self.slice_indices):
            group = f"slice_{index:02d}"
            if step == 0:
                tf.summary.image(f"{group}/input", self.images[position:position + 1])
                tf.summary.image(f"{group}/label", self.labels[position:position + 1])
            tf.summary.image(f"{group}/prediction", probabilities[position:position + 1],
                             description="Probability of cell: black 0, white 1.")
            overlay = error_overlay(self.images[position, ..., 0], self.labels[position, ..., 0], probabilities[position, ..., 0])
            tf.summary.image(f"{group}/error", overlay[np.newaxis],
                             description="Errors on the EM slice: magenta = false membrane, green = missed membrane.")

    def write_activations_and_pr_curve(self, outputs):
        for name, activation in zip(ACTIVATION_LAYERS, outputs):
            tf.summary.histogram(f"activations/{name}", sample_values(activation))
        membrane = self.labels[..., 0] < THRESHOLD
        membrane_probability = 1.0 - np.asarray(outputs[-1], dtype=np.float32)[..., 0]
        curve = pr_curve_summary.pb("membrane_pr", labels=membrane, predictions=membrane_probability,
                                    num_thresholds=PR_THRESHOLDS,
                                    description="Precision and recall of membrane at thresholds of 1 - p(cell).")
        tf.summary.experimental.write_raw_pb(curve.SerializeToString(), step=tf.summary.experimental.get_step())


class Validation(keras.callbacks.Callback):
    """The validation scores of each epoch from one pass of the whole validation slices through the
    net, added to the epoch logs: the loss and the compiled metrics every epoch (`val_loss`,
    `val_misclassified_pixel_fraction`, ...) and every `isbi_every` epochs the ISBI challenge's
    scores (`val_v_rand`, `val_v_info`, `val_pixel_error` and the thresholds that give them).

    It stands in for Keras' `validation_data`, which would pass the slices through the net a
    second time, and which under a tf.distribute strategy (Keras 3.15) splits a batch of one
    slice across the replicas and fails on the empty share. Keras' TensorBoard callback, which
    must come after this one, writes the scores to the `validation` run as `epoch_loss`,
    `epoch_v_rand`, ...; the progress bar, History and checkpoints see them too.
    """

    def __init__(self, images, labels, loss, metrics, isbi_every):
        super().__init__()
        self.images = images[..., np.newaxis]
        self.labels = labels[..., np.newaxis].astype(np.float32)
        self.loss = loss
        self.metrics = metrics
        self.isbi_every = isbi_every
        self._predict = None

    def on_train_begin(self, logs=None):
        self._predict = forward_pass(self.model)

    def on_epoch_end(self, epoch, logs=None):
        for metric in self.metrics:
            metric.reset_state()
        losses, probabilities = [], []
        # One slice at a time, so that large slices and the paper-size net fit in memory.
        for image, label in zip(self.images, self.labels):
            probability = np.asarray(self._predict(image[np.newaxis]), dtype=np.float32)
            losses.append(float(np.mean(self.loss(label[np.newaxis], probability))))
            for metric in self.metrics:
                metric.update_state(label[np.newaxis], probability)
            probabilities.append(probability[0, ..., 0])
        logs["val_loss"] = float(np.mean(losses))
        logs.update({f"val_{metric.name}": float(metric.result()) for metric in self.metrics})
        if self.isbi_every and epoch % self.isbi_every == 0 and np.isfinite(logs["loss"]):
            scores = isbi_scores(self.labels[..., 0], np.stack(probabilities))
            logs.update({f"val_{name}": value for name, value in scores.items()})


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` with every epoch summary kept, one global step and a graph.

    Keras (3.15) enters `record_if(step % update_freq == 0)` for batch-level scalars and leaves it
    open through `on_epoch_end`, so epoch scalars and weight histograms are silently dropped
    whenever the step at hand is not a multiple of `update_freq`; those writes are forced here.
    The validation scores (from the Validation callback, not Keras' evaluation) are also written
    against the training step, as `evaluation_<name>_vs_iterations`, as Keras does after its own
    evaluation. Its batch step restarts at 0 on every `fit`; here it starts from the optimizer's
    iteration count, the step the other callbacks use. And its graph (a conceptual `keras` graph)
    opens in the Graphs tab as "Malformed GraphDef"; here `write_graph` writes the op graph of one
    forward pass instead, drawn with a box per named layer (once: a resumed run has it). Its
    writers are flushed after every epoch, so that a checkpoint never gets ahead of the curves.
    Weight histograms are bucketed by TensorBoard's numpy `histogram_pb` (the same 30 buckets as
    `tf.summary.histogram`), which takes a quarter of the time of the ~80 eager ops per weight of
    `tf.summary.histogram` (1 s per epoch for the default net on two cores).
    """

    def __init__(self, log_dir, write_graph=True, **kwargs):
        super().__init__(log_dir, write_graph=False, **kwargs)
        self.write_forward_graph = write_graph

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._global_train_batch = int(self.model.optimizer.iterations.numpy())
        if self.write_forward_graph and self._global_train_batch == 0:
            self.write_forward_pass_graph()

    def write_forward_pass_graph(self):
        forward = forward_pass(self.model)
        example = tf.zeros((1, 2**DEPTH, 2**DEPTH, self.model.input_shape[-1]))
        tf.summary.trace_on(graph=True, profiler=False)
        forward(example)
        with tf.summary.record_if(True), self._train_writer.as_default():
            tf.summary.trace_export("unet", step=0)

    def _log_weights(self, epoch):
        # np.errstate: the weights of a run stopped by a NaN loss are NaN, bucketed as such without a warning.
        with self._train_writer.as_default(), np.errstate(invalid="ignore"):
            for weight in self.model.weights:
                summary = histogram_summary.histogram_pb(f"{weight.path.replace(':', '_')}/histogram", weight.numpy())
                tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=epoch)
        self._train_writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        with tf.summary.record_if(True):
            super().on_epoch_end(epoch, logs)
            # As Keras writes after its own evaluation, which the Validation callback replaces.
            with self._val_writer.as_default(step=int(self.model.optimizer.iterations.numpy())):
                for name, value in logs.items():
                    if name.startswith("val_"):
                        tf.summary.scalar(f"evaluation_{name[4:]}_vs_iterations", value)
        self._train_writer.flush()
        self._val_writer.flush()


class RunSummary(keras.callbacks.Callback):
    """What the run was, in the run directory itself: HParams and Text tabs, and its best epochs.

    At the start of a run (not of a resumed one, which has them): the hyperparameters for the
    HParams tab (with the metrics it should show for every run) and the markdown `documents` for
    the Text tab. After each epoch: the best validation value so far of each metric in BEST
    (`best_misclassified_pixel_fraction`, `best_v_rand`), when the epoch has it, starting from
    `best` ({name: value}) when resuming.
    """

    BEST = {"misclassified_pixel_fraction": (min, "Lowest validation misclassified-pixel fraction so far."),
            "v_rand": (max, "Highest validation V_rand (ISBI challenge score) so far.")}
    METRICS = [
        ("", "best_misclassified_pixel_fraction", "best validation misclassified-pixel fraction"),
        ("", "best_v_rand", "best validation V_rand"),
        ("validation", "epoch_v_rand", "last validation V_rand"),
        ("validation", "epoch_v_info", "last validation V_info"),
        ("validation", "epoch_pixel_error", "last validation pixel error"),
        ("validation", "epoch_misclassified_pixel_fraction", "last validation misclassified-pixel fraction"),
        ("validation", "epoch_loss", "last validation loss"),
        ("validation", "epoch_membrane_dice", "last validation membrane Dice"),
        ("train", "epoch_loss", "last training loss"),
    ]

    def __init__(self, log_dir, trial_id, hyperparameters, documents, best=None):
        super().__init__()
        self.log_dir = str(log_dir)
        self.trial_id = trial_id
        self.hyperparameters = hyperparameters
        self.documents = documents
        self.best = dict(best or {})
        self._writer = None

    @classmethod
    def best_of(cls, validation_scalars):
        """The best values so far, for resuming, from a run's validation scalars {tag: [(step, value)]}."""
        return {name: better(value for _, value in validation_scalars[f"epoch_{name}"])
                for name, (better, _) in cls.BEST.items() if validation_scalars.get(f"epoch_{name}")}

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)
        if int(self.model.optimizer.iterations.numpy()) > 0:
            return
        with tf.summary.record_if(True), self._writer.as_default(step=0):
            hp.hparams_config(
                hparams=[hp.HParam(name) for name in self.hyperparameters],
                metrics=[hp.Metric(tag, group=group or None, display_name=name) for group, tag, name in self.METRICS])
            hp.hparams(self.hyperparameters, trial_id=self.trial_id)
            for name, markdown in self.documents.items():
                tf.summary.text(name, markdown)
        self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        with tf.summary.record_if(True), self._writer.as_default(step=epoch):
            for name, (better, description) in self.BEST.items():
                if f"val_{name}" in logs:
                    value = logs[f"val_{name}"]
                    self.best[name] = better(self.best.get(name, value), value)
                    tf.summary.scalar(f"best_{name}", self.best[name], description=description)
        self._writer.flush()

    def on_train_end(self, logs=None):
        self._writer.close()


# --- checkpoints and stops ----------------------------------------------------------------------

class CheckpointError(InputError):
    """A checkpoint that cannot be written (a full disk, ...): the run stops, and the line says
    how to go on."""


def save_atomically(model, path):
    """Save `model` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    try:
        with files.replaced_atomically(path) as temporary:
            model.save(temporary)
    except OSError as error:
        how = (f"continue the run from its last checkpoint with --resume {path.parent}"
               if (path.parent / LAST).is_file() else "start the run again")
        raise CheckpointError(f"cannot write {path} ({error.strerror or error}): free some space, then {how}") from None


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


# --- a run's callbacks --------------------------------------------------------------------------

def for_run(args, run_dir, validation, shown, best, stop, hyperparameters, documents):
    """The callbacks of a run in the order they must run: `validation` is (slices, masks, indices),
    `shown` the positions of those shown as images, `best` the best values so far ({} for a new
    run), `stop` the run's StopOnNonFiniteLoss."""
    images, labels, indices = validation
    return [
        # Before TensorBoard, which writes the scores it adds to the epoch logs.
        Validation(images, labels, LOSSES[args.loss], training_metrics(), args.eval_every),
        TensorBoard(log_dir=str(run_dir), histogram_freq=args.histogram_freq, write_graph=True,
                    update_freq=args.update_freq),
        ValidationSliceSummaries(Path(run_dir) / VALIDATION_SLICES, images[shown], labels[shown],
                                 [indices[i] for i in shown], image_every=args.image_every,
                                 histogram_every=args.histogram_freq),
        RunSummary(run_dir, Path(run_dir).name, hyperparameters, documents, best),
        stop,
        # Last: a checkpoint is written only once everything the epoch logged is on disk.
        Checkpoints(run_dir, best.get("misclassified_pixel_fraction", math.inf)),
    ]
