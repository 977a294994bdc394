"""How fast does this U-Net train here, and what holds it back? Measured side by side in one process.

    python bench.py                                   # train.py's defaults
    python bench.py --filters 32 --crop 256 --batch-size 4 --precision mixed_bfloat16
    python bench.py --filters 64 --crop 512 --batch-size 8 --precision mixed_bfloat16 --step-only   # a GPU's figure

Takes train.py's flags for the configuration and prints one table (markdown, for docs/performance.md):

- the machine's 3x3-convolution peak in the run's precision (forward, the best of a few shapes);
- the training step on a batch already in memory: images/s, GFLOP/s (the U-Net's FLOPs counted
  from its layers, forward + backward = 3x forward) and the share of the conv peak;
- the data pipeline on its own (augmentation and batching, train.py's tf.data pipeline) against
  what training consumes;
- `model.fit` on the real pipeline with and without validation and train.py's TensorBoard
  callbacks at the chosen settings: the overhead of watching, in wall time;
- a reference pipeline on the same model: the seed article's approach (float32,
  ImageDataGenerator-style augmentation in the main thread, a callback that predicts the shown
  slices after every batch through a new summary writer), and the speed-up over it.
"""

import contextlib
import shlex
import statistics
import sys
import tempfile

import cli

cli.import_tensorflow()  # before anything that imports it

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

import callbacks
import distribute
import flags
import inputs
import rundir
import runs
import settings
import timing
import unet
import watcher
from unet import build_unet


def build_parser():
    parser = flags.build_parser(prog="bench.py")
    parser.description = (
        "Benchmark training speed, data pipeline and TensorBoard overhead for a train.py configuration."
    )
    bench = parser.add_argument_group("benchmark")
    bench.add_argument(
        "--timed-steps", type=cli.positive(int), default=20, help="training steps timed per measurement, after warm-up"
    )
    bench.add_argument(
        "--timed-epochs",
        type=cli.positive(int),
        default=2,
        help="epochs of --steps-per-epoch timed with and without callbacks, after one warm-up epoch each",
    )
    bench.add_argument(
        "--rounds",
        type=cli.positive(int),
        default=3,
        help="fits without callbacks and with the watcher, taken in turn this many times (the figures are the medians)",
    )
    bench.add_argument(
        "--step-only",
        action="store_true",
        help="measure the conv peak and the training step only (a minute; e.g. for a GPU's figure)",
    )
    return parser


# --- the reference: the seed article's pipeline ---------------------------------------------------


def image_data_generator_pair(rng, image, mask, crop):
    """A random crop transformed as the seed article's ImageDataGenerator did it (rotation 0.2 deg,
    shifts 5 %, shear 0.05 deg, zoom 5 % per axis, horizontal flip, nearest fill; one affine_transform
    per array, linear, mask thresholded at 0.5)."""
    top, left = rng.integers(image.shape[0] - crop + 1), rng.integers(image.shape[1] - crop + 1)
    image, mask = (
        image[top : top + crop, left : left + crop],
        mask[top : top + crop, left : left + crop].astype(np.float32),
    )
    theta = np.deg2rad(rng.uniform(-0.2, 0.2))
    shear = np.deg2rad(rng.uniform(-0.05, 0.05))
    zoom_row, zoom_col = rng.uniform(0.95, 1.05, size=2)
    shift = rng.uniform(-0.05, 0.05, size=2) * crop
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shearing = np.array([[1, -np.sin(shear)], [0, np.cos(shear)]])
    matrix = rotation @ shearing @ np.diag([zoom_row, zoom_col])
    centre = (crop - 1) / 2
    offset = np.array([centre, centre]) - matrix @ np.array([centre, centre]) + shift
    image, mask = (ndimage.affine_transform(array, matrix, offset, order=1, mode="nearest") for array in (image, mask))
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image.astype(np.float32), (mask > 0.5).astype(np.float32)


class PredictionImagesEveryBatch(keras.callbacks.Callback):
    """The seed article's image callback: after every batch, predict the shown slices and write
    them through a summary writer opened (and closed) for that batch."""

    def __init__(self, log_dir, images):
        super().__init__()
        self.log_dir, self.images = log_dir, images[..., np.newaxis]

    def on_train_batch_end(self, batch, logs=None):
        writer = tf.summary.create_file_writer(self.log_dir)
        probabilities = self.model.predict(self.images, verbose=0)
        with writer.as_default(step=int(self.model.optimizer.iterations.numpy())):
            tf.summary.image("prediction", probabilities, max_outputs=len(probabilities))
        writer.close()


