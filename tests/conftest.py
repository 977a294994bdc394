import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from filelock import FileLock
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import data  # noqa: E402
import inputs  # noqa: E402

SHARED_MIRROR = ROOT.parent / "shared" / "data" / "isbi2012-mirror"
CHECKOUT_DATA = ROOT / data.DEFAULT_DATA_DIR
ISBI_VALIDATION_SLICES = inputs.default_validation_slices(data.NUM_SLICES)  # the slices a run on ISBI shows


def given_mirror():
    """The ISBI 2012 mirror the tests are pointed at: $ISBI2012_MIRROR, else ../shared beside the
    checkout (as in CI); None if neither."""
    if os.environ.get(data.MIRROR_ENV):
        return os.environ[data.MIRROR_ENV]
    return SHARED_MIRROR.as_uri() if SHARED_MIRROR.is_dir() else None


@pytest.fixture(scope="session")
def mirror_url():
    """A URL to download ISBI 2012 from: the given mirror, else the real download (GitHub) if it
    answers."""
    url = data.mirror_url(given_mirror())
    try:
        data.fetch(url + "data/membrane/test/0.png")
    except data.DataError as error:
        if given_mirror() is not None:
            raise
        pytest.skip(f"no ISBI 2012 mirror given and the real download failed ({error})")
    return url


@pytest.fixture(scope="session")
def local_mirror(mirror_url):
    """The given mirror as a directory, for tests that compare or damage its files."""
    if not mirror_url.startswith("file://"):
        pytest.skip(f"needs a file:// mirror ({data.MIRROR_ENV} or ../shared), not {mirror_url}")
    return Path(mirror_url.removeprefix("file://").rstrip("/"))


@pytest.fixture(scope="session")
def isbi_dir(tmp_path_factory):
    """The three ISBI 2012 TIFFs, from the given mirror, else those that `python data.py` put in
    the checkout, else the real download. Skipped, with the reason in pytest's summary, only when
    none of these can be had."""
    if given_mirror() is None and not data.missing_stacks(CHECKOUT_DATA):
        return CHECKOUT_DATA
    directory = tmp_path_factory.mktemp("isbi2012")
    try:
        data.download_isbi2012(directory, given_mirror(), verbose=False)
    except data.DataError as error:
        if given_mirror() is not None:
            raise
        pytest.skip(f"no ISBI 2012 data: no mirror given, none in {CHECKOUT_DATA}, and the download failed ({error})")
    return directory


SMALL_SIDE = 128


@pytest.fixture(scope="session")
def small_isbi_dir(tmp_path_factory, isbi_dir):
    """The three ISBI 2012 stacks cut to the top-left SMALL_SIDE x SMALL_SIDE pixels of every slice:
    real EM data for the tests of what a run does (resume, stop, refuse) rather than what it
    scores, whose validation pass, scoring and images then cost a sixteenth."""
    import tifffile

    directory = tmp_path_factory.mktemp("isbi2012_small")
    for name in data.STACK_SOURCES:
        stack = tifffile.imread(isbi_dir / name)
        tifffile.imwrite(directory / name, stack[:, :SMALL_SIDE, :SMALL_SIDE], photometric="minisblack")
    return directory


