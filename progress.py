"""What a run prints while it trains, in place of Keras' progress bar (whose 14 values wrap every
step on a terminal of 120 columns and fill a piped log with control characters).

On a terminal: one line, rewritten in place and never wider than WIDTH columns, with the step, the
time per step, the training loss and misclassified-pixel fraction (means since the epoch began,
as Keras reports them); at each epoch's end that line stays and one more says the validation
scores in words. Piped or redirected: one line per epoch with both, no control characters.
"""

import os
import sys
import time

import keras

WIDTH = 100
REDRAWS_PER_SECOND = 10
# The validation scores of an epoch's line, in words, in the order shown; those the epoch lacks
# (the challenge's scores between evaluations, --eval-every) are left out.
VALIDATION_WORDS = {"v_rand": "V_rand", "v_info": "V_info", "pixel_error": "pixel error",
                    "misclassified_pixel_fraction": "misclassified pixels", "loss": "loss"}


def validation_line(logs):
    scores = [f"{words} {logs[f'val_{name}']:.4f}" for name, words in VALIDATION_WORDS.items() if f"val_{name}" in logs]
    return "validation: " + ", ".join(scores)


class ProgressLine(keras.callbacks.Callback):
    """The run's progress on `stream` (stdout): live on a terminal, one line per epoch elsewhere.
    Must come after the callback that adds the validation scores to the epoch logs."""

    def __init__(self, epochs, stream=None):
        super().__init__()
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._open = False  # a live line is on screen, not yet ended
        self._epoch = 0
        self._epoch_started = self._drawn = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._epoch_started = epoch, time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if not self.live or (now - self._drawn < 1 / REDRAWS_PER_SECOND and batch + 1 < self.params["steps"]):
            return
        self._drawn = now
        self.draw(self.step_line(batch + 1, now, logs))

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        if self.live:
            self.draw(self.step_line(self.params["steps"], now, logs))
            self.end_line()
            print("  " + validation_line(logs), file=self.stream, flush=True)
        else:
            print(f"{self.step_line(self.params['steps'], now, logs)}; {validation_line(logs)}", file=self.stream, flush=True)

    def step_line(self, steps_done, now, logs):
        return (f"epoch {self._epoch + 1}/{self.epochs}  step {steps_done}/{self.params['steps']}  "
                f"{(now - self._epoch_started) / steps_done:.3f} s/step  loss {logs['loss']:.4f}  "
                f"misclassified pixels {logs['misclassified_pixel_fraction']:.4f}")

    def draw(self, text):
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        # One column short of the terminal's: a line as wide as it wraps on some terminals.
        width = min(WIDTH, columns - 1) if columns > 1 else WIDTH
        # \r back to the line's start, \x1b[K clears what a longer line left beyond the new one.
        self.stream.write("\r" + text[:width] + "\x1b[K")
        self.stream.flush()
        self._open = True

    def end_line(self):
        """End the live line, so that what follows (the closing line, an error) starts on its own."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
