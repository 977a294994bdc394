"""A run's U-Net as a bioimage.io model package, for the tools that read the bioimage.io model
format (bioimageio.core and the napari plugins on it, ilastik, deepImageJ in Fiji, ...).

    python export.py logs/bce_lr1e-4 -o models/bce_lr1e-4.zip
    KERAS_BACKEND=tensorflow bioimageio test models/bce_lr1e-4.zip

The package (format 0.5, built and tested with the `bioimageio.spec` and `bioimageio.core`
packages) holds:
- the weights in three formats: Keras 3 (`keras_v3`), a TensorFlow SavedModel
  (`tensorflow_saved_model_bundle`) and ONNX (`onnx`, converted by Keras' own export through
  tf2onnx), the one format that ilastik, deepImageJ in Fiji and bioimageio.core all run;
- the grey-value scaling the run trained with, as the input's preprocessing (scale_linear, then
  clip to [0, 1]); the output as cell probability; the context the net needs: sides a multiple of
  16, and 32 mirrored pixels around a slice (the output's halo), as predict.py predicts;
- a validation slice of the run with that context as test input, the net's prediction of it as
  test output, a cover (the slice, its prediction and errors), and a README with the training
  data, the run's settings and the exported net's challenge scores on the run's validation slices.

Nothing is written unless bioimageio.core's own model test reproduces the test output.
"""

import getpass
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import cli
import files
import predict
import rundir
import tiffs
import tiling
from settings import MULTIPLE

CITATIONS = {
    "U-Net: Ronneberger, Fischer and Brox, MICCAI 2015": "10.1007/978-3-319-24574-4_28",
    "ISBI 2012 challenge: Arganda-Carreras et al., Front. Neuroanat. 2015": "10.3389/fnana.2015.00142",
}
HALO = tiling.CONTEXT
# tf2onnx's default opset: every onnxruntime since 1.10 (2021) runs it, older than the runtimes
# that ilastik and deepImageJ ship (docs/using-the-net.md).
ONNX_OPSET = 15
# bioimage.io's test of a written package, run in a fresh process (tested_in_a_fresh_process):
# argv[1] the package, argv[2] where its summary goes as JSON.
PACKAGE_TEST = """
import sys
import keras
from loguru import logger
from bioimageio.core import test_model
keras.config.disable_interactive_logging()  # the test's predictions would draw progress bars
logger.disable("bioimageio")  # its log lines; the summary says what failed
open(sys.argv[2], "w").write(test_model(sys.argv[1]).model_dump_json())
"""
PACKAGE_TEST_SECONDS = 600


class ExportError(cli.InputError):
    """A package that cannot be made; one line naming the problem and the fix."""


# --- before TensorFlow ------------------------------------------------------------------------


def export_inputs(args):
    """(checkpoint, run directory, config, raw validation slices, their masks, validation indices)."""
    if args.output.exists() and not args.overwrite:
        raise ExportError(f"{args.output} exists: choose another -o or add --overwrite")
    if args.output.suffix != ".zip":
        raise ExportError(f"{args.output} is no .zip: a bioimage.io package is a zip file, e.g. -o model.zip")
    if why := files.why_not_writable(args.output):
        raise ExportError(f"cannot write {args.output} ({why}): choose another -o")
    from bioimageio.spec.model.v0_5 import LicenseId

    try:
        LicenseId(args.license)
    except ValueError:
        raise ExportError(
            f"--license {args.license!r} is no SPDX license identifier: give one such as MIT, "
            "CC-BY-4.0 or Apache-2.0 (https://spdx.org/licenses)"
        ) from None
    checkpoint = predict.checkpoint_path(args.model)
    run_dir = checkpoint.parent
    if not (run_dir / rundir.CONFIG).is_file():
        raise ExportError(
            f"{checkpoint} is not in a run directory of train.py: the package needs the run's "
            "config.json (its data, scaling and validation slices)"
        )
    config = rundir.read_config(run_dir)
    # As training read them: a stack larger than memory allows stays on disk, only its validation
    # slices are read.
    images, labels = (
        tiffs.read_stack(rundir.recorded_path(config, name), tiffs.memory_map_above(config["memmap"]))
        for name in ("images", "labels")
    )
    cell, _ = tiffs.cell_value(labels, rundir.recorded_path(config, "labels"), config["labels_polarity"])
    indices = config["val_slices"]
    return checkpoint, run_dir, config, images[indices], (labels[indices] == cell).astype(np.uint8), indices


