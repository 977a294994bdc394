"""What every command of this project does the same way: flags checked to their real range at parse
time, `--help` text written as it reads (no `%` escaping, defaults appended), and every refusal or
stop told in one line on stderr with its exit code: 2 for bad input, 1 for a run that stopped, 130
for Ctrl-C (SIGINT), 143 for SIGTERM (a scheduler's time limit, `kill`, `docker stop`) and 129 for
SIGHUP (a closed terminal): 128 + the signal's number, as a shell reports a process it killed.

Imports nothing but the standard library: every command checks its input with it before
TensorFlow loads, so that bad input is answered in about a second.
"""

import argparse
import contextlib
import gc
import math
import os
import re
import signal
import sys
import threading

# TensorFlow's C++ INFO and WARNING lines (which CPU instructions its binary was built for, ...)
# stay off a user's terminal; its errors still show. Every command imports this module before
# TensorFlow, and TF_CPP_MIN_LOG_LEVEL=0 in the environment brings the lines back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The project is Keras on TensorFlow (tf.summary, tf.distribute): a KERAS_BACKEND of jax or torch
# left in a user's shell, or set by bioimage.io's libraries (torch unless told), must not reach it.
os.environ["KERAS_BACKEND"] = "tensorflow"
# A line of TensorFlow's C++ log (absl's format: severity letter, date, time, thread, file:line]),
# and the notice absl prints once per library before its log level applies.
LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
LOG_SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0, 1, 2, 3


def import_tensorflow():
    """Import TensorFlow, keeping its start-up lines off stderr: the one way every command loads it.

    While it loads, TensorFlow's libraries log through absl before absl's log level applies, so
    TF_CPP_MIN_LOG_LEVEL cannot silence them: on CPUs where oneDNN is on by default (AVX-512
    VNNI/BF16, AMX), "oneDNN custom operations are on", twice, each after absl's notice. So
    stderr goes through a pipe while it loads, and each line is passed on at once unless
    TensorFlow's log level would have hidden it (tensorflow_log_lines): real errors still show,
    even one that aborts the process, and TF_CPP_MIN_LOG_LEVEL=0 shows everything.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    try:
        sys.stderr.flush()
        stderr = os.dup(2)
    except (AttributeError, OSError):  # no stderr to keep clean (closed, or sys.stderr is None)
        import tensorflow

        return tensorflow
    reading, writing = os.pipe()
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")

    def pass_on():
        with os.fdopen(reading, "rb") as lines:
            for line in lines:
                kept = tensorflow_log_lines(line.decode(errors="replace"), level)
                if kept:
                    os.write(stderr, kept.encode())
        os.close(stderr)

    forwarder = threading.Thread(target=pass_on, daemon=True)
    forwarder.start()
    os.dup2(writing, 2)
    os.close(writing)
    try:
        import tensorflow
    finally:
        os.dup2(stderr, 2)  # the pipe's last writer gone: the forwarder reads to its end and stops
        # Unless a library kept a copy of the pipe as its stderr: then the forwarder goes on
        # passing its lines on, and this process does not wait for it.
        forwarder.join(timeout=5)
    return tensorflow


def tensorflow_log_lines(text, min_log_level):
    """`text` (stderr while TensorFlow loaded) without absl's notice and the C++ log lines below
    `min_log_level` (TF_CPP_MIN_LOG_LEVEL: 0 shows all, 1 hides INFO, 2 WARNING too, 3 ERROR too)."""
    if min_log_level not in ("1", "2", "3"):
        return text
    hidden = LOG_SEVERITIES[: int(min_log_level)]
    kept = []
    for line in text.splitlines(keepends=True):
        log_line = LOG_LINE.match(line)
        if line.rstrip() != ABSL_NOTICE and not (log_line and log_line[1] in hidden):
            kept.append(line)
    return "".join(kept)


class InputError(Exception):
    """Bad input, or a run that cannot start: one line naming the problem and the fix."""

    label, exit_code = "error", 2


class Stopped(Exception):
    """A run that stopped before its end: one line saying why and how to go on."""

    label, exit_code = "stopped", 1


class Interrupted(Stopped):
    """Ctrl-C, SIGTERM or SIGHUP (STOP_SIGNALS): one line saying what was kept, and the exit code
    128 + the signal's number."""

    def __init__(self, message):
        super().__init__(message)
        signum = _interrupts[-1] if _interrupts else signal.SIGINT
        self.exit_code = 128 + signum
        self.label = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


