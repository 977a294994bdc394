"""What a run shows in TensorBoard, apart from Keras: the tag names, the overlays that show where
the net is wrong, and how each summary is made and written (scalars, images, histograms, the PR
curve, the graph, the HParams and Text tabs, the comparison dashboard) at the default writer and
step that the caller sets. The callbacks (callbacks.py) capture what these need on the training
thread; the run's watcher calls these with it.

Tags are named so that TensorBoard's Time Series tab, which groups tags by their first `/` part
and sorts the groups by name, opens on the best-so-far scalars, then the epoch curves
(`epoch_*`, `evaluation_*`, Keras' names), the shown slices' scalars and images (`shown_slices/`,
`slice_NN/`), the per-batch curves (`train_batch/`) and last the histograms (`unet/`).
"""

import dataclasses
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import config_pb2, event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.graph import metadata as graph_metadata
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.pr_curve import summary as pr_curve_summary
from tensorboard.util import tensor_util

from metrics import THRESHOLD, merges_and_splits, misclassified_pixel_fraction, thinned_segments, true_cells_of
from rundir import TRAIN, VALIDATION
from settings import BEST_SCORES, COMPARED
from watcher import DEVICE as WATCHER_DEVICE

EPOCH_TAG = "epoch_{}"  # Keras' name: a value of the epoch, at the epoch index
EVALUATION_TAG = "evaluation_{}_vs_iterations"  # Keras' name: a validation value at the global step
BEST_TAG = "best_{}"  # the best validation value so far of a score in settings.BEST_SCORES
GRAPH_TAG = "unet"
DOCUMENT_TAG = "run/{}"  # a markdown document of the Text tab: what the run was
PR_CURVE_TAG = "membrane_pr"
SLICE_GROUP = "slice_{:02d}"  # the images of one shown validation slice, by its index in the stack

# A record of an event file: its length (8 bytes) and that length's checksum (4), the serialized
# event, the event's checksum (4).
RECORD_FRAMING = 16

BATCH_GROUP = "train_batch"  # the loss and metrics of single training batches
SHOWN_GROUP = "shown_slices"  # scalars over the slices shown as images
WEIGHTS_GROUP = "unet/weights"
ACTIVATIONS_GROUP = "unet/activations"

FALSE_MEMBRANE_RGB = (1.0, 0.0, 1.0)  # magenta: membrane predicted where the label says cell
MISSED_MEMBRANE_RGB = (0.0, 1.0, 0.0)  # green: label says membrane, prediction says cell
MERGE_RGB = (1.0, 0.5, 0.0)  # orange: one segment over two or more true cells
SPLIT_RGB = (0.0, 0.45, 1.0)  # blue: one true cell cut into two or more segments
ERROR_OPACITY = 0.75
TOPOLOGY_OPACITY = 0.6
# EM texture barely compresses: 16 grey levels under the colours keep the structure recognisable
# and make the PNG about 40 % smaller than full 8-bit grey.
OVERLAY_GREY_LEVELS = 16
PR_THRESHOLDS = 51
# zlib's level 3 encodes the shown slices' PNGs in 40 % of the time of tf.summary.image's default
# (level 6), into as many bytes in all: the watcher's CPU time beside training is time training
# loses (docs/performance.md).
PNG_COMPRESSION = 3
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
    for wrong, colour in (
        (np.isin(segments, merging_segments), MERGE_RGB),
        (np.isin(true_cells, split_cells), SPLIT_RGB),
    ):
        overlay[wrong] = (1 - TOPOLOGY_OPACITY) * overlay[wrong] + TOPOLOGY_OPACITY * np.asarray(colour)
    return overlay


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


def write_weight_histograms(weights):
    """`unet/weights/<path>` histograms of `weights` ({weight path: values}) at the default step."""
    for path, values in weights.items():
        write_histogram(f"{WEIGHTS_GROUP}/{path.replace(':', '_')}", values)


def encoded_image(image):
    """`image` (H, W, channels) in [0, 1] as the tensor of tf.summary.image's record: width, height
    and the PNG of the same pixels (TensorFlow's conversion to 8 bits), compressed at
    PNG_COMPRESSION, which tf.summary.image does not take."""
    pixels = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    height, width = pixels.shape[:2]
    return tf.stack([str(width), str(height), tf.image.encode_png(pixels, compression=PNG_COMPRESSION)])


def write_image(tag, encoded, description=None):
    """An image (its `encoded_image`) as an image summary at the default step: the record
    tf.summary.image writes outside a name scope (as the watcher writes)."""
    metadata = image_metadata.create_summary_metadata(display_name=None, description=description)
    tf.summary.write(tag, encoded, step=tf.summary.experimental.get_step(), metadata=metadata)


