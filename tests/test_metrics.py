import collections
import fractions
import math
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import scipy.ndimage

import metrics


def batch(*images):
    """(N, H, W, 1) float32 from 2-D lists."""
    return np.asarray(images, dtype=np.float32)[..., np.newaxis]


LABEL = batch([[1, 1, 0, 0], [1, 1, 0, 0]])


def test_misclassified_pixel_fraction_counts_thresholded_disagreements():
    # Two of eight pixels on the wrong side of 0.5; confident or not does not matter.
    prediction = batch([[0.9, 0.51, 0.1, 0.49], [0.2, 1.0, 0.0, 0.7]])
    np.testing.assert_allclose(metrics.misclassified_pixel_fraction(LABEL, prediction), [2 / 8])


def test_misclassified_pixel_fraction_is_per_image_for_any_size():
    label = np.ones((3, 5, 7, 1), np.float32)
    prediction = np.ones((3, 5, 7, 1), np.float32)
    prediction[1, 0, :3] = 0.0  # 3 wrong pixels in image 1
    prediction[2] = 0.2  # all wrong in image 2
    np.testing.assert_allclose(metrics.misclassified_pixel_fraction(label, prediction), [0, 3 / 35, 1], rtol=1e-6)


def test_exactly_one_half_counts_as_cell():
    assert float(metrics.misclassified_pixel_fraction(batch([[1]]), batch([[0.5]]))[0]) == 0.0


def test_membrane_dice_by_hand():
    # Label membrane: the 4 right-hand pixels. Predicted membrane: 3 of them plus 1 cell pixel.
    prediction = batch([[0.9, 0.2, 0.1, 0.1], [0.9, 0.9, 0.1, 0.8]])
    intersection, total = 3, 4 + 4
    expected = (2 * intersection + metrics.SMOOTHING) / (total + metrics.SMOOTHING)
    np.testing.assert_allclose(metrics.membrane_dice(LABEL, prediction), [expected], rtol=1e-6)


def test_all_cell_prediction_has_zero_membrane_dice_but_high_accuracy():
    label = np.ones((1, 10, 10, 1), np.float32)
    label[0, :, :2] = 0  # 20 % membrane
    all_cell = np.ones_like(label)
    np.testing.assert_allclose(metrics.misclassified_pixel_fraction(label, all_cell), [0.2], rtol=1e-6)
    assert float(metrics.membrane_dice(label, all_cell)[0]) == pytest.approx(1 / 21)


@pytest.mark.parametrize("name", sorted(metrics.LOSSES))
def test_every_loss_is_smallest_for_the_right_answer(name):
    loss = metrics.LOSSES[name]
    perfect = np.mean(loss(LABEL, LABEL * 0.98 + 0.01))
    inverted = np.mean(loss(LABEL, (1 - LABEL) * 0.98 + 0.01))
    halfway = np.mean(loss(LABEL, np.full_like(LABEL, 0.5)))
    assert perfect < halfway < inverted


def test_weighted_bce_weighs_each_pixel_by_the_sample_weights_the_batches_carry():
    # The weights come as a fourth axis of 1, as batches.RandomCrops makes them; Keras averages
    # weight x loss over the pixels.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.compile(loss=metrics.LOSSES["wbce"])
    rng = np.random.default_rng(0)
    images, labels = rng.random((2, 4, 4, 1), dtype=np.float32), (rng.random((2, 4, 4, 1)) > 0.5).astype(np.float32)
    weights = rng.uniform(0.5, 10, (2, 4, 4, 1)).astype(np.float32)
    per_pixel = keras.losses.binary_crossentropy(labels, model.predict(images, verbose=0))
    assert model.evaluate(images, labels, sample_weight=weights, verbose=0) == pytest.approx(
        float(np.mean(weights[..., 0] * per_pixel)), rel=1e-5
    )


def test_soft_dice_loss_by_hand():
    prediction = batch([[1, 1, 0.5, 0], [1, 1, 0, 0]])  # membrane probability 0.5, 1, 1, 1 on the membrane pixels
    dice = (2 * 3.5 + metrics.SMOOTHING) / (4 + 3.5 + metrics.SMOOTHING)
    np.testing.assert_allclose(metrics.soft_dice_loss(LABEL, prediction), [1 - dice], rtol=1e-6)


# --- ISBI challenge scores --------------------------------------------------------------------

