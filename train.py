"""Train a U-Net on ISBI 2012 and watch it learn in TensorBoard.

    python train.py --loss bce --lr 1e-4
    tensorboard --logdir logs

Each run writes to its own directory <logdir>/<loss>_lr<lr>/ (a numbered sibling if that name is
taken) with the resolved configuration, the TensorBoard event files and the best and last
checkpoints, so that runs with other losses and learning rates sit side by side on the same plots.
A run that was killed or crashed continues with `python train.py --resume <run dir>`. The same
command trains on several GPUs or machines (`--strategy`, distribute.py) and on stacks larger than
memory (`--memmap`); see README, "Scaling out".
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the way

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import data
import distribute
import metrics
import resume
import runs
from callbacks import RunSummary, TensorBoard, Validation, ValidationSliceSummaries
from unet import DEPTH, build_unet

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
DEFAULT_EPOCHS = 15
IMAGE_SLICES = 3  # validation slices shown as images
DATA_WORKERS = 2  # parallel calls building training batches
MEMMAP_CHOICES = ("auto", "on", "off")
MEMMAP_SHARE = 0.25  # --memmap auto maps a stack larger than this share of the machine's memory
MACHINE_SETTINGS = ("strategy", "memmap")  # may differ when a run is resumed elsewhere


class SetupError(Exception):
    """A run that cannot start; the message names the problem and the fix in one line."""


class TrainingStopped(Exception):
    """A run stopped before its last epoch; the message says why and how to go on."""


# --- command line -----------------------------------------------------------------------------

def checked_number(kind, text, condition, requirement):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
    if not condition(value):  # a NaN fails every condition
        raise argparse.ArgumentTypeError(f"{text!r} must be {requirement}")
    return value


def positive(kind):
    return lambda text: checked_number(kind, text, lambda value: value > 0, "greater than 0")


def non_negative_int(text):
    return checked_number(int, text, lambda value: value >= 0, "0 or more")


def crop_size(text):
    value = positive(int)(text)
    if value % 2**DEPTH:
        raise argparse.ArgumentTypeError(
            f"{value} is not a multiple of {2**DEPTH} (the U-Net halves it {DEPTH} times); "
            f"try {max(2**DEPTH, value - value % 2**DEPTH)}")
    return value


def slice_list(text):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of slice indices") from None


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a same-padded U-Net on ISBI 2012 and log the run to TensorBoard.")
    run = parser.add_argument_group("run")
    run.add_argument("--loss", choices=sorted(metrics.LOSSES), default="bce", help="training loss (default: %(default)s)")
    run.add_argument("--lr", type=positive(float), default=1e-4, help="Adam learning rate (default: %(default)g)")
    run.add_argument("--epochs", type=positive(int), help=f"number of epochs (default: {DEFAULT_EPOCHS}; "
                     "with --resume, the run's own)")
    run.add_argument("--steps-per-epoch", type=positive(int), default=200, help="training batches per epoch (default: %(default)s)")
    run.add_argument("--batch-size", type=positive(int), default=4, help="crops per training batch (default: %(default)s)")
    run.add_argument("--crop", type=crop_size, default=128, help=f"training crop size in pixels, a multiple of {2**DEPTH} (default: %(default)s)")
    run.add_argument("--filters", type=positive(int), default=16, help="filters of the first U-Net level; the paper has 64 (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed for weights, crops and augmentation (default: %(default)s)")
    run.add_argument("--precision", choices=PRECISIONS, default="auto",
                     help="Keras dtype policy; auto picks one for the device found, see README (default: %(default)s)")
    run.add_argument("--strategy", choices=distribute.STRATEGIES, default="auto",
                     help="tf.distribute strategy: mirrored = every GPU of this machine, multiworker = several "
                          "machines named by TF_CONFIG; auto picks one, see README (default: %(default)s)")
    where = parser.add_argument_group("data and logs")
    where.add_argument("--logdir", type=Path, default=Path("logs"), help="parent directory of the run directories (default: %(default)s)")
    where.add_argument("--data", type=Path, default=data.DEFAULT_DATA_DIR,
                       help="directory of the ISBI 2012 TIFFs, downloaded there if missing (default: %(default)s)")
    where.add_argument("--images", type=Path, help="your own image stack (multi-page TIFF) instead of ISBI's")
    where.add_argument("--labels", type=Path, help="your own binary mask stack, same shape as --images")
    where.add_argument("--mirror", help=f"base URL to download ISBI 2012 from (http(s):// or file://); default ${data.MIRROR_ENV} or GitHub")
    where.add_argument("--memmap", choices=MEMMAP_CHOICES, default="auto",
                       help="read training crops straight from the TIFFs instead of loading them; auto does so for "
                            f"a stack larger than {MEMMAP_SHARE:.0%} of this machine's memory (default: %(default)s)")
    where.add_argument("--val-slices", type=slice_list,
                       help="comma-separated validation slice indices (default: three spread through the stack, 5,15,25 for ISBI)")
    board = parser.add_argument_group("TensorBoard")
    board.add_argument("--image-every", type=positive(int), default=200, help="write prediction images every N training steps (default: %(default)s)")
    board.add_argument("--histogram-freq", type=non_negative_int, default=1, help="write weight and activation histograms and PR curves every N epochs, 0 for never (default: %(default)s)")
    board.add_argument("--eval-every", type=non_negative_int, default=1,
                       help="score the whole validation slices as the ISBI challenge does (V_rand, V_info, "
                            "pixel error) every N epochs, 0 for never (default: %(default)s)")
    board.add_argument("--update-freq", type=positive(int), default=10, help="write batch-level scalars every N steps (default: %(default)s)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a run from its last checkpoint, with its own settings (only --epochs may "
                             "change, to train it further, and --strategy and --memmap, for the machine)")
    parser.add_argument("--summary", type=Path, metavar="LOGDIR",
                        help="print one row per run under LOGDIR (loss, lr, steps, best and last validation "
                             "metrics) and exit")
    # One line naming the problem, as for every other bad input.
    parser.error = lambda message: (print(f"train.py: error: {message} (see --help)", file=sys.stderr), sys.exit(2))
    return parser


# --- device -----------------------------------------------------------------------------------

def cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def device_settings(precision):
    """(dtype policy, jit_compile, device description) for the accelerator or CPU found.

    On a CPU with AMX or AVX-512 bf16 units, bf16 convolutions run several times faster than
    float32; without them (AVX2 only) bf16 is emulated and about 8x slower. XLA slows this
    U-Net down on CPUs, so it is used on GPUs only.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        device = f"{len(gpus)} GPU(s), compute capability {capability[0]}.{capability[1]}"
        best = "mixed_bfloat16" if capability >= (8, 0) else "mixed_float16" if capability >= (7, 0) else "float32"
        jit = True
    else:
        bf16_units = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
        device = f"CPU ({', '.join(bf16_units) or 'no bf16 units'})"
        best = "mixed_bfloat16" if bf16_units else "float32"
        jit = False
    return (best if precision == "auto" else precision), jit, device