def histogram_buckets(values):
    """TensorBoard's buckets of `values`: the (left edge, right edge, count) rows that
    `histogram_pb` makes (the 30 of `tf.summary.histogram`), counted by np.bincount where
    histogram_pb compares every value with every bucket, thirty booleans a value: the weights'
    histograms took 0.075 s of the watcher's CPU an epoch, and that CPU time beside training is time
    training loses (docs/performance.md). A test holds the two to the same bytes."""
    values = np.asarray(values, dtype=np.float64).ravel()
    count = histogram_summary.DEFAULT_BUCKET_COUNT
    if values.size == 0:
        return np.zeros((count, 3))
    low, high = np.min(values), np.max(values)
    # As histogram_pb buckets. The values of a run stopped by a NaN loss are NaN (or infinite): every
    # index is then the integer a NaN converts to, counted only where that is not negative, and the
    # edges NaN, without a warning.
    with np.errstate(invalid="ignore"):
        if high - low == 0:
            return np.array([[low] * count, [low] * count, [0] * (count - 1) + [values.size]]).transpose()
        indices = np.minimum(np.floor((values - low) / ((high - low) / count)).astype(int), count - 1)
        edges = np.linspace(low, high, count + 1)
    return np.array([edges[:-1], edges[1:], np.bincount(indices[indices >= 0], minlength=count)]).transpose()


def write_histogram(tag, values):
    """A histogram of `values` at the default step: the record TensorBoard's histogram_pb makes (the
    histograms dashboard's), with its buckets from `histogram_buckets`."""
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=tag,
        metadata=histogram_metadata.create_summary_metadata(display_name=None, description=None),
        tensor=tensor_util.make_tensor_proto(histogram_buckets(values), dtype=np.float64),
    )
    tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=tf.summary.experimental.get_step())


@dataclasses.dataclass(frozen=True)
class ShownSlices:
    """The validation slices shown as images: their `indices` in the stack, `images` and `labels`
    (slices, H, W, 1) float32, the `true_cells` of each label (metrics.true_cells_of) and the loss
    `weights` (slices, H, W), None for an unweighted loss."""

    indices: list
    images: np.ndarray
    labels: np.ndarray
    true_cells: list
    weights: np.ndarray | None

    @classmethod
    def of(cls, indices, images, labels, weights=None):
        """From (slices, H, W) `images` in [0, 1] and {0, 1} `labels`."""
        return cls(
            list(indices),
            images[..., np.newaxis],
            labels[..., np.newaxis].astype(np.float32),
            [true_cells_of(label) for label in labels],
            weights,
        )


def write_shown_slices(shown, probabilities, v_rand_threshold, shown_segments=None):
    """The images and scalars of the shown validation slices (ShownSlices) for the net's
    `probabilities` of them (slices, H, W), at the default step, segmented at `v_rand_threshold`
    (their thinned_segments there, or `shown_segments`, one per slice, where the scoring made them):
    `input`, `label` (and `loss_weights`) once at step 0, then `prediction`, `error` and
    `merges_and_splits` per slice, and the misclassified fraction, merges and splits over them.

    The slices' images are made on a thread each (the overlays' numpy and the PNG encoding release
    the GIL) and written in order: the watcher beside training slows every step that starts while
    it has work, so its work costs training less the sooner it is done (docs/performance.md)."""
    if shown_segments is not None and len(shown_segments) != len(shown.indices):
        raise ValueError(f"{len(shown_segments)} segmentations for {len(shown.indices)} shown slices")
    step = tf.summary.experimental.get_step()
    probabilities = probabilities[..., np.newaxis]
    tf.summary.scalar(
        f"{SHOWN_GROUP}/misclassified_pixel_fraction",
        np.mean(misclassified_pixel_fraction(shown.labels, probabilities)),
        description="Misclassified-pixel fraction on the slices shown as images.",
    )

    def slice_images(position):
        """(merging segments, split cells, [(tag, encoded_image, description)]) of one shown slice."""
        group, images = SLICE_GROUP.format(shown.indices[position]), []
        if step == 0:
            images += [
                (f"{group}/input", shown.images[position], None),
                (f"{group}/label", shown.labels[position], None),
            ]
            if shown.weights is not None:
                weights = shown.weights[position]
                images.append(
                    (
                        f"{group}/loss_weights",
                        (weights / weights.max())[..., np.newaxis],
                        f"The loss weight of each pixel (the U-Net paper's weight map), black 0 to white "
                        f"{weights.max():.1f}: the class balance plus a border term on membrane between close cells.",
                    )
                )
        probability = probabilities[position, ..., 0]
        images.append((f"{group}/prediction", probabilities[position], "Probability of cell: black 0, white 1."))
        images.append(
            (
                f"{group}/error",
                error_overlay(shown.images[position, ..., 0], shown.labels[position, ..., 0], probability),
                "Errors on the EM slice: magenta = false membrane, green = missed membrane.",
            )
        )
        # In double precision, as the challenge's scorer compares (metrics.isbi_scores_by_threshold).
        segments = (
            thinned_segments(probability.astype(np.float64) > v_rand_threshold)
            if shown_segments is None
            else shown_segments[position]
        )
        merging_segments, split_cells = merges_and_splits(shown.true_cells[position], segments)
        images.append(
            (
                f"{group}/merges_and_splits",
                topology_overlay(segments, shown.true_cells[position], merging_segments, split_cells),
                "The cells the ISBI scorer sees in the prediction (grey, black 1-pixel borders) at the best "
                "V_rand threshold of the latest evaluation: orange = a segment that merges true cells "
                "(missing membrane), blue = a true cell split into segments (false membrane). Both cost V_rand.",
            )
        )
        with tf.device(WATCHER_DEVICE):
            encoded = [(tag, encoded_image(image), description) for tag, image, description in images]
        return merging_segments, split_cells, encoded

    with ThreadPoolExecutor(max(1, min(len(shown.indices), os.cpu_count() or 1))) as pool:
        made = list(pool.map(slice_images, range(len(shown.indices))))
    for _, _, encoded in made:
        for tag, image, description in encoded:
            write_image(tag, image, description)
    tf.summary.scalar(
        f"{SHOWN_GROUP}/merges",
        sum(len(merging_segments) for merging_segments, _, _ in made),
        description="Segments that merge two or more true cells, over the shown slices.",
    )
    tf.summary.scalar(
        f"{SHOWN_GROUP}/splits",
        sum(len(split_cells) for _, split_cells, _ in made),
        description="True cells split into two or more segments, over the shown slices.",
    )


