"""Cell probabilities of a stack from a trained U-Net, as the ISBI 2012 challenge wants them.

    python predict.py logs/bce_lr1e-4 data/isbi2012/test-volume.tif -o probs.tif
    python predict.py logs/bce_lr1e-4/best.keras data/isbi2012/train-volume.tif -o train-probs.tif \\
        --labels data/isbi2012/train-labels.tif --tta
    python predict.py models/bce_lr1e-4.zip data/isbi2012/test-volume.tif -o probs.tif

Writes a float32 multi-page TIFF, one page per input slice, cells high and membranes low (the
challenge's submission polarity). Slices of any size work: one that fits in a --tile is predicted
whole, a larger one in overlapping tiles whose borders are discarded (the U-Net paper's
overlap-tile strategy); beyond a slice's edges the image is mirrored. --tta averages the predictions of the 8
flips and rotations. With --labels it also prints the challenge's V_rand, V_info and pixel error.

Grey values are scaled to [0, 1] as the run's training scaled them (its config.json's
`image_scaling`); a stack whose own rule (tiffs.ImageScaling) differs, e.g. a float32 or 16-bit
copy of 8-bit training data, is refused unless --scaling says which to apply; a checkpoint outside
a run directory scales the stack by its own values. A bioimage.io package (export.py's, or one that
fits: bioimage_package.py) brings its own preprocessing and weights, ONNX first. Everything is
checked before TensorFlow loads.
"""

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np

import bioimage_package
import cli
import data
import files
import rundir
import settings
import tiffs
import tiling
from settings import MULTIPLE


class PredictError(cli.InputError):
    """A prediction that cannot run; the message names the problem and the fix in one line."""


# --- model ------------------------------------------------------------------------------------


