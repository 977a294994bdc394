"""Train a U-Net on ISBI 2012 and watch it learn in TensorBoard.

    python train.py --loss bce --lr 1e-4
    tensorboard --logdir logs

Each run writes to its own directory <logdir>/<loss>_lr<lr>/ (a numbered sibling if that name is
taken) with the resolved configuration, the TensorBoard event files and the best and last
checkpoints, so that runs with other losses and learning rates sit side by side on the same plots.
A run that was killed or crashed continues with `python train.py --resume <run dir>`. The same
command trains on several GPUs or machines (`--strategy`, distribute.py) and on stacks larger than
memory (`--memmap`); see docs/scaling.md.

A run comes in two parts. First everything that can be checked without TensorFlow: the flags, the
run to resume, the stacks (shape, values, label polarity), the split and the log directory, so
that bad input is refused in about a second with one line. Then TensorFlow loads and the run
trains.
"""

import argparse
import contextlib
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

import cli
import data
import rundir
import settings
from settings import MULTIPLE

IMAGE_SLICES = 3  # validation slices shown as images
DATA_WORKERS = 2  # parallel calls building training batches
TENSORBOARD_PORT = 6006  # TensorBoard's default


# --- command line -------------------------------------------------------------------------------

def build_parser(prog="train.py"):
    parser = cli.ArgumentParser(prog, "Train a same-padded U-Net on ISBI 2012 and log the run to TensorBoard.")
    run = parser.add_argument_group("run")
    run.add_argument("--loss", choices=settings.LOSSES, default="bce", help="training loss")
    run.add_argument("--lr", type=cli.positive(float), default=1e-4, help="Adam learning rate")
    run.add_argument("--epochs", type=cli.positive(int),
                     help=f"number of epochs (default: {settings.DEFAULT_EPOCHS}; with --resume, the run's own)")
    run.add_argument("--steps-per-epoch", type=cli.positive(int), default=200, help="training batches per epoch")
    run.add_argument("--batch-size", type=cli.positive(int), default=4, help="crops per training batch")
    run.add_argument("--crop", type=cli.multiple_of(MULTIPLE, f"the U-Net halves it {settings.DEPTH} times"),
                     default=128, help=f"training crop size in pixels, a multiple of {MULTIPLE}")
    run.add_argument("--filters", type=cli.positive(int), default=16, help="filters of the first U-Net level; the paper has 64")
    run.add_argument("--seed", type=cli.seed, default=0, help="seed for weights, crops and augmentation")
    run.add_argument("--precision", choices=settings.PRECISIONS, default="auto",
                     help="Keras dtype policy; auto picks one for the device found, see docs/performance.md")
    run.add_argument("--strategy", choices=settings.STRATEGIES, default="auto",
                     help="tf.distribute strategy: mirrored = every GPU of this machine, multiworker = several "
                          "machines named by TF_CONFIG; auto picks one, see docs/scaling.md")
    where = parser.add_argument_group("data and logs")
    where.add_argument("--logdir", type=Path, default=Path("logs"), help="parent directory of the run directories")
    where.add_argument("--data", type=Path, default=data.DEFAULT_DATA_DIR,
                       help="directory of the ISBI 2012 TIFFs, downloaded there if missing")
    where.add_argument("--images", type=Path, help="your own image stack (multi-page TIFF) instead of ISBI's")
    where.add_argument("--labels", type=Path, help="your own binary mask stack, same shape as --images")
    where.add_argument("--labels-polarity", choices=settings.LABEL_POLARITIES, default="cells-high",
                       help="which of the two label values is cell: the higher (ISBI: 255 = cell, 0 = membrane) "
                            "or the lower; a stack that looks the other way round is refused")
    where.add_argument("--mirror", help=f"base URL to download ISBI 2012 from (http(s):// or file://); "
                                        f"default ${data.MIRROR_ENV} or GitHub")
    where.add_argument("--memmap", choices=settings.MEMMAP_CHOICES, default="auto",
                       help="read training crops straight from the TIFFs instead of loading them; auto does so for "
                            f"a stack larger than {settings.MEMMAP_SHARE:.0%} of this machine's memory")
    where.add_argument("--val-slices", type=cli.index_list,
                       help="comma-separated validation slice indices (default: three spread through the stack, "
                            "5,15,25 for ISBI)")
    board = parser.add_argument_group("TensorBoard")
    board.add_argument("--image-every", type=cli.positive(int), default=200, help="write prediction images every N training steps")
    board.add_argument("--histogram-freq", type=cli.non_negative_int, default=1,
                       help="write weight and activation histograms and PR curves every N epochs, 0 for never")
    board.add_argument("--eval-every", type=cli.non_negative_int, default=1,
                       help="score the whole validation slices as the ISBI challenge does (V_rand, V_info, "
                            "pixel error) every N epochs, 0 for never")
    board.add_argument("--update-freq", type=cli.positive(int), default=10, help="write batch-level scalars every N steps")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a run from its last checkpoint, with its own settings (only --epochs may "
                             "change, to train it further, and --strategy and --memmap, for the machine)")
    parser.add_argument("--accept-new-data", action="store_true",
                        help="with --resume: continue although the image or label file changed since the run started")
    parser.add_argument("--summary", type=Path, metavar="LOGDIR",
                        help="print one row per run under LOGDIR (loss, lr, steps, best and last validation "
                             "metrics) and exit")
    return parser


