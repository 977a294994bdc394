"""What a training batch is: augmented random crops of the training slices (RandomCrops), each
transform done in one interpolation, with the crops of the U-Net paper's loss weight maps
(border_weights) for a weighted loss. Batches are numpy arrays, which distribute.py feeds to each
replica through tf.data.
"""

import dataclasses
import functools
import math

import numpy as np
import skimage.transform
from scipy import ndimage
from skimage.measure import label as connected_components

from tiffs import TrainingStacks


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
    return np.stack(
        [
            [skimage.transform.resize(impulse, shape, order=3, mode="edge", clip=False) for impulse in row]
            for row in impulses
        ]
    )


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
BORDER_SIGMA = 5.0  # sigma of eq. 2, in pixels
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
        window = tuple(
            slice(max(part.start - reach, 0), min(part.stop + reach, size))
            for part, size in zip(box, mask.shape, strict=True)
        )
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
        crops = [
            augmented_crop(
                self.stacks,
                self.slices[i],
                self.crop,
                rng,
                self.augmentation,
                None if self.weights is None else self.weights[self.slices[i]],
            )
            for i in picks
        ]
        return tuple(np.stack(part)[..., np.newaxis] for part in zip(*crops, strict=True))
