"""ISBI 2012 data: download, reading TIFF stacks, the train/validation split and augmented batches.

    python data.py                      # download into data/isbi2012 unless already there
    python data.py --mirror file:///path/to/mirror

Layout on disk (the challenge's): train-volume.tif and test-volume.tif hold 30 uint8 slices of
512x512, one per page; train-labels.tif holds the masks, 255 = cell and 0 = membrane. Stacks are
kept as stored (in memory, or memory-mapped when larger than memory allows) and read a slice or a
crop at a time: images as float32 in [0, 1], labels as {0, 1} with 1 = cell, the polarity the
challenge expects from a submission. Batches of augmented random crops are numpy arrays, which
distribute.py feeds to each replica through tf.data. Imports no TensorFlow: every stack is
checked before it loads.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import skimage.io
import skimage.transform
import tifffile
from scipy import ndimage
from skimage.measure import label as connected_components

import cli
import settings
from files import replaced_atomically

# The 30 training slices, their masks and the 30 test slices as PNGs, pinned to one commit of
# zhixuhao/unet so that the bytes can be checked against isbi2012.sha256.
PINNED_COMMIT = "b45af4d458437d8281cc218a07fd4380818ece4a"
DEFAULT_MIRROR = f"https://raw.githubusercontent.com/zhixuhao/unet/{PINNED_COMMIT}/"
MIRROR_ENV = "ISBI2012_MIRROR"
CHECKSUMS = Path(__file__).with_name("isbi2012.sha256")
DEFAULT_DATA_DIR = Path("data/isbi2012")
NUM_SLICES = 30
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES = "train-volume.tif", "train-labels.tif", "test-volume.tif"
STACK_SOURCES = {
    TRAIN_IMAGES: "data/membrane/train/image",
    TRAIN_LABELS: "data/membrane/train/label",
    TEST_IMAGES: "data/membrane/test",
}


class DataError(cli.InputError):
    """Bad or unreachable data; the message names the problem and the fix in one line."""


# --- download ---------------------------------------------------------------------------------

def read_checksums(path=CHECKSUMS):
    """{relative path: sha256 hex digest} from a `sha256sum`-style file."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        digest, relative_path = line.split(maxsplit=1)
        sums[relative_path.strip().removeprefix("./")] = digest
    return sums


def mirror_url(mirror=None):
    """The base URL to download from: --mirror, else $ISBI2012_MIRROR, else GitHub."""
    base = mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    if not base.startswith(("http://", "https://", "file://")):
        raise DataError(
            f"mirror {base!r} is not a URL: give http(s)://... or file:///absolute/path "
            f"(via --mirror or {MIRROR_ENV})"
        )
    return base.rstrip("/") + "/"


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(
            f"could not fetch {url} ({reason}): check the network, or point --mirror or "
            f"{MIRROR_ENV} at a reachable copy of zhixuhao/unet@{PINNED_COMMIT[:7]}"
        ) from None


def fetch_verified_slice(base_url, relative_path, expected_sha256):
    url = base_url + relative_path
    content = fetch(url)
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise DataError(
            f"checksum mismatch for {url} (sha256 {actual[:12]}..., expected "
            f"{expected_sha256[:12]}...): the mirror's copy is damaged or not the pinned one; "
            "use another mirror"
        )
    return skimage.io.imread(io.BytesIO(content))