def reference_step_seconds(args, images, labels, shown_images, log_dir):
    """Median seconds per step of the reference, float32, batches made in the main thread:
    {"bare": the training loop alone, "image callback": with the article's per-batch callback}."""
    keras.mixed_precision.set_global_policy("float32")
    model = build_unet(filters=args.filters)
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr), loss="binary_crossentropy", metrics=["accuracy"], jit_compile=False
    )
    callback = PredictionImagesEveryBatch(str(log_dir), shown_images)
    callback.set_model(model)
    rng = np.random.default_rng(args.seed)

    def step(with_callback):
        picks = rng.integers(len(images), size=args.batch_size)
        pairs = [image_data_generator_pair(rng, images[i], labels[i], args.crop) for i in picks]
        batch_images, batch_masks = map(np.stack, zip(*pairs, strict=True))
        model.train_on_batch(batch_images[..., np.newaxis], batch_masks[..., np.newaxis])
        if with_callback:
            callback.on_train_batch_end(0)

    return {
        "bare": timing.median_seconds(lambda: step(False), args.timed_steps),
        "image callback": timing.median_seconds(lambda: step(True), args.timed_steps),
    }


def measuring(what):
    """Say on stderr what is being measured, as it starts: the table comes at the end, on stdout."""
    print(f"bench.py: measuring {what}", file=sys.stderr, flush=True)


def fits(args, run_inputs, setup, batches, compiled_unet):
    """`model.fit` on the pipeline without callbacks and with train.py's callbacks and the watcher,
    in turn for --rounds rounds, then once with every job on the training thread. In turn, because
    these machines drift between one minute and the next by more than watching costs: each round's
    two fits are compared with each other (taken in the other order every second round), and the
    figures are the rounds' medians. The fit on the training thread is one fit, against the rounds'
    median bare epoch."""
    fit_epochs = f"{args.timed_epochs + 1} epochs of {args.steps_per_epoch} steps each, the first one not timed"
    measuring(
        f"model.fit without callbacks and with the watcher, in turn ({args.rounds} rounds of two fits, {fit_epochs})"
    )
    fit = {
        "bare": lambda: timed_fit(args, batches, compiled_unet),
        "watcher": lambda: timed_fit(args, batches, compiled_unet, run_inputs, setup),
    }
    rounds = []
    for index in range(args.rounds):
        # In the other order every second round: a machine that speeds up or slows down throughout
        # would otherwise push every round's overhead the same way.
        order = ("bare", "watcher") if index % 2 == 0 else ("watcher", "bare")
        rounds.append({way: fit[way]() for way in order})
    measuring(f"model.fit with train.py's callbacks, watching on the training thread ({fit_epochs})")
    inline = timed_fit(args, batches, compiled_unet, run_inputs, setup, inline=True)
    bare = statistics.median(r["bare"]["epoch seconds"] for r in rounds)
    watched = statistics.median(r["watcher"]["epoch seconds"] for r in rounds)
    overheads = [
        (r["watcher"]["epoch seconds"] - r["bare"]["epoch seconds"]) / r["watcher"]["epoch seconds"] for r in rounds
    ]
    breakdown = {
        name: statistics.median(r["watcher"]["breakdown"][name] for r in rounds)
        for name in rounds[0]["watcher"]["breakdown"]
    }
    return {
        "epoch seconds": bare,
        "fit images/s": args.steps_per_epoch * args.batch_size / bare,
        # Keyed by round too: steps_slowed_row compares each step with the same step of its round's bare fit.
        "bare steps": {(i, *key): step for i, r in enumerate(rounds) for key, step in r["bare"]["steps"].items()},
        "watcher": {
            "images/s": args.steps_per_epoch * args.batch_size / watched,
            "overhead": statistics.median(overheads),
            "overheads": overheads,
            "epoch seconds": watched,
            "breakdown": breakdown,
            "busy": statistics.median(r["watcher"]["busy"] for r in rounds),
            "waited": statistics.median(r["watcher"]["waited"] for r in rounds),
            "steps": {(i, *key): step for i, r in enumerate(rounds) for key, step in r["watcher"]["steps"].items()},
        },
        "inline": {**inline, "overhead": (inline["epoch seconds"] - bare) / inline["epoch seconds"]},
    }


