"""Train a U-Net on ISBI 2012 and watch it learn in TensorBoard.

    python train.py --loss bce --lr 1e-4
    tensorboard --logdir logs

Each run writes to its own directory <logdir>/<loss>_lr<lr>/ (or --name; a numbered sibling if
that name is taken) with the resolved configuration, the TensorBoard event files and the best and last
checkpoints, so that runs with other losses and learning rates sit side by side on the same plots.
A run that was killed or crashed continues with `python train.py --resume <run dir>`. The same
command trains on several GPUs or machines (`--strategy`, distribute.py) and on stacks larger than
memory (`--memmap`); see docs/scaling.md.

A run comes in two parts. First everything that can be checked without TensorFlow: the flags
(flags.py), the run to resume, the stacks and the split (inputs.py) and the log directory, so
that bad input is refused in about a second with one line. Then TensorFlow loads and the run
trains.
"""

import argparse
import contextlib
import re
import shlex
import sys
from pathlib import Path

import numpy as np

import cli
import data
import files
import flags
import inputs
import rundir
import settings

TENSORBOARD_PORT = 6006  # TensorBoard's default
# The comparison dashboard, unsmoothed: TensorBoard's default smoothing (0.6) draws a near-tie of
# short runs as a gap, and reads its weight from the URL.
DASHBOARD = "#custom_scalars&_smoothingWeight=0"


# --- before TensorFlow: the run to resume ---------------------------------------------------------


def resumable_config(run_dir):
    """The config.json of a run that --resume can continue."""
    config = rundir.read_config(run_dir)
    flags.check_recorded(config, Path(run_dir) / rundir.CONFIG)
    rundir.refuse_a_linked_lock(run_dir)
    rundir.refuse_if_being_trained(run_dir)
    for name in (rundir.TRAIN, rundir.VALIDATION):
        if (path := Path(run_dir) / name).exists() and not path.is_dir():  # where the run writes its curves
            raise cli.InputError(rundir.not_a_directory(path))
    if not (Path(run_dir) / rundir.LAST).is_file():
        raise cli.InputError(
            f"{run_dir} has no {rundir.LAST}: it stopped before its first epoch ended (or an older "
            "train.py ran it); start it anew"
        )
    return config


def refuse_a_damaged_checkpoint(run_dir):
    """InputError if the run's last.keras is damaged, as far as can be told without TensorFlow."""
    if why := rundir.why_damaged(Path(run_dir) / rundir.LAST):
        best_whole = not rundir.why_damaged(Path(run_dir) / rundir.BEST)
        raise cli.InputError(rundir.unreadable_checkpoint(run_dir, why, best_whole))


def resumed_arguments(args, given, config):
    """The arguments of the run being resumed: its config.json, with --epochs, --strategy and
    --memmap as given, and where its data is now if --data or --images and --labels are given
    (inputs.load checks that it is the run's data). Any other flag given, even at its default
    value, is refused."""
    changed = sorted(
        f"--{name.replace('_', '-')}"
        for name in given
        if name not in (*settings.COMMAND_FLAGS, *settings.RESUMABLE, *settings.DATA_LOCATIONS)
    )
    if changed:
        raise cli.InputError(
            f"--resume continues a run with its own settings: drop {' '.join(changed)} (start a new run to change them)"
        )
    if (
        "data" in given
        and rundir.recorded_path(config, "images") != rundir.recorded_path(config, "data") / data.TRAIN_IMAGES
    ):
        raise cli.InputError(
            f"{args.resume} trained on stacks of its own, not ISBI 2012 in a --data directory: give "
            "where they are now with --images and --labels"
        )
    # --data: ISBI 2012 is now there; --images or --labels: that stack is now there.
    moved = given & set(settings.DATA_LOCATIONS) | ({"images", "labels"} if "data" in given else set())
    kept = {
        name
        for name in vars(args)
        if name in config and name not in moved and name not in given and name not in settings.COMMAND_FLAGS
    }
    resumed = {**vars(args), **{name: config[name] for name in kept}}
    for name in settings.PATHS:
        if resumed[name] is not None:
            resumed[name] = rundir.recorded_path(config, name) if name in kept else Path(resumed[name])
    resumed["logdir"] = Path(args.resume).absolute().parent  # where the run is now, if it moved
    return argparse.Namespace(**resumed)


# --- the run ------------------------------------------------------------------------------------


class OutOfMemory(cli.Stopped):
    """The net, a batch or the validation slices did not fit in the memory of the device, or in
    what TensorFlow can hold in one tensor."""