# --- run directory ----------------------------------------------------------------------------

def run_name(loss, lr):
    """`bce_lr1e-4`: the shortest exact scientific form, so distinct rates never share a name."""
    return f"{loss}_lr{np.format_float_scientific(lr, trim='-', exp_digits=1)}"


def create_run_directory(logdir, name):
    """Create <logdir>/<name>, or <name>_2, _3, ... if taken; never reuses an existing directory."""
    try:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10_000):
            path = Path(logdir) / (name if attempt == 1 else f"{name}_{attempt}")
            try:
                path.mkdir()  # atomic: two runs starting together cannot both get it
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise SetupError(f"cannot create a run directory in {logdir} ({error.strerror}): choose a writable --logdir") from None
    raise SetupError(f"{logdir} already holds 9999 runs named {name}: choose another --logdir")


def save_config(run_dir, config):
    """config.json, replaced atomically: a resumed run rewrites it."""
    with data.replaced_atomically(run_dir / "config.json") as temporary:
        temporary.write_text(json.dumps(config, indent=2, default=str))


def resumed_arguments(args, config):
    """The arguments of the run being resumed: its config.json, with --epochs, --strategy and
    --memmap as given."""
    parser = build_parser()
    changed = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
               if name not in ("resume", "epochs", *MACHINE_SETTINGS) and value != parser.get_default(name)]
    if changed:
        raise SetupError(f"--resume continues a run with its own settings: drop {' '.join(changed)} "
                         "(start a new run to change them)")
    # Settings a run's config.json lacks (added to train.py after it started) keep their defaults.
    resumed = {**vars(args), **{name: config[name] for name in vars(args) if name in config and name not in MACHINE_SETTINGS}}
    for name in ("logdir", "data", "images", "labels"):
        if resumed[name] is not None:
            resumed[name] = Path(resumed[name])
    return argparse.Namespace(**{**resumed, "resume": args.resume, "epochs": args.epochs or config["epochs"]})