# Three true cells on 16 foreground pixels: A (4 px), B (4 px), C (8 px), membrane columns 2 and 5.
TRUE_MASK = np.array([[1, 1, 0, 1, 1, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 1, 1, 1, 1]], dtype=np.uint8)


def scores_of(proposed_cell_mask):
    true_cells = metrics.connected_components(TRUE_MASK, connectivity=1)
    return metrics.rand_and_info_scores(true_cells, metrics.thinned_segments(np.asarray(proposed_cell_mask, bool)))


def test_isbi_thresholds_are_those_of_the_fiji_loop():
    assert len(metrics.ISBI_THRESHOLDS) == 11
    assert metrics.ISBI_THRESHOLDS[0] == 0.0 and metrics.ISBI_THRESHOLDS[5] == 0.5
    assert 0.9999999 < metrics.ISBI_THRESHOLDS[-1] < 1.0  # ten additions of 0.1 in double precision


def test_a_perfect_prediction_scores_one():
    scores = scores_of(TRUE_MASK)
    assert scores == pytest.approx(dict.fromkeys(scores, 1.0))
    stack = np.stack([TRUE_MASK, 1 - TRUE_MASK])
    isbi = metrics.isbi_scores(stack, stack.astype(np.float32))
    assert (isbi["v_rand"], isbi["v_info"], isbi["pixel_error"]) == (1.0, 1.0, 0.0)


def test_merging_two_cells_lowers_the_scores_as_computed_by_hand():
    merged = TRUE_MASK.copy()
    merged[:, 2] = 1  # A and B become one segment S1 (8 px), C stays S2 (8 px)
    scores = scores_of(merged)
    # p_ij: 4/16, 4/16, 8/16 -> sum p^2 = 3/8; true sizes 1/4, 1/4, 1/2 -> sum t^2 = 3/8;
    # proposed sizes 1/2, 1/2 -> sum s^2 = 1/2. V_rand = 2 (3/8) / (3/8 + 1/2) = 6/7.
    assert scores["v_rand"] == pytest.approx(6 / 7)
    assert scores["v_rand_split"] == pytest.approx(1.0)
    assert scores["v_rand_merge"] == pytest.approx(3 / 4)
    # H(T) = 1.5 bits, H(S) = 1 bit, S is a function of T so I = H(S) = 1: V_info = 2 / 2.5.
    assert scores["v_info"] == pytest.approx(0.8)
    assert scores["v_info_split"] == pytest.approx(1.0)
    assert scores["v_info_merge"] == pytest.approx(1 / 1.5)


def test_splitting_a_cell_lowers_the_scores_as_computed_by_hand():
    split = TRUE_MASK.copy()
    split[:, 8] = 0  # a 1-pixel border through C: C1 (4 px), 2 border pixels, C2 (2 px)
    scores = scores_of(split)
    # The two border pixels are singletons: p = 4, 4, 4, 2, 1, 1 (/16) -> sum p^2 = 54/256, which
    # is also sum s^2; sum t^2 = (16 + 16 + 64)/256. V_rand = 2 * 54 / (96 + 54) = 0.72.
    assert scores["v_rand"] == pytest.approx(0.72)
    assert scores["v_rand_split"] == pytest.approx(54 / 96)
    assert scores["v_rand_merge"] == pytest.approx(1.0)
    # H(S) = 3 (1/4 * 2) + 1/8 * 3 + 2 (1/16 * 4) = 2.375 bits; T is a function of S so I = H(T) = 1.5.
    assert scores["v_info"] == pytest.approx(3 / 3.875)
    assert scores["v_info_split"] == pytest.approx(1.5 / 2.375)
    assert scores["v_info_merge"] == pytest.approx(1.0)


def test_label_ids_do_not_matter():
    true_cells = metrics.connected_components(TRUE_MASK, connectivity=1)
    split = TRUE_MASK.copy()
    split[:, 8] = 0
    proposed = metrics.thinned_segments(split.astype(bool))
    renumber_true = np.array([0, 7, 3, 40])  # background stays 0
    renumber_proposed = np.array([0, 9, 2, 5, 1])
    assert metrics.rand_and_info_scores(renumber_true[true_cells], renumber_proposed[proposed]) == pytest.approx(
        metrics.rand_and_info_scores(true_cells, proposed)
    )