def write_activations_and_pr_curve(activations, labels, probabilities):
    """Histograms of `activations` ({block name: sampled values}) and the precision-recall curve of
    membrane detection of `probabilities` (slices, H, W) against `labels` (slices, H, W, 1)."""
    for name, values in activations.items():
        write_histogram(f"{ACTIVATIONS_GROUP}/{name}", values)
    membrane = labels[..., 0] < THRESHOLD
    curve = pr_curve_summary.pb(
        PR_CURVE_TAG,
        labels=membrane,
        predictions=1.0 - probabilities,
        num_thresholds=PR_THRESHOLDS,
        description="Precision and recall of membrane at thresholds of 1 - p(cell).",
    )
    tf.summary.experimental.write_raw_pb(curve.SerializeToString(), step=tf.summary.experimental.get_step())


def write_graph(graph_def):
    """`graph_def` as `tf.summary.trace_export` writes a graph (a RunMetadata of function graphs
    under GRAPH_TAG), at step 0."""
    run_metadata = config_pb2.RunMetadata()
    run_metadata.function_graphs.add().pre_optimization_graph.ParseFromString(graph_def.SerializeToString())
    summary = summary_pb2.Summary(
        value=[
            summary_pb2.Summary.Value(
                tag=GRAPH_TAG,
                tensor=tensor_util.make_tensor_proto([run_metadata.SerializeToString()]),
                metadata=summary_pb2.SummaryMetadata(
                    # content "1": the version of TensorFlow's own graph summary, which the Graphs tab insists on.
                    plugin_data=summary_pb2.SummaryMetadata.PluginData(
                        plugin_name=graph_metadata.PLUGIN_NAME_RUN_METADATA_WITH_GRAPH, content=b"1"
                    ),
                    data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
                ),
            )
        ]
    )
    tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)


# The metrics the HParams tab shows for every run: (run, tag, display name).
HPARAMS_METRICS = [
    *(("", BEST_TAG.format(name), description) for name, (_, description) in BEST_SCORES.items()),
    (VALIDATION, EPOCH_TAG.format("v_rand"), "last validation V_rand"),
    (VALIDATION, EPOCH_TAG.format("v_info"), "last validation V_info"),
    (VALIDATION, EPOCH_TAG.format("pixel_error"), "last validation pixel error"),
    (VALIDATION, EPOCH_TAG.format("misclassified_pixel_fraction"), "last validation misclassified-pixel fraction"),
    (VALIDATION, EPOCH_TAG.format("loss"), "last validation loss"),
    (VALIDATION, EPOCH_TAG.format("membrane_dice"), "last validation membrane Dice"),
    (TRAIN, EPOCH_TAG.format("loss"), "last training loss"),
]