# --- the run ----------------------------------------------------------------------------------

def memory_map_above(memmap):
    """The stack size in bytes above which --memmap `memmap` reads crops straight from the file."""
    if memmap == "auto":
        return MEMMAP_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0 if memmap == "on" else math.inf


def load_data(args):
    """(stacks, images path, labels path) of the chosen stacks, downloading ISBI 2012 if it is used
    and missing."""
    if args.images is None and args.labels is None:
        data.ensure_isbi2012(args.data, args.mirror, names=("train-volume.tif", "train-labels.tif"))
    elif args.images is None or args.labels is None:
        raise SetupError("give --images and --labels together, or neither to use ISBI 2012")
    images_path = args.images or args.data / "train-volume.tif"
    labels_path = args.labels or args.data / "train-labels.tif"
    stacks = data.load_training_stacks(images_path, labels_path, memory_map_above(args.memmap))
    if min(stacks.slice_shape) < args.crop:
        raise SetupError(f"--crop {args.crop} is larger than the {stacks.slice_shape[0]}x{stacks.slice_shape[1]} "
                         f"slices: use --crop {min(stacks.slice_shape) // 2**DEPTH * 2**DEPTH} or less")
    return stacks, images_path, labels_path


def split(args, stacks):
    """(training indices, validation indices, validation slices, their masks) of the stacks."""
    train_indices, val_indices = data.split_slices(len(stacks), args.val_slices)
    # Whole validation slices go through the net, which needs sides divisible by 2**DEPTH.
    val_images = np.stack([stacks.image(index) for index in val_indices])
    val_labels = np.stack([stacks.mask(index) for index in val_indices])
    return (train_indices, val_indices, data.trim_to_multiple(val_images, 2**DEPTH),
            data.trim_to_multiple(val_labels, 2**DEPTH))


def random_crops(args, stacks, train_indices):
    return data.RandomCrops(stacks, train_indices, args.batch_size, args.crop, args.seed)


def training_batches(strategy, args, crops, first_epoch):
    """The training batches from epoch `first_epoch` on, one stream per replica: the crops of epoch
    k are the same whether or not the run was resumed before it."""
    return strategy.distribute_datasets_from_function(
        lambda context: data.replica_batches(crops, args.steps_per_epoch, first_epoch, context, DATA_WORKERS))


def compile_model(args, jit_compile):
    model = build_unet(filters=args.filters)
    model.compile(optimizer=keras.optimizers.Adam(args.lr), loss=metrics.LOSSES[args.loss],
                  metrics=metrics.training_metrics(), jit_compile=jit_compile)
    return model


def shown_slices(num_validation_slices):
    """Positions of the validation slices shown as images: up to IMAGE_SLICES, spread out."""
    return np.linspace(0, num_validation_slices - 1, min(IMAGE_SLICES, num_validation_slices)).round().astype(int)


