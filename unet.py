"""The symmetric U-Net of Ronneberger et al. (2015) with 'same' padding.

Layer names follow the paper's figure: `enc1_conv1` ... `enc4_pool` on the way down,
`bottleneck_conv1/2` at the bottom, `dec4_up` ... `dec1_conv2` on the way up (decoder level
k joins the skip from encoder level k) and `output`, so the graph and the histograms read like
the figure. With 'same' padding the output has the input's height and width, which must be
multiples of 2**depth; the input size is left open, so a net trained on crops predicts whole
slices. The net is compiled with Adam, which may keep a moving average of the weights
(`compiled_unet(ema=...)`, `averaged_weights_swap`).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import metrics
from settings import DEPTH


def block_outputs(depth=DEPTH):
    """The names of the layers that end each block (a level's second convolution) and the
    output, from the top of the encoder down and back up."""
    return (
        [f"enc{level}_conv2" for level in range(1, depth + 1)]
        + ["bottleneck_conv2"]
        + [f"dec{level}_conv2" for level in range(depth, 0, -1)]
        + ["output"]
    )


def conv_block(x, filters, prefix):
    for i in (1, 2):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            activation="relu",
            kernel_initializer="he_normal",
            name=f"{prefix}_conv{i}",
        )(x)
    return x


DROPOUT = "bottleneck_dropout"  # the one dropout layer, with --dropout


def build_unet(filters=64, depth=DEPTH, channels=1, dropout=0.0):
    """U-Net with `filters` channels at the first level, doubling at each of `depth` levels, and
    with `dropout` > 0 a dropout layer after the bottleneck (the paper's 'drop-out layers at the
    end of the contracting path')."""
    inputs = keras.Input(shape=(None, None, channels), name="image")
    skips = []
    x = inputs
    for level in range(1, depth + 1):
        x = conv_block(x, filters * 2 ** (level - 1), f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = conv_block(x, filters * 2**depth, "bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name=DROPOUT)(x)
    for level in range(depth, 0, -1):
        level_filters = filters * 2 ** (level - 1)
        # The paper's 2x2 "up-convolution": doubles the resolution and halves the channels.
        x = layers.Conv2DTranspose(level_filters, 2, strides=2, name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([skips[level - 1], x])
        x = conv_block(x, level_filters, f"dec{level}")
    # Kept in float32 under mixed precision so probabilities near 0 and 1 stay exact.
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name="unet")


def compiled_unet(filters, loss, lr, jit_compile, ema=0.0, dropout=0.0):
    """A new U-Net compiled for training: Adam at `lr`, the loss named `loss` (metrics.LOSSES) and
    the training metrics. With `ema` > 0 Adam also keeps an exponential moving average of the
    weights at that momentum (AveragedWeights shows it to validation and checkpoints)."""
    model = build_unet(filters=filters, dropout=dropout)
    optimizer = keras.optimizers.Adam(lr, **({"use_ema": True, "ema_momentum": ema} if ema else {}))
    model.compile(
        optimizer=optimizer, loss=metrics.LOSSES[loss], metrics=metrics.training_metrics(), jit_compile=jit_compile
    )
    # Now rather than inside the first training step, where Keras (without a tf.distribute strategy)
    # would create the optimizer's variables: a tf.function that creates variables is traced twice.
    model.optimizer.build(model.trainable_variables)
    return model


def averaged_weights_swap(model):
    """A function of no arguments that exchanges the net's trainable weights with the optimizer's
    moving average of them (a model compiled with `ema` > 0), in one graph call: done op by op, its
    140-odd reads and assignments each gave the GIL up, and at an epoch's start, where the watcher
    has just been handed the epoch's jobs, waited for it to come back. Keras has no public access
    to the average except its SwapEMAWeights callback, which at the last epoch also overwrites the
    average; this is the one place that reads the optimizer's private list of averages (guarded
    by test_resume)."""
    pairs = list(zip(model.trainable_variables, adam_of(model)._model_variables_moving_average, strict=True))

    @tf.function
    def swap():
        for variable, average in pairs:
            value = keras.ops.copy(variable)  # on the device: no round trip through the host
            variable.assign(average)
            average.assign(value)

    return swap


def averages_weights(model):
    return bool(getattr(adam_of(model), "use_ema", False))


def adam_of(model):
    """The model's Adam, also under mixed float16's LossScaleOptimizer."""
    return getattr(model.optimizer, "inner_optimizer", model.optimizer)


def precision(model):
    """The Keras dtype policy the net computes in (its output layer is float32 under any)."""
    return model.get_layer(block_outputs()[0]).dtype_policy.name


def in_float32(model):
    """`model` with float32 weights and computation: itself if it is so, else a copy of a net
    trained under a mixed policy (bfloat16 or float16 computation). A bfloat16 net's outputs
    depend on how each backend rounds its intermediate results; in float32 they agree between
    machines to about 1e-6, so the net can be exported and checked anywhere."""
    if precision(model) == "float32":
        return model
    copy = keras.models.clone_model(
        model, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})
    )
    copy.set_weights(model.get_weights())
    return copy


class AveragedWeights(keras.callbacks.Callback):
    """With `--ema`: from each epoch's end to the next epoch's start the net holds the moving
    average of its weights, and the optimizer the weights it trains, so that everything the epoch
    end writes (scores, images, histograms, checkpoints) is of the averaged net. Must come before
    every callback that reads the net. Training itself never sees the average: each epoch swaps
    the weights back first."""

    def __init__(self):
        super().__init__()
        self.swapped = False
        self._swap = None

    def on_train_begin(self, logs=None):
        self._swap = averaged_weights_swap(self.model)

    def swap(self):
        self._swap()
        self.swapped = not self.swapped

    def on_epoch_begin(self, epoch, logs=None):
        if self.swapped:
            self.swap()

    def on_epoch_end(self, epoch, logs=None):
        if not self.swapped:
            self.swap()


def drops_out(model):
    return any(layer.name == DROPOUT for layer in model.layers)


class DropoutSeeds(keras.callbacks.Callback):
    """With `--dropout`: each epoch's dropout masks drawn from the run's `seed` and the epoch, as its
    training crops are (batches.py), so that a resumed run draws the masks of one run straight
    through: a .keras checkpoint does not hold the random-seed state that Keras' Dropout draws them
    from, and a resumed run's would start again at the first epoch's."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        state = self.model.get_layer(DROPOUT).seed_generator.state
        first = np.random.default_rng([self.seed, epoch]).integers(2**31 - 1)
        state.assign(np.array([first, 0], dtype=state.dtype))