def write_stack_atomically(path, stack, fix="free some space or choose another --data"):
    """Write a multi-page TIFF so that `path` either does not exist or is complete; `fix` ends
    the error message when it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as temporary:
            tifffile.imwrite(temporary, stack, photometric="minisblack")
    except OSError as error:
        raise DataError(f"cannot write {path} ({error.strerror}): {fix}") from None


def download_isbi2012(data_dir=DEFAULT_DATA_DIR, mirror=None, verbose=True, overwrite=False):
    """Fetch and verify the PNGs, then write the challenge TIFFs missing from `data_dir`.

    Every file is verified before any TIFF is written, so a bad or interrupted download leaves
    the directory as it was; TIFFs already there are kept unless `overwrite`.
    """
    missing = {name: STACK_SOURCES[name] for name in (STACK_SOURCES if overwrite else missing_stacks(data_dir))}
    base_url = mirror_url(mirror)
    checksums = read_checksums()
    if verbose:
        print(f"Downloading ISBI 2012 from {base_url} into {data_dir}/")
    stacks = {}
    for tiff_name, source_dir in missing.items():
        slices = []
        for index in range(NUM_SLICES):
            relative_path = f"{source_dir}/{index}.png"
            slices.append(fetch_verified_slice(base_url, relative_path, checksums[relative_path]))
        stacks[tiff_name] = np.stack(slices)
        if verbose:
            print(f"  {tiff_name}: {NUM_SLICES} slices fetched and verified")
    for tiff_name, stack in stacks.items():
        write_stack_atomically(Path(data_dir) / tiff_name, stack)
    return [Path(data_dir) / name for name in missing]


def missing_stacks(data_dir, names=tuple(STACK_SOURCES)):
    """The challenge TIFFs among `names` that are not in `data_dir`."""
    return [name for name in names if not (Path(data_dir) / name).exists()]


def ensure_isbi2012(data_dir=DEFAULT_DATA_DIR, mirror=None, names=tuple(STACK_SOURCES)):
    """Download ISBI 2012 unless every TIFF in `names` is already in `data_dir`."""
    if missing_stacks(data_dir, names):
        download_isbi2012(data_dir, mirror)


# --- reading stacks ---------------------------------------------------------------------------

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
            ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts)]
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
                if len({(s.shape[-2:], s.dtype) for s in series}) > 1 or any(len(s.shape) not in (2, 3) for s in series):
                    listed = ", ".join(f"{s.shape} {s.dtype}" for s in series[:3]) + (", ..." if len(series) > 3 else "")
                    raise DataError(f"{path} holds {len(series)} image series of different shapes or types ({listed}): "
                                    "save one stack of grey slices, one per page")
                shape = (sum(1 if len(s.shape) == 2 else s.shape[0] for s in series), *series[0].shape[-2:])
                axes = "IYX"
            memory_map = math.prod(shape) * np.dtype(dtype).itemsize > memory_map_above
            if memory_map and len(series) > 1:
                raise DataError(
                    f"{path} holds its {shape[0]} slices as {len(series)} separate series, which cannot be "
                    "memory-mapped: save it as one stack, e.g. tifffile.imwrite(path, stack), or use --memmap off"
                )
            stack = None if memory_map else np.concatenate(
                [s.asarray().reshape(-1, *s.shape[-2:]) for s in series]) if len(series) > 1 else series[0].asarray()
    except DataError:
        raise
    except Exception as error:  # tifffile raises several types for damaged files
        raise DataError(
            f"{path} is not a readable TIFF ({type(error).__name__}: {error}): replace it "
            "(for ISBI 2012, move it away and run `python data.py`)"
        ) from None
    if "S" in axes:
        # tifffile stores a (3, H, W) or (4, H, W) array as one RGB(A) page unless told it is grey.
        slices = (f"; if these are {shape[axes.index('S')]} grey slices, write them with "
                  "tifffile.imwrite(path, stack, photometric='minisblack')" if axes == "SYX" else "")
        raise DataError(f"{path} holds colour pixels (axes {axes}): convert it to greyscale, one slice per page{slices}")
    if len(shape) not in (2, 3):
        raise DataError(
            f"{path} has shape {shape}: expected grey slices, one per page "
            "(pages x height x width)"
        )
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == bool):
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
        raise DataError(f"{path} holds {page[row, column]} at slice {index}, row {row}, column {column}: "
                        "replace the values that are not finite (e.g. by the slice's median) and save it again")


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
        return cls(bottom, (top - bottom) or 1.0,
                   f"{stack.dtype} values from {low:g} to {high:g}: percentiles {PERCENTILES[0]:g} to "
                   f"{PERCENTILES[1]:g} ({bottom:g} to {top:g}) scaled to [0, 1]")


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
        raise DataError(f"{path} holds the value {low:g} only: a mask needs both cell and membrane pixels "
                        "(e.g. 255 = cell, 0 = membrane)")
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


def cell_value(stack, path, polarity="cells-high"):
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


def load_training_stacks(images_path, labels_path, memory_map_above=math.inf, polarity="cells-high", scaling=None):
    """The image and mask stacks as TrainingStacks; each memory-mapped if larger than
    `memory_map_above` bytes. `polarity` says which label value is cell (settings.LABEL_POLARITIES);
    the images are scaled by `scaling` (a resumed run's), else by their own (ImageScaling.of)."""
    images, labels = read_stack(images_path, memory_map_above), read_stack(labels_path, memory_map_above)
    # A mask has two values; grey slices, many (more than a mask of a few classes would have).
    if len(np.unique(images[0])) <= 2 and len(np.unique(labels[0])) > 16:
        raise DataError(f"{images_path} looks like masks (two values) and {labels_path} like images: are --images and "
                        "--labels swapped?")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} slices but {labels_path} has {len(labels)}: "
            "give one mask per image slice"
        )
    if images.shape != labels.shape:
        raise DataError(
            f"slices of {images_path} are {images.shape[1:]} but masks in {labels_path} are "
            f"{labels.shape[1:]}: image and mask slices must have the same height and width"
        )
    return TrainingStacks(images, labels, *cell_value(labels, labels_path, polarity),
                          scaling or ImageScaling.of(images, images_path))


