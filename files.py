"""Writing a file so that a kill or a full disk never leaves half of it: checkpoints, event files,
config.json and TIFFs are written beside their place and renamed onto it."""

import contextlib
import os
import tempfile
from pathlib import Path

# The pattern of the temporary files, by which a resumed run finds what a killed process left.
PARTIAL_PATTERN = ".*.partial*"


@contextlib.contextmanager
def replaced_atomically(path):
    """A temporary path beside `path` to write to: renamed onto `path` when the block ends, deleted
    if it fails, so that `path` is always either its old content or the complete new one
    (temporary_path names it by this process)."""
    path = Path(path)
    temporary = temporary_path(path, os.getpid())
    # A file planted under that name (a symbolic link in a run directory received from someone
    # else) is removed, not written through; os.replace replaces a link at `path`, never its target.
    temporary.unlink(missing_ok=True)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def temporary_path(path, tag):
    """Where a file for `path` is written before its rename onto it: hidden, named by `tag` (a
    process, an epoch), with `path`'s suffix (Keras insists on .keras), matching PARTIAL_PATTERN."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{tag}.partial{path.suffix}")


def temporaries_of(path):
    """The temporary files for `path` (temporary_path) that are still there: a kill came before
    their rename, or a process is writing one now."""
    return sorted(Path(path).parent.glob(temporary_path(path, "*").name))


def why_not_writable(path):
    """Why no file can be written at `path`, in a few words, or None if one can: checked before
    the work that produces it, by creating and removing a file in the nearest folder that exists
    (permissions alone say nothing for root, nor for a read-only mount)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory"
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"{folder}: {error.strerror or error}"
    return None


def remove_partial_files(directories):
    """Delete the temporary files that a killed process left in `directories` (not below them)."""
    for directory in directories:
        for path in Path(directory).glob(PARTIAL_PATTERN):
            path.unlink()
