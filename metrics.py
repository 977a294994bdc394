"""Losses and metrics for membrane segmentation.

Labels and predictions are cell probabilities (1 = cell, 0 = membrane). The losses and training
metrics are Keras ops so they run inside training. Dice is measured on the membrane class: 78 % of
ISBI pixels are cells, so a cell Dice of 0.88 is reached by a network that predicts "cell"
everywhere, while its membrane Dice is 0.

The ISBI 2012 challenge scores (V_rand, V_info, pixel error) at the end are numpy and
scikit-image: they segment whole slices into cells, which is no tensor operation.
"""

import collections
import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import keras
import numba
import numpy as np
from keras import ops
from skimage.measure import label as connected_components

THRESHOLD = 0.5
SMOOTHING = 1.0

# Registered so that a checkpoint loads with its loss and metrics compiled, ready to resume.
serializable = keras.saving.register_keras_serializable(package="isbi_unet")


@serializable
def misclassified_pixel_fraction(y_true, y_pred):
    """Per image, the fraction of pixels whose thresholded prediction differs from the label."""
    predicted_cell = ops.cast(y_pred >= THRESHOLD, "float32")
    wrong = ops.not_equal(predicted_cell, ops.cast(y_true, "float32"))
    return ops.mean(ops.cast(wrong, "float32"), axis=(1, 2, 3))


@serializable
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


@serializable
def soft_dice_loss(y_true, y_pred):
    """1 - Dice of the predicted membrane probability with the labelled membrane."""
    true_membrane = 1.0 - ops.cast(y_true, "float32")
    predicted_membrane = 1.0 - ops.cast(y_pred, "float32")
    return 1.0 - dice_overlap(true_membrane, predicted_membrane)


@serializable
def bce_dice_loss(y_true, y_pred):
    """Per image, mean binary cross-entropy plus the soft membrane Dice loss."""
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    return bce + soft_dice_loss(y_true, y_pred)


LOSSES = {
    "bce": keras.losses.binary_crossentropy,
    "mse": keras.losses.mean_squared_error,
    "dice": soft_dice_loss,
    "bce_dice": bce_dice_loss,
    # Weighted per pixel by the U-Net paper's weight map, which the batches carry as Keras' sample
    # weights (batches.RandomCrops, settings.WEIGHTED_LOSSES).
    "wbce": keras.losses.binary_crossentropy,
}


def training_metrics():
    """Fresh metric objects for `model.compile`; their names become the TensorBoard tags."""
    return [
        keras.metrics.BinaryAccuracy(name="accuracy", threshold=THRESHOLD),
        keras.metrics.MeanMetricWrapper(misclassified_pixel_fraction, name="misclassified_pixel_fraction"),
        keras.metrics.MeanMetricWrapper(membrane_dice, name="membrane_dice"),
    ]


# --- ISBI 2012 challenge scores ---------------------------------------------------------------
#
# As the challenge's Fiji script computes them (trainableSegmentation.metrics: RandError.
# getMaximalVRandAfterThinning, VariationOfInformation.getMaximalVInfoAfterThinning and
# PixelError.getPixelErrorMaximalFScore, all over thresholds 0.0 to 1.0 in steps of 0.1).

# Fiji's loop adds 0.1 to a double ten times, so its last threshold is 0.9999999999999999, not 1.0:
# a probability of exactly 1.0 still counts as cell there.
ISBI_THRESHOLDS = tuple(itertools.accumulate([0.1] * 10, initial=0.0))


# The states of a pixel in Fiji's watershed other than its segment's label (> 0).
LINE, BORDER, QUEUED, OUTSIDE = 0, -1, -2, -3


