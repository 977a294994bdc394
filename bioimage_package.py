"""A bioimage.io model package as a net that predict.py tiles: read and validated with
bioimageio.spec, checked to fit predict.py's tiling (one grey 2D input; one cell probability map
of its size out; a size rule, batch and halo that the tiles keep), and run through
bioimageio.core with the package's own preprocessing and weights. A package of export.py fits;
one from elsewhere that does not is refused in one line saying what predict.py needs.

The preprocessing runs on whole slices before tiling, its dataset statistics (if it has any)
computed once over the stack: computed on each tile, a tile's mirrored context would change them,
and a slice's probabilities would depend on the slices predicted before it.
"""

import zipfile

import numpy as np

import cli
import tiling
from settings import MULTIPLE

# Tried in this order, the first that loads is used: ONNX first, the weights that ilastik and Fiji
# run, so that predict.py shows what they show.
WEIGHTS_ORDER = ("onnx", "keras_v3", "tensorflow_saved_model_bundle", "torchscript", "pytorch_state_dict")
NEEDS = "predict.py needs one grey 2D input (axes batch, y, x, and at most one channel) and one output of its size"
# Names of an output that is not the probability of cell (predict.py's TIFF and scores are cells high).
NOT_CELLS = ("membrane", "boundar", "border", "edge", "background")
DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml")  # bioimage.io's, also as <name>.bioimageio.yaml


class PackageError(cli.InputError):
    """A package that predict.py cannot run; one line naming the problem and the fix."""


def is_package(path):
    """Whether `path` is a zip holding a bioimage.io description (a .keras file is a zip too)."""
    try:
        if not (path.is_file() and zipfile.is_zipfile(path)):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):  # a damaged zip: the Keras loader says what it is
        return False
    return any(name == known or name.endswith(f".{known}") for name in names for known in DESCRIPTION_NAMES)


def read(path, tile):
    """The package's model description, validated (its files' SHA-256 included) and checked to fit
    predict.py's tiling with `tile`."""
    from bioimageio.spec import InvalidDescr, load_description

    try:
        description = load_description(path, format_version="latest")
    except Exception as error:  # YAML, zip and validation errors alike
        raise PackageError(
            f"{path} is no readable bioimage.io package ({described(error)}): give a model package, a zip with "
            "an rdf.yaml"
        ) from None
    if isinstance(description, InvalidDescr):
        errors = [error for detail in description.validation_summary.details for error in detail.errors]
        where = ".".join(str(part) for part in errors[0].loc) if errors else ""
        reason = ": ".join(part for part in (where, errors[0].msg if errors else "invalid") if part)
        raise PackageError(
            f"{path} is no valid bioimage.io package ({one_line(reason)}): give a package that bioimageio validates"
        )
    if description.type != "model":
        raise PackageError(f"{path} describes a {description.type}, not a model: give a model package")
    if why := misfit(description, tile):
        raise PackageError(f"{path} does not fit predict.py: {why}")
    return description


def one_line(text):
    return " ".join(str(text).split())[:300]


def described(error):
    """An error in one line; for a group, its first error."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return one_line(f"{type(error).__name__}: {error}")


def misfit(description, tile):
    """Why the model does not fit predict.py's tiling with `tile`, or None."""
    if len(description.inputs) != 1 or len(description.outputs) != 1:
        return f"it has {len(description.inputs)} inputs and {len(description.outputs)} outputs; {NEEDS}"
    (image,), (output,) = description.inputs, description.outputs
    for tensor in (image, output):
        kinds = [axis.type for axis in tensor.axes]
        spatial = sorted(str(axis.id) for axis in tensor.axes if axis.type == "space")
        others = sorted(kind for kind in kinds if kind != "space")
        if spatial != ["x", "y"] or others not in (["batch"], ["batch", "channel"]):
            return f"{tensor.id} has axes {', '.join(str(axis.id) for axis in tensor.axes)}; {NEEDS}"
        if (channels := [axis.size for axis in tensor.axes if axis.type == "channel"]) and channels[0] != 1:
            return f"{tensor.id} has {channels[0]} channels; {NEEDS}"
    names = output_names(output)
    if any(word in name.lower() for name in names for word in NOT_CELLS):
        return (
            f"its output ({', '.join(names)}) is not the probability of cell: predict.py writes and scores the "
            "probability of cell, cells high"
        )
    value_range = getattr(output.data, "range", None) or (None, None)
    if None in value_range or value_range[0] < 0 or value_range[1] > 1:
        return (
            f"its output's values are not declared within [0, 1] (range {value_range}): predict.py writes and "
            "scores probabilities"
        )
    sides = {str(axis.id): axis for axis in image.axes if axis.type == "space"}
    for axis in sides.values():
        size = axis.size
        if (
            not hasattr(size, "step")
            or MULTIPLE % size.step
            or size.min % size.step
            or size.min > tiling.SMALLEST_INPUT
        ):
            return (
                f"its input's {axis.id} size rule is {size}; predict.py gives sides that are multiples of "
                f"{MULTIPLE}, from {tiling.SMALLEST_INPUT} pixels"
            )
    halo = 0
    for axis in output.axes:
        if axis.type == "space":
            reference = axis.size
            if getattr(reference, "tensor_id", None) != image.id or str(reference.axis_id) != str(axis.id):
                return f"its output's {axis.id} size is {reference}, not its input's; {NEEDS}"
            if reference.offset or axis.scale != sides[str(axis.id)].scale:
                return f"its output's {axis.id} is offset or scaled against its input's; {NEEDS}"
            halo = max(halo, getattr(axis, "halo", 0))
    smallest = max(axis.size.min for axis in sides.values())
    if tile < smallest:
        return f"its input's sides are {smallest} pixels or more: use --tile {smallest} or more"
    if halo > tiling.CONTEXT:
        return f"its output's halo is {halo} pixels; predict.py gives a slice {tiling.CONTEXT} pixels of context"
    if tiling.margin(tile) < halo:
        enough = tiling.round_up(8 * halo, MULTIPLE)
        return (
            f"--tile {tile} keeps {tiling.margin(tile)} pixels of a tile's border, less than its halo of {halo}: "
            f"use --tile {enough} or more"
        )
    return None


