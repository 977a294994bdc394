"""Writing a file so that a kill or a full disk never leaves half of it: checkpoints, event files,
config.json and TIFFs are written beside their place and renamed onto it."""

import contextlib
import os
from pathlib import Path

# The pattern of the temporary files, by which a resumed run finds what a killed process left.
PARTIAL_PATTERN = ".*.partial*"


@contextlib.contextmanager
def replaced_atomically(path):
    """A temporary path beside `path` to write to: renamed onto `path` when the block ends, deleted
    if it fails, so that `path` is always either its old content or the complete new one.

    The name keeps the suffix (Keras insists on .keras) and matches PARTIAL_PATTERN.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    # A file planted under that name (a symbolic link in a run directory received from someone
    # else) is removed, not written through; os.replace replaces a link at `path`, never its target.
    temporary.unlink(missing_ok=True)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_partial_files(directories):
    """Delete the temporary files that a killed process left in `directories` (not below them)."""
    for directory in directories:
        for path in Path(directory).glob(PARTIAL_PATTERN):
            path.unlink()
