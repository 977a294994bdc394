"""Records of runs: what a run was (its config.json, hyperparameters, provenance, Text-tab documents) and, read back
from the event files, how it went (`python train.py --summary logs`).
"""

import dataclasses
import platform
import subprocess
from pathlib import Path

import keras
import numpy as np
import tensorboard
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import batches
import cli
import rundir
import settings
import summaries
from cli import InputError
from summaries import DOCUMENT_TAG, EPOCH_TAG, EVALUATION_TAG

HYPERPARAMETERS = (
    "loss",
    "lr",
    "ema",
    "filters",
    "dropout",
    "crop",
    "batch_size",
    "epochs",
    "steps_per_epoch",
    "precision",
    "seed",
)


def hyperparameters(config):
    """The HParams tab's columns: training settings and the augmentation ranges."""
    augmentation = {f"augment_{name}": value for name, value in dataclasses.asdict(batches.Augmentation()).items()}
    return {**{name: config[name] for name in HYPERPARAMETERS}, **augmentation}


def git_commit():
    """'<commit>' or '<commit> (uncommitted changes)' of this project, or why there is none."""

    def git(*arguments):
        return subprocess.run(
            ["git", *arguments], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )

    try:
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" (uncommitted changes)" if status.stdout.strip() else "")


def provenance():
    """Versions and code a run used, for config.json and the Text tab."""
    return {
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tensorboard": tensorboard.__version__,
            "numpy": np.__version__,
        },
        "git_commit": git_commit(),
    }


def data_record(args, run_inputs):
    """Where a run's data is and what it is, for its config.json: the paths absolute (settings.PATHS),
    so that the run can be resumed, exported and predicted from any directory, how its images are
    scaled, and the files' checksums (`data_files`)."""
    paths = {name: getattr(args, name) for name in settings.PATHS}
    paths.update(images=run_inputs.images_path, labels=run_inputs.labels_path)
    absolute = {name: None if path is None else str(Path(path).absolute()) for name, path in paths.items()}
    return {
        **absolute,
        "image_scaling": run_inputs.stacks.scaling.describe(),
        "data_files": {
            "images": absolute["images"],
            "images_sha256": run_inputs.sha256["images"],
            "labels": absolute["labels"],
            "labels_sha256": run_inputs.sha256["labels"],
        },
    }


def run_config(args, run_inputs, command, setup):
    """A new run's config.json: the flags as resolved, the data and split (`run_inputs`,
    inputs.RunInputs), the directory and `command` that started it, the machine `setup`
    (distribute.machine_setup) and its provenance."""
    return {
        "config_version": rundir.CONFIG_VERSION,
        **{name: value for name, value in vars(args).items() if name not in settings.COMMAND_FLAGS},
        "mirror": run_inputs.mirror,
        **setup,
        "train_slices": run_inputs.train_indices,
        "val_slices": run_inputs.val_indices,
        "started_in": str(Path.cwd()),
        "command": command,
        "resumed": [],
        rundir.BEST_SCORES_AT: "step",
        **provenance(),
        **data_record(args, run_inputs),
    }


def markdown_table(rows):
    return "| name | value |\n|---|---|\n" + "\n".join(f"| {key} | `{value}` |" for key, value in rows.items())


def run_documents(config):
    """Markdown for the Text tab, one document per tag."""
    settings = {
        key: value
        for key, value in config.items()
        if key not in ("command", "resumed", "versions", "data_files", "git_commit", "train_slices", "val_slices")
    }
    return {
        DOCUMENT_TAG.format("command"): "\n".join(
            f"    {command}" for command in [config["command"], *config["resumed"]]
        ),
        DOCUMENT_TAG.format("configuration"): markdown_table(settings),
        DOCUMENT_TAG.format("versions"): markdown_table({**config["versions"], "project commit": config["git_commit"]}),
        DOCUMENT_TAG.format("data"): markdown_table(
            {
                **config["data_files"],
                "image scaling": (config["image_scaling"] or {"rule": "not recorded"})["rule"],
                "labels polarity": config["labels_polarity"],
            }
        ),
        DOCUMENT_TAG.format("split"): markdown_table(
            {
                "training slices": cli.index_list_text(config["train_slices"]),
                "validation slices": cli.index_list_text(config["val_slices"]),
            }
        ),
    }


# --- reading runs back ------------------------------------------------------------------------

UNFINISHED = "*"  # after the steps of a run that stopped before its epochs
NO_CHECKPOINT = "!"  # after those of a run that stopped before its first checkpoint: nothing to resume
TRAINING = "+"  # after those of a run that a process is training now
COLUMN_NAMES = {"misclassified_pixel_fraction": "mpf", "v_rand": "v_rand"}  # of the scores in settings.BEST_SCORES
COLUMNS = (
    "run",
    "loss",
    "lr",
    "steps",
    *(f"{which}_val_{COLUMN_NAMES[name]}" for name in settings.BEST_SCORES for which in ("best", "last")),
    "last_val_loss",
    "last_val_dice",
)


def read_scalars(directory):
    """{tag: [(step, value)]} of the scalar summaries in one TensorBoard run directory."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return {
        tag: [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]
        for tag in accumulator.Tags()[event_accumulator.TENSORS]
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


def validation_scalars(run_dir):
    """read_scalars of a run's `validation` directory; {} where it has none. InputError if one of
    its event files is damaged: TensorBoard's reader would leave out what follows the damage."""
    directory = Path(run_dir) / rundir.VALIDATION
    if directory.exists() and not directory.is_dir():
        raise InputError(rundir.not_a_directory(directory))
    if not directory.is_dir():
        return {}
    for path in sorted(directory.glob(rundir.EVENT_FILES)):
        if (damaged_at := summaries.read_records(path)[1]) is not None:
            raise InputError(summaries.damaged_event_file(path, damaged_at))
    return read_scalars(directory)


