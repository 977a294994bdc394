import argparse
import threading
import time

import keras
import numpy as np
import pytest

import bench
import timing
import watcher
from unet import build_unet


def unet_forward_flops(filters, size, depth=4):
    """The U-Net's convolution FLOPs for one image, level by level from the paper's figure."""
    channels = [filters * 2**level for level in range(depth + 1)]  # levels 1..depth, then the bottleneck
    sizes = [size // 2**level for level in range(depth + 1)]
    flops, previous = 0, 1
    for level in range(depth + 1):  # two 3x3 convolutions on the way down and at the bottom
        flops += 2 * sizes[level] ** 2 * 9 * (previous * channels[level] + channels[level] ** 2)
        previous = channels[level]
    for level in range(depth - 1, -1, -1):
        c = channels[level]
        flops += 2 * sizes[level + 1] ** 2 * 4 * channels[level + 1] * c  # 2x2 up-convolution, stride 2
        flops += 2 * sizes[level] ** 2 * 9 * (2 * c * c + c * c)  # conv on the concatenation, then c -> c
    return flops + 2 * size**2 * filters  # 1x1 output convolution


@pytest.mark.parametrize("filters, size", [(4, 64), (16, 128), (64, 512)])
def test_forward_flops_counted_from_the_layers_match_the_figure(filters, size):
    assert timing.forward_flops_per_image(build_unet(filters), size) == unet_forward_flops(filters, size)


def test_reference_augmentation_gives_aligned_binary_crops():
    rng = np.random.default_rng(0)
    image = np.tile(np.linspace(0, 1, 96, dtype=np.float32), (80, 1))
    mask = (image > 0.5).astype(np.uint8)
    for _ in range(5):
        crop_image, crop_mask = bench.image_data_generator_pair(rng, image, mask, 32)
        assert crop_image.shape == crop_mask.shape == (32, 32)
        assert crop_image.dtype == crop_mask.dtype == np.float32
        assert set(np.unique(crop_mask)) <= {0.0, 1.0}
        # The transforms are small (0.2 deg, 5 %): the mask still follows the image's ramp.
        assert np.mean((crop_image > 0.5) == (crop_mask > 0.5)) > 0.95


TINY_BENCH = "--filters 4 --crop 64 --batch-size 2 --timed-steps 2 --precision float32".split()


# Slow: bench.py's fixed-size parts (the conv peak, the XLA step, the reference loop) take over a minute
# on two cores whatever the configuration.
@pytest.mark.slow
def test_bench_prints_every_measure_for_a_tiny_configuration(isbi_dir, capsys):
    flags = [*TINY_BENCH, "--steps-per-epoch", "3", "--timed-epochs", "1", "--rounds", "2", "--data", str(isbi_dir)]
    assert bench.main(flags) == 0
    table, said = capsys.readouterr()
    # What it measures, said as it starts each part: the full bench runs for minutes.
    assert said.splitlines()[0] == "bench.py: measuring the 3x3-convolution peak"
    assert len(said.splitlines()) == 6 and all(line.startswith("bench.py: measuring ") for line in said.splitlines())
    for row in (
        "3x3 conv peak",
        "training FLOPs",
        "of the conv peak",
        "data pipeline alone",
        "no callbacks",
        "of wall time (the median of 2 rounds: ",
        "Validation",
        "ValidationSliceSummaries",
        "watcher, ",
        "all on the training thread",
        "training thread blocked by watching",
        "waiting for the watcher (for room in its queue, or for the former epoch's jobs",
        "training steps beside the watcher's work",
        "s of jobs timed alone",
        "on the CPU time training left idle",
        "on an accelerator",
        "the watcher keeps up while an epoch of 3 steps",
        "what the step is made of",
        "With XLA on",
        "the seed article's loop, bare",
        "with its image callback",
        "over the bare loop",
        "over the image-callback loop",
    ):
        assert row in table, row
    assert "U-Net f=4, 64x64 crops, batch 2, float32" in table


# Slow: the conv peak and the XLA-compiled step alone take most of a minute on two cores.
@pytest.mark.slow
def test_bench_step_only_measures_the_step_and_nothing_after_it(isbi_dir, capsys):
    assert bench.main([*TINY_BENCH, "--data", str(isbi_dir), "--step-only"]) == 0
    table = capsys.readouterr().out
    assert "of the conv peak" in table and "what the step is made of" in table and "With XLA on" in table
    assert "fit on the pipeline" not in table and "reference" not in table


@pytest.mark.parametrize("flags", [["--timed-steps", "0"], ["--summary", "logs"]])
def test_bench_refuses_bad_flags_in_one_line(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(flags)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("bench.py: error:") and error.count("\n") == 1


@pytest.mark.parametrize("flags", [["--profile-batch", "2,3"], ["--summary", "logs"], ["--resume", "logs/bce_lr1e-4"]])
def test_bench_refuses_what_only_train_py_does(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "--resume, --summary and --profile-batch are train.py's; bench.py measures a new configuration" in error


def test_epoch_times_times_each_step_and_says_whether_the_watcher_had_work_when_it_started():
    release = threading.Event()

    def job():  # 0.1 s of its own, whenever the idle-priority thread starts it
        release.wait()
        time.sleep(0.1)

    class HandsOverAtStep(keras.callbacks.Callback):
        """In the second epoch, after step 2, a job that runs until step 4 of that epoch ends; step 4
        takes 0.3 s longer in its batch-end hook (counted in its time, as other callbacks' hooks are)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch == 1:
                watching.submit(job)
            if self.epoch == 1 and batch == 3:
                time.sleep(0.3)
                release.set()
                watching.drain()

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with watcher.running() as watching:
        timer = timing.EpochTimes(watching)
        callbacks = [HandsOverAtStep(), timer]
        model.fit(np.ones((12, 4)), np.ones((12, 1)), batch_size=2, epochs=2, verbose=0, callbacks=callbacks)
    # The first epoch is not timed; in the second, steps 3 and 4 started while the job ran.
    assert sorted(timer.steps) == [(1, batch) for batch in range(6)]
    assert [timer.steps[1, batch][1] for batch in range(6)] == [False, False, True, True, False, False]
    assert timer.steps[1, 3][0] >= 0.3 > max(timer.steps[1, batch][0] for batch in (0, 1, 2, 4, 5))
    assert len(timer.epochs) == 2 and timer.busy >= 0.1


def test_watching_cost_takes_the_steps_beside_the_watcher_against_the_same_steps_without_it():
    steps = 10
    args = argparse.Namespace(timed_epochs=2, rounds=1, steps_per_epoch=steps)
    beside = {(0, epoch, batch) for epoch in (1, 2) for batch in (0, 1)}

    def fit(seconds_beside):
        keys = [(0, epoch, batch) for epoch in (1, 2) for batch in range(steps)]
        return {key: (seconds_beside if key in beside else 0.5, key in beside) for key in keys}

    # The first two steps of an epoch: 0.6 s beside the watcher, 0.55 s without callbacks, 0.5 s
    # otherwise; 0.05 s of each is the watcher's, 2 steps an epoch: 0.1 s, with 1.0 s blocked 1.1 s.
    results = {"watcher": {"steps": fit(0.6), "epoch seconds": 11.0}, "bare steps": fit(0.55)}
    name, text = bench.steps_slowed_row(args, results, blocked=1.0)
    assert name == "training steps beside the watcher's work"
    assert text.startswith("2 of 10 steps an epoch started while the watcher had work: +100.0 ms each")
    assert "without callbacks +50.0 ms: 0.10 s an epoch" in text
    assert text.endswith("watching cost 1.10 s = 10.0% of the epoch")


def test_watching_cost_compares_steps_round_by_round():
    """The watcher costing nothing, in two rounds: the second's fit with the watcher 20 % slower
    throughout (the machine drifted), with more of its steps beside the watcher. Pooled over the
    rounds, those slower steps would read as watching's cost."""
    steps = 10
    args = argparse.Namespace(timed_epochs=1, rounds=2, steps_per_epoch=steps)
    beside = {(0, 1, batch) for batch in range(2)} | {(1, 1, batch) for batch in range(8)}

    def fit(seconds):
        return {
            (round_, 1, batch): (seconds[round_], (round_, 1, batch) in beside)
            for round_ in (0, 1)
            for batch in range(steps)
        }

    results = {"watcher": {"steps": fit({0: 0.5, 1: 0.6}), "epoch seconds": 6.0}, "bare steps": fit({0: 0.5, 1: 0.5})}
    _, text = bench.steps_slowed_row(args, results, blocked=0.0)
    assert text.startswith("5 of 10 steps an epoch started while the watcher had work: +0.0 ms each")
    assert "0.00 s an epoch" in text