def read_events(directory):
    """What one TensorBoard run directory holds, read as TensorBoard reads it (every event file in
    name order, values upgraded to tensors): ({tag: [(step, value as a numpy array)]} in file
    order, duplicates and all; {tag: (plugin name, plugin content)}). The one reader of the tests."""
    series, plugins = {}, {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name:
                    plugins.setdefault(
                        value.tag, (value.metadata.plugin_data.plugin_name, value.metadata.plugin_data.content)
                    )
                series.setdefault(value.tag, []).append((event.step, tensor_util.make_ndarray(value.tensor)))
    return series, plugins


def runs_in(logdir):
    """{TensorBoard run name: directory} of the directories under `logdir` that hold event files."""
    return {
        str(path.parent.relative_to(logdir)).replace(os.sep, "/"): path.parent
        for path in sorted(Path(logdir).rglob("events.out.tfevents.*"))
    }


def cells_and_membranes(pages, height=64, width=64, spacing=8):
    """Labels as EM masks look: (spacing-1)-pixel square cells (255) in a connected grid of 1-pixel
    membranes (0)."""
    _, rows, columns = np.indices((pages, height, width))
    return ((rows % spacing != 0) & (columns % spacing != 0)).astype(np.uint8) * 255


# A run of seconds: a 4-filter net on 64x64 crops, 2 epochs of 3 steps, images every 2 steps.
TINY = (
    "--filters 4 --crop 64 --epochs 2 --steps-per-epoch 3 --batch-size 2 --image-every 2 --update-freq 2 "
    "--precision float32"
).split()
TINY_STEPS = 2 * 3


def tiny_run(data_dir, logdir, *flags):
    """train.py's exit code for a TINY run at --lr 1e-3 on the stacks in `data_dir`, logged under
    `logdir`, with `flags` added (a later one wins)."""
    import train

    return train.main([*TINY, "--lr", "1e-3", "--data", str(data_dir), "--logdir", str(logdir), *flags])


def saved_at_step(path, step):
    """A .keras archive at `path` of a small net whose optimizer is at training step `step`."""
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(step)
    model.save(path)


def built_once(tmp_path_factory, worker_id, name, build):
    """`build(path)` for a session fixture at a path shared by all of pytest-xdist's workers, run by
    the first that asks (the others wait for it), as xdist's documentation shows: built by each, a
    tiny training cost every worker half a minute of two busy cores. The result is read only."""
    if worker_id == "master":  # not under xdist
        path = tmp_path_factory.mktemp(name) / name
        build(path)
        return path
    path = tmp_path_factory.getbasetemp().parent / name
    built = path.with_name(f"{name}.built")
    with FileLock(f"{path}.lock"):
        if not built.is_file():
            shutil.rmtree(path, ignore_errors=True)  # what a worker that failed left
            build(path)
            built.touch()
    return path


@pytest.fixture(scope="session")
def two_run_logdir(tmp_path_factory, isbi_dir, worker_id):
    """A log directory with two tiny runs on ISBI 2012: `bce_lr1e-3`, scored as in the challenge
    every epoch and profiled over steps 2 and 3 (--profile-batch, which must leave its curves as any
    run's), and `wbce_lr1e-3` (the U-Net paper's weighted loss), with --eval-every 2 (scored at its
    first and last epochs) and averaged weights (--ema). Read only: a test that changes it works on
    a copy."""

    def train_both(logdir):
        for loss, flags in (
            ("bce", ("--eval-every", "1", "--ema", "0", "--profile-batch", "2,3")),
            ("wbce", ("--eval-every", "2", "--ema", "0.9")),
        ):
            assert tiny_run(isbi_dir, logdir, "--loss", loss, *flags) == 0

    return built_once(tmp_path_factory, worker_id, "two_run_logdir", train_both)


def write_stack(path, stack):
    """`stack` (pages, H, W) as a multi-page grey TIFF at `path`; `path`."""
    tifffile.imwrite(path, stack, photometric="minisblack")
    return path


def raw_events(run_dir):
    """{subdirectory: {tag: [(step, value)]}} of a run directory, in file order, duplicates and all."""
    return {
        ("" if directory == run_dir else directory.name): read_events(directory)[0]
        for directory in [run_dir, *sorted(path for path in run_dir.iterdir() if path.is_dir())]
    }


def steps(series):
    return [step for step, _ in series]


MAIN_THEN_REPORT = (
    "import sys, {module}\n"
    "try:\n    code = {module}.main(sys.argv[1:])\n"
    "finally:\n    print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
    "sys.exit(code)"
)


def run_command(module, arguments, **environment):
    """`module`.main(arguments) in a fresh process; its stdout ends with whether TensorFlow was
    imported, which says that a refusal came before it loaded (the seconds it would take)."""
    return subprocess.run(
        [sys.executable, "-c", MAIN_THEN_REPORT.format(module=module), *map(str, arguments)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **environment},
    )


@pytest.fixture
def untouched_stop_signals():
    """The stop signals' handlers as Python starts them, whatever this pytest inherited (nohup
    ignores SIGHUP, a background shell job SIGINT), restored after the test."""
    inherited = {signum: signal.getsignal(signum) for signum in cli.STOP_SIGNALS}
    for signum, untouched in cli.STOP_SIGNALS.items():
        signal.signal(signum, untouched)
    yield
    for signum, handler in inherited.items():
        signal.signal(signum, handler)
