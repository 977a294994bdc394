"""What a command prints while it works, in place of Keras' progress bar (whose 14 values wrap every
step on a terminal of 120 columns and fill a piped log with control characters): a run's
progress (ProgressLine) and predict.py's count of slices (Counter).

On a terminal: one line, rewritten in place and never wider than WIDTH columns (nor than the
terminal), with the step, the time per step, the training loss and misclassified-pixel fraction
(means since the epoch began, as Keras reports them); at each epoch's end that line stays, and one
more says the validation scores in words once they are in (the watcher scores them while the next
epoch trains). Piped or redirected: one line per epoch with both, no control characters.
"""

import os
import sys
import threading
import time

import keras

WIDTH = 100
REDRAWS_PER_SECOND = 10
# The validation scores of an epoch's line, in words, in the order shown; those the epoch lacks
# (the challenge's scores between evaluations, --eval-every) are left out.
VALIDATION_WORDS = {
    "v_rand": "V_rand",
    "v_info": "V_info",
    "pixel_error": "pixel error",
    "misclassified_pixel_fraction": "misclassified",
    "loss": "loss",
}


def validation_line(logs):
    scores = [f"{words} {logs[f'val_{name}']:.4f}" for name, words in VALIDATION_WORDS.items() if f"val_{name}" in logs]
    return "validation: " + ", ".join(scores)


class ProgressLine(keras.callbacks.Callback):
    """The run's progress on `stream` (stdout): live on a terminal, one line per epoch elsewhere.
    The validation scores of an epoch are told by `validated`, from the watcher's thread."""

    def __init__(self, epochs, stream=None):
        super().__init__()
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._open = False  # a live line is on screen, not yet ended
        self._epoch, self._last_step = 0, None  # (steps done, when, logs) of the latest step
        self._epoch_started = self._drawn = 0.0
        self._ended = {}  # piped: {epoch: its last step line}, until its scores are in
        self._writing = threading.Lock()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._epoch_started = epoch, time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        # Every step: only what the line needs, formatted only when drawn.
        now = time.monotonic()
        self._last_step = (batch + 1, now, logs)
        if self.live and (now - self._drawn >= 1 / REDRAWS_PER_SECOND or batch + 1 == self.params["steps"]):
            self._drawn = now
            with self._writing:
                self.draw(self.step_line())

    def on_epoch_end(self, epoch, logs=None):
        # The epoch's last step line, with its time per step without the epoch end's.
        with self._writing:
            if self.live:
                self.draw(self.step_line())  # the redraws' limit may have skipped a stopped epoch's last step
                self._end_line()
            else:
                self._ended[epoch] = self.step_line()

    def validated(self, epoch, logs):
        """Tell the validation scores of `epoch` (`val_*` in `logs`): on a terminal on a line of their
        own that names the epoch, the live line drawn again below; piped, on the epoch's line."""
        with self._writing:
            if not self.live:
                print(f"{self._ended.pop(epoch)}; {validation_line(logs)}", file=self.stream, flush=True)
                return
            was_open = self._open
            # Its own line, named: with short epochs it may come after a later epoch's line.
            # Whole, however wide: a line that stays may wrap, and no value of it is cut.
            redraw(self.stream, f"  epoch {epoch + 1} {validation_line(logs)}", width=None)
            self.stream.write("\n")
            self._open = False
            if was_open:
                self.draw(self.step_line())

    def step_line(self):
        steps_done, now, logs = self._last_step
        return (
            f"epoch {self._epoch + 1}/{self.epochs}  step {steps_done}/{self.params['steps']}  "
            f"{(now - self._epoch_started) / steps_done:.3f} s/step  loss {logs['loss']:.4f}  "
            f"misclassified {logs['misclassified_pixel_fraction']:.4f}"
        )

    def draw(self, text):
        redraw(self.stream, text)
        self._open = True

    def end_line(self):
        """End the live line, so that what follows (the closing line, an error) starts on its own."""
        with self._writing:
            self._end_line()

    def _end_line(self):
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def redraw(stream, text, width=WIDTH):
    """`text` in place of the terminal line the cursor is on, cut to `width` columns and the
    terminal's (None: whole)."""
    if width is not None:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        # One column short of the terminal's: a line as wide as it wraps on some terminals.
        text = fitted(text, min(width, columns - 1) if columns > 1 else width)
    # \r back to the line's start, \x1b[K clears what a longer line left beyond the new one.
    stream.write("\r" + text + "\x1b[K")
    stream.flush()


def fitted(text, width):
    """`text` cut to `width` columns between two of its values, never within one (a number cut
    short reads as another: "loss 0.4321" as "loss 0"), the cut marked."""
    if len(text) <= width:
        return text
    cut = max(text.rfind(separator, 0, max(width - 3, 0)) for separator in ("  ", ", "))
    return text[:cut] + " ..." if cut > 0 else text[:width]


class Counter:
    """`<what> k/n`, redrawn in place on a terminal as `update(k)` is called; nothing when piped or
    redirected (the command's own lines say what was done)."""

    def __init__(self, total, what, stream=None):
        self.total, self.what = total, what
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def update(self, done):
        if self.live:
            redraw(self.stream, f"{self.what} {done}/{self.total}")
            if done == self.total:
                self.stream.write("\n")
                self.stream.flush()
