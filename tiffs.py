"""TIFF stacks as a run reads them: a stack of any size read or memory-mapped, with one clear line
for a damaged or unusual file; its grey values scaled to [0, 1] (ImageScaling); its masks checked
and their polarity told apart (cell_value); the training stacks (TrainingStacks).

Stacks are kept as stored (in memory, or memory-mapped when larger than memory allows) and read a
slice or a region at a time: images as float32 in [0, 1], labels as {0, 1} with 1 = cell, the
polarity the challenge expects from a submission. Imports no TensorFlow: every stack is checked
before it loads.
"""

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import tifffile
from skimage.measure import label as connected_components

import settings
from data import DEFAULT_DATA_DIR, DataError


def sha256_of(path):
    """The SHA-256 of a file, streamed: a stack may be larger than memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def tifffile_warnings():
    """The messages tifffile logs while the block runs, kept off stderr: a list, filled as it goes."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def refuse_truncated(path, tiff, warnings):
    """DataError if the TIFF ends before its pages do (an interrupted copy or download): a page
    whose directory lies past the file's end (tifffile warns of an invalid page offset and stops
    reading pages), or whose pixels do."""
    size = path.stat().st_size
    pages = len(tiff.pages)  # reads every page's directory
    cut = next((message for message in warnings if "invalid page offset" in message), None)
    if cut is None:
        for index, page in enumerate(tiff.pages):
            ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)]
            if ends and max(ends) > size:
                cut = f"the pixels of page {index + 1} of {pages} end past the file's end"
                break
    else:
        cut = f"page {pages + 1}'s directory is at byte {cut.split()[-1]}, past the end"
    if cut is not None:
        raise DataError(f"{path} is truncated ({size} bytes; {cut}): copy it again from its source")


