"""The watcher: the work of watching a run that does not need the net (scoring, rendering, histograms,
writing the summaries and checkpoints), done on a thread beside training, in the order it
was handed over, so that training waits only for what needs the net at that step.

The training thread hands over jobs (functions of no arguments, holding copies of what they need)
through a bounded queue: when the watcher falls behind, training waits, so memory stays bounded,
and the wait is counted. A job that fails stops the watcher (later jobs would write curves that
skip what it should have written); its error is raised on the training thread at the next hand-over
or when the watcher is drained. Knows nothing of Keras.

numpy, scipy, scikit-image and TensorFlow's ops release the GIL for the heavy work, so on a machine
whose accelerator trains the net the watcher's scoring runs on CPU cores that would idle otherwise.
Where the CPU trains the net, the watcher takes only the CPU time training leaves idle (`yield_to_training`).
"""

import contextlib
import os
import queue
import threading
import time

import tensorflow as tf

# The device of the watcher's TensorFlow ops (the validation loss and metrics, the PNG encoding, the
# summary writes): the CPU, off the accelerator that trains. A device scope holds for the thread
# that opens it, so threads the watcher's jobs start open it too.
DEVICE = "/CPU:0"

# Jobs waiting at most: an epoch hands over about ten, each holding at most the validation slices'
# probabilities and a copy of the weights (tens of MB at the defaults).
CAPACITY = 32
_DONE = object()


class Watcher:
    """Runs the jobs handed to `submit` one after the other on a thread of its own (or at once on
    the caller's thread with `inline`, the synchronous baseline bench.py compares with). Its
    counters: `busy` (seconds the jobs took) and `waited` (seconds the caller waited for it: for room
    in the queue, or in `catch_up`), totals since it started; `idle` says whether every job released
    to its thread is done (jobs kept back by `hold` do not count). Jobs are handed over from one
    thread."""

    def __init__(self, inline=False, capacity=CAPACITY):
        self.inline = inline
        self.busy = self.waited = 0.0
        # Each counted by one thread only (handed by the caller, done by the watcher): no lock needed.
        self._handed = self._done = 0
        self._error = None
        self._raised = False
        self._held = None  # jobs kept back between `hold` and `release`
        self._dropping = False  # set by a stop signal during `close`: the jobs not yet begun are skipped
        self._closing = False
        self._stopped = threading.Event()
        self._jobs = queue.Queue(maxsize=capacity)
        self._thread = None if inline else threading.Thread(target=self._work, name="watcher", daemon=True)
        if self._thread:
            self._thread.start()

    def submit(self, job):
        """Hand `job` over, waiting while the queue is full; raise the error of a job that failed."""
        self.raise_error()
        if self.inline:
            self._run(job)
            self.raise_error()
        elif self._held is not None:
            self._held.append(job)
        else:
            self._put(job)

    def hold(self):
        """Keep the jobs handed over from now on until `release` (or `drain`, or `close`), so that
        the watcher does not start on them while the caller still has work of its own to do."""
        if not self.inline and self._held is None:
            self._held = []

    def release(self):
        """Hand over the jobs kept back since `hold`, in order."""
        held, self._held = self._held or [], None
        for job in held:
            self._put(job)

    def catch_up(self):
        """Wait until every job released to the watcher is done, counting the wait; raise the error
        of a job that failed. An epoch's end calls it before handing over its jobs: the watcher is
        never more than one epoch behind, so a kill loses at most the epoch being scored (besides
        the one training), and at most two checkpoint candidates are on disk."""
        start = time.perf_counter()
        try:
            if not self.inline:
                self._jobs.join()
        except KeyboardInterrupt:  # a second Ctrl-C: the first waits for the step's edge (cli.stopping_between_steps)
            self._dropping = True
            raise
        finally:
            self.waited += time.perf_counter() - start
        self.raise_error()

    def drain(self):
        """Wait until every job handed over is done; raise the error of a job that failed."""
        self.release()
        if not self.inline:
            self._jobs.join()
        self.raise_error()

    def close(self):
        """Finish the jobs handed over and stop the thread; raise the error of a job that failed
        and was not raised yet. A stop signal while it waits (a second Ctrl-C; or one while
        training waited in `catch_up`) skips the jobs not yet begun, lets the one in progress
        finish, so that no file is left half written, and is raised."""
        try:
            self._finish()
        except KeyboardInterrupt:
            self._dropping = True
            self._finish()
            raise
        self.raise_error()

    def _finish(self):
        if self._thread is None:
            return
        self.release()
        if not self._closing:
            self._jobs.put(_DONE)
            self._closing = True
        # Not Thread.join: a join that a signal interrupted marks the thread as ended (Python 3.11).
        self._stopped.wait()

    @property
    def idle(self):
        return self._handed == self._done

    def _put(self, job):
        start = time.perf_counter()
        self._handed += 1  # before the job can be done: idle is never True while it waits
        self._jobs.put(job)
        self.waited += time.perf_counter() - start

    def raise_error(self):
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _work(self):
        try:
            yield_to_training()
            with tf.device(DEVICE):
                while (job := self._jobs.get()) is not _DONE:
                    if self._error is None and not self._dropping:
                        self._run(job)
                    self._done += 1  # before task_done: idle once drain returns
                    self._jobs.task_done()
                self._jobs.task_done()
        finally:
            self._stopped.set()

    def _run(self, job):
        start = time.perf_counter()
        try:
            job()
        except BaseException as error:  # raised again on the training thread, which says what it was
            self._error = error
        finally:
            self.busy += time.perf_counter() - start


def yield_to_training():
    """Run the calling thread, and the threads it starts (which inherit it), only on CPU time that
    no other thread of the machine wants (Linux's SCHED_IDLE; elsewhere nothing changes).

    Training on the CPU keeps its cores busy in bursts: a watcher that took its share of them at the
    same priority made TensorFlow's thread pools wait for their slowest thread, and training paid
    for watching twice (docs/performance.md, "The watcher's priority"). A watcher that falls behind
    still gets the CPU: training waits for room in its queue and leaves the cores idle.
    """
    if not hasattr(os, "SCHED_IDLE"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread (Linux schedules threads)
    except OSError:  # a sandbox that forbids it: the watcher shares the CPU as any thread does
        pass


@contextlib.contextmanager
def running(inline=False):
    """A Watcher for the block, finishing the jobs handed over when the block ends, however it ends
    (a Ctrl-C or SIGTERM included, so that what the last checkpoints logged is written; a second
    one stops it sooner: Watcher.close). The error of a job that failed meanwhile is raised."""
    watcher = Watcher(inline)
    try:
        yield watcher
    finally:
        watcher.close()