def thinned_segments(cell_mask):
    """The proposal's cells as Fiji segments them (trainableSegmentation's WatershedTransform2D of
    the border pixels, 4-connected): the 4-connected components of the cell pixels, grown through
    the border until the borders between them are lines (label 0). Border that separates nothing
    (a dangling fragment inside a cell) disappears into the cell; a slice without cells is one
    segment, as Fiji floods its border as a basin of its own.
    """
    cell_mask = np.asarray(cell_mask, dtype=bool)
    if cell_mask.ndim != 2:
        raise ValueError(f"a slice's cell mask must be 2-D, not {cell_mask.shape}")
    cells = connected_components(cell_mask, connectivity=1).astype(np.int32)
    if cells.max() <= 1:  # one segment (flooded grows cells; a slice without any is left to this)
        return np.ones_like(cells)
    return flooded(cells)


def compiled(function):
    """`function` compiled by numba, without the GIL; its machine code is kept beside this file (or
    in the user's cache) for later processes. Where the cache cannot be used (neither place can be
    written, a full disk, ...), each process compiles it again (a second) rather than fail a run."""
    uncached = numba.njit(nogil=True)(function)
    try:
        cached = numba.njit(nogil=True, cache=True)(function)
    except RuntimeError as error:
        if "no locator available" not in str(error):
            raise
        return uncached

    @functools.wraps(function)
    def run(*arguments):
        try:
            return cached(*arguments)
        except OSError:  # reading or writing the cache: `function` itself touches no file
            return uncached(*arguments)

    return run


@compiled
def flooded(cells):
    """The border (0) of `cells` (H, W; labels > 0) flooded as Fiji's watershed floods it, statement
    for statement: a queue of the border pixels next to a cell, column by column (left to right,
    each top to bottom), then of each pixel's unqueued neighbours (left, up, right, down) as it
    leaves the queue. A pixel takes the label of its first labelled neighbour, and becomes a line
    where a later one differs, or where it meets a line before any label (`after_line`: a later
    labelled neighbour then still gives it its label).

    Compiled by numba, as the queue is taken one pixel after the other, and without the GIL, so
    that the scoring's threads thin slices at once.
    """
    height, width = cells.shape
    stride = width + 2  # padded, so that no neighbour falls outside the array
    state = np.full((height + 2) * stride, OUTSIDE, np.int32)
    for y in range(height):
        for x in range(width):
            state[(y + 1) * stride + x + 1] = cells[y, x] if cells[y, x] > 0 else BORDER
    neighbours = (-1, -stride, 1, stride)
    queue = np.empty(state.size, np.int64)  # flat positions: slices of more than 2**31 pixels too
    queued = 0
    for x in range(1, width + 1):
        for y in range(1, height + 1):
            pixel = y * stride + x
            if state[pixel] == BORDER:
                for step in neighbours:
                    if state[pixel + step] >= LINE:
                        state[pixel] = QUEUED
                        queue[queued] = pixel
                        queued += 1
                        break
    after_line = False
    for taken in range(state.size):
        if taken == queued:
            break
        pixel = queue[taken]
        for step in neighbours:
            neighbour = state[pixel + step]
            if neighbour > 0:
                if state[pixel] == QUEUED or (state[pixel] == LINE and after_line):
                    state[pixel] = neighbour
                elif state[pixel] > 0 and state[pixel] != neighbour:
                    state[pixel] = LINE
                    after_line = False
            elif neighbour == LINE:
                if state[pixel] == QUEUED:
                    state[pixel] = LINE
                    after_line = True
            elif neighbour == BORDER:
                state[pixel + step] = QUEUED
                queue[queued] = pixel + step
                queued += 1
    segments = np.empty_like(cells)
    for y in range(height):
        for x in range(width):
            segments[y, x] = state[(y + 1) * stride + x + 1]
    return segments


# The overlaps of a slice's cells and segments are counted in a dense table, by np.bincount, where
# it has at most this many entries (about 130 cells by 550 segments on an ISBI slice), and at most
# DENSE_ENTRIES_PER_PIXEL a pixel: ten times faster than a sparse table, whose conversion sorts the
# pixels. Larger ones (many cells against many segments, or labels of large numbers) sort the
# pixels' pairs of labels, numbered by rank, so that memory stays proportional to the pixels.
DENSE_TABLE_ENTRIES = 1 << 22
DENSE_ENTRIES_PER_PIXEL = 16


