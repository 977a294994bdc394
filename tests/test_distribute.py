"""tf.distribute on CPUs: two logical devices under MirroredStrategy, and two processes on this
machine under MultiWorkerMirroredStrategy, as two machines would run it."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rundir
from conftest import ROOT, TINY, TINY_STEPS, read_events
from rundir import BEST, CONFIG, LAST
from summaries import BATCH_GROUP

RUN_TIMEOUT = 300  # seconds; a tiny run takes under a minute
RUN_PARTS = ("", "/train", "/validation")

# Logical devices must be set up before TensorFlow starts, so the run gets a process of its own.
ON_TWO_CPU_DEVICES = """
import sys
import tensorflow as tf
cpu, = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import train
sys.exit(train.main(sys.argv[1:]))
"""


def tiny_run_arguments(small_isbi_dir, logdir, strategy):
    return TINY + [
        "--loss",
        "bce",
        "--lr",
        "1e-3",
        "--eval-every",
        "1",
        "--strategy",
        strategy,
        "--data",
        str(small_isbi_dir),
        "--logdir",
        str(logdir),
    ]


def finished(processes):
    """[(exit code, output)] of `processes`, each killed if it runs past RUN_TIMEOUT."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=RUN_TIMEOUT)
            results.append((process.returncode, output))
    finally:
        for process in processes:
            process.kill()
    return results


def start(arguments, **environment):
    return subprocess.Popen(
        [sys.executable, *arguments],
        cwd=ROOT,
        env={**os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def tags_by_part(logdir, run):
    """{part of the run: {plugin: sorted tags}} as TensorBoard reads the run directory."""
    result = {}
    for part in RUN_PARTS:
        by_plugin = {}
        for tag, (plugin, _) in read_events(Path(logdir) / (run + part))[1].items():
            by_plugin.setdefault(plugin, []).append(tag)
        result[part] = {plugin: sorted(names) for plugin, names in by_plugin.items()}
    return result


def batch_loss_steps(logdir, run):
    return [step for step, _ in read_events(Path(logdir) / run / "train")[0][f"{BATCH_GROUP}/loss"]]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


# Slow (20-45 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_two_devices_under_mirrored_strategy_log_what_one_device_logs(small_isbi_dir, two_run_logdir, tmp_path):
    ((code, output),) = finished(
        [start(["-c", ON_TWO_CPU_DEVICES, *tiny_run_arguments(small_isbi_dir, tmp_path, "mirrored")])]
    )
    assert code == 0, output
    assert "distribution: MirroredStrategy, 2 replicas; global batch 4 crops" in output
    config = json.loads((tmp_path / "bce_lr1e-3" / CONFIG).read_text())
    assert config["global_batch_size"] == 4 and config["distribution"].startswith("MirroredStrategy, 2 replicas")
    # two_run_logdir's bce run: the same tiny run on one device.
    assert tags_by_part(tmp_path, "bce_lr1e-3") == tags_by_part(two_run_logdir, "bce_lr1e-3")
    assert batch_loss_steps(tmp_path, "bce_lr1e-3") == batch_loss_steps(two_run_logdir, "bce_lr1e-3")


# Slow, as the lost-worker test below: two processes train under MultiWorkerMirroredStrategy; the
# mirrored test above checks what a distributed run writes.
@pytest.mark.slow
def test_two_workers_train_one_run_that_only_the_chief_writes(small_isbi_dir, two_run_logdir, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [
        start(
            ["train.py", *tiny_run_arguments(small_isbi_dir, tmp_path, "multiworker")],
            TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}),
        )
        for index in range(2)
    ]
    (chief_code, chief_output), (worker_code, worker_output) = finished(processes)
    assert chief_code == 0, chief_output
    assert worker_code == 0, worker_output
    assert "MultiWorkerMirroredStrategy, 2 replicas; this process: worker 0 (chief)" in chief_output
    assert f"run directory: {tmp_path / 'bce_lr1e-3'}" in chief_output
    assert "this process: worker 1;" in worker_output
    # Only the chief wrote: one run directory, with checkpoints and events of every part.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bce_lr1e-3"]
    run_dir = tmp_path / "bce_lr1e-3"
    assert (run_dir / LAST).is_file() and (run_dir / BEST).is_file()
    assert tags_by_part(tmp_path, "bce_lr1e-3") == tags_by_part(two_run_logdir, "bce_lr1e-3")
    assert batch_loss_steps(tmp_path, "bce_lr1e-3")[-1] == TINY_STEPS
    # The other worker wrote to a temporary directory, and removed it.
    worker_dir = re.search(r"this worker logs to (\S+), removed at the end", worker_output).group(1)
    assert not os.path.exists(worker_dir)


@pytest.mark.slow
def test_a_lost_worker_stops_the_chief_with_one_line(small_isbi_dir, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    arguments = TINY + [
        "--epochs",
        "50",
        "--strategy",
        "multiworker",
        "--data",
        str(small_isbi_dir),
        "--logdir",
        str(tmp_path),
    ]
    chief, worker = [
        start(
            ["train.py", *arguments],
            PYTHONUNBUFFERED="1",
            TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}),
        )
        for index in range(2)
    ]
    try:
        # Training has begun on both once the worker's callbacks have written the start of its run.
        worker_logdir = next(
            Path(line.removeprefix("this worker logs to ").split(", removed at the end")[0])
            for line in worker.stdout
            if line.startswith("this worker logs to ")
        )
        deadline = time.monotonic() + 240
        while not list(worker_logdir.glob(f"*/{rundir.VALIDATION}/events.out.tfevents.*")):
            assert time.monotonic() < deadline, "the worker's run did not start within 4 minutes"
            time.sleep(0.05)
        worker.kill()
        ((code, output),) = finished([chief])
    finally:
        worker.kill()
    assert code == 1, output
    last = output.strip().splitlines()[-1]
    # TensorFlow names the lost task (its heartbeats stopped) or the address it cannot reach, by timing.
    assert last.startswith("train.py: stopped: the cluster lost a worker (")
    # Killed as its first epoch began: no checkpoint to continue from, the run removed.
    assert last.endswith(" was checkpointed, so nothing was kept: start the run again")
    assert "Traceback" not in output


@pytest.mark.skipif(os.cpu_count() < 2, reason="OpenBLAS takes one thread at most on one CPU")
def test_a_run_keeps_numpys_blas_on_one_thread():
    # OpenBLAS' threads spin after each call and took a core from training (distribute.machine_setup).
    import tensorflow as tf
    import threadpoolctl

    import distribute

    def blas_threads():
        return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]

    threadpoolctl.threadpool_limits(2, user_api="blas")
    assert blas_threads() and set(blas_threads()) == {2}
    distribute.machine_setup("float32", 1, tf.distribute.get_strategy())
    assert set(blas_threads()) == {1}