def scores_by_definition(true_cells, segments):
    """V_rand and V_info of a slice counted pixel by pixel from their definitions, each border
    pixel a segment of its own: V_rand as an exact fraction, the entropies as sums of -p log p."""
    inside = true_cells.ravel() > 0
    cells = true_cells.ravel()[inside].tolist()
    pieces = [piece or -1 - pixel for pixel, piece in enumerate(segments.ravel()[inside].tolist())]
    joint = collections.Counter(zip(cells, pieces, strict=True))
    true, proposed = collections.Counter(cells), collections.Counter(pieces)

    def squares(sizes):
        return sum(size * size for size in sizes.values())

    def entropy(sizes):
        return math.fsum(-size / len(cells) * math.log2(size / len(cells)) for size in sizes.values())

    information = entropy(true) + entropy(proposed) - entropy(joint)
    return {
        "v_rand": float(fractions.Fraction(2 * squares(joint), squares(true) + squares(proposed))),
        "v_rand_split": float(fractions.Fraction(squares(joint), squares(true))),
        "v_rand_merge": float(fractions.Fraction(squares(joint), squares(proposed))),
        "v_info": 2 * information / (entropy(true) + entropy(proposed)),
        "v_info_split": information / entropy(proposed),
        "v_info_merge": information / entropy(true),
    }


@pytest.mark.parametrize("table", ["dense", "sorted"])
def test_the_scores_are_those_of_their_definitions(table, monkeypatch):
    if table == "sorted":  # the way of a slice of many cells against many segments
        monkeypatch.setattr(metrics, "DENSE_TABLE_ENTRIES", 0)
    rng, checked = np.random.default_rng(1), 0
    for _ in range(60):
        shape = rng.integers(8, 48, size=2)
        true_cells = metrics.true_cells_of(scipy.ndimage.gaussian_filter(rng.random(shape), 2) > 0.48)
        noise = scipy.ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2))
        segments = metrics.thinned_segments(noise > np.quantile(noise, rng.uniform(0.2, 0.8)))
        if true_cells.max() < 2 or len(np.unique(segments[true_cells > 0])) < 2:  # an entropy of 0: a ratio of 0 / 0
            continue
        checked += 1
        expected = scores_by_definition(true_cells, segments)
        assert metrics.rand_and_info_scores(true_cells, segments) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert checked >= 30


def test_the_dense_and_the_sorted_overlaps_agree(monkeypatch):
    rng = np.random.default_rng(2)
    true_cells = metrics.true_cells_of(scipy.ndimage.gaussian_filter(rng.random((64, 64)), 1.5) > 0.5)
    segments = metrics.thinned_segments(scipy.ndimage.gaussian_filter(rng.random((64, 64)), 1.5) > 0.5)
    dense = metrics.overlaps(true_cells, segments)
    monkeypatch.setattr(metrics, "DENSE_TABLE_ENTRIES", 0)
    for counted, sorted_ in zip(dense, metrics.overlaps(true_cells, segments), strict=True):
        np.testing.assert_array_equal(counted, sorted_)
    assert dense[2].sum() == np.count_nonzero(true_cells) and np.all(dense[0] > 0)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.overlaps(true_cells, segments - 1)


def test_labels_of_any_size_count_as_their_small_equals():
    """Labels numbered up to 2**62 (from another tool, say): pairs of them overflow 64 bits as
    one number, and a table indexed by them would not fit in memory."""
    rng = np.random.default_rng(0)
    true_cells = metrics.true_cells_of(scipy.ndimage.gaussian_filter(rng.random((64, 64)), 3) > 0.5)
    segments = metrics.thinned_segments(scipy.ndimage.gaussian_filter(rng.random((64, 64)), 3) > 0.5)
    large_cells = np.concatenate([[0], np.sort(rng.choice(2**62, true_cells.max(), replace=False))])
    large_segments = np.concatenate([[0], np.sort(rng.choice(2**62, segments.max(), replace=False))])
    cells, pieces, pixels = metrics.overlaps(large_cells[true_cells], large_segments[segments])
    expected = metrics.overlaps(true_cells, segments)
    for found, small, renumber in zip(
        (cells, pieces, pixels), expected, (large_cells, large_segments, None), strict=True
    ):
        np.testing.assert_array_equal(found, small if renumber is None else renumber[small])
    scores = metrics.rand_and_info_scores(large_cells[true_cells], large_segments[segments])
    assert scores == pytest.approx(metrics.rand_and_info_scores(true_cells, segments), rel=1e-12)
    merging, split = metrics.merges_and_splits(large_cells[true_cells], large_segments[segments])
    small_merging, small_split = metrics.merges_and_splits(true_cells, segments)
    assert len(small_merging) and len(small_split)
    np.testing.assert_array_equal(merging, large_segments[small_merging])
    np.testing.assert_array_equal(split, large_cells[small_split])


