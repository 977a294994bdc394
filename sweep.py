"""Every combination of losses, learning rates and seeds, each an ordinary train.py run in one --logdir.

    python sweep.py --loss bce mse dice --lr 1e-4 3e-4 1e-3 --seed 0 1 2 [any train.py flag]
    python sweep.py ... --list        # the runs, whether each is new, finished or to resume, and its command
    python sweep.py ... --index 4     # only the run listed as 4 (a cluster's job array: docs/sweeps.md)
    python sweep.py ... --parallel 2  # two at once, each on its own GPU or its share of the CPU threads

A run is named by its loss, learning rate and seed (`bce_lr1e-4_seed1`). The same sweep run again
skips the runs that have finished, resumes those that were stopped or killed (train.py --resume)
and starts the others; a run that another process trains (its lock is held) is left to it. Every
point's flags, the data and the runs already there are checked before the first run starts.
"""

import dataclasses
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cli
import flags
import rundir
import settings
import train

TRAIN = Path(__file__).with_name("train.py")
# Flags of train.py that a sweep sets itself or that are no new run's.
NOT_PASSED_ON = ("name", *settings.COMMAND_FLAGS)


@dataclasses.dataclass
class Point:
    """One run of the sweep: its directory, train.py's flags for a new run, what is there now
    (new, finished, resume, or the line saying why it cannot run) and the command that continues it."""

    name: str
    run_dir: Path
    new_run: list
    state: str
    command: list


