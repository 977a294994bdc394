"""A run directory: its name, the files it holds, its config.json, the lock that lets one process
at a time write it, and the run being trained in it (Run).

    <logdir>/<loss>_lr<lr>/         config.json, best.keras, last.keras; the HParams, Text,
                                    comparison-dashboard and best-so-far summaries
        train/                      training curves (epoch and batch), weight histograms, graph
        validation/                 validation curves and scores; images, activation histograms
                                    and PR curve of the shown slices

Imports nothing heavier than numpy: `--resume` is checked before TensorFlow loads.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import stat
import time
import zipfile
from pathlib import Path

import numpy as np

import settings
from cli import InputError
from files import PARTIAL_PATTERN, replaced_atomically, temporaries_of, temporary_path, why_not_writable

CONFIG = "config.json"
LAST = "last.keras"
BEST = "best.keras"
LOCK = ".lock"
# What a .keras archive of Keras 3 holds.
ARCHIVE_MEMBERS = ("config.json", "metadata.json", "model.weights.h5")
# How long taking the lock waits out a probe of it before it names the holder.
PROBE_WAIT_S = 0.5
# The TensorBoard runs of a run directory, named as Keras' TensorBoard callback names its two.
TRAIN = "train"
VALIDATION = "validation"
# Runs started before the shown slices moved into `validation` have their images here.
OLDER_VALIDATION_SLICES = "validation_slices"
EVENT_DIRECTORIES = ("", TRAIN, VALIDATION, OLDER_VALIDATION_SLICES)
# The names TensorFlow's summary writer gives event files.
EVENT_FILES = "events.out.tfevents.*"
# Where TensorFlow's profiler writes the traces of --profile-batch in a run's `train` directory.
PROFILES = "plugins"


def run_name(loss, lr):
    """`bce_lr1e-4`: the rate in its shortest exact scientific form, so distinct rates never share a name."""
    return f"{loss}_lr{rate_text(lr)}"


def rate_text(lr):
    """`1e-4`: the shortest scientific form that reads back as the same number."""
    return np.format_float_scientific(lr, trim="-", exp_digits=1)


def event_directories(run_dir):
    """The directories of `run_dir` that hold its own event files (never a run nested in it)."""
    return [Path(run_dir) / name for name in EVENT_DIRECTORIES if (Path(run_dir) / name).is_dir()]


def not_a_directory(path):
    """The refusal of a run whose curves' directory `path` is something else."""
    return f"{path} is not a directory: move it out of the run directory, then resume the run"