def ranks(labels):
    """(the labels present, sorted, and 0; each pixel's label as its index among them)."""
    present, index = np.unique(np.concatenate([np.zeros(1, labels.dtype), labels.ravel()]), return_inverse=True)
    return present, index[1:]


def overlaps(true_cells, segments):
    """The nonzero entries of the contingency table of `true_cells` (label 0: outside every cell,
    left out) and `segments` (label 0: border): (cells, segments, pixels), one per overlapping pair."""
    true_cells, segments = np.asarray(true_cells), np.asarray(segments)
    if true_cells.shape != segments.shape or min(true_cells.min(), segments.min()) < 0:
        raise ValueError(f"labels must be non-negative and of one shape: {true_cells.shape}, {segments.shape}")
    rows, columns = int(true_cells.max()) + 1, int(segments.max()) + 1  # Python integers: no overflow
    if rows * columns <= min(DENSE_TABLE_ENTRIES, DENSE_ENTRIES_PER_PIXEL * true_cells.size):
        pixels = np.bincount((true_cells.astype(np.int64) * columns + segments).ravel())
        pairs = np.flatnonzero(pixels)
        cells, pieces = np.divmod(pairs, columns)
        pixels = pixels[pairs]
    else:
        (cell_labels, cell_ranks), (segment_labels, segment_ranks) = ranks(true_cells), ranks(segments)
        pairs, pixels = np.unique(cell_ranks * len(segment_labels) + segment_ranks, return_counts=True)
        cells, pieces = np.divmod(pairs, len(segment_labels))
        cells, pieces = cell_labels[cells], segment_labels[pieces]
    inside = cells > 0
    return cells[inside], pieces[inside], pixels[inside]


def sizes_by_label(labels, pixels):
    """(the pixels summed per label of `labels`, in label order; each entry's label's index in it)."""
    _, index = np.unique(labels, return_inverse=True)
    return np.bincount(index, weights=pixels), index


def rand_and_info_scores(true_cells, proposed_segments):
    """Foreground-restricted V_rand and V_info of one slice, with their split and merge parts, as
    Fiji's RandError and VariationOfInformation compute them (getForegroundRestrictedRandIndexStatsN2).

    Only pixels inside a true cell count (the true membrane is ignored), and each proposed border
    pixel (label 0) counts as a segment of its own. From the overlaps' pixel counts c_ij, the
    cells' t_i and the segments' s_j over the n true-cell pixels (a border pixel a segment of
    one pixel): V_rand = 2 sum c_ij^2 / (sum t_i^2 + sum s_j^2), and V_info = 2 I(S;T) / (H(S) +
    H(T)), the Shannon entropies of the distributions c/n, t/n and s/n, H = log n - sum c log c / n.
    (scikit-image's `adapted_rand_error` differs from Fiji: it counts pixel pairs, sum c^2 - n,
    treats the border as one segment, and calls Fiji's recall precision.) A split cell lowers the
    split parts (sum c^2 / sum t^2 and I / H(S)), a merger the merge parts.
    """
    cells, pieces, pixels = overlaps(true_cells, proposed_segments)
    if cells.size == 0:
        return dict.fromkeys(
            ("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge"), np.nan
        )
    border = pieces == 0
    true_sizes, _ = sizes_by_label(cells, pixels)
    proposed_sizes, _ = sizes_by_label(pieces[~border], pixels[~border])
    # A border pixel is a segment of one pixel: 1 to the sums of squares, 1 log 1 = 0 to the entropies'.
    border_pixels = np.sum(pixels[border])
    sum_joint2 = np.sum(pixels[~border].astype(np.float64) ** 2) + border_pixels
    sum_true2 = np.sum(true_sizes**2)
    sum_proposed2 = np.sum(proposed_sizes**2) + border_pixels

    n = np.sum(pixels)

    def entropy(sizes):
        sizes = sizes[sizes > 1]
        return np.log2(n) - np.sum(sizes * np.log2(sizes)) / n

    true_entropy, proposed_entropy = entropy(true_sizes), entropy(proposed_sizes)
    mutual_information = true_entropy + proposed_entropy - entropy(pixels[~border].astype(np.float64))

    def ratio(numerator, denominator):
        # 0 / 0 only when both sides are one segment each: the same partition.
        return 1.0 if denominator <= 1e-12 else float(np.clip(numerator / denominator, 0.0, 1.0))

    return {
        "v_rand": float(2 * sum_joint2 / (sum_true2 + sum_proposed2)),
        "v_rand_split": float(sum_joint2 / sum_true2),
        "v_rand_merge": float(sum_joint2 / sum_proposed2),
        "v_info": ratio(2 * mutual_information, true_entropy + proposed_entropy),
        "v_info_split": ratio(mutual_information, proposed_entropy),
        "v_info_merge": ratio(mutual_information, true_entropy),
    }


