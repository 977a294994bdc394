"""The command line of a run: train.py's flags, their types, domains and defaults (settings.py),
the recipes of several flags (--preset, settings.PRESETS),
and their help. bench.py takes the same flags, to measure a run as train.py would train it."""

import argparse
import json
import os
from pathlib import Path

import cli
import data
import settings
from settings import DEFAULTS, MULTIPLE


def describe(values):
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in values.items())


def with_preset(args, given):
    """`args` with the values of its --preset for the flags that `given` lacks."""
    if args.preset is None:
        return args
    args = argparse.Namespace(**vars(args))
    for name, value in settings.PRESETS[args.preset].items():
        if name not in given:
            setattr(args, name, value)
    return args


def run_directory_name(text):
    """A name for a run directory: one directory in --logdir, not hidden."""
    if not text or text.startswith(".") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"{text!r} is no directory name: give a name such as bce_lr1e-4_seed1")
    return text


def cluster_tasks(strategy):
    """The number of training processes (chief and workers) that TF_CONFIG names, 0 without it;
    InputError, before TensorFlow loads, for a TF_CONFIG that `--strategy strategy` cannot start
    with (TensorFlow would fail later, in words about gRPC or a missing key)."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        if strategy == "multiworker":
            raise cli.InputError(
                "--strategy multiworker needs TF_CONFIG naming the cluster and this process's task: see docs/scaling.md"
            )
        return 0
    try:
        config = json.loads(text)
        cluster = {role: list(config["cluster"].get(role, [])) for role in ("chief", "worker")}
        if not all(
            isinstance(address, str) and address.rpartition(":")[2].isdigit()
            for addresses in cluster.values()
            for address in addresses
        ):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise cli.InputError(
            f'TF_CONFIG is not valid JSON with a "cluster" of host:port addresses '
            f"({text[:60]!r}): see docs/scaling.md for its form"
        ) from None
    tasks = sum(map(len, cluster.values()))
    if strategy == "multiworker" or (strategy == "auto" and tasks > 1):
        task = config.get("task")
        role, index = (task.get("type"), task.get("index")) if isinstance(task, dict) else (None, None)
        if role not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[role]):
            raise cli.InputError(
                f"TF_CONFIG's \"task\" ({json.dumps(task)}) is not one of its cluster's "
                f'{tasks} processes: give each process its own {{"type": "worker", "index": i}} '
                "(see docs/scaling.md)"
            )
    return tasks


def check_recorded(config, path):
    """InputError if a run's config.json (at `path`) records a setting that its flag would refuse:
    a hand edit that would otherwise end in a traceback or a silently wrong run."""
    parser = build_parser(exit_on_error=False)
    for name in vars(parser.parse_args([])):
        value = config.get(name)
        if name in (*settings.COMMAND_FLAGS, *settings.PATHS) or value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        try:
            recorded = getattr(parser.parse_args([f"--{name.replace('_', '-')}", text]), name)
        except argparse.ArgumentError as error:
            why = error.message
        else:
            if recorded == value:
                continue
            why = f"not a {type(recorded).__name__}"
        raise cli.InputError(
            f"{path} records {name} {value!r}, which train.py refuses ({why}): restore it, or move "
            "the run out of the way"
        )


def build_parser(prog="train.py", exit_on_error=True):
    parser = cli.ArgumentParser(
        prog, "Train a same-padded U-Net on ISBI 2012 and log the run to TensorBoard.", exit_on_error=exit_on_error
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--preset",
        choices=tuple(settings.PRESETS),
        help="a recipe of several flags, each overridable: "
        + "; ".join(f"{name} = {describe(values)}" for name, values in settings.PRESETS.items()),
    )
    run.add_argument("--loss", choices=settings.LOSSES, default=DEFAULTS["loss"], help="training loss")
    run.add_argument("--lr", type=cli.positive_float32, default=DEFAULTS["lr"], help="Adam learning rate")
    run.add_argument(
        "--ema",
        type=cli.fraction_below_one,
        default=DEFAULTS["ema"],
        metavar="MOMENTUM",
        help="momentum of an exponential moving average of the weights that validation, checkpoints "
        "and the epoch's histograms see instead of the last step's weights (steadier curves, see "
        "docs/performance.md); 0 for none",
    )
    run.add_argument(
        "--epochs",
        type=cli.positive(int),
        help=f"number of epochs (default: {DEFAULTS['epochs']}; with --resume, the run's own)",
    )
    run.add_argument(
        "--steps-per-epoch",
        type=cli.positive(int),
        default=DEFAULTS["steps_per_epoch"],
        help="training batches per epoch",
    )
    run.add_argument(
        "--batch-size", type=cli.positive(int), default=DEFAULTS["batch_size"], help="crops per training batch"
    )
    run.add_argument(
        "--crop",
        type=cli.multiple_of(MULTIPLE, f"the U-Net halves it {settings.DEPTH} times"),
        default=DEFAULTS["crop"],
        help=f"training crop size in pixels, a multiple of {MULTIPLE}",
    )
    run.add_argument(
        "--filters",
        type=cli.positive(int),
        default=DEFAULTS["filters"],
        help="filters of the first U-Net level; the paper has 64",
    )
    run.add_argument(
        "--dropout",
        type=cli.fraction_below_one,
        default=DEFAULTS["dropout"],
        help="dropout rate after the bottleneck's convolutions, as in the paper (0.5); 0 for none",
    )
    run.add_argument("--seed", type=cli.seed, default=DEFAULTS["seed"], help="seed for weights, crops and augmentation")
    run.add_argument(
        "--precision",
        choices=settings.PRECISIONS,
        default=DEFAULTS["precision"],
        help="Keras dtype policy; auto picks one for the device found, see docs/performance.md",
    )
    run.add_argument(
        "--strategy",
        choices=settings.STRATEGIES,
        default=DEFAULTS["strategy"],
        help="tf.distribute strategy: mirrored = every GPU of this machine, multiworker = several "
        "machines named by TF_CONFIG; auto picks one, see docs/scaling.md",
    )
    where = parser.add_argument_group("data and logs")
    where.add_argument("--logdir", type=Path, default=Path("logs"), help="parent directory of the run directories")
    where.add_argument(
        "--name",
        type=run_directory_name,
        help="the run directory's name in --logdir (default: loss and learning rate, e.g. bce_lr1e-4); "
        "a taken name gets _2, _3, ...",
    )
    where.add_argument(
        "--data",
        type=Path,
        default=data.DEFAULT_DATA_DIR,
        help="directory of the ISBI 2012 TIFFs, downloaded there if missing",
    )
    where.add_argument("--images", type=Path, help="your own image stack (multi-page TIFF) instead of ISBI's")
    where.add_argument("--labels", type=Path, help="your own binary mask stack, same shape as --images")
    where.add_argument(
        "--labels-polarity",
        choices=settings.LABEL_POLARITIES,
        default=DEFAULTS["labels_polarity"],
        help="which of the two label values is cell: the higher (ISBI: 255 = cell, 0 = membrane) "
        "or the lower; a stack that looks the other way round is refused",
    )
    where.add_argument(
        "--mirror",
        help=f"base URL to download ISBI 2012 from (http(s):// or file://); default ${data.MIRROR_ENV} or GitHub",
    )
    where.add_argument(
        "--memmap",
        choices=settings.MEMMAP_CHOICES,
        default=DEFAULTS["memmap"],
        help="read training crops straight from the TIFFs instead of loading them; auto does so for "
        f"a stack larger than {settings.MEMMAP_SHARE:.0%} of this machine's memory",
    )
    where.add_argument(
        "--val-slices",
        type=cli.index_list,
        help="comma-separated validation slice indices (default: three spread through the stack, 5,15,25 for ISBI)",
    )
    board = parser.add_argument_group("TensorBoard")
    board.add_argument(
        "--image-every",
        type=cli.positive(int),
        default=DEFAULTS["image_every"],
        help="write prediction images every N training steps (default: at the end of each epoch)",
    )
    board.add_argument(
        "--histogram-freq",
        type=cli.non_negative_int,
        default=DEFAULTS["histogram_freq"],
        help="write weight and activation histograms and PR curves every N epochs, 0 for never",
    )
    board.add_argument(
        "--eval-every",
        type=cli.non_negative_int,
        default=DEFAULTS["eval_every"],
        help="score the whole validation slices as the ISBI challenge does (V_rand, V_info, "
        "pixel error) at the first epoch, every N epochs after it and the last, 0 for never",
    )
    board.add_argument(
        "--update-freq",
        type=cli.positive(int),
        default=DEFAULTS["update_freq"],
        help="write batch-level scalars every N steps",
    )
    board.add_argument(
        "--profile-batch",
        type=cli.step_range,
        metavar="START,STOP",
        help="trace training steps START to STOP, or one step N (as TensorBoard's step axis counts "
        "them), with TensorFlow's profiler, for TensorBoard's Profile tab (docs/performance.md); off by default",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a run from its last checkpoint, with its own settings (only --epochs may "
        "change, to train it further, and --strategy and --memmap, for the machine)",
    )
    parser.add_argument(
        "--accept-new-data",
        action="store_true",
        help="with --resume: continue although the image or label file changed since the run started",
    )
    parser.add_argument(
        "--summary",
        type=Path,
        metavar="LOGDIR",
        help="print one row per run under LOGDIR (loss, lr, steps, best and last validation metrics) and exit",
    )
    return parser