def build_parser():
    parser = cli.ArgumentParser(
        "sweep.py",
        "Train every combination of --loss, --lr and --seed as train.py runs in one --logdir; any other "
        "train.py flag is passed on to every run.",
    )
    parser.add_argument("--loss", nargs="+", choices=settings.LOSSES, default=[settings.DEFAULTS["loss"]])
    parser.add_argument("--lr", nargs="+", type=cli.positive_float32, default=[settings.DEFAULTS["lr"]])
    parser.add_argument("--seed", nargs="+", type=cli.seed, default=[settings.DEFAULTS["seed"]])
    parser.add_argument(
        "--parallel",
        type=cli.positive(int),
        default=1,
        help="runs at once: each gets a GPU of its own where there are GPUs, else its share of the CPU threads",
    )
    parser.add_argument("--list", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument(
        "--index", type=cli.non_negative_int, help="run only the run that --list numbers so (e.g. $SLURM_ARRAY_TASK_ID)"
    )
    return parser


# --- before the first run ------------------------------------------------------------------------


def points(args, passed_on):
    """The sweep's runs in order (loss, then learning rate, then seed), each checked: its flags as
    train.py checks them, and a run already in its directory against what the sweep asks of it."""
    refused = sorted({flag for flag in passed_on if flag.lstrip("-").split("=")[0].replace("-", "_") in NOT_PASSED_ON})
    if any(flag.split("=")[0] == "--profile-batch" for flag in refused):
        raise cli.InputError("sweep.py profiles no run: profile one of its settings with train.py --profile-batch")
    if refused:
        raise cli.InputError(f"sweep.py names and resumes its runs itself: drop {' '.join(refused)}")
    found = []
    for loss, lr, seed in itertools.product(dict.fromkeys(args.loss), dict.fromkeys(args.lr), dict.fromkeys(args.seed)):
        name = f"{rundir.run_name(loss, lr)}_seed{seed}"
        new_run = [*passed_on, "--loss", loss, "--lr", rundir.rate_text(lr), "--seed", str(seed), "--name", name]
        run_args, given = cli.parse_with_given(flags.build_parser("sweep.py"), new_run)
        run_args = flags.with_preset(run_args, given)
        run_dir = Path(run_args.logdir) / name
        state, command = existing(run_dir, run_args, given, new_run)
        found.append(Point(name, run_dir, new_run, state, command))
    if found:  # the data and the log directory, once: every point shares them
        _, _, run_inputs = train.checked(*cli.parse_with_given(flags.build_parser("sweep.py"), found[0].new_run))
        for point in found:
            if point.state in ("finished", "resume"):
                refuse_other_data(point.run_dir, run_inputs)
    return found


def refuse_other_data(run_dir, run_inputs):
    """Refuse a run there trained on other files than the sweep's (by SHA-256, wherever they are
    now): counted as finished, or resumed, its curves would be compared as if it were the sweep's."""
    recorded = rundir.read_config(run_dir).get("data_files") or {}
    other = [
        recorded[kind]
        for kind in ("images", "labels")
        if recorded.get(f"{kind}_sha256") not in (None, run_inputs.sha256[kind])
    ]
    if other:
        raise cli.InputError(
            f"{run_dir} was trained on other data ({', '.join(other)}) than this sweep's: "
            "give the sweep another --logdir"
        )


def existing(run_dir, run_args, given, new_run):
    """(state, train.py's flags) of the point whose run directory is `run_dir`: new; finished;
    resume, a run stopped before its epochs; or the line saying why it cannot run now. A run there
    that was trained with other settings than the sweep asks for is refused: its curves would be
    compared as if it were the sweep's."""
    if not run_dir.exists():
        return "new", new_run
    try:  # first: a run that another sweep's task has just started may not have its config.json yet
        rundir.refuse_if_being_trained(run_dir)
    except cli.InputError as error:
        return f"left alone: {error}", []
    if not (run_dir / rundir.CONFIG).is_file():
        return f"left alone: {run_dir} holds no {rundir.CONFIG}: {rundir.to_start_anew(run_dir)}", []
    config = rundir.read_config(run_dir)
    differ = sorted(
        name
        for name in given
        if name in config
        and name not in (*NOT_PASSED_ON, *settings.RESUMABLE, *settings.PATHS)
        and config[name] != getattr(run_args, name)
    )
    if differ:
        settings_there = ", ".join(f"{name} {config.get(name)!r}" for name in differ)
        raise cli.InputError(
            f"{run_dir} was trained with {settings_there}, not as this sweep asks: give the sweep another --logdir"
        )
    step = rundir.checkpoint_step(run_dir / rundir.LAST) if (run_dir / rundir.LAST).is_file() else None
    if step is None:
        return (
            f"left alone: {run_dir} holds no checkpoint (stopped in its first epoch): {rundir.to_start_anew(run_dir)}",
            [],
        )
    epochs = run_args.epochs or config["epochs"]
    if step // config["steps_per_epoch"] >= epochs:
        return "finished", []
    more = ["--epochs", str(epochs)] if "epochs" in given else []
    kept = [flag for name in ("strategy", "memmap") if name in given for flag in (f"--{name}", getattr(run_args, name))]
    return "resume", ["--resume", str(run_dir), *more, *kept]


def chosen(found, index):
    if index is None:
        return found
    if index >= len(found):
        raise cli.InputError(f"--index {index}: this sweep has {len(found)} runs, 0 to {len(found) - 1}")
    return [found[index]]


# --- running -------------------------------------------------------------------------------------


def gpus():
    """The GPUs a run can be given (CUDA_VISIBLE_DEVICES's, else nvidia-smi's), without TensorFlow."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip() and device.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(index) for index, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]


def environments(parallel):
    """One environment per run slot: one run alone has the whole machine (every GPU, for
    --strategy mirrored); several get a GPU each where there are enough, else the CPU threads
    shared out."""
    if parallel == 1:
        return [dict(os.environ)]
    devices = gpus()
    if devices:
        if parallel > len(devices):
            raise cli.InputError(
                f"--parallel {parallel} but {len(devices)} GPUs: give --parallel {len(devices)} or less"
            )
        return [{**os.environ, "CUDA_VISIBLE_DEVICES": device} for device in devices[:parallel]]
    threads = str(max(1, len(os.sched_getaffinity(0)) // parallel))
    shared = {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads, "OMP_NUM_THREADS": threads}
    return [{**os.environ, **shared} for _ in range(parallel)]


def command_line(point):
    return ["python", "train.py", *point.command]


def start(point, environment, logdir, parallel):
    """train.py for `point`, in a session of its own so that only this process hears Ctrl-C and
    passes it on once; with --parallel its output goes to <logdir>/<name>.out."""
    output = None
    if parallel > 1:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        output = open(Path(logdir) / f"{point.name}.out", "a")  # closed by run_all when the run ends
    process = subprocess.Popen(
        [sys.executable, str(TRAIN), *point.command],
        env=environment,
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
        start_new_session=True,
    )
    return process, output


def stop_runs(running):
    """Pass a stop signal on to the running train.py processes and wait for them to end; a further
    signal, even while they are being signalled, is passed on too (train.py then stops at once).
    SIGTERM, which train.py takes as Ctrl-C: a sweep that a script started in the background ignores
    SIGINT, and so would its runs. The names of the runs it stopped, and of those that failed."""
    while True:
        try:
            for process, _ in running:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process, _ in running:
                process.wait()
            break
        except KeyboardInterrupt:
            continue
    for _, output in running:
        if output:
            output.close()
    ended = {point.name: process.returncode for (process, _), (point, _) in running.items()}
    stopped = [name for name, code in ended.items() if code in (128 + signal.SIGTERM, -signal.SIGTERM)]
    return stopped, [name for name, code in ended.items() if code and name not in stopped]


def run_all(todo, parallel, logdir):
    """Run the points of `todo`, `parallel` at once; the names of those whose train.py failed. A stop
    signal is passed on to the runs (each stops as after Ctrl-C, its checkpoints kept) and ends the
    sweep; so does any error of the sweep itself, after which it is raised."""
    free = environments(parallel)
    running, failed, total = {}, [], len(todo)
    queue = list(enumerate(todo, 1))
    try:
        while queue or running:
            while queue and free:
                number, point = queue.pop(0)
                environment = free.pop()
                print(
                    f"sweep.py: run {number}/{total}: {point.name} ({point.state}): {shlex.join(command_line(point))}"
                )
                running[start(point, environment, logdir, parallel)] = (point, environment)
            time.sleep(0.2)
            for (process, output), (point, environment) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[(process, output)]
                free.append(environment)
                if output:
                    output.close()
                if process.returncode:
                    failed.append(point.name)
                    print(f"sweep.py: {point.name} ended with exit code {process.returncode}")
    except KeyboardInterrupt:
        stopped, failed_meanwhile = stop_runs(running)
        raise cli.Interrupted(
            (f"{', '.join(stopped)} stopped as after Ctrl-C, checkpoints kept" if stopped else "no run was stopped")
            + (f"; failed: {', '.join(failed + failed_meanwhile)}" if failed + failed_meanwhile else "")
            + ": run the same sweep again to go on"
        ) from None
    except BaseException:
        stop_runs(running)
        raise
    return failed


def sweep(args, passed_on):
    found = points(args, passed_on)
    todo = chosen(found, args.index)
    if args.list:
        for number, point in enumerate(found):
            command = shlex.join(command_line(point)) if point.command else ""
            print(f"{number}  {point.name}  {point.state}  {command}".rstrip())
        return
    for point in todo:
        if not point.command:
            print(f"sweep.py: {point.name}: {point.state}")
        if point.state == "finished" and (promoted := rundir.finish_promotion(point.run_dir)):
            print(f"sweep.py: {promoted}")
    runnable = [point for point in todo if point.command]
    logdir = Path(cli.parse_with_given(flags.build_parser("sweep.py"), found[0].new_run)[0].logdir)
    compare = f"compare them: python train.py --summary {logdir}"
    if not runnable:
        finished = sum(point.state == "finished" for point in todo)
        done = f"all {finished} runs have" if finished == len(todo) else f"{finished} of {len(todo)} runs have"
        print(f"sweep.py: {done} finished; {compare}")
        return
    failed = run_all(runnable, args.parallel, logdir)
    print(
        f"sweep.py: {len(runnable) - len(failed)} of {len(runnable)} runs trained"
        + (f"; failed: {', '.join(failed)} (their lines above say why)" if failed else "")
        + f"; {compare}"
    )
    if failed:
        raise cli.Stopped(f"{len(failed)} of the sweep's runs failed; run the sweep again to resume them")


def main(argv=None):
    args, passed_on = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    return cli.run("sweep.py", lambda: sweep(args, passed_on))


if __name__ == "__main__":
    sys.exit(main())
