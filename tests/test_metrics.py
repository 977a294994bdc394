import numpy as np
import pytest

import metrics


def batch(*images):
    """(N, H, W, 1) float32 from 2-D lists."""
    return np.asarray(images, dtype=np.float32)[..., np.newaxis]


LABEL = batch([[1, 1, 0, 0],
               [1, 1, 0, 0]])


def test_misclassified_pixel_fraction_counts_thresholded_disagreements():
    # Two of eight pixels on the wrong side of 0.5; confident or not does not matter.
    prediction = batch([[0.9, 0.51, 0.1, 0.49],
                        [0.2, 1.0, 0.0, 0.7]])
    np.testing.assert_allclose(metrics.misclassified_pixel_fraction(LABEL, prediction), [2 / 8])


def test_misclassified_pixel_fraction_is_per_image_for_any_size():
    label = np.ones((3, 5, 7, 1), np.float32)
    prediction = np.ones((3, 5, 7, 1), np.float32)
    prediction[1, 0, :3] = 0.0   # 3 wrong pixels in image 1
    prediction[2] = 0.2          # all wrong in image 2
    np.testing.assert_allclose(metrics.misclassified_pixel_fraction(label, prediction), [0, 3 / 35, 1], rtol=1e-6)


def test_exactly_one_half_counts_as_cell():
    assert float(metrics.misclassified_pixel_fraction(batch([[1]]), batch([[0.5]]))[0]) == 0.0


def test_membrane_dice_by_hand():
    # Label membrane: the 4 right-hand pixels. Predicted membrane: 3 of them plus 1 cell pixel.
    prediction = batch([[0.9, 0.2, 0.1, 0.1],
                        [0.9, 0.9, 0.1, 0.8]])
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


def test_soft_dice_loss_by_hand():
    prediction = batch([[1, 1, 0.5, 0],
                        [1, 1, 0, 0]])  # membrane probability 0.5, 1, 1, 1 on the membrane pixels
    dice = (2 * 3.5 + metrics.SMOOTHING) / (4 + 3.5 + metrics.SMOOTHING)
    np.testing.assert_allclose(metrics.soft_dice_loss(LABEL, prediction), [1 - dice], rtol=1e-6)