def checkpoint_path(run_or_checkpoint):
    """The checkpoint a run directory holds (best.keras), or the .keras file given."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / rundir.BEST
        if not path.is_file():
            raise PredictError(
                f"{run_or_checkpoint} holds no {rundir.BEST}: give a run directory of train.py or a .keras checkpoint"
            )
    elif not path.is_file():
        raise PredictError(f"{path} not found: give a run directory of train.py or a .keras checkpoint")
    if not zipfile.is_zipfile(path):  # before TensorFlow, whose loader says "File not found" for it
        raise PredictError(
            f"{path} is not a Keras model (a .keras file is a zip archive, and this is none): "
            "give a .keras checkpoint written by train.py"
        )
    return path


def run_scaling(checkpoint):
    """The image scaling of the run a checkpoint belongs to, or None if it has no run directory."""
    if not (checkpoint.parent / rundir.CONFIG).is_file():
        return None
    description = rundir.read_config(checkpoint.parent)["image_scaling"]
    return None if description is None else tiffs.ImageScaling.from_description(description)


def input_scaling(run, own, args):
    """The scaling predict.py applies: the run's, unless the stack's own rule differs from it, which
    could be the same images stored otherwise (float [0, 1], another bit depth) or other images:
    refused then unless --scaling says which (a checkpoint outside a run has only its own)."""
    if run is None or args.scaling == "own":
        return own
    if args.scaling == "run" or (own.offset, own.scale) == (run.offset, run.scale):
        return run
    raise PredictError(
        f"{args.images} is stored unlike the run's training data ({own.rule}; the run's: {run.rule}): "
        "add --scaling own to scale it by its own values (right for the same kind of images stored "
        "otherwise), or --scaling run to apply the run's"
    )


def load_model(path):
    import keras  # TensorFlow loads only once the inputs are known to be good

    try:
        # compile=False: inference needs no loss, so the project's custom losses need not be registered.
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises several types for files it cannot read
        raise PredictError(
            f"{path} is not a Keras model ({type(error).__name__}: {error}): "
            "give a .keras checkpoint written by train.py"
        ) from None


# --- command line -----------------------------------------------------------------------------


def tile_size(text):
    value = cli.multiple_of(MULTIPLE, f"the U-Net halves it {settings.DEPTH} times")(text)
    if value < 4 * MULTIPLE:
        raise argparse.ArgumentTypeError(f"{value} is too small to predict with context: use {4 * MULTIPLE} or more")
    return value


def build_parser():
    parser = cli.ArgumentParser(
        "predict.py", "Write the cell probabilities of a TIFF stack predicted by a trained U-Net."
    )
    parser.add_argument(
        "model",
        type=Path,
        help="run directory of train.py (uses its best.keras), a .keras checkpoint or a bioimage.io package (.zip)",
    )
    parser.add_argument("images", type=Path, help="multi-page TIFF of grey slices, e.g. data/isbi2012/test-volume.tif")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the float32 multi-page TIFF to write")
    parser.add_argument("--tta", action="store_true", help="average the predictions of the 8 flips and rotations")
    parser.add_argument(
        "--labels", type=Path, help="binary masks of the same slices: also print V_rand, V_info and pixel error"
    )
    parser.add_argument(
        "--labels-polarity",
        choices=settings.LABEL_POLARITIES,
        default=settings.DEFAULTS["labels_polarity"],
        help="which of the two --labels values is cell, as for train.py",
    )
    parser.add_argument(
        "--scaling",
        choices=("run", "own"),
        help="for a stack whose grey values are stored unlike the run's training data: scale them as "
        "the run's (run) or by the stack's own values (own); such a stack is refused without it",
    )
    parser.add_argument(
        "--tile",
        type=tile_size,
        default=tiling.DEFAULT_TILE,
        help="largest side predicted in one piece; larger slices go in overlapping tiles",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def run_input(args):
    """For a run's net: (the stack, a loader of (net, the stack scaled as the run's training data,
    that rule in words))."""
    checkpoint = checkpoint_path(args.model)
    stack = tiffs.read_stack(args.images)
    scaling = input_scaling(run_scaling(checkpoint), tiffs.ImageScaling.of(stack, args.images), args)
    return stack, lambda: (load_model(checkpoint), scaling.apply(stack), f"grey values: {scaling.rule}")


def packaged_input(args):
    """For a bioimage.io package: (the stack, a loader of (net, the stack as the package's
    preprocessing makes it, which weights and preprocessing in words))."""
    if args.scaling:
        raise PredictError(
            f"--scaling {args.scaling} is for a run's net: {args.model} scales grey values by its own "
            "preprocessing; drop --scaling"
        )
    description = bioimage_package.read(args.model, args.tile)
    stack = tiffs.read_stack(args.images)

    def load():
        net = bioimage_package.PackagedNet(description, stack)
        how = (
            f"the package's {net.weights} weights, output {net.output_names}, grey values by its preprocessing "
            f"({bioimage_package.preprocessing(description)})"
        )
        return net, net.preprocessed(stack), how

    return stack, load


def run(args):
    if args.output.exists() and not args.overwrite:
        raise PredictError(f"{args.output} exists: choose another -o or add --overwrite")
    if why := files.why_not_writable(args.output):
        raise PredictError(f"cannot write {args.output} ({why}): choose another -o")
    stack, load = (packaged_input if bioimage_package.is_package(args.model) else run_input)(args)
    labels = None
    if args.labels is not None:
        label_stack = tiffs.read_stack(args.labels)
        if label_stack.shape != stack.shape:
            raise PredictError(
                f"{args.labels} holds {label_stack.shape} masks but {args.images} holds {stack.shape} "
                "slices: give the masks of the same slices"
            )
        labels = (label_stack == tiffs.cell_value(label_stack, args.labels, args.labels_polarity)[0]).astype(np.uint8)

    cli.import_tensorflow()  # only once the inputs are known to be good
    import metrics
    from progress import Counter

    model, images, how = load()
    print(
        f"predicting {len(images)} slices of {images.shape[1]}x{images.shape[2]}"
        + (" with 8-fold test-time augmentation" if args.tta else "")
        + f"; {how}"
    )
    probabilities = tiling.predict_stack(model, images, args.tile, args.tta, progress=Counter(len(images), "slice"))
    data.write_stack_atomically(args.output, probabilities, fix="free some space or choose another -o")
    print(f"wrote {args.output}: {len(probabilities)} pages of float32 cell probability")

    if labels is not None:
        scores = metrics.isbi_scores(labels, probabilities)
        print(
            f"V_rand {scores['v_rand']:.4f} (threshold {scores['v_rand_threshold']:.1f}), "
            f"V_info {scores['v_info']:.4f} (threshold {scores['v_info_threshold']:.1f}), "
            f"pixel error {scores['pixel_error']:.4f} (threshold {scores['pixel_error_threshold']:.1f})"
        )
        return scores
    return None


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return cli.run("predict.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