def output_names(output):
    """The output tensor's id and its channel's name, as the package names them."""
    return [
        str(output.id),
        *(str(name) for axis in output.axes if axis.type == "channel" for name in axis.channel_names),
    ]


def preprocessing(description):
    """The package's preprocessing steps in words, e.g. "scale_linear, clip"."""
    steps = [step.id for step in description.inputs[0].preprocessing if step.id != "ensure_dtype"]
    return ", ".join(steps) or "none"


def loaded_weights(description):
    """(format, bioimageio.core's model adapter) of the first weights in WEIGHTS_ORDER that load."""
    from bioimageio.core.backends import create_model_adapter

    present = [name for name in WEIGHTS_ORDER if getattr(description.weights, name, None) is not None]
    failures = []
    for weights in present:
        try:
            return weights, create_model_adapter(description, weight_format_priority_order=(weights,))
        except Exception as error:  # each backend raises its own types for weights it cannot load
            failures.append(f"{weights}: {described(error)}")
    held = ", ".join(name for name, entry in description.weights if entry is not None)
    raise PackageError(
        f"none of the package's weights ({held}) runs here ({'; '.join(failures) or 'none that predict.py runs'}): "
        "install what they need, or give a package with other weights"
    )


class PackagedNet:
    """The package's weights, called as tiling calls a Keras model: (N, H, W, 1) preprocessed
    values in, (N, H, W, 1) float32 cell probability out; `preprocessed` prepares whole slices.
    Padding and cropping stay tiling's."""

    def __init__(self, description, images):
        from bioimageio.core import create_prediction_pipeline

        (image,), (output,) = description.inputs, description.outputs
        self.input_id, self.output_id = image.id, output.id
        self.input_dims, self.output_dims = dims(image), dims(output)
        self.batch_size = next(axis.size for axis in image.axes if axis.type == "batch")  # None: any
        self.weights, adapter = loaded_weights(description)
        names = output_names(output)
        self.output_names = names[0] + (f" ({', '.join(names[1:])})" if names[1:] else "")
        self.pipeline = create_prediction_pipeline(
            description,
            model_adapter=adapter,
            dataset_for_initial_statistics=(self.sample(slice_[np.newaxis, ..., np.newaxis]) for slice_ in images),
        )

    def sample(self, batch):
        from bioimageio.core import Sample, Tensor

        batch = np.asarray(batch, np.float32)
        if len(self.input_dims) == 3:  # no channel axis
            batch = batch[..., 0]
        return Sample(members={self.input_id: Tensor.from_numpy(batch, dims=self.input_dims)}, stat={}, id=None)

    def preprocessed(self, images):
        """(pages, H, W) stored grey values -> float32 as the package's preprocessing makes them, each
        slice a sample of its own (per-sample statistics are a slice's, not a tile's)."""
        prepared = np.empty(images.shape, np.float32)
        for index, image in enumerate(images):
            sample = self.sample(image[np.newaxis, ..., np.newaxis])
            self.pipeline.apply_preprocessing(sample)
            values = sample.members[self.input_id].transpose(self.input_dims).data.values
            prepared[index] = values.reshape(images.shape[1:])
        return prepared

    def predict_on_batch(self, tiles):
        groups = [tiles] if self.batch_size is None else [tiles[i : i + 1] for i in range(len(tiles))]
        return np.concatenate([self.predicted(group) for group in groups])

    def predicted(self, tiles):
        try:
            output = self.pipeline.predict_sample_without_blocking(
                self.sample(tiles), skip_preprocessing=True, skip_input_padding=True, skip_output_cropping=True
            ).members[self.output_id]
        except Exception as error:  # the backend's own errors, e.g. a shape its graph does not take
            raise PackageError(
                f"the package's {self.weights} weights failed on {len(tiles)} tiles of "
                f"{tiles.shape[1]}x{tiles.shape[2]} ({described(error)}): the package does not run as its "
                "description says"
            ) from None
        probabilities = output.transpose(self.output_dims).data.values.astype(np.float32)
        return probabilities if len(self.output_dims) == 4 else probabilities[..., np.newaxis]


def dims(tensor):
    """A tensor's axis ids in predict.py's order: batch, y, x, then its channel axis if it has one."""
    place = {"batch": 0, "channel": 3}
    return [
        str(axis.id)
        for axis in sorted(tensor.axes, key=lambda axis: place.get(axis.type, {"y": 1, "x": 2}.get(str(axis.id))))
    ]