# --- the package --------------------------------------------------------------------------------


def cover_image(image, mask, probability):
    """(H, 3W, 3) uint8: the slice, the cell probability and the error overlay side by side."""
    from summaries import error_overlay

    grey = np.repeat(np.stack([image, probability])[..., np.newaxis], 3, axis=-1)
    panels = [grey[0], grey[1], error_overlay(image, mask, probability)]
    return np.round(np.concatenate(panels, axis=1) * 255).astype(np.uint8)


def documentation(config, scores, slice_index, trained_policy):
    import runs  # loads TensorFlow: called once the inputs are known to be good

    settings_rows = {
        name: config.get(name)
        for name in (
            "loss",
            "lr",
            "epochs",
            "steps_per_epoch",
            "batch_size",
            "crop",
            "filters",
            "seed",
            "precision",
            "labels_polarity",
        )
    }
    return f"""# U-Net for EM membranes ({Path(config["run_dir"]).name})

A same-padded U-Net (Ronneberger et al. 2015) trained with this project's `train.py` to tell
cells (1) from membranes (0) in electron-microscopy slices.

- **Input**: one grey slice, scaled as in training: {config["image_scaling"]["rule"]}, then
  clipped to [0, 1]. Sides must be multiples of {MULTIPLE}; give the slice {HALO} mirrored pixels on each side
  (the output's halo), as the test input has.
- **Output**: the probability of cell per pixel; crop {HALO} pixels (the halo) from each side.
- **Precision**: float32 weights and computation{
        ""
        if trained_policy == "float32"
        else f" (trained under Keras' {trained_policy} policy, cast to float32 for the package)"
    }.

## Training data

Images `{Path(config["images"]).name}` (SHA-256 `{config["data_files"]["images_sha256"]}`), labels
`{Path(config["labels"]).name}` (SHA-256 `{config["data_files"]["labels_sha256"]}`); validation slices
{cli.index_list_text(config["val_slices"])}, training slices {cli.index_list_text(config["train_slices"])}.

## Validation scores of these weights

On the validation slices, scored as the ISBI 2012 challenge does: V_rand {scores["v_rand"]:.4f},
V_info {scores["v_info"]:.4f}, pixel error {scores["pixel_error"]:.4f}. The test input is validation
slice {slice_index}.

## Settings of the run

{runs.markdown_table(settings_rows)}

Command: `{config["command"]}`
"""


