"""export.py: a run's net as a bioimage.io model package that the model zoo's own test accepts."""

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from bioimageio.spec import load_model_description

import bioimage_package
import export
import predict
import rundir
import tiffs
import tiling
from conftest import ROOT, TINY, built_once, write_stack


@pytest.fixture(scope="session")
def exported(two_run_logdir, tmp_path_factory, worker_id):
    """(the package of the tiny bce run, the line export.py printed), exported once for the suite."""

    def export_it(folder):
        folder.mkdir()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            arguments = [str(two_run_logdir / "bce_lr1e-3"), "-o", str(folder / "model.zip"), "--author", "A. Tester"]
            assert export.main(arguments) == 0
        (folder / "printed.txt").write_text(printed.getvalue())

    folder = built_once(tmp_path_factory, worker_id, "exported", export_it)
    return folder / "model.zip", (folder / "printed.txt").read_text()


@pytest.fixture
def package(exported):
    return exported[0]


def test_the_package_passes_bioimageio_cores_own_test_for_every_weight_format(exported):
    """export.py ran the test in a fresh process before it wrote the package, and says what it tested."""
    package, printed = exported
    assert printed.endswith("; bioimage.io's test passed for keras_v3, onnx, tensorflow_saved_model_bundle\n")
    with zipfile.ZipFile(package) as archive:
        assert sorted(archive.namelist()) == [
            "README.md",
            "cover.png",
            "rdf.yaml",
            "test-input.npy",
            "test-output.npy",
            "tf-saved-model.zip",
            "unet.keras",
            "unet.onnx",
        ]
    description = load_model_description(package)
    assert description.format_version.startswith("0.5")
    weights = description.weights
    assert weights.keras_v3 is not None and weights.tensorflow_saved_model_bundle.parent == "keras_v3"
    assert (weights.onnx.opset_version, weights.onnx.parent) == (export.ONNX_OPSET, "keras_v3")
    assert [author.name for author in description.authors] == ["A. Tester"]
    assert {str(cite.doi) for cite in description.cite} == set(export.CITATIONS.values())
    (input_tensor,), (output_tensor,) = description.inputs, description.outputs
    steps = {step.id: step.kwargs for step in input_tensor.preprocessing if step.id != "ensure_dtype"}
    assert list(steps) == ["scale_linear", "clip"]  # the run's scaling: uint8 divided by 255, then [0, 1]
    assert steps["scale_linear"].gain == pytest.approx(1 / 255) and (steps["clip"].min, steps["clip"].max) == (0, 1)
    assert [getattr(axis, "halo", None) for axis in output_tensor.axes] == [None, export.HALO, export.HALO, None]


def test_the_test_output_is_predict_pys_prediction_of_that_slice(package, two_run_logdir, isbi_dir):
    with zipfile.ZipFile(package) as archive:
        test_input = np.load(archive.open("test-input.npy"))
        test_output = np.load(archive.open("test-output.npy"))
    run_dir = two_run_logdir / "bce_lr1e-3"
    stack = tiffs.read_stack(isbi_dir / "train-volume.tif")
    np.testing.assert_array_equal(
        test_input[0, 32 : 32 + 512, 32 : 32 + 512, 0], stack[15]
    )  # slice 15 with its context
    scaling = predict.run_scaling(run_dir / rundir.BEST)
    model = predict.load_model(run_dir / rundir.BEST)
    expected = tiling.predict_slice(model, scaling.apply(stack[15]))
    np.testing.assert_allclose(test_output[0, 32 : 32 + 512, 32 : 32 + 512, 0], expected, atol=1e-5)