def timed_fit(args, batches, compiled_unet, run_inputs=None, setup=None, inline=False):
    """One fit of a new net on `batches` (from step 0 as train.py's run starts: on a net trained on,
    the steps at which images are due, every --image-every, would fall within epochs, not at their
    ends), without callbacks, or with train.py's (given `run_inputs`) and the watcher or `inline`:
    {epoch seconds (median), images/s, breakdown (the callbacks' seconds an epoch), busy and
    waited (the watcher's, an epoch), steps (timing.EpochTimes.steps)}."""
    model = compiled_unet()
    watching_while = watcher.running(inline) if run_inputs is not None else contextlib.nullcontext()
    # The watcher closed before the run's lock is let go: its last jobs write into the run.
    with contextlib.ExitStack() as held, watching_while as watching:
        fit_callbacks = []
        if watching is not None:
            config = runs.run_config(args, run_inputs, "python bench.py", setup)
            run = rundir.Run(
                rundir.start(args.logdir, rundir.run_name(args.loss, args.lr), config, held), config, model
            )
            fit_callbacks = callbacks.for_run(
                args,
                run,
                run_inputs,
                callbacks.StopOnNonFiniteLoss(),
                runs.hyperparameters(config),
                runs.run_documents(config),
                watching,
                {},
                lambda epoch, logs: None,
            )
        seconds, breakdown, timer = timing.timed_fit(
            model,
            batches,
            args.timed_epochs,
            args.steps_per_epoch,
            watching=watching,
            callbacks=fit_callbacks,
        )
    return {
        "epoch seconds": seconds,
        "images/s": args.steps_per_epoch * args.batch_size / seconds,
        "breakdown": breakdown,
        "busy": timer.busy / args.timed_epochs,
        "waited": timer.waited / args.timed_epochs,
        "steps": timer.steps,
    }


def measure(args):
    run_inputs = inputs.load(args)
    stacks, train_indices, val_images, shown = (
        run_inputs.stacks,
        run_inputs.train_indices,
        run_inputs.val_images,
        run_inputs.shown(),
    )
    strategy = tf.distribute.get_strategy()
    setup = distribute.machine_setup(args.precision, args.batch_size, strategy)
    keras.utils.set_random_seed(args.seed)
    crops = run_inputs.crops(args.batch_size, args.crop, args.seed, args.loss)
    batches = distribute.training_batches(strategy, crops, args.steps_per_epoch, 0)
    results = {"device": setup["device"], "precision": setup["precision"], "XLA": setup["jit_compile"]}

    def compiled_unet():
        return unet.compiled_unet(args.filters, args.loss, args.lr, setup["jit_compile"], args.ema, args.dropout)

    measuring("the 3x3-convolution peak")
    results["conv rates"] = timing.conv_rates()
    measuring(f"the training step ({args.timed_steps} steps) and what it is made of")
    model = compiled_unet()
    flops_per_image = 3 * timing.forward_flops_per_image(model, args.crop)
    batch = crops.batch(epoch=0, index=0)
    step = timing.median_seconds(lambda: model.train_on_batch(*batch), args.timed_steps, warmup=3)
    results["step"] = step
    results["train images/s"] = args.batch_size / step
    results["GFLOP/image"] = flops_per_image / 1e9
    results["GFLOP/s"] = flops_per_image * args.batch_size / step / 1e9
    results["step breakdown"] = timing.step_breakdown(model, batch, setup["jit_compile"], args.timed_steps)
    if args.step_only:
        return results

    measuring("the data pipeline alone")
    results["pipeline images/s"] = timing.pipeline_images_per_second(batches, args.batch_size, 4 * args.timed_steps)

    with tempfile.TemporaryDirectory() as logdir:
        args.logdir = logdir
        results.update(fits(args, run_inputs, setup, batches, compiled_unet))
        measuring("the seed article's pipeline, bare and with its image callback")
        reference = reference_step_seconds(
            args,
            np.stack([stacks.image(i) for i in train_indices]),
            np.stack([stacks.mask(i) for i in train_indices]),
            val_images[shown],
            logdir,
        )
        results["reference images/s"] = {name: args.batch_size / seconds for name, seconds in reference.items()}
    return results