def test_thinning_leaves_a_line_between_cells_and_drops_dangling_border():
    cells = np.ones((5, 11), bool)
    cells[:, 4:7] = False  # a border 3 pixels wide
    thinned = metrics.thinned_segments(cells)
    assert set(np.unique(thinned[:, 5])) == {0} and np.all(thinned[:, :5] == thinned[0, 0])
    assert np.all(thinned[:, 6:] == thinned[0, 10]) and thinned[0, 0] != thinned[0, 10]
    fragment = np.ones((6, 6), bool)
    fragment[2, 1:4] = False  # separates nothing
    assert np.all(metrics.thinned_segments(fragment) == 1)


def fiji_watershed(cell_mask):
    """trainableSegmentation's WatershedTransform2D (4-connected) on Fiji's thresholded proposal
    (cells 0, border 255), transcribed statement by statement for its two grey levels: the
    reference thinned_segments must agree with, pixel by pixel up to the labels' numbers."""
    mask, init, line, in_queue = -2, -1, 0, -3
    columns = np.asarray(cell_mask, bool).T  # Fiji's tabLabels[x][y]
    tab = np.full(columns.shape, init)

    def neighbours(x, y):
        for u, v in ((x - 1, y), (x, y - 1), (x + 1, y), (x, y + 1)):
            if 0 <= u < tab.shape[0] and 0 <= v < tab.shape[1]:
                yield u, v

    label = 0
    for level in (columns, ~columns):  # grey 0, then 255; pixels in Fiji's order: x, then y
        pixels = [tuple(pixel) for pixel in np.argwhere(level)]
        fifo = collections.deque()
        for x, y in pixels:
            tab[x, y] = mask
            if any(tab[u, v] >= line for u, v in neighbours(x, y)):
                fifo.append((x, y))
                tab[x, y] = in_queue
        flag = False
        while fifo:
            x, y = fifo.popleft()
            for u, v in neighbours(x, y):
                if tab[u, v] > 0:
                    if tab[x, y] == in_queue or (tab[x, y] == line and flag):
                        tab[x, y] = tab[u, v]
                    elif tab[x, y] > 0 and tab[x, y] != tab[u, v]:
                        tab[x, y], flag = line, False
                elif tab[u, v] == line:
                    if tab[x, y] == in_queue:
                        tab[x, y], flag = line, True
                elif tab[u, v] == mask:
                    tab[u, v] = in_queue
                    fifo.append((u, v))
        for x, y in pixels:
            if tab[x, y] == mask:
                label += 1
                tab[x, y] = label
                fifo.append((x, y))
                while fifo:
                    for u, v in neighbours(*fifo.popleft()):
                        if tab[u, v] == mask:
                            tab[u, v] = label
                            fifo.append((u, v))
    return tab.T


