"""Where a run trains: the device found and what runs fastest there (the Keras dtype policy and
whether XLA compiles the step: machine_setup), and training on several GPUs or machines with
tf.distribute: which strategy, which process is the chief, and where each process writes.

`--strategy mirrored` keeps a copy of the model on every GPU of the machine (every logical CPU
device where there is no GPU) and averages their gradients each step; `--strategy multiworker`
does the same across machines, one train.py process per machine, with the cluster and the
process's own place in it given by the TF_CONFIG environment variable (see docs/scaling.md).
Every replica trains on its own `--batch-size` crops, so a step takes batch size x replicas crops,
fed to it through tf.data from its own stream of random crops.
"""

import contextlib
import re
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import threadpoolctl

import flags


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """TensorFlow's strategy, with `reduce` taking what Keras 3 gives it (keras-team/keras#20585).

    Keras' (3.15) `fit` reduces the first batch, an (images, masks) pair, and every step's scalar
    logs along axis 0; TensorFlow's (2.21) collective reduce takes one tensor and no axis for a
    scalar. Here each value of a nested structure is reduced on its own, a scalar along no axis,
    as MirroredStrategy does.
    """

    def reduce(self, reduce_op, value, axis):
        def reduce_one(per_replica):
            scalar = self.experimental_local_results(per_replica)[0].shape.rank == 0
            return super(MultiWorkerMirroredStrategy, self).reduce(reduce_op, per_replica, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def make_strategy(name):
    """The tf.distribute strategy `name` (one of settings.STRATEGIES). Create it before anything else
    touches TensorFlow: a multi-worker strategy configures the runtime, which it can only do
    before the runtime starts.

    auto: multiworker if TF_CONFIG names more than one process, else mirrored if the machine has
    more than one GPU, else TensorFlow's default (one device).
    """
    tasks = flags.cluster_tasks(name)  # checked before TensorFlow loaded, by train.py and bench.py
    if name == "auto":
        name = (
            "multiworker" if tasks > 1 else "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
        )
    if name == "multiworker":
        return MultiWorkerMirroredStrategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


def task(strategy):
    """(task type, task index) of this process in a multi-worker cluster; (None, None) otherwise."""
    resolver = strategy.cluster_resolver
    if resolver is None or not resolver.task_type:
        return None, None
    return resolver.task_type, resolver.task_id


def is_chief(strategy):
    """Whether this process writes the run: the "chief" task, or worker 0 of a cluster without one."""
    task_type, task_id = task(strategy)
    if task_type is None:
        return True
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def describe(strategy):
    """One line: the strategy, its replicas and this process's part."""
    replicas = strategy.num_replicas_in_sync
    task_type, task_id = task(strategy)
    where = f"; this process: {task_type} {task_id}{' (chief)' if is_chief(strategy) else ''}" if task_type else ""
    name = (
        "MultiWorkerMirroredStrategy"
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        else "MirroredStrategy"
        if isinstance(strategy, tf.distribute.MirroredStrategy)
        else "default strategy"
    )
    return f"{name}, {replicas} replica{'s' if replicas > 1 else ''}{where}"


def lost_worker(error):
    """In a few words, what the cluster lost if `error` is a tf.errors.UnavailableError (a worker
    died or cannot be reached): the tasks that stopped sending heartbeats, or why a collective was
    aborted; None for any other error."""
    if not isinstance(error, tf.errors.UnavailableError):
        return None
    if "unhealthy" in error.message:
        return (
            ", ".join(sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", error.message.split("unhealthy")[1]))))
            or "a worker"
        )
    aborted = re.search(r"aborted by: ([^\n]+)", error.message)
    return aborted.group(1) if aborted else error.message.splitlines()[0][:120]


@contextlib.contextmanager
def log_directory(strategy, logdir):
    """Where this process writes its run: `logdir` on the chief; on every other worker a temporary
    directory, removed at the end. All workers run the same callbacks, as Keras' multi-worker
    guide has it (a worker that skipped one could leave the others waiting in a collective), but
    only the chief's events and checkpoints are kept."""
    if is_chief(strategy):
        yield Path(logdir)
        return
    task_type, task_id = task(strategy)
    with tempfile.TemporaryDirectory(prefix=f"train-{task_type}{task_id}-") as temporary:
        yield Path(temporary)


# --- input -------------------------------------------------------------------------------------

DATA_WORKERS = 2  # parallel calls building training batches


def training_batches(strategy, crops, steps_per_epoch, first_epoch, workers=DATA_WORKERS):
    """The training batches from epoch `first_epoch` on, one stream per replica: the crops of epoch
    k are the same whether or not the run was resumed before it."""
    return strategy.distribute_datasets_from_function(
        lambda context: replica_batches(crops, steps_per_epoch, first_epoch, context, workers)
    )


def replica_batches(crops, steps_per_epoch, first_epoch, input_context, workers):
    """The tf.data input pipeline of one worker of a tf.distribute strategy (see
    `Strategy.distribute_datasets_from_function`): per-replica batches from `first_epoch` on,
    built by `workers` threads, in order.

    The worker's replicas take turns at its batches; each draws from its own stream, numbered
    globally, so that no two replicas or workers train on the same crops, and a single replica
    draws stream 0: the same crops as a run without a strategy.
    """
    local_replicas = input_context.num_replicas_in_sync // input_context.num_input_pipelines
    first_stream = input_context.input_pipeline_id * local_replicas
    shape = (crops.batch_size, crops.crop, crops.crop, 1)

    def batch(element):
        step, replica = divmod(int(element), local_replicas)
        epoch, index = divmod(step, steps_per_epoch)
        return crops.batch(epoch, index, first_stream + replica)

    def built(element):
        parts = tf.numpy_function(batch, [element], (tf.float32,) * crops.parts, stateful=False)
        return tuple(tf.ensure_shape(part, shape) for part in parts)

    start = first_epoch * steps_per_epoch * local_replicas
    return (
        tf.data.Dataset.range(start, np.iinfo(np.int64).max)
        .map(built, num_parallel_calls=workers, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


# --- the device and its settings -----------------------------------------------------------------


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def device_settings(precision):
    """(dtype policy, jit_compile, device description) for the accelerator or CPU found;
    `precision` is one of settings.PRECISIONS.

    On a CPU with AMX or AVX-512 bf16 units, bf16 convolutions run several times faster than
    float32; without them (AVX2 only) bf16 is emulated and about 8x slower. XLA made this U-Net
    slower on an AMX CPU and no faster on an AVX2 one (docs/performance.md), so it is used on
    GPUs only.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        device = f"{len(gpus)} GPU(s), compute capability {capability[0]}.{capability[1]}"
        best = "mixed_bfloat16" if capability >= (8, 0) else "mixed_float16" if capability >= (7, 0) else "float32"
        jit = True
    else:
        bf16_units = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
        device = f"CPU ({', '.join(bf16_units) or 'no bf16 units'})"
        best = "mixed_bfloat16" if bf16_units else "float32"
        jit = False
    return (best if precision == "auto" else precision), jit, device


def machine_setup(precision, batch_size, strategy):
    """What the run does on this machine, for config.json: precision (set as Keras' global policy),
    XLA, device, distribution and global batch."""
    policy, jit_compile, device = device_settings(precision)
    keras.mixed_precision.set_global_policy(policy)
    # OpenBLAS (numpy's and scipy's) keeps its threads spinning for a while after each call: the
    # one matrix product of each training crop (batches.elastic_displacement) kept a core busy
    # beside TensorFlow's threads, and a step on the pipeline took twice as long (docs/performance.md).
    threadpoolctl.threadpool_limits(1, user_api="blas")
    return {
        "precision": policy,
        "jit_compile": jit_compile,
        "device": device,
        "distribution": describe(strategy),
        "global_batch_size": batch_size * strategy.num_replicas_in_sync,
    }