def step_made_of(r):
    breakdown = r["step breakdown"]
    convolutions = breakdown["convolutions"]
    slowest = sorted(convolutions.items(), key=lambda item: item[1][1])[:3]
    return (
        f"forward {breakdown['forward']:.3f} s ({breakdown['forward'] / r['step']:.0%}), of which the "
        f"{len(convolutions)} convolutions alone {sum(seconds for seconds, _ in convolutions.values()):.3f} s; "
        f"backward and update {r['step'] - breakdown['forward']:.3f} s. Slowest convolutions: "
        + ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, (_, rate) in slowest)
        + f". With XLA {'off' if r['XLA'] else 'on'}: {breakdown['other XLA step']:.3f} s per step"
    )


def format_results(args, r):
    peak = max(r["conv rates"].values())
    rows = [
        (
            "configuration",
            f"U-Net f={args.filters}, {args.crop}x{args.crop} crops, batch {args.batch_size}, "
            f"{r['precision']}, XLA {'on' if r['XLA'] else 'off'}; {r['device']}",
        ),
        (
            "3x3 conv peak (forward)",
            f"{peak:.0f} GFLOP/s; by input: "
            + ", ".join(f"{'x'.join(map(str, shape))} {rate:.0f}" for shape, rate in r["conv rates"].items()),
        ),
        ("training FLOPs", f"{r['GFLOP/image']:.2f} GFLOP per image (3x forward)"),
        (
            "training step, batch in memory",
            f"{r['step']:.3f} s = {r['train images/s']:.1f} images/s = "
            f"{r['GFLOP/s']:.0f} GFLOP/s = {r['GFLOP/s'] / peak:.0%} of the conv peak",
        ),
        ("what the step is made of", step_made_of(r)),
    ]
    if args.step_only:
        return results_table(rows)
    rows += [
        (
            "data pipeline alone",
            f"{r['pipeline images/s']:.0f} images/s (tf.data, {distribute.DATA_WORKERS} parallel calls) = "
            f"{r['pipeline images/s'] / r['train images/s']:.1f}x what training consumes",
        ),
        ("fit on the pipeline, no callbacks", f"{r['fit images/s']:.1f} images/s"),
        *watching_rows(args, r),
        ("reference: the seed article's loop, bare", f"{r['reference images/s']['bare']:.2f} images/s"),
        (
            "reference: the seed article's loop with its image callback",
            f"{r['reference images/s']['image callback']:.2f} images/s",
        ),
        (
            "speed-up over the reference (fit with callbacks)",
            " and ".join(
                f"{r['watcher']['images/s'] / rate:.1f}x over the {name} loop"
                for name, rate in (
                    ("bare", r["reference images/s"]["bare"]),
                    ("image-callback", r["reference images/s"]["image callback"]),
                )
            ),
        ),
    ]
    return results_table(rows)


