"""The watcher: jobs in order beside the caller, a bounded queue, errors raised where training sees them."""

import os
import signal
import threading
import time

import pytest

import watcher


def test_jobs_run_in_the_order_handed_over_on_a_thread_of_their_own():
    done, threads = [], set()

    def job(number):
        def run():
            time.sleep(0.001 * (5 - number))  # later jobs quicker: order is kept anyway
            done.append(number)
            threads.add(threading.current_thread().name)

        return run

    with watcher.running() as watching:
        for number in range(5):
            watching.submit(job(number))
        watching.drain()
        assert done == list(range(5)) and threads == {"watcher"}
        assert watching.busy > 0.0


def test_idle_until_a_job_is_handed_over_and_again_once_it_is_done():
    release = threading.Event()
    with watcher.running() as watching:
        assert watching.idle
        watching.hold()
        watching.submit(release.wait)
        assert watching.idle  # held back: not handed over yet
        watching.release()
        assert not watching.idle
        release.set()
        watching.drain()
        assert watching.idle


def test_a_full_queue_makes_the_caller_wait_and_the_wait_is_counted():
    release = threading.Event()
    watching = watcher.Watcher(capacity=1)
    try:
        watching.submit(release.wait)  # taken by the thread, which then blocks
        time.sleep(0.05)
        watching.submit(lambda: None)  # fills the queue
        threading.Timer(0.2, release.set).start()
        watching.submit(lambda: None)  # waits for room until the first job ends
        assert watching.waited >= 0.15
    finally:
        release.set()
        watching.close()


def test_a_failed_job_stops_the_later_ones_and_is_raised_once_at_the_next_hand_over():
    ran = []

    def fails():
        raise OSError(28, "No space left on device")

    with watcher.running() as watching:
        watching.submit(fails)
        watching.submit(lambda: ran.append("after"))
        with pytest.raises(OSError, match="No space left"):
            watching.drain()
        watching.drain()  # said once
    assert ran == []


def test_closing_finishes_the_jobs_handed_over():
    done = []
    with watcher.running() as watching:
        for number in range(3):
            watching.submit(lambda number=number: (time.sleep(0.02), done.append(number)))
    assert done == [0, 1, 2]


def test_inline_runs_each_job_at_once_on_the_callers_thread():
    threads = []
    with watcher.running(inline=True) as watching:
        watching.submit(lambda: threads.append(threading.current_thread()))
        assert threads == [threading.current_thread()]
        with pytest.raises(ValueError):
            watching.submit(lambda: int("x"))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_watcher_and_the_threads_it_starts_take_only_idle_cpu_time_and_the_caller_keeps_its_priority():
    policies = {}

    def job():
        policies["watcher"] = os.sched_getscheduler(0)
        helper = threading.Thread(target=lambda: policies.setdefault("started by it", os.sched_getscheduler(0)))
        helper.start()
        helper.join()

    with watcher.running() as watching:
        watching.submit(job)
        watching.drain()
    assert policies == {"watcher": os.SCHED_IDLE, "started by it": os.SCHED_IDLE}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_jobs_held_back_wait_for_their_release_and_keep_their_order():
    done = []
    with watcher.running() as watching:
        watching.submit(lambda: done.append(0))
        watching.hold()
        for number in (1, 2):
            watching.submit(lambda number=number: done.append(number))
        time.sleep(0.1)
        assert done == [0]
        watching.release()
        watching.submit(lambda: done.append(3))
        watching.drain()
        assert done == [0, 1, 2, 3]
        watching.hold()
        watching.submit(lambda: done.append(4))
        watching.drain()  # a drain, like a close, hands the held jobs over first
        assert done == [0, 1, 2, 3, 4]
        watching.hold()
        watching.submit(lambda: done.append(5))
    assert done == [0, 1, 2, 3, 4, 5]


def test_catching_up_waits_for_the_jobs_released_not_for_those_held_back_and_counts_the_wait():
    done, release = [], threading.Event()
    with watcher.running() as watching:
        watching.submit(lambda: (time.sleep(0.2), done.append("released")))
        watching.hold()
        watching.submit(release.wait)  # would never end if catching up waited for it
        watching.catch_up()
        assert done == ["released"] and watching.waited >= 0.15
        release.set()


def test_closing_raises_the_error_of_a_job_that_failed_meanwhile():
    def fails():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with watcher.running() as watching:
            watching.submit(fails)


def watcher_in_a_job(done):
    """A Watcher whose first job, appending "in progress" to `done` after half a second, has begun;
    a SIGINT comes 0.1 s later, sent to the process as a terminal sends Ctrl-C (raise_signal from
    the timer's thread would leave the main thread's wait uninterrupted)."""
    started = threading.Event()

    def in_progress():
        started.set()
        time.sleep(0.5)
        done.append("in progress")

    watching = watcher.Watcher()
    watching.submit(in_progress)
    started.wait()
    threading.Timer(0.1, os.kill, [os.getpid(), signal.SIGINT]).start()
    return watching


def test_a_stop_signal_while_closing_skips_the_jobs_not_begun_once_the_one_in_progress_is_done(untouched_stop_signals):
    done = []
    watching = watcher_in_a_job(done)
    watching.submit(lambda: done.append("not begun"))
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C, while close waits
        watching.close()
    assert done == ["in progress"]  # finished before close raised: nothing left half written


def test_a_stop_signal_while_training_waits_to_catch_up_skips_the_jobs_not_begun(untouched_stop_signals):
    done = []
    watching = watcher_in_a_job(done)
    watching.hold()
    watching.submit(lambda: done.append("held back"))  # the epoch's jobs, not yet released
    with pytest.raises(KeyboardInterrupt):
        watching.catch_up()
    watching.close()
    assert done == ["in progress"]