# --- before TensorFlow: the run to resume, the data, the split ------------------------------------

def resumable_config(run_dir):
    """The config.json of a run that --resume can continue."""
    config = rundir.read_config(run_dir)
    if not (Path(run_dir) / rundir.LAST).is_file():
        raise cli.InputError(f"{run_dir} has no {rundir.LAST}: it stopped before its first epoch ended (or an older "
                             "train.py ran it); start it anew")
    return config


def resumed_arguments(args, given, config):
    """The arguments of the run being resumed: its config.json, with --epochs, --strategy and
    --memmap as given. Any other flag given, even at its default value, is refused."""
    changed = sorted(f"--{name.replace('_', '-')}" for name in given
                     if name not in ("resume", "accept_new_data", *settings.RESUMABLE))
    if changed:
        raise cli.InputError(f"--resume continues a run with its own settings: drop {' '.join(changed)} "
                             "(start a new run to change them)")
    # Settings a run's config.json lacks (added to train.py after it started) keep their defaults.
    resumed = {**vars(args), **{name: config[name] for name in vars(args)
                                if name in config and name not in given and name not in ("resume", "accept_new_data")}}
    for name in ("logdir", "data", "images", "labels"):
        if resumed[name] is not None:
            resumed[name] = Path(resumed[name])
    return argparse.Namespace(**resumed)


def load_data(args):
    """(stacks, images path, labels path, the mirror downloaded from or None) of the chosen stacks,
    downloading ISBI 2012 if it is used and missing."""
    mirror = None
    if args.images is None and args.labels is None:
        names = ("train-volume.tif", "train-labels.tif")
        if data.missing_stacks(args.data, names):
            mirror = data.mirror_url(args.mirror)
            data.download_isbi2012(args.data, mirror)
    elif args.images is None or args.labels is None:
        raise cli.InputError("give --images and --labels together, or neither to use ISBI 2012")
    images_path = args.images or args.data / "train-volume.tif"
    labels_path = args.labels or args.data / "train-labels.tif"
    stacks = data.load_training_stacks(images_path, labels_path, data.memory_map_above(args.memmap),
                                        args.labels_polarity)
    if min(stacks.slice_shape) < args.crop:
        raise cli.InputError(f"--crop {args.crop} is larger than the {stacks.slice_shape[0]}x{stacks.slice_shape[1]} "
                             f"slices: use --crop {min(stacks.slice_shape) // MULTIPLE * MULTIPLE} or less")
    return stacks, images_path, labels_path, mirror


def check_data_unchanged(config, images_path, labels_path, accept_new_data):
    """Refuse to resume on image or label files that differ from those the run started with."""
    recorded = config.get("data_files", {})
    for name, path in (("images", images_path), ("labels", labels_path)):
        expected = recorded.get(f"{name}_sha256")
        if expected and not accept_new_data and data.sha256_of(path) != expected:
            raise cli.InputError(f"{path} has changed since the run started (its SHA-256 differs from config.json's): "
                                 "restore the file, or add --accept-new-data to continue on the new data")


def split(args, stacks, labels_path):
    """(training indices, validation indices, validation slices, their masks) of the stacks."""
    train_indices, val_indices = data.split_slices(len(stacks), args.val_slices)
    data.check_masks(stacks, train_indices, val_indices, labels_path)
    # Whole validation slices go through the net, which needs sides divisible by 2**DEPTH.
    val_images = np.stack([stacks.image(index) for index in val_indices])
    val_labels = np.stack([stacks.mask(index) for index in val_indices])
    return (train_indices, val_indices, data.trim_to_multiple(val_images, MULTIPLE),
            data.trim_to_multiple(val_labels, MULTIPLE))