def test_the_onnx_weights_in_onnxruntime_give_predict_pys_prediction(package, two_run_logdir):
    """As ilastik and deepImageJ run them: the package's preprocessing, then the ONNX graph, on the
    test slice with its context and on a batch of another size."""
    import onnxruntime

    with zipfile.ZipFile(package) as archive:
        test_input = np.load(archive.open("test-input.npy"))
        session = onnxruntime.InferenceSession(archive.read("unet.onnx"), providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    checkpoint = two_run_logdir / "bce_lr1e-3" / rundir.BEST
    scaled = predict.run_scaling(checkpoint).apply(test_input[..., 0])
    model = predict.load_model(checkpoint)
    (onnx_output,) = session.run(None, {onnx_input.name: scaled[..., np.newaxis]})
    expected = tiling.predict_slice(model, scaled[0, 32 : 32 + 512, 32 : 32 + 512])
    np.testing.assert_allclose(onnx_output[0, 32 : 32 + 512, 32 : 32 + 512, 0], expected, atol=1e-4)
    other = np.random.default_rng(0).random((2, 96, 160, 1), np.float32)
    (onnx_output,) = session.run(None, {onnx_input.name: other})
    np.testing.assert_allclose(onnx_output, model.predict_on_batch(other), atol=1e-4)


def test_predict_py_with_the_package_prints_the_scores_it_prints_with_the_run(
    package, two_run_logdir, isbi_dir, tmp_path, capsys
):
    # Four slices of the training stack and their masks: the scores of 30 take seconds more to the same end.
    stacks = [
        str(write_stack(tmp_path / name, tiffs.read_stack(isbi_dir / name)[13:17]))
        for name in ("train-volume.tif", "train-labels.tif")
    ]
    arguments = [stacks[0], "--labels", stacks[1]]
    assert predict.main([str(two_run_logdir / "bce_lr1e-3"), *arguments, "-o", str(tmp_path / "run.tif")]) == 0
    with_run = capsys.readouterr().out.splitlines()
    assert predict.main([str(package), *arguments, "-o", str(tmp_path / "package.tif")]) == 0
    with_package = capsys.readouterr().out.splitlines()
    assert with_package[0] == (
        "predicting 4 slices of 512x512; the package's onnx weights, output cell_probability (cell), grey values "
        "by its preprocessing (scale_linear, clip)"
    )
    scores = [[float(number) for number in re.findall(r"\d\.\d{4}", out[-1])] for out in (with_run, with_package)]
    assert with_run[-1].startswith("V_rand ") and scores[1] == pytest.approx(scores[0], abs=2e-4)
    np.testing.assert_allclose(
        tiffs.read_stack(tmp_path / "package.tif"), tiffs.read_stack(tmp_path / "run.tif"), atol=1e-4
    )


def test_the_packaged_net_predicts_tiles_as_the_runs_net(package, two_run_logdir, isbi_dir):
    """In overlapping tiles of 256 (each keeps 32 pixels of its border, the package's halo), with
    the package's preprocessing on the stored values."""
    stored = tiffs.read_stack(isbi_dir / "train-volume.tif")[15:16]
    net = bioimage_package.PackagedNet(bioimage_package.read(package, 256), stored)
    checkpoint = two_run_logdir / "bce_lr1e-3" / rundir.BEST
    scaled = predict.run_scaling(checkpoint).apply(stored[0])
    expected = tiling.predict_slice(predict.load_model(checkpoint), scaled, 256)
    np.testing.assert_allclose(net.preprocessed(stored)[0], scaled, atol=1e-6)
    np.testing.assert_allclose(tiling.predict_slice(net, net.preprocessed(stored)[0], 256), expected, atol=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--tile", "128"],
            "does not fit predict.py: --tile 128 keeps 16 pixels of a tile's border, less than its "
            "halo of 32: use --tile 256 or more",
        ),
        (["--scaling", "own"], "--scaling own is for a run's net: "),
    ],
)
def test_predict_py_refuses_flags_the_package_cannot_take(package, isbi_dir, tmp_path, flags, message, capsys):
    output = tmp_path / "p.tif"
    assert predict.main([str(package), str(isbi_dir / "test-volume.tif"), "-o", str(output), *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("predict.py: error: ") and message in error and error.count("\n") == 1, error
    assert not output.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"unet.onnx": b"half a file"}, "is no valid bioimage.io package (weights.onnx: Value error, SHA256 mismatch"),
        ({"rdf.yaml": b"inputs: [unclosed"}, "is no readable bioimage.io package (ParserError: "),
    ],
)
def test_a_damaged_package_is_refused_in_one_line(package, isbi_dir, tmp_path, damage, message, capsys):
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(package) as original, zipfile.ZipFile(damaged, "w") as copy:
        for name in original.namelist():
            copy.writestr(name, damage.get(name, original.read(name)))
    output = tmp_path / "p.tif"
    assert predict.main([str(damaged), str(isbi_dir / "test-volume.tif"), "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"predict.py: error: {damaged} ") and message in error and error.count("\n") == 1, error
    assert not output.exists()


def variant(package, path, rdf_edits=(), files=None):
    """A copy of `package` at `path` with text replaced in its rdf.yaml and `files` replaced, their
    SHA-256 in the rdf.yaml following."""
    files = files or {}
    with zipfile.ZipFile(package) as original, zipfile.ZipFile(path, "w") as copy:
        rdf = original.read("rdf.yaml").decode()
        for old, new in rdf_edits:
            assert old in rdf, old
            rdf = rdf.replace(old, new)
        for name in original.namelist():
            if name in files:
                old_hash, new_hash = (hashlib.sha256(data).hexdigest() for data in (original.read(name), files[name]))
                rdf = rdf.replace(old_hash, new_hash)
            if name != "rdf.yaml":
                copy.writestr(name, files.get(name, original.read(name)))
        copy.writestr("rdf.yaml", rdf)
    return path


SCALING = """      - id: scale_linear
        kwargs:
          gain: 0.00392156862745098
          offset: -0.0
      - id: clip
        kwargs:
          min: 0.0
          max: 1.0
"""


def test_a_packages_dataset_statistics_are_the_stacks_and_its_sample_statistics_a_slices(package, isbi_dir, tmp_path):
    """zero_mean_unit_variance over the dataset (its default axes) and over each slice (y, x): not
    over a tile with its mirrored context, and not changing with the slices predicted before."""
    stack = tiffs.read_stack(isbi_dir / "train-volume.tif")[:4]
    for axes, expected in (
        ("", (stack - stack.mean()) / stack.std()),
        ("\n        kwargs:\n          axes: [y, x]", None),
    ):
        normalised = variant(
            package, tmp_path / "zmuv.zip", [(SCALING, f"      - id: zero_mean_unit_variance{axes}\n")]
        )
        net = bioimage_package.PackagedNet(bioimage_package.read(normalised, 1024), stack)
        prepared = net.preprocessed(stack)
        if expected is None:  # each slice by its own mean and spread
            expected = (stack - stack.mean(axis=(1, 2), keepdims=True)) / stack.std(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(prepared, expected, atol=1e-4)
        np.testing.assert_array_equal(net.preprocessed(stack[::-1])[::-1], prepared)


def test_a_package_whose_batch_is_one_tile_gets_one_tile_at_a_time(package, isbi_dir, tmp_path, capsys):
    import onnx

    with zipfile.ZipFile(package) as archive:
        graph = onnx.load_from_string(archive.read("unet.onnx"))
    for tensor in (*graph.graph.input, *graph.graph.output):
        tensor.type.tensor_type.shape.dim[0].dim_value = 1  # onnxruntime refuses any other batch now
    one_at_a_time = variant(
        package,
        tmp_path / "batch1.zip",
        [("    axes:\n      - type: batch\n", "    axes:\n      - type: batch\n        size: 1\n")],
        {"unet.onnx": graph.SerializeToString()},
    )
    stack = str(write_stack(tmp_path / "two.tif", tiffs.read_stack(isbi_dir / "train-volume.tif")[:2]))
    for model, output in ((package, "any.tif"), (one_at_a_time, "one.tif")):  # 256: tiles, four to a batch
        assert predict.main([str(model), stack, "-o", str(tmp_path / output), "--tile", "256"]) == 0
    np.testing.assert_allclose(
        tiffs.read_stack(tmp_path / "one.tif"), tiffs.read_stack(tmp_path / "any.tif"), atol=1e-5
    )


def test_a_damaged_keras_checkpoint_that_looks_like_a_zip_is_one_line(two_run_logdir, isbi_dir, tmp_path, capsys):
    checkpoint = (two_run_logdir / "bce_lr1e-3" / rundir.BEST).read_bytes()
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(checkpoint.replace(b"PK\x01\x02", b"XX\x01\x02", 1))  # the central directory, not its end
    assert zipfile.is_zipfile(damaged)
    assert predict.main([str(damaged), str(isbi_dir / "test-volume.tif"), "-o", str(tmp_path / "p.tif")]) == 2
    error = capsys.readouterr().err
    assert f"{damaged} is not a Keras model (BadZipFile" in error and error.count("\n") == 1, error


def other_axes(tensor, *axes):
    return tensor.model_copy(update={"axes": list(axes)})


@pytest.mark.parametrize(
    "change, why",
    [
        (
            lambda d, v: {"inputs": [d.inputs[0]] * 2},
            "it has 2 inputs and 1 outputs; predict.py needs one grey 2D input",
        ),
        (
            lambda d, v: {"inputs": [other_axes(d.inputs[0], *d.inputs[0].axes[:3], v.SpaceInputAxis(id="z", size=8))]},
            "image has axes batch, y, x, z; predict.py needs",
        ),
        (
            lambda d, v: {"inputs": [other_axes(d.inputs[0], *d.inputs[0].axes[1:])]},
            "image has axes y, x, channel; predict.py needs",
        ),
        (
            lambda d, v: {
                "outputs": [
                    other_axes(d.outputs[0], *d.outputs[0].axes[:3], v.ChannelAxis(channel_names=["cell", "membrane"]))
                ]
            },
            "cell_probability has 2 channels; predict.py needs",
        ),
        (
            lambda d, v: {
                "inputs": [
                    other_axes(
                        d.inputs[0],
                        d.inputs[0].axes[0],
                        v.SpaceInputAxis(id="y", size=512),
                        *d.inputs[0].axes[2:],
                    )
                ]
            },
            "its input's y size rule is 512; predict.py gives sides that are multiples of 16, from 80 pixels",
        ),
        (
            lambda d, v: {
                "outputs": [
                    other_axes(
                        d.outputs[0],
                        d.outputs[0].axes[0],
                        d.outputs[0].axes[1].model_copy(update={"halo": 48}),
                        *d.outputs[0].axes[2:],
                    )
                ]
            },
            "its output's halo is 48 pixels; predict.py gives a slice 32 pixels of context",
        ),
        (
            lambda d, v: {
                "outputs": [other_axes(d.outputs[0], *d.outputs[0].axes[:3], v.ChannelAxis(channel_names=["membrane"]))]
            },
            "its output (cell_probability, membrane) is not the probability of cell",
        ),
        (
            lambda d, v: {"outputs": [d.outputs[0].model_copy(update={"data": v.IntervalOrRatioDataDescr()})]},
            "its output's values are not declared within [0, 1] (range (None, None))",
        ),
    ],
)
def test_a_package_that_does_not_fit_predict_py_is_told_why(package, change, why):
    from bioimageio.spec.model import v0_5

    description = load_model_description(package)
    assert bioimage_package.misfit(description, 1024) is None
    assert why in bioimage_package.misfit(description.model_copy(update=change(description, v0_5)), 1024)


def test_an_existing_package_is_kept(package, two_run_logdir, capsys):
    before = package.read_bytes()
    assert export.main([str(two_run_logdir / "bce_lr1e-3"), "-o", str(package)]) == 2
    assert capsys.readouterr().err == f"export.py: error: {package} exists: choose another -o or add --overwrite\n"
    assert package.read_bytes() == before


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert export.main([str(tmp_path), "-o", str(tmp_path / "m.zip")]) == 2
    assert (
        capsys.readouterr().err == f"export.py: error: {tmp_path} holds no best.keras: give a run directory of "
        "train.py or a .keras checkpoint\n"
    )


# Slow: converts and tests all three weight formats again (30 s on two cores) to see them refused;
# the package that passes is tested by default.
@pytest.mark.slow
def test_a_package_whose_test_output_does_not_reproduce_is_not_written(two_run_logdir, tmp_path, monkeypatch, capsys):
    real_predict_batch = tiling.predict_batch
    monkeypatch.setattr(tiling, "predict_batch", lambda model, tiles: real_predict_batch(model, tiles) + 0.1)
    assert export.main([str(two_run_logdir / "bce_lr1e-3"), "-o", str(tmp_path / "m.zip")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("export.py: error: bioimage.io's test of the package failed (") and error.count("\n") == 1
    assert error.endswith("no package written\n")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_is_not_a_model_or_not_in_a_run_is_refused(two_run_logdir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_run_logdir / "bce_lr1e-3", run_dir)
    (run_dir / rundir.BEST).write_bytes(b"half a checkpoint")
    assert export.main([str(run_dir), "-o", str(tmp_path / "m.zip")]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith(f"export.py: error: {run_dir / rundir.BEST} is not a Keras model") and error.count("\n") == 1
    )
    alone = shutil.copy(two_run_logdir / "bce_lr1e-3" / rundir.BEST, tmp_path / "alone.keras")
    assert export.main([str(alone), "-o", str(tmp_path / "m.zip")]) == 2
    assert "is not in a run directory of train.py" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()


# Slow: trains, exports and runs bioimage.io's test in three fresh processes, bf16 emulated on AVX2 CPUs;
# the float32 package's own test runs by default.
@pytest.mark.slow
def test_a_mixed_bfloat16_run_exports_a_float32_package_that_passes_the_test_anywhere(tmp_path, isbi_dir):
    """Exported from another directory than training's; the package's own test in a fresh shell in a
    third; neither the checkout nor those directories keep anything of it but the package."""
    import keras

    started, exporting, testing = (tmp_path / name for name in ("started", "exporting", "testing"))
    for directory in (started, exporting, testing):
        directory.mkdir()
    checkout_before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    trained = subprocess.run(
        [
            sys.executable,
            ROOT / "train.py",
            *TINY,
            "--precision",
            "mixed_bfloat16",
            "--epochs",
            "1",
            "--data",
            str(isbi_dir),
            "--logdir",
            "logs",
        ],
        cwd=started,
        capture_output=True,
        text=True,
    )
    assert trained.returncode == 0, trained.stderr
    exported = subprocess.run(
        [sys.executable, ROOT / "export.py", started / "logs" / "bce_lr1e-4", "-o", "model.zip"],
        cwd=exporting,
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0 and exported.stderr == "", exported.stderr
    assert "float32 weights" in exported.stdout and "bioimage.io's test passed" in exported.stdout
    assert [path.name for path in exporting.iterdir()] == ["model.zip"]

    tested = subprocess.run(
        # bioimage.io's own command, installed beside this Python (in a venv that is not activated too).
        [Path(sys.executable).with_name("bioimageio"), "test", exporting / "model.zip"],
        cwd=testing,
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert tested.returncode == 0, tested.stdout[-3000:]
    with zipfile.ZipFile(exporting / "model.zip") as archive:
        readme = archive.read("README.md").decode()
        archive.extract("unet.keras", tmp_path)
    assert "float32 weights and computation (trained under Keras' mixed_bfloat16 policy" in readme
    net = keras.models.load_model(tmp_path / "unet.keras", compile=False)
    assert {layer.dtype_policy.name for layer in net.layers} == {"float32"}
    assert (
        subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        == checkout_before
    )


@pytest.mark.parametrize(
    "output, extra, message",
    [
        ("a-directory.zip", ["--overwrite"], "a-directory.zip is a directory): choose another -o"),
        ("a-file/m.zip", [], "a-file is a file): choose another -o"),
        ("/proc/m.zip", [], "cannot write /proc/m.zip (/proc: "),
        (
            "m.zip",
            ["--license", "free-for-all"],
            "--license 'free-for-all' is no SPDX license identifier: give one such as MIT",
        ),
    ],
)
def test_an_export_that_cannot_be_written_is_one_line_and_writes_nothing(
    output, extra, message, two_run_logdir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-directory.zip").mkdir()
    (tmp_path / "a-file").write_text("a file of the user's")
    before = sorted(tmp_path.rglob("*"))
    assert export.main([str(two_run_logdir / "bce_lr1e-3"), "-o", output, *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("export.py: error: ") and message in error and error.count("\n") == 1, error
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "a-file").read_text() == "a file of the user's"


def test_a_packages_axes_are_put_in_predict_pys_order(package):
    from bioimageio.spec.model import v0_5

    description = load_model_description(package)
    batch, y, x, channel = description.inputs[0].axes
    shuffled = description.inputs[0].model_copy(update={"axes": [channel, x, batch, y]})
    assert bioimage_package.dims(shuffled) == ["batch", "y", "x", "channel"]
    assert bioimage_package.dims(other_axes(shuffled, x, v0_5.BatchAxis(), y)) == ["batch", "y", "x"]
