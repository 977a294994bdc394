"""TensorBoard callbacks: images of where the network is wrong, and Keras' own callback mended."""

import keras
import numpy as np
import tensorflow as tf

from metrics import THRESHOLD


class ValidationSliceImages(keras.callbacks.Callback):
    """Every `every` training steps, shows the network's prediction on a few fixed slices.

    For each slice it writes, under the tag group `slice_<index>`, the probability map
    (`prediction`, white = cell) and the misclassified pixels (`error`, white = wrong), plus the
    `input` and `label` once; and the misclassified-pixel fraction over all these slices as a
    scalar. The step is the optimizer's iteration count, the same global training step as Keras'
    batch-level scalars, so images and curves line up and continue across `fit` calls. Pixel
    values are written on a fixed [0, 1] scale: a flat prediction shows as flat grey, not as
    stretched noise.
    """

    def __init__(self, log_dir, images, labels, slice_indices, every):
        super().__init__()
        self.log_dir = str(log_dir)
        self.images = images[..., np.newaxis]
        self.labels = labels[..., np.newaxis].astype(np.float32)
        self.slice_indices = list(slice_indices)
        self.every = every
        self._writer = None
        self._wrote_inputs = False

    @property
    def writer(self):
        # Created on first use so that a run that never writes leaves no empty event file.
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        return self._writer

    def global_step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        self.write(self.global_step())

    def on_train_batch_end(self, batch, logs=None):
        step = self.global_step()
        if step % self.every == 0:
            self.write(step)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, step):
        # Recorded whatever Keras' batch-level `record_if` says about this step.
        with tf.summary.record_if(True):
            self.write_summaries(step)
        self._wrote_inputs = True
        self.writer.flush()

    def write_summaries(self, step):
        probabilities = np.asarray(self.model.predict_on_batch(self.images), dtype=np.float32)
        errors = ((probabilities >= THRESHOLD) != (self.labels >= THRESHOLD)).astype(np.float32)
        with self.writer.as_default(step=step):
            tf.summary.scalar("misclassified_pixel_fraction", errors.mean(),
                              description="Misclassified-pixel fraction on the slices shown as images.")
            for position, index in enumerate(self.slice_indices):
                group = f"slice_{index:02d}"
                if not self._wrote_inputs:
                    tf.summary.image(f"{group}/input", self.images[position:position + 1])
                    tf.summary.image(f"{group}/label", self.labels[position:position + 1])
                tf.summary.image(f"{group}/prediction", probabilities[position:position + 1])
                tf.summary.image(f"{group}/error", errors[position:position + 1])


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` with every epoch summary kept and one global step.

    Keras (3.15) enters `record_if(step % update_freq == 0)` for batch-level scalars and leaves it
    open through `on_epoch_end`, `on_test_end` and the train-graph write, so epoch scalars, weight
    histograms and the graph are silently dropped whenever the step at hand is not a multiple of
    `update_freq`. Those writes are forced here. Its batch step also restarts at 0 on every `fit`;
    here it starts from the optimizer's iteration count, the step the image callback uses.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._global_train_batch = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        if self._should_write_train_graph:
            with tf.summary.record_if(True):
                self._write_keras_model_train_graph()
            self._should_write_train_graph = False
        super().on_train_batch_end(batch, logs)

    def on_test_end(self, logs=None):
        with tf.summary.record_if(True):
            super().on_test_end(logs)

    def on_epoch_end(self, epoch, logs=None):
        with tf.summary.record_if(True):
            super().on_epoch_end(epoch, logs)
