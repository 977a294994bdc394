"""What bench.py measures with: the U-Net's FLOPs counted from its layers, a device's 3x3
convolution peak, a training step's parts, the input pipeline alone, and `model.fit` timed per
epoch with the seconds each callback's hooks take and what the watcher did meanwhile.
"""

import collections
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

import metrics

CONV_PEAK_SHAPES = [(8, 128, 128, 32), (8, 64, 64, 64), (8, 32, 32, 128), (8, 16, 16, 256)]
LAYER_REPEATS = 10


# --- FLOPs and peak -----------------------------------------------------------------------------


def sized_convolutions(model, size):
    """[(layer, forward FLOPs per image)] of the convolutions of `model` applied to `size` x `size`
    images: multiply-adds x 2 (pooling, ReLU and concatenation are a rounding error next to them)."""
    sized = keras.models.clone_model(model, input_tensors=keras.Input((size, size, model.input_shape[-1])))
    convolutions = []
    for layer in sized.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
            kernel_h, kernel_w, in_channels, out_channels = layer.kernel.shape
            if isinstance(layer, keras.layers.Conv2DTranspose):  # kernel (h, w, out, in), one pass per input pixel
                in_channels, out_channels = out_channels, in_channels
                positions = np.prod(layer.input.shape[1:3])
            else:
                positions = np.prod(layer.output.shape[1:3])
            convolutions.append((layer, int(2 * positions * kernel_h * kernel_w * in_channels * out_channels)))
    return convolutions


def forward_flops_per_image(model, size):
    return sum(flops for _, flops in sized_convolutions(model, size))


def median_seconds(function, repeats, warmup=2):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_rates(repeats=10):
    """{input shape: GFLOP/s} of a forward 3x3 'same' convolution keeping the channel count, for
    the shapes of CONV_PEAK_SHAPES, in the global dtype policy's compute precision."""
    rates = {}
    for shape in CONV_PEAK_SHAPES:
        batch, height, width, channels = shape
        conv = keras.layers.Conv2D(channels, 3, padding="same")
        inputs = tf.random.uniform(shape)
        forward = tf.function(conv, jit_compile=False)
        seconds = median_seconds(lambda forward=forward, inputs=inputs: forward(inputs).numpy(), repeats)
        rates[shape] = 2 * batch * height * width * 9 * channels * channels / seconds / 1e9
    return rates


def step_breakdown(model, batch, jit_compile, repeats):
    """What a training step on `batch` is made of, in median seconds: the forward pass in training
    mode, each convolution's forward pass alone ({layer name: (seconds, GFLOP/s)}), and the whole
    step with XLA switched the other way (a copy of the model compiled so)."""
    images, labels = batch
    forward = tf.function(lambda x: model(x, training=True))
    forward_seconds = median_seconds(lambda: forward(images).numpy(), repeats)
    layers = {}
    for layer, flops in sized_convolutions(model, images.shape[1]):
        inputs = tf.random.uniform((images.shape[0], *layer.input.shape[1:]))
        # LAYER_REPEATS different inputs in one call, so that a small layer is not timed as the call's overhead.
        alone = tf.function(
            lambda x, layer=layer: tf.add_n([tf.reduce_sum(layer(x * (1 + 1e-3 * i))) for i in range(LAYER_REPEATS)])
        )
        seconds = median_seconds(lambda alone=alone, inputs=inputs: alone(inputs).numpy(), repeats) / LAYER_REPEATS
        layers[layer.name] = (seconds, flops * images.shape[0] / seconds / 1e9)
    other = keras.models.clone_model(model)
    other.set_weights(model.get_weights())
    other.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=model.loss,
        metrics=metrics.training_metrics(),
        jit_compile=not jit_compile,
    )
    other_step = median_seconds(lambda: other.train_on_batch(images, labels), repeats, warmup=3)
    return {"forward": forward_seconds, "convolutions": layers, "other XLA step": other_step}


# --- this project's pipeline ----------------------------------------------------------------------


def pipeline_images_per_second(batches, batch_size, repeats):
    """Images/s that the training input pipeline `batches` delivers on its own, after a warm-up."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    for _ in range(repeats):
        next(iterator)
    return repeats * batch_size / (time.perf_counter() - start)


class TimedCallback(keras.callbacks.Callback):
    """Runs `callback` and adds up the wall seconds spent in its hooks, per epoch: those of the
    epoch's batches and its end. The start and the end of training (the graph, draining the
    watcher) are outside every epoch, as they are outside EpochTimes' epochs."""

    HOOKS = (
        "on_train_begin",
        "on_train_end",
        "on_epoch_begin",
        "on_epoch_end",
        "on_train_batch_begin",
        "on_train_batch_end",
    )
    UNTIMED = ("on_train_begin", "on_train_end")

    def __init__(self, callback):
        super().__init__()
        self.callback, self.epoch, self.seconds = callback, 0, collections.Counter()
        for hook in self.HOOKS:
            setattr(self, hook, self.timed(hook, getattr(callback, hook)))

    def timed(self, name, hook):
        def run(*arguments, **keywords):
            if name == "on_epoch_begin":
                self.epoch = arguments[0]
            start = time.perf_counter()
            hook(*arguments, **keywords)
            if name not in self.UNTIMED:
                self.seconds[self.epoch] += time.perf_counter() - start

        return run

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)


class EpochTimes(keras.callbacks.Callback):
    """Wall seconds of each epoch, from its first batch to after every other callback's epoch end;
    of each step after the first epoch, `steps[epoch, batch] = (seconds, beside)`: from its batch's
    start to after the other callbacks' batch ends, and whether `watching` (a watcher.Watcher) had
    work when it started; and what the watcher did from the first epoch's end to the last one's:
    its busy and waited seconds, the jobs of as many epoch ends as epochs timed (the first epoch's
    jobs run in the second; the last epoch's after training)."""

    def __init__(self, watching=None):
        super().__init__()
        self.watching = watching
        self.epochs, self._start = [], None
        self.busy = self.waited = 0.0
        self.steps = {}
        self._epoch = self._step_start = self._beside = None
        self._busy_before = self._waited_before = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._start = epoch, time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self._beside = self.watching is not None and not self.watching.idle
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch > 0:
            self.steps[self._epoch, batch] = (time.perf_counter() - self._step_start, self._beside)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self._start)
        if not self.watching:
            return
        if epoch == 0:
            self._busy_before, self._waited_before = self.watching.busy, self.watching.waited
        else:
            self.busy = self.watching.busy - self._busy_before
            self.waited = self.watching.waited - self._waited_before


def timed_fit(model, batches, epochs, steps_per_epoch, callbacks=(), watching=None):
    """(median wall seconds per epoch, {callback: median seconds per epoch}, EpochTimes) of
    model.fit over `epochs` epochs after a first one (tracing, graph, step-0 images), which is
    left out."""
    timer = EpochTimes(watching)
    timed = [TimedCallback(callback) for callback in callbacks]
    model.fit(
        batches, epochs=epochs + 1, steps_per_epoch=steps_per_epoch, shuffle=False, verbose=0, callbacks=[*timed, timer]
    )
    breakdown = {
        type(callback.callback).__name__: statistics.median(callback.seconds[epoch] for epoch in range(1, epochs + 1))
        for callback in timed
    }
    return statistics.median(timer.epochs[1:]), breakdown, timer
