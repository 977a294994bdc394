import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402

SHARED_MIRROR = ROOT.parent / "shared" / "data" / "isbi2012-mirror"


@pytest.fixture(scope="session")
def mirror_url():
    """file:// URL of the ISBI 2012 mirror: $ISBI2012_MIRROR, else ../shared beside the checkout."""
    url = os.environ.get(data.MIRROR_ENV)
    if url:
        return url
    if not SHARED_MIRROR.is_dir():
        pytest.skip(f"no ISBI 2012 mirror: set {data.MIRROR_ENV} or place shared/ beside the checkout")
    return SHARED_MIRROR.as_uri()


@pytest.fixture(scope="session")
def isbi_dir(tmp_path_factory, mirror_url):
    """The three ISBI 2012 TIFFs, downloaded once per session from the mirror."""
    directory = tmp_path_factory.mktemp("isbi2012")
    data.download_isbi2012(directory, mirror_url, verbose=False)
    return directory


TINY = ["--filters", "4", "--crop", "64", "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "2",
        "--image-every", "2", "--update-freq", "2", "--precision", "float32"]
TINY_STEPS = 2 * 3


@pytest.fixture(scope="session")
def two_run_logdir(tmp_path_factory, isbi_dir):
    """A log directory with two tiny runs on ISBI 2012: `bce_lr1e-3`, scored as in the challenge
    every epoch, and `mse_lr1e-3`, every second epoch."""
    import train

    logdir = tmp_path_factory.mktemp("logs")
    for loss, eval_every in (("bce", "1"), ("mse", "2")):
        assert train.main(TINY + ["--loss", loss, "--lr", "1e-3", "--eval-every", eval_every,
                                  "--data", str(isbi_dir), "--logdir", str(logdir)]) == 0
    return logdir