# --- argument types ------------------------------------------------------------------------------


def checked_number(kind, text, condition, requirement):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
    if not (math.isfinite(value) and condition(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {requirement}")
    return value


def positive(kind):
    return lambda text: checked_number(kind, text, lambda value: value > 0, "greater than 0")


FLOAT32_MAX = 3.4028234663852886e38


def positive_float32(text):
    """A positive number that TensorFlow's float32 variables hold as given (a learning rate):
    a larger one would become infinite there."""
    return checked_number(
        float,
        text,
        lambda value: 1.2e-38 <= value <= FLOAT32_MAX,
        f"from 1.2e-38 to {FLOAT32_MAX:.4g} (what float32 holds)",
    )


def fraction_below_one(text):
    return checked_number(float, text, lambda value: 0 <= value < 1, "from 0 up to, not including, 1")


def non_negative_int(text):
    return checked_number(int, text, lambda value: value >= 0, "of 0 or more")


def seed(text):
    # numpy's generators and Keras' set_random_seed take seeds in [0, 2**32).
    return checked_number(int, text, lambda value: 0 <= value < 2**32, f"from 0 to {2**32 - 1}")


def multiple_of(multiple, why):
    def check(text):
        value = positive(int)(text)
        if value % multiple:
            raise argparse.ArgumentTypeError(
                f"{value} is not a multiple of {multiple} ({why}); try {max(multiple, value - value % multiple)}"
            )
        return value

    return check


def index_list(text):
    """Comma-separated indices, at least one, none negative, none twice."""
    parts = [part.strip() for part in text.split(",")]
    try:
        indices = [int(part) for part in parts if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of slice indices") from None
    if not indices:
        raise argparse.ArgumentTypeError(f"{text!r} names no slice: give at least one index, e.g. 5,15,25")
    if min(indices) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} holds a negative index: slices count from 0")
    if len(set(indices)) < len(indices):
        raise argparse.ArgumentTypeError(f"{text!r} names a slice twice")
    return indices


def step_range(text):
    """`START,STOP` or one step `N`: training steps counted from 1, as TensorBoard's step axis
    counts them."""
    parts = text.split(",")
    try:
        first, last = int(parts[0]), int(parts[-1])
    except ValueError:
        first = last = None
    if len(parts) > 2 or first is None or not 1 <= first <= last:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not START,STOP with 1 <= START <= STOP (training steps, e.g. 10,15) or one step N"
        )
    return first, last


def index_list_text(indices):
    """Indices as index_list reads them: "5,15,25"."""
    return ",".join(map(str, indices))


# --- parser --------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Help as written: a `%` in a help text is a percent sign, and a flag's default, when it has
    one, is appended as "(default: ...)".

    argparse %-formats every help string; `_get_help_string` is the hook that its own
    ArgumentDefaultsHelpFormatter overrides for the same purpose (test_cli runs every --help).
    """

    def _get_help_string(self, action):
        text = (action.help or "").replace("%", "%%")
        if action.option_strings and not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's help format, and a bad flag told in one line with exit code 2."""

    def __init__(self, prog, description, **kwargs):
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        say(self.prog, "error", f"{message} (see --help)")
        sys.exit(InputError.exit_code)


def parse_with_given(parser, argv):
    """(arguments, names of the arguments that `argv` gives): a flag given at its default value is
    given all the same. For a parser without required arguments."""
    unset = object()
    defaults = vars(parser.parse_args([]))
    # argparse fills in a default only where the namespace has no value yet.
    arguments = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset))))
    given = {name for name, value in arguments.items() if value is not unset}
    return argparse.Namespace(**{**defaults, **{name: arguments[name] for name in given}}), given