def model_description(args, config, files, scaling, shape, scores, slice_index):
    """The bioimage.io model description (format 0.5) of the files written in `files`."""
    import keras
    import tensorflow as tf
    from bioimageio.spec.model import v0_5

    preprocessing = []
    if (scaling.offset, scaling.scale) != (0.0, 1.0):
        preprocessing.append(
            v0_5.ScaleLinearDescr(
                kwargs=v0_5.ScaleLinearKwargs(gain=1.0 / scaling.scale, offset=-scaling.offset / scaling.scale)
            )
        )
    preprocessing.append(v0_5.ClipDescr(kwargs=v0_5.ClipKwargs(min=0.0, max=1.0)))
    image, probability = v0_5.TensorId("image"), v0_5.TensorId("cell_probability")
    spatial = [v0_5.AxisId("y"), v0_5.AxisId("x")]
    return v0_5.ModelDescr(
        name=args.name or f"ISBI 2012 membrane U-Net {Path(config['run_dir']).name}",
        description="Same-padded U-Net that segments cells and membranes in EM slices (ISBI 2012 style); "
        "outputs the probability of cell.",
        authors=[v0_5.Author(name=name) for name in args.author],
        cite=[v0_5.CiteEntry(text=text, doi=v0_5.Doi(doi)) for text, doi in CITATIONS.items()],
        license=v0_5.LicenseId(args.license),
        tags=["unet", "segmentation", "electron-microscopy", "membranes", "isbi2012", "2d", "keras"],
        documentation=v0_5.FileDescr(source=files["README.md"]),
        covers=[v0_5.FileDescr(source=files["cover.png"])],
        inputs=[
            v0_5.InputTensorDescr(
                id=image,
                description="grey EM slice, stored values (scaled by the preprocessing)",
                axes=[
                    v0_5.BatchAxis(),
                    *(
                        v0_5.SpaceInputAxis(
                            id=axis, size=v0_5.ParameterizedSize(min=tiling.SMALLEST_INPUT, step=MULTIPLE)
                        )
                        for axis in spatial
                    ),
                    v0_5.ChannelAxis(channel_names=[v0_5.Identifier("grey")]),
                ],
                test_tensor=v0_5.FileDescr(source=files["test-input.npy"]),
                data=v0_5.IntervalOrRatioDataDescr(type="float32"),
                preprocessing=preprocessing,
            )
        ],
        outputs=[
            v0_5.OutputTensorDescr(
                id=probability,
                description="probability of cell (1) versus membrane (0)",
                axes=[
                    v0_5.BatchAxis(),
                    *(
                        v0_5.SpaceOutputAxisWithHalo(
                            id=axis, halo=HALO, size=v0_5.SizeReference(tensor_id=image, axis_id=axis)
                        )
                        for axis in spatial
                    ),
                    v0_5.ChannelAxis(channel_names=[v0_5.Identifier("cell")]),
                ],
                test_tensor=v0_5.FileDescr(source=files["test-output.npy"]),
                data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            )
        ],
        weights=v0_5.WeightsDescr(
            keras_v3=v0_5.KerasV3WeightsDescr(
                source=files["unet.keras"],
                keras_version=v0_5.Version(keras.__version__),
                backend=("tensorflow", v0_5.Version(tf.__version__)),
            ),
            tensorflow_saved_model_bundle=v0_5.TensorflowSavedModelBundleWeightsDescr(
                source=files["tf-saved-model.zip"], tensorflow_version=v0_5.Version(tf.__version__), parent="keras_v3"
            ),
            onnx=v0_5.OnnxWeightsDescr(source=files["unet.onnx"], opset_version=ONNX_OPSET, parent="keras_v3"),
        ),
        training_data=None,
        config={
            "isbi_unet": {
                "validation_scores": {name: float(value) for name, value in scores.items()},
                "test_slice": int(slice_index),
                "input_shape": list(shape),
            }
        },
    )