def make_callbacks(args, run_dir, config, val_images, val_labels, val_indices, best, stop):
    shown = shown_slices(len(val_indices))
    return [
        # Before TensorBoard, which writes the scores it adds to the epoch logs.
        Validation(val_images, val_labels, metrics.LOSSES[args.loss], metrics.training_metrics(), args.eval_every),
        TensorBoard(log_dir=str(run_dir), histogram_freq=args.histogram_freq, write_graph=True,
                    update_freq=args.update_freq),
        ValidationSliceSummaries(run_dir / "validation_slices", val_images[shown], val_labels[shown],
                                 [val_indices[i] for i in shown], image_every=args.image_every,
                                 histogram_every=args.histogram_freq),
        RunSummary(run_dir, run_dir.name, runs.hyperparameters(config), runs.run_documents(config), best),
        stop,
        # Last: a checkpoint is written only once everything the epoch logged is on disk.
        resume.Checkpoints(run_dir, best.get("misclassified_pixel_fraction", float("inf"))),
    ]


def start_run(args, logdir, command, images_path, labels_path, train_indices, val_indices, setup):
    """A new run directory under `logdir` with its config.json."""
    run_dir = create_run_directory(logdir, run_name(args.loss, args.lr))
    config = {**{name: value for name, value in vars(args).items() if name not in ("summary", "resume")},
              "images": images_path, "labels": labels_path, **setup, "run_dir": run_dir,
              "train_slices": train_indices, "val_slices": val_indices,
              "command": command,
              **runs.provenance(images_path, labels_path, data.mirror_url(args.mirror) if args.images is None else None)}
    save_config(run_dir, config)
    return run_dir, config


def best_so_far(run_dir):
    """The best validation values a run logged, from its event files."""
    return RunSummary.best_of(runs.read_scalars(run_dir / "validation") if (run_dir / "validation").is_dir() else {})


def continue_run(run_dir, config, args, command, setup):
    """(model, completed epochs, best values so far) of a run to resume, its event files cut back
    to its last checkpoint and its config.json updated."""
    model, initial_epoch = resume.restore_model(run_dir, config)
    if initial_epoch >= args.epochs:
        raise SetupError(f"{run_dir} has finished its {initial_epoch} epochs: give --epochs with more to train it further")
    resume.remove_leftovers(run_dir)
    resume.cut_event_files(run_dir, initial_epoch, int(model.optimizer.iterations.numpy()))
    config.update(epochs=args.epochs, resumed=[*config.get("resumed", []), command], **setup)
    save_config(run_dir, config)
    return model, initial_epoch, best_so_far(run_dir)


def machine_setup(args, strategy):
    """What the run does on this machine, for config.json: precision (set as Keras' global policy),
    XLA, device, distribution and global batch."""
    precision, jit_compile, device = device_settings(args.precision)
    keras.mixed_precision.set_global_policy(precision)
    return {"precision": precision, "jit_compile": jit_compile, "device": device,
            "distribution": distribute.describe(strategy),
            "global_batch_size": args.batch_size * strategy.num_replicas_in_sync}


def prepare_model(strategy, args, resumed_config, logdir, command, paths, split_indices):
    """(model, completed epochs, best values so far, run directory, config) of a new run, or of the
    run to resume; its variables live on the strategy's replicas.

    A worker other than the chief only reads a run it resumes: it writes to a run directory of
    its own under `logdir`, a temporary directory."""
    setup = machine_setup(args, strategy)
    jit_compile = setup["jit_compile"]
    chief = distribute.is_chief(strategy)
    with strategy.scope():
        if args.resume is None or not chief:
            run_dir, config = start_run(args, logdir, command, *paths, *split_indices, setup)
        if args.resume is None:
            model, initial_epoch, best = compile_model(args, jit_compile), 0, {}
        elif chief:
            run_dir, config = args.resume, resumed_config
            model, initial_epoch, best = continue_run(run_dir, config, args, command, setup)
        else:
            model, initial_epoch = resume.restore_model(args.resume, config)
            best = best_so_far(args.resume)
    model.jit_compile = jit_compile
    return model, initial_epoch, best, run_dir, config