def random_crops(args, stacks, train_indices):
    return data.RandomCrops(stacks, train_indices, args.batch_size, args.crop, args.seed)


def shown_slices(num_validation_slices):
    """Positions of the validation slices shown as images: up to IMAGE_SLICES, spread out."""
    return np.linspace(0, num_validation_slices - 1, min(IMAGE_SLICES, num_validation_slices)).round().astype(int)


# --- the run ------------------------------------------------------------------------------------

def start_run(args, logdir, command, inputs, setup, provenance):
    """A new run directory under `logdir` with its config.json."""
    stacks, images_path, labels_path, mirror, train_indices, val_indices = inputs
    run_dir = rundir.create(logdir, rundir.run_name(args.loss, args.lr))
    config = {**{name: value for name, value in vars(args).items() if name not in ("summary", "resume", "accept_new_data")},
              "mirror": mirror, "images": images_path, "labels": labels_path, "image_scaling": stacks.scaling.describe(),
              **setup, "run_dir": run_dir, "train_slices": train_indices, "val_slices": val_indices,
              "command": command, **provenance}
    try:
        rundir.save_config(run_dir, config)
    except cli.InputError:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, config


def stopped(error, run_dir, chief, new_run, lost_worker):
    """What to raise for `error`, raised while the run trained: one line that says how to go on.
    `lost_worker` is what the cluster lost if the error says so (distribute.lost_worker). A new run
    stopped by Ctrl-C or a write error before its first checkpoint is removed: there is nothing in
    it to resume."""
    checkpoint = (run_dir / rundir.LAST).is_file()
    removed = chief and new_run and not checkpoint and isinstance(error, (KeyboardInterrupt, cli.InputError, OSError))
    if removed:
        shutil.rmtree(run_dir, ignore_errors=True)
    go_on = (f"continue the run from its last checkpoint with --resume {run_dir}" if checkpoint
             else f"no epoch of {run_dir} had ended, so nothing was kept: start the run again" if removed
             else "it stopped before its first epoch ended: start it again")
    if lost_worker:
        return cli.Stopped(f"the cluster lost a worker ({lost_worker}); "
                           + (go_on + (" on every worker" if checkpoint else "") if chief else "the chief says how to go on"))
    if isinstance(error, KeyboardInterrupt):
        return cli.Interrupted(go_on)
    if isinstance(error, OSError):
        return cli.InputError(f"cannot write in {run_dir} ({error.strerror or error}): free some space or fix its "
                              f"permissions; {go_on}")
    return error