def pixel_f_score(true_cell, predicted_cell):
    """F-score of cell pixels (Fiji's PixelError counts, summed over the slices given)."""
    true_positives = np.count_nonzero(true_cell & predicted_cell)
    if true_positives == 0:
        return 0.0
    precision = true_positives / np.count_nonzero(predicted_cell)
    recall = true_positives / np.count_nonzero(true_cell)
    return 2 * precision * recall / (precision + recall)


# A piece of a true cell counts in a merge or split when it holds this share of the cell and at
# least this many pixels: slivers along a border cost V_rand almost nothing.
SIGNIFICANT_SHARE = 0.1
SIGNIFICANT_PIXELS = 50


def true_cells_of(label):
    """The true cells of a binary mask (cell > 0) as the scores count them: 4-connected components."""
    return connected_components(np.asarray(label) > 0, connectivity=1)


def merges_and_splits(true_cells, segments):
    """(merging segment labels, split cell labels) of a proposal: a merge is a proposed segment
    holding a significant piece of two or more true cells (a missing stretch of membrane), a
    split a true cell with significant pieces in two or more segments (a false membrane). These
    are the errors that cost V_rand's merge and split parts; `segments` as from
    `thinned_segments` (label 0 = border), `true_cells` as from `true_cells_of`."""
    cells, pieces, pixels = overlaps(true_cells, segments)
    cell_sizes, cell_index = sizes_by_label(cells, pixels)
    piece = (pieces > 0) & (pixels >= np.maximum(SIGNIFICANT_SHARE * cell_sizes[cell_index], SIGNIFICANT_PIXELS))
    cells, pieces_segments = cells[piece], pieces[piece]
    merging_segments, counts = np.unique(pieces_segments, return_counts=True)
    split_cells, cell_counts = np.unique(cells, return_counts=True)
    return merging_segments[counts > 1], split_cells[cell_counts > 1]


def best_of(values):
    """The index of the best (highest) of `values`, the first on ties; NaN is never best unless all are."""
    return int(np.argmax(np.nan_to_num(values, nan=-np.inf)))