def reached(validation):
    """What a run had reached, from its `validation` scalars (validation_scalars): the best value so
    far of each score in settings.BEST_SCORES, and the V_rand threshold of its latest evaluation
    (`v_rand_threshold`), where it has them."""
    reached = {
        name: better(value for _, value in validation[EPOCH_TAG.format(name)])
        for name, (better, _) in settings.BEST_SCORES.items()
        if validation.get(EPOCH_TAG.format(name))
    }
    if validation.get(EPOCH_TAG.format("v_rand_threshold")):
        reached["v_rand_threshold"] = validation[EPOCH_TAG.format("v_rand_threshold")][-1][1]
    return reached


def last(series):
    return series[-1][1] if series else float("nan")


def run_row(run_dir):
    config = rundir.read_config(run_dir)
    validation = validation_scalars(run_dir)
    evaluations = validation.get(EVALUATION_TAG.format("loss"), [])
    training = rundir.trainer_of(run_dir) is not None
    resumable = (run_dir / rundir.LAST).is_file() and not training
    # Where --resume and sweep.py go on from: a kill between an epoch's summaries and its checkpoint
    # leaves last.keras an epoch behind the curves, and that epoch is trained again.
    steps = rundir.checkpoint_step(run_dir / rundir.LAST) if resumable else None
    if steps is None:  # no checkpoint, one that does not say, or a run training now
        steps = evaluations[-1][0] if evaluations else 0
    planned = config["epochs"] * config["steps_per_epoch"]
    row = {
        "run": run_dir.name,
        "loss": config["loss"],
        "lr": rundir.rate_text(config["lr"]),
        "steps": f"{steps}/{planned}"
        # A finished run trained further has its planned steps raised only once its net is loaded.
        + (TRAINING if training else "" if steps >= planned else UNFINISHED if resumable else NO_CHECKPOINT),
        "finished": steps >= planned and not training,
        "training": training,
        "resumable": resumable,
        "setting": (
            *((name, config[name]) for name in HYPERPARAMETERS if name != "seed"),
            ("val_slices", cli.index_list_text(config["val_slices"]) if config.get("val_slices") else "not recorded"),
            ("data", data_of(config)),
        ),
    }
    for name, (better, _) in settings.BEST_SCORES.items():
        values = [value for _, value in validation.get(EPOCH_TAG.format(name), [])]
        row[f"best_val_{COLUMN_NAMES[name]}"] = better(values) if values else float("nan")
        row[f"last_val_{COLUMN_NAMES[name]}"] = values[-1] if values else float("nan")
    return {
        **row,
        "last_val_loss": last(validation.get(EPOCH_TAG.format("loss"), [])),
        "last_val_dice": last(validation.get(EPOCH_TAG.format("membrane_dice"), [])),
    }


def data_of(config):
    """The files a run trained on, as --summary tells settings apart: the first digits of the
    images' and the labels' SHA-256 (the same files may lie elsewhere now, under other names)."""
    files = config.get("data_files") or {}
    if not files.get("images_sha256"):  # a run older than the record
        return "not recorded"
    return "/".join(files[f"{kind}_sha256"][:8] for kind in ("images", "labels"))


def summarize(logdir):
    """(one row per run directory (one holding config.json) under `logdir`, sorted by name; the
    InputErrors of those whose config.json cannot be read)."""
    rows, unreadable = [], []
    for config in sorted(Path(logdir).glob(f"*/{rundir.CONFIG}")):
        try:
            rows.append(run_row(config.parent))
        except InputError as error:
            unreadable.append(error)
    return rows, unreadable


def cell(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def aligned(table):
    """Rows of cells as text, each column as wide as its widest cell."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip() for line in table
    )


def format_table(rows):
    return aligned([COLUMNS] + [tuple(cell(row[column]) for column in COLUMNS) for row in rows])


def by_setting(rows):
    """{setting: rows} of the runs that differ only in their seed, in the order of their first run."""
    groups = {}
    for row in rows:
        groups.setdefault(row["setting"], []).append(row)
    return groups


def setting_text(name, value):
    return f"{name} {rundir.rate_text(value) if name == 'lr' else value}"


def format_settings(rows):
    """One row per setting (the runs that differ only in seed): how many runs, how many of them
    unfinished, and the mean, lowest and highest of each best score. A setting is named by what
    differs between the settings (loss and lr where nothing does)."""
    groups = by_setting(rows)
    differing = [
        index
        for index, (name, _) in enumerate(rows[0]["setting"])
        if len({setting[index][1] for setting in groups}) > 1
    ] or [0, 1]
    header = ("setting", "runs")
    table = []
    for setting, members in groups.items():
        unfinished = sum(not row["finished"] for row in members)
        line = [
            " ".join(setting_text(*setting[index]) for index in differing),
            f"{len(members)}" + (f" ({unfinished} unfinished)" if unfinished else ""),
        ]
        for name in settings.BEST_SCORES:
            # Of the runs evaluated so far: one in its first epoch has no score yet.
            values = [value for row in members if not np.isnan(value := row[f"best_val_{COLUMN_NAMES[name]}"])]
            statistics = (np.mean(values), min(values), max(values)) if values else (float("nan"),) * 3
            line += [cell(float(value)) for value in statistics]
        table.append(tuple(line))
    header += tuple(
        f"best_val_{COLUMN_NAMES[name]}_{statistic}"
        for name in settings.BEST_SCORES
        for statistic in ("mean", "min", "max")
    )
    return aligned([header, *table])
