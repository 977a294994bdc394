"""How the net predicts a slice of any size, as predict.py, the validation scores and export.py's
test data all see it: beyond the slice's edges the image is mirrored (the U-Net paper's
extrapolation); a slice that fits in a tile goes through the net whole with CONTEXT mirrored pixels
around it, a larger one in overlapping tiles whose borders are discarded (the paper's overlap-tile
strategy); test-time augmentation averages the 8 flips and rotations. Numpy only: the net is
handed in.
"""

import numpy as np

from settings import MULTIPLE

# 1024 takes a 512x512 ISBI slice whole; f=64 needs about 3 GB for it.
DEFAULT_TILE = 1024
CONTEXT = 32  # mirrored pixels around a slice predicted whole
# The smallest input the net is given: a small slice with its context, sides rounded up to a multiple.
SMALLEST_INPUT = 2 * CONTEXT + MULTIPLE
TILE_BATCH = 4


def round_up(value, multiple):
    return -(-value // multiple) * multiple


def predict_batch(model, tiles):
    """Cell probabilities of (N, H, W) tiles whose sides are multiples of 16."""
    return np.asarray(model.predict_on_batch(tiles[..., np.newaxis]), dtype=np.float32)[..., 0]


def with_context(image):
    """A slice with CONTEXT mirrored pixels on each side, and more below and to the right up to sides
    that the net takes (multiples of 16): the net's output, cropped by CONTEXT at the top and left,
    is the slice's prediction."""
    height, width = image.shape
    bottom = round_up(height + 2 * CONTEXT, MULTIPLE) - height - CONTEXT
    right = round_up(width + 2 * CONTEXT, MULTIPLE) - width - CONTEXT
    return np.pad(image, ((CONTEXT, bottom), (CONTEXT, right)), mode="reflect")


def margin(tile):
    """The border of a tile that is discarded: each pixel kept saw at least this much context."""
    return tile // 8


def predict_slice(model, image, tile=DEFAULT_TILE):
    """(H, W) float32 cell probability of one slice of any size.

    Beyond the slice's edges the image is mirrored, as in the U-Net paper, so that edge pixels
    are predicted with context like any other. A slice that fits in `tile` x `tile` with
    CONTEXT mirrored pixels around it goes through the net whole. A larger one is cut into tiles
    of `tile` pixels that overlap by `tile // 4`: only the centre of each is kept, so every pixel
    kept saw at least `tile // 8` pixels of context on each side.
    """
    height, width = image.shape
    if height + 2 * CONTEXT <= tile and width + 2 * CONTEXT <= tile:
        return predict_batch(model, with_context(image)[np.newaxis])[
            0, CONTEXT : CONTEXT + height, CONTEXT : CONTEXT + width
        ]
    border = margin(tile)
    core = tile - 2 * border
    rows, columns = round_up(height, core), round_up(width, core)
    padded = np.pad(image, ((border, rows - height + border), (border, columns - width + border)), mode="reflect")
    corners = [(top, left) for top in range(0, rows, core) for left in range(0, columns, core)]
    probabilities = np.empty((rows, columns), np.float32)
    for start in range(0, len(corners), TILE_BATCH):
        batch = corners[start : start + TILE_BATCH]
        tiles = predict_batch(model, np.stack([padded[top : top + tile, left : left + tile] for top, left in batch]))
        for (top, left), tile_probabilities in zip(batch, tiles, strict=True):
            probabilities[top : top + core, left : left + core] = tile_probabilities[
                border : border + core, border : border + core
            ]
    return probabilities[:height, :width]


def dihedral(image, flip, turns):
    return np.rot90(np.fliplr(image) if flip else image, turns)


def undo_dihedral(image, flip, turns):
    image = np.rot90(image, -turns)
    return np.fliplr(image) if flip else image


def predict_stack(model, images, tile=DEFAULT_TILE, tta=False, progress=None):
    """(pages, H, W) float32 cell probabilities; with `tta` the mean over the 8 flips and rotations."""
    transforms = [(flip, turns) for flip in (False, True) for turns in range(4)] if tta else [(False, 0)]
    probabilities = np.empty(images.shape, np.float32)
    for index, image in enumerate(images):
        probabilities[index] = np.mean(
            [
                undo_dihedral(
                    predict_slice(model, np.ascontiguousarray(dihedral(image, flip, turns)), tile), flip, turns
                )
                for flip, turns in transforms
            ],
            axis=0,
        )
        if progress:
            progress.update(index + 1)
    return probabilities