def read_records(path):
    """(the serialized events of the event file at `path`, in order; the offset where a whole
    record fails its checksum, or None). TensorBoard's reader stops at the first bad record
    without a word; a record a kill cut short at the end is no damage and is left out."""
    records = list(RawEventFileLoader(str(path)).Load())
    offset, size = sum(len(record) + RECORD_FRAMING for record in records), Path(path).stat().st_size
    with open(path, "rb") as file:
        file.seek(offset)
        header = file.read(12)
    if len(header) < 12:
        return records, None
    (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
    cut_short = crc == masked_crc32c(header[:8]) and offset + length + RECORD_FRAMING > size
    return records, None if cut_short else offset


def damaged_event_file(path, offset):
    """The line for an event file whose record at `offset` fails its checksum (read_records)."""
    size = Path(path).stat().st_size
    return (
        f"{path} is damaged at byte {offset} of {size} (a record fails its checksum): restore it from a "
        f"copy, or give up what follows by cutting it there (truncate -s {offset} {path})"
    )


def write_run(trial_id, hyperparameters, documents):
    """What the run was, at step 0: the `hyperparameters` for the HParams tab (with the metrics it
    shows for every run), the markdown `documents` ({tag: text}) for the Text tab and the Custom
    Scalars layout (comparison_layout)."""
    config = hp.hparams_config_pb(
        hparams=[hp.HParam(name) for name in hyperparameters],
        metrics=[hp.Metric(tag, group=group or None, display_name=name) for group, tag, name in HPARAMS_METRICS],
    )
    # TensorBoard lists the hyperparameters marked as differing between runs first, the others by
    # name, and ticks the first five: marked so, the compared settings open first and ticked (by
    # name alone the constant augment_* ranges did).
    (value,) = config.value
    plugin_data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in plugin_data.experiment.hparam_infos:
        info.differs = info.name in COMPARED
    value.metadata.plugin_data.content = plugin_data.SerializeToString()
    tf.summary.experimental.write_raw_pb(config.SerializeToString(), step=0)
    hp.hparams(hyperparameters, trial_id=trial_id)
    write_documents(documents)
    layout = custom_scalar_summary.pb(comparison_layout())
    tf.summary.experimental.write_raw_pb(layout.SerializeToString(), step=0)


def write_documents(documents):
    """The markdown `documents` ({tag: text}) for the Text tab."""
    for name, markdown in documents.items():
        tf.summary.text(name, markdown)


def with_hyperparameters(record, hyperparameters):
    """`record` (a serialized Event), its HParams record of the run's hyperparameters (written by
    write_run) holding `hyperparameters` instead, with its trial and start time; any other record
    unchanged. TensorBoard reads only the first such record of a run: a resumed run's new --epochs
    would not show written again."""
    if hparams_metadata.SESSION_START_INFO_TAG.encode() not in record:  # not parsed a second time
        return record
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
        if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
            start = hparams_metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
            (updated,) = hp.hparams_pb(hyperparameters, start.group_name, start.start_time_secs).value
            value.CopyFrom(updated)
            return event.SerializeToString()
    return record


def comparison_layout():
    """The Custom Scalars tab's dashboard: one chart per question, every run on it, all against the
    global training step. TensorBoard merges the layouts that the runs of a logdir carry."""

    def chart(title, *tags):
        return layout_pb2.Chart(
            title=title, multiline=layout_pb2.MultilineChartContent(tag=[f"^{tag}$" for tag in tags])
        )

    evaluation = EVALUATION_TAG.format
    return layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title="Which run learns better (validation slices, against the training step)",
                chart=[
                    chart("misclassified-pixel fraction (lower is better)", evaluation("misclassified_pixel_fraction")),
                    chart("V_rand, the ISBI challenge's main score (higher is better)", evaluation("v_rand")),
                    chart("V_info (higher is better)", evaluation("v_info")),
                    chart("pixel error, 1 - best F-score of cells (lower is better)", evaluation("pixel_error")),
                    chart("loss: training batches and validation", f"{BATCH_GROUP}/loss", evaluation("loss")),
                    chart("learning rate", f"{BATCH_GROUP}/learning_rate"),
                ],
            ),
            layout_pb2.Category(
                title="Where the net is wrong (slices shown as images)",
                chart=[
                    # Apart: on one chart a run's merges and splits are lines of one colour.
                    chart("merges: segments that join true cells (missing membrane)", f"{SHOWN_GROUP}/merges"),
                    chart("splits: true cells cut in two or more (false membrane)", f"{SHOWN_GROUP}/splits"),
                    chart("misclassified-pixel fraction", f"{SHOWN_GROUP}/misclassified_pixel_fraction"),
                ],
            ),
            layout_pb2.Category(
                title="Training batches, each alone",
                closed=True,
                chart=[
                    chart("misclassified-pixel fraction", f"{BATCH_GROUP}/misclassified_pixel_fraction"),
                    chart("membrane Dice", f"{BATCH_GROUP}/membrane_dice"),
                    chart("accuracy", f"{BATCH_GROUP}/accuracy"),
                ],
            ),
        ]
    )
