"""The device a run trains on, and what runs fastest there: the Keras dtype policy (precision) and
whether XLA compiles the step."""

import keras
import tensorflow as tf

import distribute


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
    return {"precision": policy, "jit_compile": jit_compile, "device": device,
            "distribution": distribute.describe(strategy),
            "global_batch_size": batch_size * strategy.num_replicas_in_sync}