def out_of_memory(error):
    """An OutOfMemory for TensorFlow's out-of-memory error, or its refusal of a tensor too large
    to hold; None for another error."""
    import tensorflow as tf

    if isinstance(error, tf.errors.InvalidArgumentError) and "Cannot parse tensor from proto" in error.message:
        # A batch of 26 GB (--batch-size 100000): the training step's graph holds a zeros_like of
        # it as a constant, over protocol buffers' 2 GB. Far more than the memory of these machines.
        return OutOfMemory("a tensor of the training step too large for TensorFlow (over 2 GB in its graph)")
    if not isinstance(error, tf.errors.ResourceExhaustedError):
        return None
    # TensorFlow's allocator says the first, XLA (on GPUs) the second.
    what = re.search(
        r"OOM when allocating tensor with shape\[[^\]]*\]|Out of memory while trying to allocate [0-9.]+\w*",
        error.message,
    )
    return OutOfMemory(f"out of memory ({what.group() if what else 'TensorFlow could not allocate a tensor'})")


def stopped(error, run_dir, chief, new_run, lost_worker):
    """What to raise for `error`, raised while the run trained: one line that says how to go on.
    `lost_worker` is what the cluster lost if the error says so (distribute.lost_worker). A new run
    stopped by Ctrl-C, a refusal, a file error, a lack of memory or a lost worker before its first checkpoint is
    removed: there is nothing in it to resume. One stopped by an unexpected error (its traceback
    follows) is kept, with what it logged, to find out why; `--summary` marks it."""
    from checkpoints import CheckpointError  # TensorFlow is loaded by now

    checkpoint = (run_dir / rundir.LAST).is_file()
    ends = (KeyboardInterrupt, cli.InputError, CheckpointError, OSError, OutOfMemory)
    removed = chief and new_run and not checkpoint and (isinstance(error, ends) or lost_worker is not None)
    if removed:
        rundir.remove_new_run(run_dir)
    go_on = (
        f"continue the run from its last checkpoint with --resume {run_dir}"
        if checkpoint
        else f"no epoch of {run_dir} was checkpointed, so nothing was kept: start the run again"
        if removed
        else "it stopped before its first epoch ended: start it again"
    )
    if lost_worker:
        return cli.Stopped(
            f"the cluster lost a worker ({lost_worker}); "
            + (go_on + (" on every worker" if checkpoint else "") if chief else "the chief says how to go on")
        )
    if isinstance(error, KeyboardInterrupt):
        return cli.Interrupted(go_on)
    if isinstance(error, OutOfMemory):
        lower = "--batch-size, --crop or --filters"
        if checkpoint:  # resuming keeps them: a new run can lower them
            return cli.Stopped(f"{error}: start a new run with a lower {lower}; {run_dir} keeps its last checkpoint")
        return cli.Stopped(f"{error}: lower {lower}; {go_on}")
    if isinstance(error, OSError):  # where the run's files are read and written (checkpoints say so themselves)
        where = f" on {error.filename}" if error.filename else ""
        return cli.Stopped(f"a file error{where} ({error.strerror or error}) stopped the run; {go_on}")
    return error


def print_start(run, run_inputs, logdir, chief, worker_logdir, requested):
    """The run's first lines. `requested`: the directory name a new run asked for (None when resumed);
    a taken one is said, since commands copied from the README would name the earlier run."""
    config = run.config
    print(
        f"device: {config['device']}; precision {config['precision']}, XLA {'on' if config['jit_compile'] else 'off'}"
    )
    print(f"distribution: {config['distribution']}; global batch {config['global_batch_size']} crops")
    print(
        f"slices: {len(run_inputs.train_indices)} training, validation {cli.index_list_text(run_inputs.val_indices)} "
        f"of {len(run_inputs.stacks)} in {run_inputs.images_path}"
        + (" (memory-mapped)" if isinstance(run_inputs.stacks.images, np.memmap) else "")
    )
    if chief:
        print(
            f"run directory: {run.directory}"
            + (f" (resumed after epoch {run.initial_epoch})" if run.initial_epoch else "")
            + (
                f" ({run.directory.with_name(requested)} holds an earlier run: name {run.directory.name} in the "
                "commands for this one)"
                if requested not in (None, run.directory.name)
                else ""
            )
        )
        print(
            f"watch it with: tensorboard --logdir {logdir}, then open "
            f"http://localhost:{TENSORBOARD_PORT}/{DASHBOARD} to compare the runs"
        )
    else:
        print(f"this worker logs to {worker_logdir}, removed at the end; the chief writes the run")


def print_end(run, epoch_logs):
    """The best validation scores of the run ({epoch: logs with its scores}), with those it had
    reached before a resume."""
    scores = []
    for name, (better, description) in settings.BEST_SCORES.items():
        values = [logs[f"val_{name}"] for logs in epoch_logs.values() if f"val_{name}" in logs]
        values += [run.reached[name]] if name in run.reached else []
        if values:
            scores.append(f"{description} {better(values):.4f}")
    print(", ".join(scores) + f"; checkpoints {run.directory / rundir.BEST}, {run.directory / rundir.LAST}")