def assert_same_segments(segments, expected):
    np.testing.assert_array_equal(segments == 0, expected == 0)
    pairs = np.unique(np.stack([segments.ravel(), expected.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1], "the segments differ"


def test_thinning_is_fijis_watershed():
    rng = np.random.default_rng(0)
    masks = [np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(5, dtype=bool), TRUE_MASK > 0]
    # Cells in every third column, a row down in the next: a border whose labels wait on each other
    # down its whole length.
    ripple = np.zeros((192, 9), bool)
    ripple[0::2, 0::3], ripple[1::2, 2::3] = True, True
    masks.append(ripple)
    for size in [*rng.integers(1, 33, size=(150, 2)), *rng.integers(64, 129, size=(4, 2))]:
        noise = scipy.ndimage.gaussian_filter(rng.random(size), rng.uniform(0, 3))
        masks.append(noise > np.quantile(noise, rng.uniform(0.1, 0.9)))
    for cell_mask in masks:
        assert_same_segments(metrics.thinned_segments(cell_mask), fiji_watershed(cell_mask))


def test_an_even_border_is_thinned_to_its_later_middle_line_as_in_fiji():
    """Fiji's queue takes the border column by column, so of two middle columns (rows) the first
    joins its cell and the line is the second, straight: where the line of a watershed by heights
    falls depends on its priority queue, and scikit-image's zigzags here."""
    columns = np.ones((4, 8), bool)
    columns[:, 3:5] = False
    assert np.array_equal(metrics.thinned_segments(columns) == 0, np.tile(np.arange(8) == 4, (4, 1)))
    rows = np.ones((8, 4), bool)
    rows[3:5] = False
    assert np.array_equal(metrics.thinned_segments(rows) == 0, np.tile(np.arange(8)[:, None] == 4, (1, 4)))


def test_a_proposal_without_cells_is_one_segment_as_in_fiji():
    """Fiji floods a border that touches no cell as a basin of its own, so a threshold above every
    probability scores one segment, not each pixel a border of its own."""
    assert np.all(metrics.thinned_segments(np.zeros((4, 6), bool)) == 1)
    # p_ij = t_i = 4/16, 4/16, 8/16, s = 1: V_rand = 2 (3/8) / (3/8 + 1) = 6/11.
    assert scores_of(np.zeros_like(TRUE_MASK))["v_rand"] == pytest.approx(6 / 11)


def test_isbi_scores_pick_the_best_threshold_and_count_pixel_error_like_fiji():
    true = np.stack([TRUE_MASK])
    probabilities = np.where(true > 0, 0.75, 0.25).astype(np.float32)
    probabilities[0, :, 2] = 0.45  # merges A and B at thresholds below 0.45
    scores = metrics.isbi_scores(true, probabilities)
    assert scores["v_rand"] == 1.0 and scores["v_rand_threshold"] == pytest.approx(0.5)
    assert scores["pixel_error"] == 0.0 and scores["pixel_error_threshold"] == pytest.approx(0.5)
    # Everything predicted cell: 16 true positives, 4 false positives -> F = 2 (0.8) / 1.8.
    everything = metrics.isbi_scores(true, np.ones_like(probabilities))
    assert everything["pixel_error"] == pytest.approx(1 - 1.6 / 1.8)
    assert everything["pixel_error_threshold"] == 0.0


def test_isbi_scores_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        metrics.isbi_scores(np.ones((2, 4, 4)), np.ones((1, 4, 4)))


def test_the_segments_kept_are_those_of_the_first_best_v_rand_threshold():
    """Membranes 4 pixels wide whose outer rows are cell below a probability of 0.35: from 0.1 to 0.8
    the proposed borders move only within the true membrane, which V_rand ignores, so these
    thresholds tie with different segments."""
    labels = np.ones((2, 48, 48), np.uint8)
    core = np.zeros(labels.shape, bool)
    for start in range(0, 48, 12):
        labels[:, start : start + 4], labels[:, :, start : start + 4] = 0, 0
        core[:, start + 1 : start + 3], core[:, :, start + 1 : start + 3] = True, True
    probabilities = np.where(labels > 0, 0.9, np.where(core, 0.05, 0.35)).astype(np.float32)
    table = metrics.isbi_scores_by_threshold(labels, probabilities)
    assert np.all(table["v_rand"][1:9] == 1.0) and np.all(table["v_rand"][[0, 9, 10]] < 1.0)
    scores = metrics.isbi_scores(labels, probabilities, kept=[1])
    assert {name: value for name, value in scores.items() if name != "segments"} == metrics.isbi_scores(
        labels, probabilities
    )
    assert scores["v_rand_threshold"] == table["threshold"][1]

    def segments_at(threshold):
        return metrics.thinned_segments(probabilities[1].astype(np.float64) > threshold)

    [kept] = scores["segments"]
    np.testing.assert_array_equal(kept, segments_at(table["threshold"][1]))
    assert not np.array_equal(kept, segments_at(0.5)) and not np.array_equal(kept, segments_at(table["threshold"][8]))


def test_the_thinning_works_where_numbas_cache_cannot_be_used(tmp_path):
    """A __pycache__ that cannot be read or written (here a file in its place, after the import)
    made numba's cached call raise OSError, which stopped a run at its first evaluation."""
    shutil.copy(Path(metrics.__file__), tmp_path / "metrics.py")
    script = (
        "import pathlib, shutil, sys\n"
        "import numpy as np\n"
        "import metrics\n"
        "cache = pathlib.Path(metrics.__file__).parent / '__pycache__'\n"
        "shutil.rmtree(cache, ignore_errors=True)\n"
        "cache.write_text('')\n"
        "mask = np.zeros((4, 6), bool)\n"
        "mask[:, :2] = mask[:, 4:] = True\n"
        "print(metrics.thinned_segments(mask)[0].tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1, 1, 1, 0, 2, 2]"
