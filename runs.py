"""Compare runs without a browser: one row per run directory, read from its event files.

    python train.py --summary logs
"""

import json
from pathlib import Path

import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

COLUMNS = ("run", "loss", "lr", "steps", "best_val_mpf", "last_val_mpf", "last_val_loss", "last_val_dice")


def read_scalars(directory):
    """{tag: [(step, value)]} of the scalar summaries in one TensorBoard run directory."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return {tag: [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()[event_accumulator.TENSORS]
            if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


def last(series):
    return series[-1][1] if series else float("nan")


def run_row(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    validation = read_scalars(run_dir / "validation") if (run_dir / "validation").is_dir() else {}
    fractions = [value for _, value in validation.get("epoch_misclassified_pixel_fraction", [])]
    evaluations = validation.get("evaluation_loss_vs_iterations", [])
    return {
        "run": run_dir.name, "loss": config["loss"], "lr": config["lr"],
        "steps": evaluations[-1][0] if evaluations else 0,
        "best_val_mpf": min(fractions, default=float("nan")),
        "last_val_mpf": fractions[-1] if fractions else float("nan"),
        "last_val_loss": last(validation.get("epoch_loss", [])),
        "last_val_dice": last(validation.get("epoch_membrane_dice", [])),
    }


def summarize(logdir):
    """One row per run directory (one holding config.json) under `logdir`, sorted by name."""
    return [run_row(config.parent) for config in sorted(Path(logdir).glob("*/config.json"))]


def format_table(rows):
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    table = [COLUMNS] + [tuple(cell(row[column]) for column in COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in table)