def train(args, given, command):
    """Run a training, or with --resume continue one; return its run directory (None on a worker
    other than the chief)."""
    if args.accept_new_data and args.resume is None:
        raise cli.InputError("--accept-new-data goes with --resume: a new run records the data it starts with")
    config = None if args.resume is None else resumable_config(args.resume)
    if config is not None:
        args = resumed_arguments(args, given, config)
    args.epochs = args.epochs or settings.DEFAULT_EPOCHS
    stacks, images_path, labels_path, mirror = load_data(args)
    if config is not None:
        check_data_unchanged(config, images_path, labels_path, args.accept_new_data)
    train_indices, val_indices, val_images, val_labels = split(args, stacks, labels_path)
    if args.resume is None:
        rundir.writable_directory(args.logdir)
    inputs = (stacks, images_path, labels_path, mirror, train_indices, val_indices)

    # TensorFlow takes seconds to load: only now, once every input above is known to be good.
    import keras

    import callbacks
    import device
    import distribute
    import resume
    import runs
    import unet

    strategy = distribute.make_strategy(args.strategy)  # first: it may configure TensorFlow's runtime
    chief = distribute.is_chief(strategy)
    keras.utils.set_random_seed(args.seed)
    setup = device.machine_setup(args.precision, args.batch_size, strategy)
    new_run = args.resume is None or not chief  # a worker other than the chief writes a run of its own
    run_dir, fitting = None, False
    try:
        with contextlib.ExitStack() as held:
            logdir = held.enter_context(distribute.log_directory(strategy, args.logdir))
            with strategy.scope():
                if new_run:
                    run_dir, config = start_run(args, logdir, command, inputs, setup,
                                                runs.provenance(images_path, labels_path))
                held.enter_context(rundir.locked(run_dir if new_run else args.resume))
                if args.resume is None:
                    model, initial_epoch, reached = unet.compiled_unet(args.filters, args.loss, args.lr, setup["jit_compile"]), 0, {}
                elif chief:
                    run_dir = args.resume
                    if args.accept_new_data:  # the new data is the run's from now on
                        config["data_files"] = runs.provenance(images_path, labels_path)["data_files"]
                    model, initial_epoch, reached = resume.continue_run(run_dir, config, args.epochs, command, setup)
                else:
                    model, initial_epoch = resume.restore_model(args.resume, config)
                    reached = resume.reached(args.resume)
            model.jit_compile = setup["jit_compile"]

            print(f"device: {config['device']}; precision {config['precision']}, XLA {'on' if config['jit_compile'] else 'off'}")
            print(f"distribution: {config['distribution']}; global batch {config['global_batch_size']} crops")
            print(f"slices: {len(train_indices)} training, validation {runs.describe_slices(val_indices)} "
                  f"of {len(stacks)} in {images_path}" + (" (memory-mapped)" if isinstance(stacks.images, np.memmap) else ""))
            if chief:
                print(f"run directory: {run_dir}" + (f" (resumed after epoch {initial_epoch})" if initial_epoch else ""))
                print(f"watch it with: tensorboard --logdir {args.logdir}, then open "
                      f"http://localhost:{TENSORBOARD_PORT}/#custom_scalars to compare the runs")
            else:
                print(f"this worker logs to {logdir}, removed at the end; the chief writes the run")

            stop = callbacks.StopOnNonFiniteLoss()
            shown = shown_slices(len(val_indices))
            fitting = True
            # shuffle=False: the batches come in the order of their seeds (Keras would only warn that it
            # cannot shuffle a tf.data pipeline).
            history = model.fit(
                distribute.training_batches(strategy, random_crops(args, stacks, train_indices), args.steps_per_epoch,
                                            initial_epoch, DATA_WORKERS),
                epochs=args.epochs, initial_epoch=initial_epoch, steps_per_epoch=args.steps_per_epoch, shuffle=False,
                callbacks=callbacks.for_run(args, run_dir, (val_images, val_labels, val_indices), shown, reached, stop,
                                            runs.hyperparameters(config), runs.run_documents(config)))
    except BaseException as error:
        if run_dir is None:  # nothing of the run is on disk yet
            raise
        if fitting:
            cli.end_progress_line()
        raise stopped(error, run_dir, chief, new_run, distribute.lost_worker(error)) from None
    if not chief:
        if stop.message:
            raise cli.Stopped(f"{stop.message}; the chief says how to go on")
        print("this worker has finished; the chief wrote the run")
        return None
    if stop.message:
        if (run_dir / rundir.LAST).is_file():
            raise cli.Stopped(f"{stop.message}; the last good checkpoint, {run_dir / rundir.LAST}, is kept: "
                              f"lower --lr and start again, or continue from it with --resume {run_dir}")
        raise cli.Stopped(f"{stop.message}, before any epoch ended: start again with a lower --lr")

    fractions = history.history["val_misclassified_pixel_fraction"] + [reached.get("misclassified_pixel_fraction", np.inf)]
    v_rands = history.history.get("val_v_rand", []) + ([reached["v_rand"]] if "v_rand" in reached else [])
    print(f"best validation misclassified-pixel fraction {min(fractions):.4f}"
          + (f", best validation V_rand {max(v_rands):.4f}" if v_rands else "")
          + f"; checkpoints {run_dir / rundir.BEST}, {run_dir / rundir.LAST}")
    return run_dir


def print_summary(logdir):
    if not Path(logdir).is_dir():
        raise cli.InputError(f"{logdir} is not a directory: give the --logdir of your training runs")
    import runs  # reads event files with TensorBoard's loader, which loads TensorFlow

    rows = runs.summarize(logdir)
    if not rows:
        raise cli.InputError(f"no runs in {logdir}: give the --logdir of your training runs")
    print(runs.format_table(rows))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, given = cli.parse_with_given(build_parser(), argv)
    if args.summary:
        return cli.run("train.py", lambda: print_summary(args.summary))
    return cli.run("train.py", lambda: train(args, given, shlex.join(["python", "train.py", *argv])))


if __name__ == "__main__":
    sys.exit(main())