def checked(args, given):
    """(the arguments of the run, the config.json of the run to resume or None, its RunInputs), all
    checked before TensorFlow loads: a refusal comes in a second."""
    if args.accept_new_data and args.resume is None:
        raise cli.InputError("--accept-new-data goes with --resume: a new run records the data it starts with")
    if args.name is not None and args.resume is not None:
        raise cli.InputError("--name names a new run: a resumed run keeps its directory; drop --name")
    config = None if args.resume is None else resumable_config(args.resume)
    if config is not None:
        args = resumed_arguments(args, given, config)
    args.epochs = args.epochs or settings.DEFAULTS["epochs"]
    step = None if config is None else rundir.checkpoint_step(Path(args.resume) / rundir.LAST)
    if step is not None and step // config["steps_per_epoch"] >= args.epochs:  # told now, not after TensorFlow loads
        if promoted := rundir.finish_promotion(args.resume):
            print(promoted)
        raise cli.InputError(rundir.finished(args.resume, step // config["steps_per_epoch"]))
    if config is not None:
        refuse_a_damaged_checkpoint(args.resume)
    if args.profile_batch is not None:
        check_profiled_steps(args.profile_batch, (step or 0) + 1, args.epochs * args.steps_per_epoch)
    run_inputs = inputs.load(args, resumed_config=config)
    if args.resume is None:
        rundir.writable_directory(args.logdir)
    flags.cluster_tasks(args.strategy)
    return args, config, run_inputs


def check_profiled_steps(profiled, first, last):
    """InputError unless the steps to profile (--profile-batch) are among those the run trains."""
    if not first <= profiled[0] <= profiled[1] <= last:
        raise cli.InputError(
            f"--profile-batch {profiled[0]},{profiled[1]}: this run trains steps {first} to {last}; "
            "pick steps among them"
        )


def open_run(args, resumed_config, run_inputs, command, setup, logdir, chief, held):
    """The Run to train, built whole, its directory locked for as long as `held` holds: the run to
    resume (on the chief), or a new run in `logdir`, whose net is built before its directory is
    made, so that a directory never lacks its net. A worker other than the chief trains the resumed
    run's net in a directory of its own: the chief writes the run."""
    import resume
    import runs
    import unet

    if args.resume is not None and chief:
        return resumed_run(args, resumed_config, run_inputs, command, setup, held)
    if args.resume is None:
        model = unet.compiled_unet(args.filters, args.loss, args.lr, setup["jit_compile"], args.ema, args.dropout)
        initial_epoch, reached = 0, {}
    else:
        model, initial_epoch = resume.restore_model(args.resume, resumed_config)
        reached = runs.reached(runs.validation_scalars(args.resume))
    config = runs.run_config(args, run_inputs, command, setup)
    directory = rundir.start(logdir, args.name or rundir.run_name(args.loss, args.lr), config, held)
    return rundir.Run(directory, config, model, initial_epoch, reached)


def resumed_run(args, config, run_inputs, command, setup, held):
    """The run to resume, locked: its net from its last checkpoint, its event files cut back to it,
    and its config.json updated with where the run and its data are now (and with
    --accept-new-data, what the data is)."""
    import resume
    import runs

    held.enter_context(rundir.locked(args.resume))
    config.update(run_dir=str(Path(args.resume).absolute()), **runs.data_record(args, run_inputs))
    return resume.continue_run(args.resume, config, args.epochs, command, setup)


def fit(run, args, run_inputs, strategy, stop, progress, epoch_logs, held):
    """Train `run` to args.epochs, watched: the watcher scores, renders and writes beside training
    (its end, normal or not, finishes them); a stop signal is raised between two steps, not inside
    TensorFlow."""
    import callbacks
    import distribute
    import runs
    import watcher

    watching = held.enter_context(watcher.running())
    held.enter_context(cli.stopping_between_steps())
    # shuffle=False: the batches come in the order of their seeds (Keras would only warn that it
    # cannot shuffle a tf.data pipeline). verbose=0: ProgressLine in place of Keras' bar, before
    # for_run's callbacks so that an epoch's line is out before the watcher tells its scores.
    batches = run_inputs.crops(args.batch_size, args.crop, args.seed, args.loss)
    documents = runs.run_documents(run.config)
    hyperparameters = runs.hyperparameters(run.config)
    watching_callbacks = callbacks.for_run(
        args, run, run_inputs, stop, hyperparameters, documents, watching, epoch_logs, progress.validated
    )
    profiling = []
    if args.profile_batch:
        profiling = [callbacks.Profiler(run.directory / rundir.TRAIN, *args.profile_batch)]
        held.callback(profiling[0].stop)  # Keras ends no callback on a Ctrl-C or an error: the trace so far is kept
    run.model.fit(
        distribute.training_batches(strategy, batches, args.steps_per_epoch, run.initial_epoch),
        epochs=args.epochs,
        initial_epoch=run.initial_epoch,
        steps_per_epoch=args.steps_per_epoch,
        shuffle=False,
        verbose=0,
        callbacks=[callbacks.StopBetweenSteps(), progress, *watching_callbacks, *profiling],
    )


def report(run, stop, epoch_logs, chief):
    """The run's end: its best scores, or one line on why it stopped; its directory (None on a
    worker other than the chief)."""
    if not chief:
        if stop.message:
            raise cli.Stopped(f"{stop.message}; the chief says how to go on")
        print("this worker has finished; the chief wrote the run")
        return None
    if stop.message:
        if (run.directory / rundir.LAST).is_file():
            raise cli.Stopped(
                f"{stop.message}; the last good checkpoint, {run.directory / rundir.LAST}, is kept: "
                f"lower --lr and start again, or continue from it with --resume {run.directory}"
            )
        raise cli.Stopped(
            f"{stop.message}, before the run's first checkpoint: start again with a lower --lr (its curves are kept "
            f"in {run.directory})"
        )
    print_end(run, epoch_logs)
    return run.directory


def train(args, given, command):
    """Run a training, or with --resume continue one; return its run directory (None on a worker
    other than the chief)."""
    args, resumed_config, run_inputs = checked(args, given)
    # TensorFlow takes seconds to load: only now, once every input above is known to be good.
    cli.import_tensorflow()
    import keras

    import callbacks
    import distribute
    from progress import ProgressLine

    strategy = distribute.make_strategy(args.strategy)  # first: it may configure TensorFlow's runtime
    chief = distribute.is_chief(strategy)
    keras.utils.set_random_seed(args.seed)
    setup = distribute.machine_setup(args.precision, args.batch_size, strategy)
    stop, progress, epoch_logs = callbacks.StopOnNonFiniteLoss(), ProgressLine(args.epochs), {}
    run = None
    try:
        with contextlib.ExitStack() as held:
            logdir = held.enter_context(distribute.log_directory(strategy, args.logdir))
            with strategy.scope():
                run = open_run(args, resumed_config, run_inputs, command, setup, logdir, chief, held)
            run.model.jit_compile = setup["jit_compile"]
            requested = None if args.resume else args.name or rundir.run_name(args.loss, args.lr)
            print_start(run, run_inputs, args.logdir, chief, logdir, requested)
            fit(run, args, run_inputs, strategy, stop, progress, epoch_logs, held)
    except BaseException as error:
        cause = KeyboardInterrupt() if cli.interrupted(error) else out_of_memory(error) or error
        if run is None:  # nothing of the run is on disk yet
            raise cause from error
        progress.end_line()
        files.remove_partial_files([run.directory])  # a checkpoint candidate the stop cut short
        new_run = args.resume is None or not chief
        raise stopped(cause, run.directory, chief, new_run, distribute.lost_worker(cause)) from error
    return report(run, stop, epoch_logs, chief)


def print_summary(logdir):
    if not Path(logdir).is_dir():
        raise cli.InputError(f"{logdir} is not a directory: give the --logdir of your training runs")
    cli.import_tensorflow()  # TensorBoard's loader of event files needs it
    import runs

    rows, unreadable = runs.summarize(logdir)
    if not rows:
        raise (
            unreadable[0]
            if unreadable
            else cli.InputError(f"no runs in {logdir}: give the --logdir of your training runs")
        )
    print(runs.format_table(rows))
    if any(not row["finished"] and row["resumable"] for row in rows):
        print(
            f"{runs.UNFINISHED} unfinished: stopped before its epochs; continue it with python train.py --resume <run>"
        )
    if any(not row["finished"] and not row["resumable"] and not row["training"] for row in rows):
        print(
            f"{runs.NO_CHECKPOINT} stopped before its first checkpoint: nothing to resume; remove it and start it anew"
        )
    if any(not row["finished"] and row["training"] for row in rows):
        print(f"{runs.TRAINING} being trained now")
    if any(len(members) > 1 for members in runs.by_setting(rows).values()):
        print("\nby setting (runs that differ only in --seed):")
        print(runs.format_settings(rows))
    for error in unreadable:  # one damaged run does not hide the others
        cli.say("train.py", "skipped", error)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, given = cli.parse_with_given(flags.build_parser(), argv)
    args = flags.with_preset(args, given)
    if args.summary:
        return cli.run("train.py", lambda: print_summary(args.summary))
    return cli.run("train.py", lambda: train(args, given, shlex.join(["python", "train.py", *argv])))


if __name__ == "__main__":
    sys.exit(main())
