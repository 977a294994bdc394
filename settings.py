"""What a run can be set to, declared once with its domain, and the scores a run is judged by:
the flags (flags.py) take their choices from here (and the defaults that more than one module
needs: DEFAULTS, the recipes), and the modules that implement a choice (metrics.LOSSES,
distribute.device_settings, distribute.make_strategy) are checked against it by the tests.

Imports nothing but the standard library, so that a command line is checked before TensorFlow
loads.
"""

DEPTH = 4  # poolings of the U-Net: crops and whole slices must be multiples of 2**DEPTH
MULTIPLE = 2**DEPTH

LOSSES = ("bce", "mse", "dice", "bce_dice", "wbce")
# Losses whose pixels are weighted by the U-Net paper's weight map (batches.border_weights).
WEIGHTED_LOSSES = ("wbce",)
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
MEMMAP_CHOICES = ("auto", "on", "off")
LABEL_POLARITIES = ("cells-high", "membranes-high")

# The validation scores a run is judged by, each with the direction that is better and its name in
# words: the best so far is logged (callbacks.RunSummary), printed at the end (train.py) and listed
# by --summary (runs.py). The first, the challenge's main score, picks the checkpoint best.keras; a
# run that never scores it (--eval-every 0) is checkpointed by the second. (In the learning-speed
# trials the misclassified fraction's best epoch was not V_rand's: 0.0921 at V_rand 0.959, against
# 0.0947 at 0.974.)
BEST_SCORES = {
    "v_rand": (max, "best validation V_rand"),
    "misclassified_pixel_fraction": (min, "best validation misclassified-pixel fraction"),
}
CHECKPOINT_SCORE, CHECKPOINT_SCORE_WITHOUT_ISBI = BEST_SCORES

# Flag sets for a whole recipe (--preset), each flag given on the command line overriding its value.
# "paper": the net and training of Ronneberger et al. (2015) as far as a same-padded U-Net goes:
# 64 filters, the border-weighted loss, large tiles one at a time, dropout at the bottleneck.
PRESETS = {"paper": {"filters": 64, "loss": "wbce", "crop": 256, "batch_size": 1, "dropout": 0.5}}

# The default of every setting of a run (flags.py gives them to the flags; rundir.migrate to the
# settings an older run's config.json lacks).
DEFAULTS = {
    "loss": "bce",
    "lr": 1e-4,
    "ema": 0.99,
    "epochs": 15,
    "steps_per_epoch": 200,
    "batch_size": 1,
    "crop": 256,
    "filters": 16,
    "dropout": 0.0,
    "seed": 0,
    "precision": "auto",
    "strategy": "auto",
    "preset": None,
    "labels_polarity": "cells-high",
    "memmap": "auto",
    "val_slices": None,  # inputs.default_validation_slices
    "image_every": None,  # at each epoch's end
    "histogram_freq": 1,
    "eval_every": 1,
    "update_freq": 10,
}
MEMMAP_SHARE = 0.25  # --memmap auto maps a stack larger than this share of the machine's memory

# What a run started before a setting existed ran with, where that differs from today's default: an
# older run's config.json that lacks the setting gets this value (rundir.migrate).
BEFORE_IT_EXISTED = {"ema": 0.0}

# What runs are compared by: the settings sweep.py combines (and names its runs by), which the
# HParams tab lists first.
COMPARED = ("loss", "lr", "seed")

# Flags about the command, not the run: never recorded in a run's config.json.
COMMAND_FLAGS = ("summary", "resume", "accept_new_data", "name", "profile_batch")

# Settings that may differ when a run is resumed: how far to train, and how this machine runs it.
RESUMABLE = ("epochs", "strategy", "memmap")
# Where a run's data is: a resumed run may find it elsewhere (the SHA-256 of the files says whether
# it is the run's data), and the paths of a new run are recorded absolute, so that a run can be
# resumed, exported and predicted from any directory.
DATA_LOCATIONS = ("data", "images", "labels")
PATHS = ("logdir", *DATA_LOCATIONS)