def watching_rows(args, r):
    """The rows on what watching costs: with the watcher and all on the training thread, side by side.
    The watcher's jobs are timed alone where they ran on the training thread (`inline`): beside
    training they run on the CPU time it leaves idle (watcher.yield_to_training), so their wall time
    there says how much idle time they found, not how much work they are."""
    watched, inline = r["watcher"], r["inline"]
    blocked = sum(watched["breakdown"].values())
    steps = args.steps_per_epoch
    work = inline["busy"]

    def hooks(breakdown):
        return ", ".join(f"{name} {seconds:.2f}" for name, seconds in breakdown.items() if seconds >= 0.005)

    return [
        (
            "fit with validation and TensorBoard callbacks, watcher",
            f"{watched['images/s']:.1f} images/s: overhead {watched['overhead']:.1%} of wall time (the median of "
            f"{len(watched['overheads'])} rounds: {', '.join(f'{overhead:.1%}' for overhead in watched['overheads'])})",
        ),
        (
            "the same, all on the training thread (no watcher)",
            f"{inline['images/s']:.1f} images/s: overhead {inline['overhead']:.1%} of wall time (one fit, "
            "against the rounds' median fit without callbacks)",
        ),
        (
            "training thread blocked by watching, s per epoch",
            f"{blocked:.2f} s = {blocked / watched['epoch seconds']:.1%} "
            f"of the epoch ({hooks(watched['breakdown'])}), of which "
            f"{watched['waited']:.2f} s waiting for the watcher (for room in its queue, or for the former "
            "epoch's jobs at an epoch's end)",
        ),
        steps_slowed_row(args, r, blocked),
        (
            "the watcher's work, s per epoch",
            f"{work:.2f} s of jobs timed alone; beside training they took "
            f"{watched['busy']:.2f} s of wall time on the CPU time training left idle "
            f"(epoch {r['epoch seconds']:.1f} s without callbacks, "
            f"{watched['epoch seconds']:.1f} s with)",
        ),
        (
            "on the training thread without the watcher, s per epoch",
            f"{sum(inline['breakdown'].values()):.2f} s ({hooks(inline['breakdown'])})",
        ),
        (
            "on an accelerator",
            f"the watcher keeps up while an epoch of {steps} steps trains in {work:.1f} s or "
            f"more, a step of {work / steps:.4f} s or more; at 0.005 s a step training would wait "
            f"{max(0.0, work - steps * 0.005):.1f} s an epoch for it (with this CPU's speed)",
        ),
    ]


def steps_slowed_row(args, r, blocked):
    """What the watcher's work beside training cost its steps: the mean step that started while the
    watcher had work against the mean of the others, in the fit with the watcher, less the same
    difference between the same steps (epoch and batch) of the fit without callbacks, where nothing
    ran beside them (the steps after an epoch's end may differ without any watcher). Steps compared
    within each fit, so the drift between two fits, larger on these machines than watching's cost,
    stays out; round by round (steps keyed by round, epoch and batch), each round weighted by its
    steps beside the watcher, so that rounds of other speeds do not make a gap of their own. With
    the training thread's blocked seconds, this is watching's cost per epoch."""
    watched, bare = r["watcher"]["steps"], r["bare steps"]
    name = "training steps beside the watcher's work"
    beside, alone = {}, {}
    for key, (_, had_work) in watched.items():
        (beside if had_work else alone).setdefault(key[0], []).append(key)
    rounds = sorted(beside.keys() & alone.keys())
    if not rounds:
        count = sum(map(len, beside.values()))
        return name, f"the watcher had work at the start of {count} of {len(watched)} timed steps: none to compare"

    def gap(steps, round_):
        return statistics.mean(steps[key][0] for key in beside[round_]) - statistics.mean(
            steps[key][0] for key in alone[round_]
        )

    counted = sum(len(beside[round_]) for round_ in rounds)

    def weighted_gap(steps):
        return sum(gap(steps, round_) * len(beside[round_]) for round_ in rounds) / counted

    gap_watched, gap_bare = weighted_gap(watched), weighted_gap(bare)
    per_epoch = counted / (args.timed_epochs * len(rounds))
    slowed = (gap_watched - gap_bare) * per_epoch
    cost = blocked + slowed
    return (
        name,
        f"{per_epoch:.0f} of {args.steps_per_epoch} steps an epoch started while the watcher had work: "
        f"{gap_watched * 1000:+.1f} ms each on average against the others, the same steps without callbacks "
        f"{gap_bare * 1000:+.1f} ms: {slowed:.2f} s an epoch; with the blocked seconds, watching cost "
        f"{cost:.2f} s = {cost / r['watcher']['epoch seconds']:.1%} of the epoch",
    )


def results_table(rows):
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)])


def benchmark(args, argv):
    results = measure(args)
    print(f"python bench.py {shlex.join(argv)}".rstrip())
    print(format_results(args, results))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, given = cli.parse_with_given(parser, argv)
    args = flags.with_preset(args, given)
    if args.resume or args.summary or args.profile_batch:
        # A profiler running in its timed fits would change what bench.py measures.
        parser.error("--resume, --summary and --profile-batch are train.py's; bench.py measures a new configuration")
    args.epochs = args.epochs or settings.DEFAULTS["epochs"]
    return cli.run("bench.py", lambda: benchmark(args, argv))


if __name__ == "__main__":
    sys.exit(main())
