"""The validation slices through the net once per training step (ValidationPass), as predict.py
predicts them, and their scores each epoch (Validation): the Keras hooks that need the net on the
training thread, and the scoring they hand to the run's watcher (metrics.validation_scores).
"""

import keras
import numpy as np
import tensorflow as tf

from metrics import validation_scores
from summaries import ACTIVATION_SAMPLE, sample_values
from tiling import CONTEXT, with_context
from unet import block_outputs


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


class ValidationPass(keras.callbacks.Callback):
    """The validation slices through the net at most once per training step, for every callback
    that needs the net's output on them: Validation (loss, metrics, challenge scores) and
    ValidationSliceSummaries (images, activation histograms, PR curve) read it instead of each
    predicting. Must come before them.

    Each slice goes through the net whole, one at a time (so that large slices and the paper-size
    net fit in memory), with tiling.CONTEXT mirrored pixels around it as `predict.py` predicts it:
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
        self._forward = forward_pass(
            keras.Model(self.model.inputs, [self.model.get_layer(name).output for name in block_outputs()])
        )

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
        return {
            name: np.concatenate([self._activations[position][name] for position in self.shown])
            for name in block_outputs()
        }

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
            self._activations[position] = {
                name: sample_values(within_slice(output), share)
                for name, output in zip(block_outputs(), outputs, strict=True)
            }


def evaluated(epoch, eval_every, epochs):
    """Whether the challenge's scores are due at `epoch` (from 0) of a run of `epochs`: with
    --eval-every N at the first epoch, every Nth after it and the last, so that the net a run ends
    with is scored and best.keras can be it; never with 0."""
    return bool(eval_every) and (epoch % eval_every == 0 or epoch == epochs - 1)


class Validation(keras.callbacks.Callback):
    """The validation scores of each epoch, from the ValidationPass of the epoch's last step, scored
    by the watcher into `epoch_logs[epoch]` (a copy of the epoch's logs, made here on the training
    thread): the loss and the compiled metrics every epoch (`val_loss`,
    `val_misclassified_pixel_fraction`, ...) and at the epochs `evaluated` names the ISBI
    challenge's scores (`val_v_rand`, `val_v_info`, `val_pixel_error` and the thresholds that give
    them).
    With `weights` (per slice, batches.border_weights), the loss is weighted as the training loss is.
    The callbacks after this one read the scores from `epoch_logs` in their watcher jobs; with
    `shown_segments`, ValidationSliceSummaries reads from `shown_segments[epoch]` the segments of
    the shown slices at the best V_rand's threshold, which the scoring made.

    It stands in for Keras' `validation_data`, which would pass the slices through the net a
    second time, and which under a tf.distribute strategy (Keras 3.15) splits a batch of one
    slice across the replicas and fails on the empty share. TrainingSummaries, which must come
    after this one, writes the scores to the `validation` run as `epoch_loss`, `epoch_v_rand`,
    ...; the progress line (progress.py), the closing line and checkpoints see them too.
    """

    def __init__(
        self, watcher, epoch_logs, validation_pass, labels, loss, metrics, eval_every, weights=None, shown_segments=None
    ):
        super().__init__()
        self.watcher = watcher
        self.epoch_logs = epoch_logs
        self.validation_pass = validation_pass
        self.labels = labels[..., np.newaxis].astype(np.float32)
        self.loss = loss
        self.metrics = metrics
        self.eval_every = eval_every
        self.weights = np.ones(labels.shape, np.float32) if weights is None else weights
        self.shown_segments = shown_segments

    def on_epoch_end(self, epoch, logs=None):
        probabilities = self.validation_pass.probabilities()
        self.epoch_logs[epoch] = dict(logs)
        self.watcher.submit(lambda: self.score(self.epoch_logs[epoch], epoch, probabilities))

    def score(self, logs, epoch, probabilities):
        """Add the validation scores of `probabilities` (slices, H, W) to `logs`, and where the ISBI
        scores were due, the shown slices' segments at the best V_rand's threshold to
        `shown_segments` (if given), which ValidationSliceSummaries takes out."""
        isbi = evaluated(epoch, self.eval_every, self.params["epochs"]) and np.isfinite(logs["loss"])
        kept = () if self.shown_segments is None else self.validation_pass.shown
        scores = validation_scores(self.labels, probabilities, self.weights, self.loss, self.metrics, isbi, kept)
        if "segments" in scores:
            self.shown_segments[epoch] = scores.pop("segments")
        logs.update({f"val_{name}": value for name, value in scores.items()})
