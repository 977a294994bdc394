import keras
import numpy as np
import pytest

from unet import DROPOUT, DropoutSeeds, build_unet


@pytest.mark.parametrize("height, width", [(64, 64), (48, 96)])
def test_output_has_the_input_size_and_one_probability_channel(height, width):
    model = build_unet(filters=2)
    output = model.predict_on_batch(np.random.default_rng(0).random((2, height, width, 1), dtype=np.float32))
    assert output.shape == (2, height, width, 1)
    assert np.all((output >= 0) & (output <= 1))


def test_layers_are_named_like_the_paper_figure():
    names = [layer.name for layer in build_unet(filters=2).layers]
    expected = (
        ["image"]
        + [f"enc{i}_{part}" for i in range(1, 5) for part in ("conv1", "conv2", "pool")]
        + ["bottleneck_conv1", "bottleneck_conv2"]
        + [f"dec{i}_{part}" for i in range(4, 0, -1) for part in ("up", "concat", "conv1", "conv2")]
        + ["output"]
    )
    assert names == expected


def test_dropout_follows_the_bottleneck_only_when_asked_and_only_in_training():
    assert DROPOUT not in [layer.name for layer in build_unet(filters=2).layers]
    model = build_unet(filters=2, dropout=0.5)
    names = [layer.name for layer in model.layers]
    assert names.index(DROPOUT) == names.index("bottleneck_conv2") + 1
    image = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
    np.testing.assert_array_equal(model(image, training=False), model(image, training=False))
    assert not np.array_equal(model(image, training=True), model(image, training=True))


def test_dropout_masks_are_new_each_step_and_epoch_and_the_same_again_for_the_same_seed_and_epoch():
    """What lets a resumed --dropout run draw the masks of one run straight through."""
    model = build_unet(filters=2, dropout=0.5)
    layer, ones = model.get_layer(DROPOUT), np.ones((1, 8, 8, 32), np.float32)

    def masks(seed, epoch):
        seeds = DropoutSeeds(seed)
        seeds.set_model(model)
        seeds.on_epoch_begin(epoch)
        return [keras.ops.convert_to_numpy(layer(ones, training=True)) != 0 for _ in range(2)]

    first, second = masks(seed=3, epoch=0), masks(seed=3, epoch=1)
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], second[0]) and not np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], masks(seed=4, epoch=0)[0])
    np.testing.assert_array_equal(masks(seed=3, epoch=0), first)


def test_filters_double_per_level_and_decoder_mirrors_encoder():
    model = build_unet(filters=3)
    assert model.get_layer("enc1_conv1").filters == 3
    assert model.get_layer("enc4_conv2").filters == 24
    assert model.get_layer("bottleneck_conv2").filters == 48
    assert model.get_layer("dec4_up").filters == 24
    assert model.get_layer("dec1_conv2").filters == 3
    assert model.get_layer("dec2_concat").output.shape[-1] == 12


def test_output_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_unet(filters=2)
        assert model.get_layer("enc1_conv1").compute_dtype == "bfloat16"
        assert model.get_layer("output").compute_dtype == "float32"
        assert model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
def test_paper_size_net_trains_on_a_whole_slice():
    model = build_unet(filters=64)
    assert model.count_params() == 31_030_593  # the paper's 64-filter U-Net with up-convolutions
    model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy")
    image = np.random.default_rng(0).random((1, 512, 512, 1), dtype=np.float32)
    loss = model.train_on_batch(image, (image > 0.5).astype(np.float32))
    assert np.isfinite(loss)
