"""What a run trains and validates on: the stacks its flags choose (ISBI 2012, downloaded when
missing, or the user's own), checked, and split into training slices, from which random crops are
drawn, and whole validation slices, of which a few are shown as images.

Imports no TensorFlow: every input is checked before it loads.
"""

import dataclasses
from pathlib import Path

import numpy as np

import batches
import cli
import data
import rundir
import tiffs
from settings import DEPTH, MULTIPLE, WEIGHTED_LOSSES

IMAGE_SLICES = 3  # validation slices shown as images


@dataclasses.dataclass
class RunInputs:
    """The checked stacks of a run and its split. `val_images` and `val_labels` are the whole
    validation slices, of any size: the validation pass predicts them as predict.py does
    (tiling.with_context)."""

    stacks: tiffs.TrainingStacks
    images_path: Path
    labels_path: Path
    mirror: str | None  # the URL the stacks were downloaded from, None if they were on disk
    sha256: dict  # {"images": hex digest, "labels": ...} of the two files
    train_indices: list
    val_indices: list
    val_images: np.ndarray
    val_labels: np.ndarray

    def crops(self, batch_size, crop, seed, loss):
        """The training batches: augmented random crops of the training slices, with their loss
        weights if `loss` is weighted (settings.WEIGHTED_LOSSES)."""
        weights = (
            {index: batches.border_weights(self.stacks.mask(index)) for index in self.train_indices}
            if loss in WEIGHTED_LOSSES
            else None
        )
        return batches.RandomCrops(self.stacks, self.train_indices, batch_size, crop, seed, weights=weights)

    def val_weights(self, loss):
        """The loss weights of the validation slices, or None if `loss` is not weighted."""
        return (
            np.stack([batches.border_weights(label) for label in self.val_labels]) if loss in WEIGHTED_LOSSES else None
        )

    def shown(self):
        """Positions, in the validation slices, of those shown as images: up to IMAGE_SLICES, spread out."""
        count = len(self.val_indices)
        return np.linspace(0, count - 1, min(IMAGE_SLICES, count)).round().astype(int)


def default_validation_slices(num_slices):
    """Three slices spread through the stack (5, 15, 25 for ISBI's 30); one for tiny stacks."""
    if num_slices < 4:
        return [num_slices // 2]
    return sorted({num_slices * (2 * k + 1) // 6 for k in range(3)})


def split_slices(num_slices, validation_slices=None):
    """(training indices, validation indices) of a stack of `num_slices` slices."""
    if validation_slices is None:
        validation_slices = default_validation_slices(num_slices)
    validation = sorted(set(validation_slices))
    out_of_range = [i for i in validation if not 0 <= i < num_slices]
    if out_of_range:
        raise data.DataError(
            f"validation slice(s) {out_of_range} out of range: the stack has slices "
            f"0..{num_slices - 1}; change --val-slices"
        )
    training = [i for i in range(num_slices) if i not in validation]
    if num_slices == 1:
        raise data.DataError(
            "the stack holds one slice: a run needs at least two, one to train on and one to validate "
            "on (a 2-D TIFF is one slice)"
        )
    if not training:
        raise data.DataError(
            f"all {num_slices} slices are validation slices: leave at least one for training in --val-slices"
        )
    return training, validation


def load(args, resumed_config=None):
    """The RunInputs that the flags `args` choose, downloading ISBI 2012 if it is used and missing;
    InputError if anything about them is wrong, or if a run to resume (`resumed_config`, its
    config.json) started on other files and `args.accept_new_data` is not given."""
    mirror = None
    if args.images is None and args.labels is None:
        if data.missing_stacks(args.data, (data.TRAIN_IMAGES, data.TRAIN_LABELS)):
            mirror = data.mirror_url(args.mirror)
            data.download_isbi2012(args.data, mirror)
    elif args.images is None or args.labels is None:
        raise cli.InputError("give --images and --labels together, or neither to use ISBI 2012")
    images_path = Path(args.images or args.data / data.TRAIN_IMAGES)
    labels_path = Path(args.labels or args.data / data.TRAIN_LABELS)
    digests = (
        None
        if resumed_config is None
        else checked_digests(resumed_config, images_path, labels_path, args.accept_new_data)
    )
    # A resumed run goes on seeing its images as it did (the rule may have changed since it started),
    # unless it continues on new data.
    recorded = None if resumed_config is None or args.accept_new_data else resumed_config["image_scaling"]
    stacks = tiffs.load_training_stacks(
        images_path,
        labels_path,
        tiffs.memory_map_above(args.memmap),
        args.labels_polarity,
        recorded and tiffs.ImageScaling.from_description(recorded),
    )
    digests = digests or {"images": tiffs.sha256_of(images_path), "labels": tiffs.sha256_of(labels_path)}
    height, width = stacks.slice_shape
    if min(height, width) < MULTIPLE:
        raise cli.InputError(
            f"the slices of {images_path} are {height}x{width}: the U-Net takes at least "
            f"{MULTIPLE}x{MULTIPLE} (it halves them {DEPTH} times)"
        )
    if min(stacks.slice_shape) < args.crop:
        raise cli.InputError(
            f"--crop {args.crop} is larger than the {stacks.slice_shape[0]}x{stacks.slice_shape[1]} "
            f"slices: use --crop {min(stacks.slice_shape) // MULTIPLE * MULTIPLE} or less"
        )
    train_indices, val_indices = split_slices(len(stacks), args.val_slices)
    tiffs.check_masks(stacks, train_indices, val_indices, labels_path)
    val_images = np.stack([stacks.image(index) for index in val_indices])
    val_labels = np.stack([stacks.mask(index) for index in val_indices])
    return RunInputs(
        stacks,
        images_path,
        labels_path,
        mirror,
        digests,
        train_indices,
        val_indices,
        val_images,
        val_labels,
    )


def checked_digests(config, images_path, labels_path, accept_new_data):
    """The SHA-256 of the files a resumed run is to continue on; unless `accept_new_data`, refused
    if they are not those the run started with (their SHA-256 in its config.json), saying how to
    go on. A file that is not there is refused too."""
    recorded = config["data_files"]
    digests = {}
    for name, path in (("images", images_path), ("labels", labels_path)):
        if not path.is_file():
            raise cli.InputError(
                f"the run's {name}, {path}, is not there: if its data moved, give where it is now with "
                "--images and --labels (or --data for ISBI 2012); the same files continue the run, "
                "other data needs --accept-new-data too"
            )
        digests[name] = tiffs.sha256_of(path)
        expected = recorded.get(f"{name}_sha256")
        if accept_new_data:
            continue
        if expected is None and path.absolute() != rundir.recorded_path(config, name).absolute():
            raise cli.InputError(
                f"the run's config.json records no SHA-256 of its {name}, so {path} cannot be checked "
                "against them: add --accept-new-data to continue on it"
            )
        if expected is not None and digests[name] != expected:
            raise cli.InputError(
                f"{path} has changed since the run started (its SHA-256 differs from config.json's): "
                "give the run's own file (--images, --labels), or add --accept-new-data to continue "
                "on this data"
            )
    return digests