# --- messages ------------------------------------------------------------------------------------


def say(prog, label, message):
    """One line on stderr, on a line of its own: `<prog>: <label>: <message>`."""
    sys.stdout.flush()
    print(f"{prog}: {label}: {message}", file=sys.stderr, flush=True)


_interrupts = []  # the stop signals received while the command runs
# The signals that stop a command as Ctrl-C does, each with the handler Python starts with where it
# is not ignored (nohup ignores SIGHUP, a background shell job SIGINT: those stay ignored).
STOP_SIGNALS = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
    signal.SIGHUP: signal.SIG_DFL,
}


def interrupted(error):
    """Whether `error` is a stop signal's doing: a KeyboardInterrupt, or, once a signal came,
    what TensorFlow raises in its place when the KeyboardInterrupt lands in its C++ code (a
    SystemError) or cancels its work after one (tf.errors.CancelledError)."""
    if isinstance(error, KeyboardInterrupt):
        return True
    tensorflow = sys.modules.get("tensorflow")
    cancelled = (tensorflow.errors.CancelledError,) if tensorflow is not None else ()
    return bool(_interrupts) and isinstance(error, (SystemError, *cancelled))


def _note_interrupt(signum, frame):
    _interrupts.append(signum)
    if _stopping_between_steps and len(_interrupts) == 1:
        return  # raised by stop_if_interrupted at the next step's edge
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, whichever the signal


_stopping_between_steps = False


@contextlib.contextmanager
def stopping_between_steps():
    """In the block a first stop signal is only noted, and raised as KeyboardInterrupt where
    `stop_if_interrupted` is called (between training steps); a second one raises at once.

    Raised wherever the signal found the training thread, the KeyboardInterrupt could land inside
    TensorFlow's C++ code (an eager op of a summary write, a step handing back its results), which
    then raised a SystemError in its place or left the process hung. A block that ends without
    reaching a check had nothing left to stop: what it was doing is done."""
    global _stopping_between_steps
    _stopping_between_steps = True
    try:
        yield
    finally:
        _stopping_between_steps = False


def stop_if_interrupted():
    """Raise the KeyboardInterrupt of a stop signal that `stopping_between_steps` kept back."""
    if _interrupts:
        raise KeyboardInterrupt


def run(prog, body):
    """Call `body()` and return the command's exit code: 0, or the code of what it raised, told in
    one line. A stop signal (STOP_SIGNALS) raises KeyboardInterrupt in `body`, as Ctrl-C does."""
    _interrupts.clear()
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # only there can signals be set
        handlers = {
            signum: signal.getsignal(signum)
            for signum, untouched in STOP_SIGNALS.items()
            if signal.getsignal(signum) is untouched
        }
    for signum in handlers:
        signal.signal(signum, _note_interrupt)
    code = 0
    try:
        body()
    except (InputError, Stopped) as error:
        code = told(prog, error)
    except Exception as error:
        if not interrupted(error):
            raise
        code = told(prog, Interrupted("nothing was written"))
    except KeyboardInterrupt:
        code = told(prog, Interrupted("nothing was written"))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if code:
        # What the stopped work's frames held is freed now, while the interpreter can still close it:
        # TensorFlow's all-reduce leaves a multiprocessing pool running when a worker is lost, and
        # collected at exit its __del__ printed a traceback after the one line.
        gc.collect()
    return code


def told(prog, error):
    """Say `error` (an InputError or Stopped) in one line; its exit code."""
    say(prog, error.label, error)
    return error.exit_code
