"""A bioimage.io model package as a net that predict.py tiles: read with bioimageio.spec, checked to
fit predict.py's tiling (one grey 2D input, one probability map of the same size out, a size rule
and halo that the tiles keep), and run with the package's own preprocessing and weights through
bioimageio.core. A package of export.py fits; one from elsewhere that does not is refused in one
line saying what predict.py needs.
"""

import zipfile

import numpy as np

import cli
import tiling
from settings import MULTIPLE

# ONNX first: the weights that ilastik and Fiji run, so that predict.py shows what they show.
WEIGHTS_ORDER = ("onnx", "keras_v3", "tensorflow_saved_model_bundle", "torchscript", "pytorch_state_dict")
NEEDS = "predict.py needs one grey 2D input (axes batch, y, x, and at most one channel) and one output of its size"
# The smallest input predict.py gives the net: a small slice with its mirrored context, sides
# rounded up to a multiple of 16.
SMALLEST_INPUT = 2 * tiling.CONTEXT + MULTIPLE


class PackageError(cli.InputError):
    """A package that predict.py cannot run; one line naming the problem and the fix."""


def is_package(path):
    """Whether `path` is a bioimage.io package: a zip holding an rdf.yaml (a .keras file is a zip too)."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name in ("rdf.yaml", "bioimageio.yaml") for name in archive.namelist())


def read(path, tile):
    """The package's model description, checked (its files' SHA-256 included) to fit predict.py's
    tiling with `tile`."""
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
        reason = f"{where}: {errors[0].msg}" if errors else "invalid"
        raise PackageError(
            f"{path} is no valid bioimage.io package ({one_line(reason)}): give a package that bioimageio validates"
        )
    if description.type != "model":
        raise PackageError(f"{path} describes a {description.type}, not a model: give a model package")
    if why := misfit(description, tile):
        raise PackageError(f"{path} does not fit predict.py: {why}")
    weights_format(description)
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
        if spatial != ["x", "y"] or sorted(kind for kind in kinds if kind != "space") not in (
            ["batch"],
            ["batch", "channel"],
        ):
            return f"{tensor.id} has axes {', '.join(str(axis.id) for axis in tensor.axes)}; {NEEDS}"
        if (channels := [axis.size for axis in tensor.axes if axis.type == "channel"]) and channels[0] != 1:
            return f"{tensor.id} has {channels[0]} channels; {NEEDS}"
    sides = {str(axis.id): axis for axis in image.axes if str(axis.id) in ("y", "x")}
    for axis in sides.values():
        size = axis.size
        if not hasattr(size, "step") or MULTIPLE % size.step or size.min % size.step or size.min > SMALLEST_INPUT:
            return (
                f"its input's {axis.id} size rule is {size}; predict.py gives sides that are multiples of "
                f"{MULTIPLE}, from {SMALLEST_INPUT} pixels"
            )
    halo = 0
    for axis in output.axes:
        if str(axis.id) in sides:
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
    if tile // 8 < halo:
        enough = tiling.round_up(8 * halo, MULTIPLE)
        return (
            f"--tile {tile} keeps {tile // 8} pixels of a tile's border, less than its halo of {halo}: "
            f"use --tile {enough} or more"
        )
    return None


def weights_format(description):
    """The weights predict.py runs: the first of WEIGHTS_ORDER that the package holds."""
    present = [name for name in WEIGHTS_ORDER if getattr(description.weights, name, None) is not None]
    if not present:
        formats = ", ".join(name for name, entry in description.weights if entry is not None)
        raise PackageError(
            f"the package's weights ({formats}) are none that predict.py runs ({', '.join(WEIGHTS_ORDER)})"
        )
    return present[0]


def preprocessing(description):
    """The package's preprocessing steps in words, e.g. "scale_linear, clip"."""
    steps = [step.id for step in description.inputs[0].preprocessing if step.id != "ensure_dtype"]
    return ", ".join(steps) or "none"


class PackagedNet:
    """The package's preprocessing and weights, called as tiling calls a Keras model: (N, H, W, 1)
    stored grey values in, (N, H, W, 1) float32 out. Padding and cropping stay tiling's."""

    def __init__(self, description):
        from bioimageio.core import create_prediction_pipeline

        self.weights = weights_format(description)
        try:
            self.pipeline = create_prediction_pipeline(description, weights_format=self.weights)
        except Exception as error:  # each backend raises its own types for weights it cannot load
            raise PackageError(
                f"the package's {self.weights} weights cannot run here ({described(error)}): "
                "install what they need, or give a package with other weights"
            ) from None
        (image,), (output,) = description.inputs, description.outputs
        self.input_id, self.output_id = image.id, output.id
        self.input_dims, self.output_dims = dims(image), dims(output)

    def predict_on_batch(self, tiles):
        from bioimageio.core import Sample, Tensor

        tiles = np.asarray(tiles, np.float32)
        if len(self.input_dims) == 3:  # no channel axis
            tiles = tiles[..., 0]
        sample = Sample(members={self.input_id: Tensor.from_numpy(tiles, dims=self.input_dims)}, stat={}, id=None)
        output = self.pipeline.predict_sample_without_blocking(
            sample, skip_input_padding=True, skip_output_cropping=True
        ).members[self.output_id]
        probabilities = output.transpose(self.output_dims).data.values.astype(np.float32)
        return probabilities if len(self.output_dims) == 4 else probabilities[..., np.newaxis]


def dims(tensor):
    """A tensor's axis ids in predict.py's order: batch, y, x, then its channel axis if it has one."""
    kind_order = {"batch": 0, "channel": 3}
    return [
        str(axis.id)
        for axis in sorted(tensor.axes, key=lambda axis: kind_order.get(axis.type, {"y": 1, "x": 2}.get(str(axis.id))))
    ]