def writable_directory(logdir):
    """Refuse a --logdir in which no run directory can be made, before anything is written."""
    existing = Path(logdir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(
            f"cannot create a run directory in {logdir} ({existing} is a file): choose a writable --logdir"
        )
    if why := why_not_writable(existing / "run"):
        raise InputError(f"cannot create a run directory in {logdir} ({why}): choose a writable --logdir")


def create(logdir, name):
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
        raise InputError(
            f"cannot create a run directory in {logdir} ({error.strerror}): choose a writable --logdir"
        ) from None
    raise InputError(f"{logdir} already holds 9999 runs named {name}: choose another --logdir")


@dataclasses.dataclass
class Run:
    """A run being trained: its directory and config.json, its model, the epochs it has done and
    what it had reached before (runs.reached: best scores; empty for a new run)."""

    directory: Path
    config: dict
    model: object = None
    initial_epoch: int = 0
    reached: dict = dataclasses.field(default_factory=dict)


def start(logdir, name, config, held):
    """A new run directory under `logdir` (named `name`, or a numbered sibling) with `config` as
    its config.json, its path added as `run_dir`, locked for as long as the ExitStack `held` holds;
    nothing is left behind if it cannot be written. Locked before config.json is written, so that
    a sweep never takes a run that is starting for one to resume."""
    run_dir = create(logdir, name)
    held.enter_context(locked(run_dir))
    config["run_dir"] = run_dir.absolute()
    try:
        save_config(run_dir, config)
    except InputError:
        remove_new_run(run_dir)
        raise
    return run_dir


def remove_new_run(run_dir):
    """Delete what a new run wrote in `run_dir` (stopped before its first checkpoint: there is
    nothing to resume), then the directory if nothing else is in it: a run started inside it in
    the meantime (`--logdir <run_dir>`) is another run, and stays."""
    run_dir = Path(run_dir)
    for name in EVENT_DIRECTORIES[1:]:
        # Its event files and profile only: `--logdir <run_dir>/train` starts a run in there too.
        shutil.rmtree(run_dir / name / PROFILES, ignore_errors=True)
        remove_with_directory(run_dir / name, (run_dir / name).glob(EVENT_FILES))
    remove_with_directory(
        run_dir, [run_dir / CONFIG, run_dir / LOCK, *run_dir.glob(EVENT_FILES), *run_dir.glob(PARTIAL_PATTERN)]
    )


def remove_with_directory(directory, paths):
    """Delete the files `paths` in `directory`, then `directory` if nothing else is in it."""
    for path in paths:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


def save_config(run_dir, config):
    """config.json, replaced atomically: a resumed run rewrites it."""
    path = Path(run_dir) / CONFIG
    try:
        with replaced_atomically(path) as temporary:
            temporary.write_text(json.dumps(config, indent=2, default=str))
    except OSError as error:
        raise InputError(f"cannot write {path} ({error.strerror}): free some space or fix its permissions") from None


def recorded_path(config, name):
    """The path config.json records as `name` (settings.PATHS): absolute since config.json records
    `started_in`; a run started before recorded them relative to a directory it did not name, so
    they are taken as relative to the current one (migrate)."""
    return Path(config["started_in"]) / config[name]


# The form of config.json that this code writes and reads; migrate() brings an older one up to it.
CONFIG_VERSION = 2
# What a config.json written before config_version (version 0) may lack, beside the settings of
# settings.DEFAULTS: the directory its paths are relative to, the records of its data and resumes.
UNVERSIONED = {"started_in": ".", "image_scaling": None, "data_files": {}, "resumed": []}
# Where a run writes its best-so-far scalars (summaries.BEST_TAG): at the training step of the
# evaluation since version 2, at the epoch index before. A run keeps its own, so that a resumed
# run's curve stays one series.
BEST_SCORES_AT = "best_scores_at"


def migrate(config, path):
    """A run's config.json (read from `path`) as CONFIG_VERSION has it, whatever version wrote it:
    the settings added since the run started get the value it ran with (settings.BEFORE_IT_EXISTED
    where that differs from today's default); the records it lacks, UNVERSIONED's. InputError for
    one written by a newer version of this project, or of this version but lacking a setting (a
    hand edit: today's default could be what the run never had)."""
    version = config.get("config_version", 0)
    if type(version) is not int or not 0 <= version <= CONFIG_VERSION:  # JSON true is no version
        raise InputError(
            f"{path} has config_version {version!r}, which this version of the project does not know "
            f"(it writes {CONFIG_VERSION}): update the project to continue the run"
        )
    if version == 0:
        config = {**settings.DEFAULTS, **settings.BEFORE_IT_EXISTED, **UNVERSIONED, **config}
    if version < 2:
        config = {BEST_SCORES_AT: "epoch", **config}
    missing = [name for name in (*settings.DEFAULTS, *UNVERSIONED, BEST_SCORES_AT) if name not in config]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: restore it from a copy, or move the run out of the way")
    return {**config, "config_version": CONFIG_VERSION}


def read_config(run_dir):
    """A run directory's config.json, brought up to date (migrate); InputError if it is none or
    the file is unreadable."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise InputError(f"{run_dir} is not a run directory (no {CONFIG}): give a directory that train.py created")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(
            f"{path} is unreadable ({getattr(error, 'strerror', None) or error}): "
            "restore it, or move the run out of the way"
        ) from None
    if not isinstance(config, dict):
        raise InputError(
            f"{path} holds no settings (a JSON {type(config).__name__}): restore it, or move the run out of the way"
        )
    return migrate(config, path)


def candidate_checkpoint(run_dir, epoch):
    """Where the net of `epoch` waits to be scored before it becomes last.keras (callbacks.Checkpoints):
    a temporary name (files.PARTIAL_PATTERN), so that --resume removes one that a kill left."""
    return temporary_path(Path(run_dir) / LAST, f"epoch{epoch}")


def why_damaged(path):
    """Why the .keras archive at `path` cannot be whole, found without TensorFlow (every member
    read back against its checksum: Keras stores them uncompressed); None if nothing says so."""
    try:
        with zipfile.ZipFile(path) as archive:
            if (failed := archive.testzip()) is not None:
                return f"{failed} in it fails its checksum"
            if missing := [name for name in ARCHIVE_MEMBERS if name not in archive.namelist()]:
                return f"no {' or '.join(missing)} in it"
    except (OSError, zipfile.BadZipFile, EOFError):
        return "not a whole .keras archive"
    return None


def unreadable_checkpoint(run_dir, why, best_whole):
    """The refusal of --resume for a run whose last.keras cannot be loaded, `why`."""
    last, best = Path(run_dir) / LAST, Path(run_dir) / BEST
    if best_whole:
        return (
            f"{last} is unreadable ({why}), but {best} is whole: to continue from the run's best "
            f"epoch, copy it over (cp {best} {last}) and resume again"
        )
    return f"{last} is unreadable ({why}), and so is {best}: the run cannot be resumed; start a new one"


# Where Keras 3 keeps the optimizer's iteration count in `model.weights.h5`: its first variable;
# under mixed_float16 the optimizer is a LossScaleOptimizer, whose own first variable counts the
# steps since its loss scale last changed, and the iteration count is its inner optimizer's.
STEP_VARIABLES = ("optimizer/inner_optimizer/vars/0", "optimizer/vars/0")


def checkpoint_step(path):
    """The training step a checkpoint was written at, read from the .keras archive without
    TensorFlow (STEP_VARIABLES; tests check it against the loaded model in each precision).
    None if the file does not hold it there."""
    import h5py  # Keras' own dependency, light: no TensorFlow

    try:
        with (
            zipfile.ZipFile(path) as archive,
            archive.open("model.weights.h5") as stored,
            h5py.File(stored, "r") as weights,
        ):
            return int(weights[next(name for name in STEP_VARIABLES if name in weights)][()])
    except (OSError, KeyError, ValueError, TypeError, StopIteration, zipfile.BadZipFile):
        return None


def to_start_anew(run_dir):
    """How to start a run anew whose directory holds nothing to resume: remove it, but not a run
    started inside it (`--logdir <run_dir>`), which would go with it."""
    inside = sorted(str(path.parent) for path in Path(run_dir).rglob(CONFIG) if path.parent != Path(run_dir))
    return (
        f"move {', '.join(inside)} out of it, then remove it to start it anew"
        if inside
        else "remove it to start it anew"
    )


def best_promoted(run_dir, epoch):
    """The line that says best.keras was put right after a kill between the two renames of
    promoting epoch `epoch` (from 0; checkpoints.Checkpoints.promote)."""
    return (
        f"{Path(run_dir) / BEST} is now the net of epoch {epoch + 1}, the best so far: the run was stopped "
        "between saving it as last.keras and as best.keras"
    )


def finish_promotion(run_dir):
    """Finish the promotion of the last epoch that a kill cut between its two renames
    (checkpoints.Checkpoints.promote): last.keras holds the epoch, and its copy for best.keras
    waits whole under its temporary name. For a finished run, which --resume refuses before it
    would put best.keras right from the curves (checkpoints.best_put_right). The line that says
    so, or None: nothing to finish, or not now (another process holds the run, or the rename
    failed; `--resume --epochs <more>` still puts it right)."""
    run_dir = Path(run_dir)
    last_step = checkpoint_step(run_dir / LAST)

    def waiting():
        return [
            path
            for path in temporaries_of(run_dir / BEST)
            # a regular file: a link planted there would make best.keras follow what it points to
            if stat.S_ISREG(path.lstat().st_mode) and checkpoint_step(path) == last_step and why_damaged(path) is None
        ]

    try:  # the whole check under the lock: it reads every copy through
        if last_step is None or checkpoint_step(run_dir / BEST) == last_step or not temporaries_of(run_dir / BEST):
            return None
        with locked(run_dir):  # not a copy that a process training the run further is about to rename
            copies = waiting()
            if not copies:
                return None
            os.replace(copies[0], run_dir / BEST)
    except (InputError, OSError):
        return None
    return best_promoted(run_dir, last_step // read_config(run_dir)["steps_per_epoch"] - 1)


def finished(run_dir, epochs_done):
    """The refusal of --resume for a run that has trained the epochs asked for."""
    return f"{run_dir} has finished its {epochs_done} epochs: give --epochs with more to train it further"


def refuse_if_being_trained(run_dir):
    """InputError naming the process that holds the run's lock, if one does: checked by --resume
    before TensorFlow loads, and before it looks for a checkpoint (a run in its first epoch has
    none yet)."""
    if (holder := trainer_of(run_dir)) is not None:
        raise InputError(being_trained(run_dir, holder))


def trainer_of(run_dir):
    """The process that holds the run's lock, as its lock file names it; None if none does. Takes
    and releases a shared lock at once, which another probe does not conflict with and a trainer
    starting in that moment waits out (`locked`); creates nothing."""
    path = Path(run_dir) / LOCK
    try:
        # O_NONBLOCK: a FIFO planted as the lock would block the open until something writes to it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # no lock file (nothing trains it), or a link (refuse_a_linked_lock says so)
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # not a lock train.py made
            return None
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder_of(descriptor)
    finally:
        os.close(descriptor)
    return None


def holder_of(descriptor):
    return os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "another process"


def being_trained(run_dir, holder):
    return f"{run_dir} is being trained by {holder}: wait for it to end, or stop it, then resume the run"


def refuse_a_linked_lock(run_dir):
    """InputError if the run directory's lock is a symbolic link (checked before TensorFlow loads
    by --resume, and by `locked`, which never follows one)."""
    path = Path(run_dir) / LOCK
    if path.is_symlink():
        raise InputError(
            f"{path} is a symbolic link, not the run's lock file: remove it (rm {path}), then resume the run"
        )


@contextlib.contextmanager
def locked(run_dir):
    """Hold the run directory's lock while the block runs: an OS file lock (flock), which dies
    with its process, so that a kill never leaves a stale lock. A second process that tries to
    take it is refused with one line naming the process that holds it; it writes nothing."""
    path = Path(run_dir) / LOCK
    try:
        # O_NOFOLLOW: the lock is truncated and written, so a symbolic link planted as the lock (a run
        # directory received from someone else) must not lead it to another file.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        refuse_a_linked_lock(run_dir)
        raise InputError(f"cannot open {path} ({error.strerror}): the run directory must be writable for you") from None
    try:
        if not took_lock(descriptor):
            raise InputError(being_trained(run_dir, holder_of(descriptor)))
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def took_lock(descriptor):
    """Whether the exclusive lock was taken within PROBE_WAIT_S: a probe (`trainer_of`, from
    --summary or another --resume's check) holds the lock for microseconds, a trainer for its run."""
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
