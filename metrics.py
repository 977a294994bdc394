"""Losses and metrics for membrane segmentation, in Keras ops so they run inside training.

Labels and predictions are cell probabilities (1 = cell, 0 = membrane). Dice is measured on the
membrane class: 78 % of ISBI pixels are cells, so a cell Dice of 0.88 is reached by a network
that predicts "cell" everywhere, while its membrane Dice is 0.
"""

import keras
from keras import ops

THRESHOLD = 0.5
SMOOTHING = 1.0


def misclassified_pixel_fraction(y_true, y_pred):
    """Per image, the fraction of pixels whose thresholded prediction differs from the label."""
    predicted_cell = ops.cast(y_pred >= THRESHOLD, "float32")
    wrong = ops.not_equal(predicted_cell, ops.cast(y_true, "float32"))
    return ops.mean(ops.cast(wrong, "float32"), axis=(1, 2, 3))


def membrane_dice(y_true, y_pred):
    """Per image, the Dice overlap of thresholded predicted membrane with labelled membrane."""
    true_membrane = 1.0 - ops.cast(y_true, "float32")
    predicted_membrane = ops.cast(y_pred < THRESHOLD, "float32")
    return dice_overlap(true_membrane, predicted_membrane)


def dice_overlap(a, b):
    """Smoothed Dice of two (batch, H, W, 1) maps in [0, 1], per image; 1 when both are empty."""
    intersection = ops.sum(a * b, axis=(1, 2, 3))
    total = ops.sum(a, axis=(1, 2, 3)) + ops.sum(b, axis=(1, 2, 3))
    return (2.0 * intersection + SMOOTHING) / (total + SMOOTHING)


def soft_dice_loss(y_true, y_pred):
    """1 - Dice of the predicted membrane probability with the labelled membrane."""
    true_membrane = 1.0 - ops.cast(y_true, "float32")
    predicted_membrane = 1.0 - ops.cast(y_pred, "float32")
    return 1.0 - dice_overlap(true_membrane, predicted_membrane)


def bce_dice_loss(y_true, y_pred):
    """Per image, mean binary cross-entropy plus the soft membrane Dice loss."""
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    return bce + soft_dice_loss(y_true, y_pred)


LOSSES = {
    "bce": keras.losses.binary_crossentropy,
    "mse": keras.losses.mean_squared_error,
    "dice": soft_dice_loss,
    "bce_dice": bce_dice_loss,
}


def training_metrics():
    """Fresh metric objects for `model.compile`; their names become the TensorBoard tags."""
    return [
        keras.metrics.BinaryAccuracy(name="accuracy", threshold=THRESHOLD),
        keras.metrics.MeanMetricWrapper(misclassified_pixel_fraction, name="misclassified_pixel_fraction"),
        keras.metrics.MeanMetricWrapper(membrane_dice, name="membrane_dice"),
    ]
