"""A stack larger than memory allows trains from its memory-mapped files."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tifffile

from conftest import ROOT, TINY, cells_and_membranes
from rundir import LAST

MEMORY_BUDGET = 2**30  # bytes of process memory (RssAnon) the run may take; a tiny ISBI run takes 0.45 GiB
SLICES, SIDE = 4800, 512  # uint8: 1.17 GiB per stack, more than the budget; ISBI-sized slices


def write_stack_by_page(path, slice_of):
    """A SLICES-page uint8 TIFF written a page at a time, never whole in this process's memory."""
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(
            (slice_of(index) for index in range(SLICES)),
            shape=(SLICES, SIDE, SIDE),
            dtype=np.uint8,
            photometric="minisblack",
        )


def peak_process_memory(process):
    """The highest RssAnon (memory the process allocated, not file pages it maps) seen every 20 ms
    until `process` ends; a loaded stack stays in memory for the whole run, so it cannot be missed."""
    peak = 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                anonymous = next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
            peak = max(peak, anonymous)
        except (OSError, StopIteration):  # the process ended between poll() and open()
            pass
        time.sleep(0.02)
    return peak


# Slow: writes stacks of more than 2 GB.
@pytest.mark.slow
def test_a_stack_larger_than_the_memory_budget_trains_from_its_memory_mapped_files(tmp_path):
    rng = np.random.default_rng(0)
    cells = cells_and_membranes(1, SIDE, SIDE)[0]
    texture = rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    write_stack_by_page(tmp_path / "images.tif", lambda index: np.roll(texture, index, axis=0))
    write_stack_by_page(tmp_path / "labels.tif", lambda index: np.roll(cells, index, axis=0))
    assert (tmp_path / "images.tif").stat().st_size > MEMORY_BUDGET

    process = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *TINY,
            "--memmap",
            "on",
            "--eval-every",
            "0",
            "--images",
            str(tmp_path / "images.tif"),
            "--labels",
            str(tmp_path / "labels.tif"),
            "--logdir",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()))
    reader.start()
    try:
        peak = peak_process_memory(process)
    finally:
        process.kill()
        reader.join()
    assert process.returncode == 0, output[0]
    assert f"of {SLICES} in {tmp_path / 'images.tif'} (memory-mapped)" in output[0]
    assert (tmp_path / "logs" / "bce_lr1e-4" / LAST).is_file()
    assert peak < MEMORY_BUDGET, f"peak {peak / 2**30:.2f} GiB"