def saved_model(model, path):
    """The net as a TensorFlow SavedModel whose "serve" endpoint maps an (N, H, W, 1) float32 batch
    to {"cell_probability": ...}: bioimage.io's TensorFlow backend calls that endpoint and takes a
    dict of outputs."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda images: {"cell_probability": model(images, training=False)},
        input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)],
    )
    archive.write_out(str(path), verbose=False)


def onnx_model(model, path):
    """The net as ONNX, batch and sides left open: an (N, H, W, 1) float32 batch named "image" in,
    the cell probability out."""
    import tensorflow as tf

    # A loaded model has never been called, so Keras cannot infer the signature itself.
    signature = [tf.TensorSpec((None, None, None, 1), tf.float32, name="image")]
    with warnings.catch_warnings():
        # Keras' patch of tf2onnx for NumPy 2 asks NumPy for np.object, which warns.
        warnings.filterwarnings("ignore", "In the future `np.object`", FutureWarning)
        model.export(str(path), format="onnx", input_signature=signature, opset_version=ONNX_OPSET, verbose=False)


def first_failure(summary):
    """In a few words, the first check of a bioimage.io validation summary that failed."""
    detail = next(detail for detail in summary.details if detail.status != "passed")
    error = (detail.errors or [None])[0]
    reason = error and (error.msg or (error.traceback_md or "").strip().splitlines()[-1])
    return f"{detail.name}: {' '.join(reason.split())[:300]}" if reason else detail.name


def tested_in_a_fresh_process(package, folder):
    """Run bioimage.io's own test of `package` as a user of the package would: in a new Python
    process (nothing of this one's TensorFlow state), with `folder` as its working directory (the
    test unpacks the TensorFlow weights there). The weight formats it tested, or ExportError naming
    the first check that failed."""
    from bioimageio.spec.summary import ValidationSummary

    summary_path = Path(folder) / "test-summary.json"
    try:
        # KERAS_BACKEND=tensorflow comes with this process's environment (cli.py).
        result = subprocess.run(
            [sys.executable, "-c", PACKAGE_TEST, str(package), str(summary_path)],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=PACKAGE_TEST_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise ExportError(
            f"bioimage.io's test of the package did not end within {PACKAGE_TEST_SECONDS // 60} minutes: "
            "no package written"
        ) from None
    if not summary_path.is_file():
        last_line = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise ExportError(f"bioimage.io's test of the package could not run ({last_line[:300]}): no package written")
    summary = ValidationSummary.model_validate_json(summary_path.read_text())
    if summary.status != "passed":
        raise ExportError(f"bioimage.io's test of the package failed ({first_failure(summary)}): no package written")
    return sorted({detail.loc[1] for detail in summary.details if detail.loc[:1] == ("weights",)})


def export(args):
    checkpoint, run_dir, config, images, masks, indices = export_inputs(args)
    scaling = tiffs.ImageScaling.from_description(config["image_scaling"])

    # TensorFlow and bioimage.io's libraries take seconds to load: only now, once the inputs are good.
    cli.import_tensorflow()
    import skimage.io
    import tensorflow as tf
    from bioimageio.spec import save_bioimageio_package

    import metrics
    import unet

    tf.get_logger().setLevel("ERROR")  # retracing warnings: the test predicts inputs of six sizes

    trained = predict.load_model(checkpoint)
    # Computed as a user of the package computes it: in float32 (unet.in_float32), which every
    # backend reproduces; a mixed-precision net's outputs would differ between machines.
    model = unet.in_float32(trained)
    scaled = scaling.apply(images)
    probabilities = tiling.predict_stack(model, scaled)
    scores = metrics.isbi_scores(masks, probabilities)
    shown = len(indices) // 2
    test_input = tiling.with_context(images[shown].astype(np.float32))[np.newaxis, ..., np.newaxis]
    test_output = tiling.predict_batch(model, scaling.apply(test_input[..., 0]))[..., np.newaxis]

    with tempfile.TemporaryDirectory() as folder:
        written = {
            name: Path(folder) / name
            for name in (
                "unet.keras",
                "tf-saved-model.zip",
                "unet.onnx",
                "test-input.npy",
                "test-output.npy",
                "cover.png",
                "README.md",
            )
        }
        model.save(written["unet.keras"])
        saved_model(model, Path(folder) / "tf-saved-model")
        shutil.make_archive(str(written["tf-saved-model.zip"].with_suffix("")), "zip", Path(folder) / "tf-saved-model")
        onnx_model(model, written["unet.onnx"])
        np.save(written["test-input.npy"], test_input)
        np.save(written["test-output.npy"], test_output)
        skimage.io.imsave(
            written["cover.png"], cover_image(scaled[shown], masks[shown], probabilities[shown]), check_contrast=False
        )
        written["README.md"].write_text(documentation(config, scores, indices[shown], unet.precision(trained)))
        description = model_description(args, config, written, scaling, test_input.shape, scores, indices[shown])
        (Path(folder) / "package").mkdir()
        package = save_bioimageio_package(description, output_path=Path(folder) / "package" / args.output.name)
        tested = tested_in_a_fresh_process(package, Path(folder) / "package")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with files.replaced_atomically(args.output) as temporary:
            shutil.copyfile(package, temporary)
    print(
        f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB): float32 weights keras_v3, "
        f"tensorflow_saved_model_bundle and onnx, test slice "
        f"{indices[shown]}, validation V_rand {scores['v_rand']:.4f}, V_info {scores['v_info']:.4f}, pixel error "
        f"{scores['pixel_error']:.4f}; bioimage.io's test passed for {', '.join(tested)}"
    )


def build_parser():
    parser = cli.ArgumentParser(
        "export.py", "Package a run's U-Net as a bioimage.io model (the model zoo's zip format)."
    )
    parser.add_argument(
        "model", type=Path, help="run directory of train.py (its best.keras) or a .keras checkpoint in one"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .zip to write")
    parser.add_argument("--name", help="the model's name (default: from the run directory)")
    parser.add_argument(
        "--author", action="append", default=None, help="an author's name; repeat for several (default: the user name)"
    )
    parser.add_argument("--license", default="MIT", help="SPDX license identifier of the weights")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.author = args.author or [getpass.getuser()]
    return cli.run("export.py", lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