def train(args, command):
    """Run a training, or with --resume continue one; return its run directory (None on a worker
    other than the chief)."""
    resumed_config = None if args.resume is None else resume.run_config(args.resume)
    if resumed_config is not None:
        args = resumed_arguments(args, resumed_config)
    args.epochs = args.epochs or DEFAULT_EPOCHS
    strategy = distribute.make_strategy(args.strategy)  # first: it may configure TensorFlow's runtime
    chief = distribute.is_chief(strategy)
    keras.utils.set_random_seed(args.seed)

    stacks, images_path, labels_path = load_data(args)
    train_indices, val_indices, val_images, val_labels = split(args, stacks)

    with distribute.log_directory(strategy, args.logdir) as logdir:
        model, initial_epoch, best, run_dir, config = prepare_model(
            strategy, args, resumed_config, logdir, command, (images_path, labels_path), (train_indices, val_indices))
        print(f"device: {config['device']}; precision {config['precision']}, XLA {'on' if config['jit_compile'] else 'off'}")
        print(f"distribution: {config['distribution']}; global batch {config['global_batch_size']} crops")
        print(f"slices: {len(train_indices)} training, validation {runs.describe_slices(val_indices)} "
              f"of {len(stacks)} in {images_path}" + (" (memory-mapped)" if isinstance(stacks.images, np.memmap) else ""))
        if chief:
            print(f"run directory: {run_dir}" + (f" (resumed after epoch {initial_epoch})" if initial_epoch else ""))
            print(f"watch it with: tensorboard --logdir {args.logdir}")
        else:
            print(f"this worker logs to {logdir}, removed at the end; the chief writes the run")

        stop = resume.StopOnNonFiniteLoss()
        # shuffle=False: the batches come in the order of their seeds (Keras would only warn that it
        # cannot shuffle a tf.data pipeline).
        try:
            history = model.fit(training_batches(strategy, args, random_crops(args, stacks, train_indices), initial_epoch),
                                epochs=args.epochs, initial_epoch=initial_epoch, steps_per_epoch=args.steps_per_epoch,
                                shuffle=False, callbacks=make_callbacks(args, run_dir, config, val_images, val_labels,
                                                                        val_indices, best, stop))
        except tf.errors.UnavailableError as error:  # a worker of the cluster died or cannot be reached
            how = ("the chief says how to go on" if not chief else
                   f"continue the run from its last checkpoint with --resume {run_dir} on every worker"
                   if (run_dir / resume.LAST).is_file() else "it stopped before its first epoch ended: start it again")
            raise TrainingStopped(f"the cluster lost a worker ({distribute.lost_worker(error)}); {how}") from None
    if not chief:
        if stop.message:
            raise TrainingStopped(f"{stop.message}; the chief says how to go on")
        print("this worker has finished; the chief wrote the run")
        return None
    if stop.message:
        if (run_dir / resume.LAST).is_file():
            raise TrainingStopped(f"{stop.message}; the last good checkpoint, {run_dir / resume.LAST}, is kept: "
                                  f"lower --lr and start again, or continue from it with --resume {run_dir}")
        raise TrainingStopped(f"{stop.message}, before any epoch ended: start again with a lower --lr")

    fractions = history.history["val_misclassified_pixel_fraction"] + [best.get("misclassified_pixel_fraction", np.inf)]
    v_rands = history.history.get("val_v_rand", []) + ([best["v_rand"]] if "v_rand" in best else [])
    print(f"best validation misclassified-pixel fraction {min(fractions):.4f}"
          + (f", best validation V_rand {max(v_rands):.4f}" if v_rands else "")
          + f"; checkpoints {run_dir / resume.BEST}, {run_dir / resume.LAST}")
    return run_dir


def print_summary(logdir):
    rows = runs.summarize(logdir)
    if not rows:
        print(f"train.py: error: no runs in {logdir}: give the --logdir of your training runs", file=sys.stderr)
        return 2
    print(runs.format_table(rows))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.summary:
        return print_summary(args.summary)
    try:
        train(args, shlex.join(["python", "train.py", *argv]))
    except (data.DataError, SetupError, resume.ResumeError, distribute.ClusterError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"train.py: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted; the run continues from its last checkpoint with --resume <run dir>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