def isbi_scores_by_threshold(labels, probabilities, thresholds=ISBI_THRESHOLDS, kept=()):
    """Per threshold: V_rand and V_info averaged over the slices, and the pixel F-score.

    `labels` are (slices, H, W) binary masks (cell > 0), `probabilities` the cell probabilities of
    the same slices; a pixel is proposed as cell where its probability exceeds the threshold.
    With `kept` (positions of slices), also "segments": the thinned_segments of those slices at the
    threshold of the best V_rand, which the images of merges and splits show (each is a watershed
    that would cost as much again).
    """
    labels = np.asarray(labels)
    # Compared in double precision as in Fiji: float32(0.1) > 0.1, so a float32 comparison moves pixels.
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.shape != probabilities.shape or labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} and probabilities {probabilities.shape} must both be (slices, H, W)")
    true_cell = labels > 0
    true_cells = [true_cells_of(mask) for mask in true_cell]

    kept = list(kept)

    def slice_scores(threshold, index):
        segments = thinned_segments(probabilities[index] > threshold)
        return rand_and_info_scores(true_cells[index], segments), (segments if index in kept else None)

    # The thinning's flood and the tables' bincounts release the GIL: on two cores two threads take
    # 0.56 of one thread's time.
    # The pool is handed at most two tasks per thread ahead of the results summed up, so that the
    # kept segments waiting in its results stay fewer than the thinnings' own arrays.
    workers = os.cpu_count() or 1
    tasks, running = itertools.product(thresholds, range(len(labels))), collections.deque()
    table = {"threshold": np.asarray(thresholds), "v_rand": [], "v_info": [], "pixel_f_score": []}
    best_segments = None
    with ThreadPoolExecutor(workers) as pool:

        def next_result():
            running.extend(
                pool.submit(slice_scores, *task) for task in itertools.islice(tasks, 2 * workers - len(running))
            )
            return running.popleft().result()

        for threshold in thresholds:
            slices = [next_result() for _ in range(len(labels))]
            table["v_rand"].append(np.mean([scores["v_rand"] for scores, _ in slices]))
            table["v_info"].append(np.mean([scores["v_info"] for scores, _ in slices]))
            table["pixel_f_score"].append(pixel_f_score(true_cell, probabilities > threshold))
            if best_of(table["v_rand"]) == len(table["v_rand"]) - 1:  # the best so far: its segments
                best_segments = [slices[index][1] for index in kept]
    table = {name: np.asarray(values) for name, values in table.items()}
    return {**table, "segments": best_segments} if kept else table


def isbi_scores(labels, probabilities, thresholds=ISBI_THRESHOLDS, kept=()):
    """The challenge's scores of a stack: best V_rand, best V_info and lowest pixel error
    (1 - best pixel F-score), each with the threshold that gives it (the first, on ties); with
    `kept`, the "segments" of isbi_scores_by_threshold too, at `v_rand_threshold`.
    """
    table = isbi_scores_by_threshold(labels, probabilities, thresholds, kept)

    def best(values):
        index = best_of(values)
        return float(values[index]), float(table["threshold"][index])

    (v_rand, v_rand_threshold), (v_info, v_info_threshold) = best(table["v_rand"]), best(table["v_info"])
    pixel_f, pixel_threshold = best(table["pixel_f_score"])
    return {
        "v_rand": v_rand,
        "v_rand_threshold": v_rand_threshold,
        "v_info": v_info,
        "v_info_threshold": v_info_threshold,
        "pixel_error": 1.0 - pixel_f,
        "pixel_error_threshold": pixel_threshold,
        **({"segments": table["segments"]} if kept else {}),
    }


def validation_scores(labels, probabilities, weights, loss, metrics, isbi, kept=()):
    """{"loss": ..., each metric's name: ..., and with `isbi` the ISBI scores (isbi_scores, with the
    "segments" of the slices at positions `kept`)} of the net's `probabilities` (slices, H, W) of
    the validation slices with `labels` (slices, H, W, 1) and per-pixel loss `weights` (slices, H,
    W), for `loss` (a LOSSES function) and the Keras `metrics` (training_metrics()).

    Slice by slice, as Keras' evaluate with batches of one would, each pixel's loss weighted as in
    training (Keras' mean over the pixels of weight x loss).
    """
    losses = []
    for metric in metrics:
        metric.reset_state()
    for label, probability, slice_weights in zip(labels, probabilities[..., np.newaxis], weights, strict=True):
        losses.append(float(np.mean(slice_weights * loss(label[np.newaxis], probability[np.newaxis])[0])))
        for metric in metrics:
            metric.update_state(label[np.newaxis], probability[np.newaxis])
    scores = {"loss": float(np.mean(losses)), **{metric.name: float(metric.result()) for metric in metrics}}
    if isbi:
        scores.update(isbi_scores(labels[..., 0], probabilities, kept=kept))
    return scores