def read_stack(path, memory_map_above=math.inf):
    """A TIFF as a (pages, height, width) array of every page; memory-mapped (nothing read until a
    region is indexed) if its pixels take more than `memory_map_above` bytes. One clear DataError
    for anything else: a file that is no TIFF, colour, or pages of different shapes."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory: give the multi-page TIFF file itself")
    if not path.is_file():
        raise DataError(
            f"{path} not found: check the path (`python data.py` downloads ISBI 2012 into {DEFAULT_DATA_DIR})"
        )
    try:
        with tifffile_warnings() as warnings, tifffile.TiffFile(path) as tiff:
            refuse_truncated(path, tiff, warnings)
            series = tiff.series
            axes, shape, dtype = series[0].axes, series[0].shape, series[0].dtype
            if len(series) > 1:  # pages appended one by one, or several stacks in one file
                if any("S" in s.axes for s in series):
                    raise DataError(f"{path} holds colour pixels: convert it to greyscale, one slice per page")
                if len({(s.shape[-2:], s.dtype) for s in series}) > 1 or any(
                    len(s.shape) not in (2, 3) for s in series
                ):
                    listed = ", ".join(f"{s.shape} {s.dtype}" for s in series[:3]) + (
                        ", ..." if len(series) > 3 else ""
                    )
                    raise DataError(
                        f"{path} holds {len(series)} image series of different shapes or types ({listed}): "
                        "save one stack of grey slices, one per page"
                    )
                shape = (sum(1 if len(s.shape) == 2 else s.shape[0] for s in series), *series[0].shape[-2:])
                axes = "IYX"
            memory_map = math.prod(shape) * np.dtype(dtype).itemsize > memory_map_above
            if memory_map and len(series) > 1:
                raise DataError(
                    f"{path} holds its {shape[0]} slices as {len(series)} separate series, which cannot be "
                    "memory-mapped: save it as one stack, e.g. tifffile.imwrite(path, stack), or use --memmap off"
                )
            stack = (
                None
                if memory_map
                else np.concatenate([s.asarray().reshape(-1, *s.shape[-2:]) for s in series])
                if len(series) > 1
                else series[0].asarray()
            )
    except DataError:
        raise
    except Exception as error:  # tifffile raises several types for damaged files
        raise DataError(
            f"{path} is not a readable TIFF ({type(error).__name__}: {error}): replace it "
            "(for ISBI 2012, move it away and run `python data.py`)"
        ) from None
    if "S" in axes:
        # tifffile stores a (3, H, W) or (4, H, W) array as one RGB(A) page unless told it is grey.
        slices = (
            f"; if these are {shape[axes.index('S')]} grey slices, write them with "
            "tifffile.imwrite(path, stack, photometric='minisblack')"
            if axes == "SYX"
            else ""
        )
        raise DataError(
            f"{path} holds colour pixels (axes {axes}): convert it to greyscale, one slice per page{slices}"
        )
    if len(shape) not in (2, 3):
        raise DataError(f"{path} has shape {shape}: expected grey slices, one per page (pages x height x width)")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.bool_)):
        raise DataError(f"{path} holds {dtype} pixels: save grey values as integers or real floats")
    if memory_map:
        stack = memory_mapped(path)
    return stack.reshape((1, *shape) if len(shape) == 2 else shape)


def memory_map_above(memmap):
    """The stack size in bytes above which --memmap `memmap` (settings.MEMMAP_CHOICES) reads a
    stack region by region from its file instead of loading it."""
    if memmap == "auto":
        return settings.MEMMAP_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0 if memmap == "on" else math.inf


def memory_mapped(path):
    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:
        raise DataError(
            f"{path} cannot be memory-mapped (its pixels are compressed, tiled or not stored in one "
            "piece): save it uncompressed, e.g. tifffile.imwrite(path, stack), or load it with --memmap off"
        ) from None


def refuse_non_finite(page, index, path):
    """DataError naming the first NaN or infinite value of slice `index`, if it has one."""
    if np.issubdtype(page.dtype, np.floating) and not np.all(np.isfinite(page)):
        row, column = np.argwhere(~np.isfinite(page))[0]
        raise DataError(
            f"{path} holds {page[row, column]} at slice {index}, row {row}, column {column}: "
            "replace the values that are not finite (e.g. by the slice's median) and save it again"
        )


PERCENTILES = (1.0, 99.8)  # CSBDeep's and StarDist's defaults
SCALING_SAMPLE = 2**20  # pixels: each percentile within a few hundredths of a percent of the whole stack's


@dataclasses.dataclass(frozen=True)
class ImageScaling:
    """How stored grey values become the net's input in [0, 1]: clip((value - offset) / scale, 0, 1),
    the same for training crops, validation slices and predict.py (which takes it from the run).

    Decided once from the stack (`of`): uint8 divided by 255 and bool as stored (0 and 1), floats as
    stored if they lie in [0, 1]; anything else (16- or 32-bit integers, other floats) from its
    PERCENTILES, the 1st to the 99.8th of a sample of its pixels, to [0, 1] and clipped, as CSBDeep
    and StarDist normalise microscopy images and bioimage.io's `scale_range` describes: a few
    saturated or hot pixels, a burned-in scale bar or a detector offset do not set the scale, as
    the largest value or the bit depth would.
    """

    offset: float
    scale: float
    rule: str

    def apply(self, values):
        return np.clip((np.asarray(values, dtype=np.float32) - self.offset) / self.scale, 0.0, 1.0)

    def describe(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_description(cls, description):
        return cls(float(description["offset"]), float(description["scale"]), str(description["rule"]))

    @classmethod
    def of(cls, stack, path):
        """The scaling of `stack`, read a slice at a time; DataError naming the slice and position
        of a NaN or infinite value."""
        if stack.dtype == bool:
            return cls(0.0, 1.0, "bool values: 0 and 1 as stored")
        if stack.dtype == np.uint8:  # 8 bits whatever its values: no pass over the stack
            return cls(0.0, 255.0, "uint8 values: 8-bit, divided by 255")
        low, high, sample = math.inf, -math.inf, []
        rng = np.random.default_rng(0)  # the same sample, so the same rule, every time
        share = SCALING_SAMPLE // len(stack) + 1
        for index, page in enumerate(stack):
            refuse_non_finite(page, index, path)
            low, high = min(low, float(page.min())), max(high, float(page.max()))
            values = np.asarray(page).ravel()
            sample.append(values if values.size <= share else values[rng.integers(values.size, size=share)])
        if np.issubdtype(stack.dtype, np.floating) and 0 <= low and high <= 1:
            return cls(0.0, 1.0, f"{stack.dtype} values in [0, 1]: as stored")
        bottom, top = (float(value) for value in np.percentile(np.concatenate(sample), PERCENTILES))
        return cls(
            bottom,
            (top - bottom) or 1.0,
            f"{stack.dtype} values from {low:g} to {high:g}: percentiles {PERCENTILES[0]:g} to "
            f"{PERCENTILES[1]:g} ({bottom:g} to {top:g}) scaled to [0, 1]",
        )


def label_values(stack, path):
    """(low, high, per-slice count of `high`) of a binary mask stack, read a slice at a time;
    DataError for more than two values, or one value only."""
    extremes = []
    for index, labels in enumerate(stack):
        refuse_non_finite(labels, index, path)
        extremes.append((labels.min(), labels.max()))
    extremes = np.array(extremes)
    low, high = extremes[:, 0].min(), extremes[:, 1].max()
    if low == high:
        raise DataError(
            f"{path} holds the value {low:g} only: a mask needs both cell and membrane pixels "
            "(e.g. 255 = cell, 0 = membrane)"
        )
    high_counts = []
    for index, labels in enumerate(stack):
        if np.any((labels != low) & (labels != high)):
            values = np.union1d(np.unique(labels), [low, high])
            raise DataError(
                f"{path} is not a binary mask: slice {index} holds {len(values)} distinct values (expected 2, "
                "e.g. 0 = membrane and 255 = cell); threshold it first"
            )
        high_counts.append(np.count_nonzero(labels == high))
    return low, high, np.array(high_counts)


REGION_SAMPLE = 8  # slices whose connected regions are counted to tell cells from membranes


def cell_value(stack, path, polarity=settings.DEFAULTS["labels_polarity"]):
    """(the label value that means cell, cell pixels per slice): the cell value is the higher of
    the two for `polarity` "cells-high", the lower for "membranes-high".

    Refused when the cell value does not look like cells: EM cells cover most of a slice in many
    separate regions, while membranes are a thin connected network. The regions are counted
    (4-connected) on REGION_SAMPLE slices spread through the stack.
    """
    low, high, high_counts = label_values(stack, path)
    cell, membrane = (high, low) if polarity == "cells-high" else (low, high)
    slice_pixels = math.prod(stack.shape[1:])
    cell_pixels = high_counts if cell == high else slice_pixels - high_counts
    cell_share = cell_pixels.sum() / (len(stack) * slice_pixels)
    sample = np.unique(np.linspace(0, len(stack) - 1, min(REGION_SAMPLE, len(stack))).round().astype(int))
    cell_regions = np.mean([connected_components(stack[i] == cell, connectivity=1).max() for i in sample])
    membrane_regions = np.mean([connected_components(stack[i] == membrane, connectivity=1).max() for i in sample])
    if cell_share <= 0.5 or cell_regions <= membrane_regions:
        other = next(choice for choice in settings.LABEL_POLARITIES if choice != polarity)
        raise DataError(
            f"{path}: the cell value {cell:g} ({polarity}) covers {cell_share:.0%} of the pixels in "
            f"{cell_regions:.0f} connected region(s) per slice, {membrane:g} covers {1 - cell_share:.0%} in "
            f"{membrane_regions:.0f}: this looks like {'membranes' if cell_share <= 0.5 else 'no cells'}; "
            f"pass --labels-polarity {other} if that is what they are"
        )
    return cell, cell_pixels


@dataclasses.dataclass(frozen=True)
class TrainingStacks:
    """Image slices and their masks as stored, in memory or memory-mapped from the TIFFs, read a
    slice or a region at a time: images scaled by `scaling` to float32 in [0, 1], masks as {0, 1}
    uint8 (1 = cell); `cell_pixels` counts the cell pixels of each slice."""

    images: np.ndarray
    labels: np.ndarray
    cell_value: float
    cell_pixels: np.ndarray
    scaling: ImageScaling

    def __len__(self):
        return len(self.images)

    @property
    def slice_shape(self):
        return self.images.shape[1:]

    def image(self, index, region=(slice(None), slice(None))):
        return self.scaling.apply(self.images[index][region])

    def mask(self, index, region=(slice(None), slice(None))):
        return (self.labels[index][region] == self.cell_value).astype(np.uint8)


def load_training_stacks(
    images_path, labels_path, memory_map_above=math.inf, polarity=settings.DEFAULTS["labels_polarity"], scaling=None
):
    """The image and mask stacks as TrainingStacks; each memory-mapped if larger than
    `memory_map_above` bytes. `polarity` says which label value is cell (settings.LABEL_POLARITIES);
    the images are scaled by `scaling` (a resumed run's), else by their own (ImageScaling.of)."""
    images, labels = read_stack(images_path, memory_map_above), read_stack(labels_path, memory_map_above)
    # A mask has two values; grey slices, many (more than a mask of a few classes would have).
    if len(np.unique(images[0])) <= 2 and len(np.unique(labels[0])) > 16:
        raise DataError(
            f"{images_path} looks like masks (two values) and {labels_path} like images: are --images and "
            "--labels swapped?"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} slices but {labels_path} has {len(labels)}: give one mask per image slice"
        )
    if images.shape != labels.shape:
        raise DataError(
            f"slices of {images_path} are {images.shape[1:]} but masks in {labels_path} are "
            f"{labels.shape[1:]}: image and mask slices must have the same height and width"
        )
    return TrainingStacks(
        images, labels, *cell_value(labels, labels_path, polarity), scaling or ImageScaling.of(images, images_path)
    )


def check_masks(stacks, train_indices, val_indices, labels_path):
    """Refuse a validation slice whose mask has no membrane or no cell (its scores would mean
    nothing); warn of such a training slice."""
    for index in [*val_indices, *train_indices]:
        cells = stacks.cell_pixels[index]
        missing = "membrane" if cells == math.prod(stacks.slice_shape) else "cell" if cells == 0 else None
        if missing and index in val_indices:
            raise DataError(
                f"validation slice {index} of {labels_path} has no {missing}: its scores would mean "
                "nothing; choose other --val-slices"
            )
        if missing:
            print(f"warning: training slice {index} of {labels_path} has no {missing}", file=sys.stderr)