def check_masks(stacks, train_indices, val_indices, labels_path):
    """Refuse a validation slice whose mask has no membrane or no cell (its scores would mean
    nothing); warn of such a training slice."""
    for index in [*val_indices, *train_indices]:
        cells = stacks.cell_pixels[index]
        missing = "membrane" if cells == math.prod(stacks.slice_shape) else "cell" if cells == 0 else None
        if missing and index in val_indices:
            raise DataError(f"validation slice {index} of {labels_path} has no {missing}: its scores would mean "
                            "nothing; choose other --val-slices")
        if missing:
            print(f"warning: training slice {index} of {labels_path} has no {missing}", file=sys.stderr)


# --- train/validation split -------------------------------------------------------------------

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
        raise DataError(
            f"validation slice(s) {out_of_range} out of range: the stack has slices "
            f"0..{num_slices - 1}; change --val-slices"
        )
    training = [i for i in range(num_slices) if i not in validation]
    if num_slices == 1:
        raise DataError("the stack holds one slice: a run needs at least two, one to train on and one to validate "
                        "on (a 2-D TIFF is one slice)")
    if not training:
        raise DataError(
            f"all {num_slices} slices are validation slices: leave at least one for training "
            "in --val-slices"
        )
    return training, validation


# --- augmentation -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random transforms applied to image and mask in lockstep (intensity: image only).

    The seed article's set (rotation, shift, shear, zoom, flips) with ranges that change the
    image (EM sections have no preferred orientation, so any angle), plus the U-Net paper's
    elastic deformation: displacements drawn on a coarse 3x3 grid with a standard deviation of
    10 pixels, interpolated bicubically.
    """

    rotation_degrees: float = 180.0
    shift_fraction: float = 0.1
    shear_degrees: float = 10.0
    zoom_range: float = 0.1
    flips: bool = True
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    brightness: float = 0.1
    contrast: float = 0.2


NO_AUGMENTATION = Augmentation(0, 0, 0, 0, False, 0, 3, 0, 0)


def elastic_displacement(rng, shape, sigma, grid):
    """(2, H, W) smooth random displacements: normal on a coarse grid, bicubic upsampling."""
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    upsampled = np.tensordot(coarse, upsampling_basis(tuple(shape), grid), axes=2)
    # skimage's resize clips its output to the input's range.
    return np.clip(upsampled, coarse.min(axis=(1, 2), keepdims=True), coarse.max(axis=(1, 2), keepdims=True))


@functools.cache
def upsampling_basis(shape, grid):
    """(grid, grid, H, W): skimage's bicubic resize, unclipped, of each grid point's unit impulse.
    Resizing is linear, so a coarse grid upsamples as the sum of these weighted by its values, in
    a tenth of the time of resizing it (which was a third of the time of a crop)."""
    impulses = np.eye(grid * grid).reshape(grid, grid, grid, grid)
    return np.stack([[skimage.transform.resize(impulse, shape, order=3, mode="edge", clip=False) for impulse in row]
                     for row in impulses])


def sample_coordinates(rng, slice_shape, crop, augmentation):
    """(2, crop, crop) source (row, col) coordinates of one randomly placed, transformed crop."""
    a = augmentation
    height, width = slice_shape
    offsets = np.arange(crop) - (crop - 1) / 2
    rows, cols = np.meshgrid(offsets, offsets, indexing="ij")
    if a.flips:
        rows = rows * rng.choice([-1, 1])
        cols = cols * rng.choice([-1, 1])
    centre_row = rng.uniform((crop - 1) / 2, height - 1 - (crop - 1) / 2)
    centre_col = rng.uniform((crop - 1) / 2, width - 1 - (crop - 1) / 2)
    shift = rng.uniform(-a.shift_fraction, a.shift_fraction, size=2) * crop
    zoom = rng.uniform(1 - a.zoom_range, 1 + a.zoom_range)
    transform = skimage.transform.AffineTransform(
        scale=zoom,
        rotation=np.deg2rad(rng.uniform(-a.rotation_degrees, a.rotation_degrees)),
        shear=np.deg2rad(rng.uniform(-a.shear_degrees, a.shear_degrees)),
        translation=(centre_col + shift[1], centre_row + shift[0]),
    )
    # skimage transforms take (x, y) = (col, row) points.
    source = transform(np.column_stack([cols.ravel(), rows.ravel()]))
    coordinates = np.stack([source[:, 1], source[:, 0]]).reshape(2, crop, crop)
    if a.elastic_sigma > 0:
        coordinates += elastic_displacement(rng, (crop, crop), a.elastic_sigma, a.elastic_grid)
    return coordinates


def mirrored(coordinates, slice_shape):
    """(2, ...) coordinates folded into the slice the way scipy.ndimage's 'mirror' mode extends
    it, about the centres of the edge pixels; for linear interpolation the values are the same."""
    last = np.reshape(slice_shape, (2,) + (1,) * (coordinates.ndim - 1)) - 1
    folded = np.mod(coordinates, 2 * last)
    return np.where(folded > last, 2 * last - folded, folded)


def augmented_crop(stacks, index, crop, rng, augmentation=Augmentation(), weights=None):
    """One random crop of slice `index` of `stacks` (image and mask, and of the slice's loss
    `weights` if given) with every transform done in a single interpolation.

    Pixels that fall outside the slice are mirrored in, as the U-Net paper extrapolates. Only the
    region the crop covers is read, so that a memory-mapped stack is never loaded. The mask is
    interpolated linearly and thresholded at 0.5, so it stays strictly binary and aligned; the
    weights are interpolated linearly at the same coordinates.
    """
    coordinates = mirrored(sample_coordinates(rng, stacks.slice_shape, crop, augmentation), stacks.slice_shape)
    top, left = np.floor(coordinates.min(axis=(1, 2))).astype(int)
    bottom, right = np.floor(coordinates.max(axis=(1, 2))).astype(int) + 2  # + the interpolation's neighbour
    region = (slice(top, bottom), slice(left, right))
    local = coordinates - np.array([top, left]).reshape(2, 1, 1)
    image_crop = ndimage.map_coordinates(stacks.image(index, region), local, order=1, mode="nearest")
    mask_crop = ndimage.map_coordinates(stacks.mask(index, region).astype(np.float32), local, order=1, mode="nearest")
    contrast = rng.uniform(1 - augmentation.contrast, 1 + augmentation.contrast)
    brightness = rng.uniform(-augmentation.brightness, augmentation.brightness)
    image_crop = np.clip((image_crop - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    crops = image_crop.astype(np.float32), (mask_crop >= 0.5).astype(np.float32)
    if weights is None:
        return crops
    return *crops, ndimage.map_coordinates(weights[region], local, order=1, mode="nearest")


# --- the U-Net paper's loss weights ------------------------------------------------------------

BORDER_WEIGHT = 10.0  # w0 of Ronneberger et al. (2015), eq. 2
BORDER_SIGMA = 5.0    # sigma of eq. 2, in pixels
# Beyond this distance (d1 + d2) the border term is below w0 e^-12.5 = 4e-5, and is left out.
BORDER_REACH = 5 * BORDER_SIGMA


def border_weights(mask, w0=BORDER_WEIGHT, sigma=BORDER_SIGMA):
    """(H, W) float32 loss weights of a binary mask (cell > 0), the U-Net paper's eq. 2:
    w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / (2 sigma^2)) on membrane pixels, where d1 and d2 are
    the distances to the nearest and the second nearest cell (4-connected components, as the
    challenge's scores count them). w_c balances the classes: n / (2 n_class), so that cell and
    membrane pixels each carry half of the total class weight and w_c averages 1. The border term
    makes the thin membranes between two cells, whose loss decides merges, weigh up to w0 more.
    """
    mask = np.asarray(mask) > 0
    cells = connected_components(mask, connectivity=1)
    nearest = np.full(mask.shape, np.inf)
    second = np.full(mask.shape, np.inf)
    reach = math.ceil(BORDER_REACH * sigma / BORDER_SIGMA)
    # Each cell's distances only within `reach` of it: the slice's full distance transform per cell
    # would take a minute for the 30 ISBI slices.
    for label, box in enumerate(ndimage.find_objects(cells), start=1):
        window = tuple(slice(max(part.start - reach, 0), min(part.stop + reach, size)) for part, size in zip(box, mask.shape))
        distance = ndimage.distance_transform_edt(cells[window] != label)
        second[window] = np.minimum(second[window], np.maximum(nearest[window], distance))
        nearest[window] = np.minimum(nearest[window], distance)
    class_pixels = np.array([np.count_nonzero(~mask), np.count_nonzero(mask)])
    class_weight = mask.size / (2 * np.maximum(class_pixels, 1))
    border = w0 * np.exp(-((nearest + second) ** 2) / (2 * sigma**2)) * ~mask
    return (class_weight[mask.astype(int)] + border).astype(np.float32)


# --- batches ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RandomCrops:
    """Batches of augmented random crops of the training slices `slices` of `stacks`.

    Batch `index` of epoch `epoch` in stream `stream` draws from a generator seeded with
    (seed, epoch, index, stream), so the crops do not depend on how many threads build them or in
    which order, a run can be replayed or resumed, and every replica of a distributed run draws
    its own stream. (numpy pads a seed with zeros, so stream 0 is seed (seed, epoch, index).)
    With `weights` ({slice index: border_weights of its mask}), each batch carries the crops of
    the weights too, as Keras' per-pixel sample weights.
    """

    stacks: TrainingStacks
    slices: list
    batch_size: int
    crop: int
    seed: int
    augmentation: Augmentation = Augmentation()
    weights: dict = None

    @property
    def parts(self):
        """What a batch holds: images and masks, and weights if the crops have them."""
        return 2 if self.weights is None else 3

    def batch(self, epoch, index, stream=0):
        """(images, masks[, weights]), each (batch_size, crop, crop, 1) float32."""
        rng = np.random.default_rng([self.seed, epoch, index, stream])
        picks = rng.integers(len(self.slices), size=self.batch_size)
        crops = [augmented_crop(self.stacks, self.slices[i], self.crop, rng, self.augmentation,
                                None if self.weights is None else self.weights[self.slices[i]]) for i in picks]
        return tuple(np.stack(part)[..., np.newaxis] for part in zip(*crops))


def trim_to_multiple(stack, multiple):
    """Centre-crop the slices of (N, H, W) to the largest height and width divisible by `multiple`."""
    height, width = (size - size % multiple for size in stack.shape[1:3])
    top, left = (stack.shape[1] - height) // 2, (stack.shape[2] - width) // 2
    return stack[:, top:top + height, left:left + width]


def build_parser():
    parser = cli.ArgumentParser("data.py", "Download ISBI 2012 as the challenge's TIFF stacks.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="directory for the TIFFs")
    parser.add_argument("--mirror", help=f"base URL of a copy of zhixuhao/unet (http(s):// or file://); default ${MIRROR_ENV} or GitHub")
    parser.add_argument("--force", action="store_true", help="download even if the TIFFs are there")
    return parser


def download(args):
    if not missing_stacks(args.data) and not args.force:
        print(f"ISBI 2012 already in {args.data}/ (use --force to download again)")
        return
    for path in download_isbi2012(args.data, args.mirror, overwrite=args.force):
        print(f"wrote {path}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cli.run("data.py", lambda: download(args))


if __name__ == "__main__":
    sys.exit(main())
