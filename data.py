"""The ISBI 2012 data on disk: where it comes from (a pinned copy of the challenge's slices, checked
against isbi2012.sha256), its files, and writing a stack as a multi-page TIFF.

    python data.py                      # download into data/isbi2012 unless already there
    python data.py --mirror file:///path/to/mirror

Layout on disk (the challenge's): train-volume.tif and test-volume.tif hold 30 uint8 slices of
512x512, one per page; train-labels.tif holds the masks, 255 = cell and 0 = membrane. Reading and
checking stacks is stacks.py's job, training batches crops.py's. Imports no TensorFlow.
"""

import hashlib
import io
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import skimage.io
import tifffile

import cli
from files import replaced_atomically

# The 30 training slices, their masks and the 30 test slices as PNGs, pinned to one commit of
# zhixuhao/unet so that the bytes can be checked against isbi2012.sha256.
PINNED_COMMIT = "b45af4d458437d8281cc218a07fd4380818ece4a"
DEFAULT_MIRROR = f"https://raw.githubusercontent.com/zhixuhao/unet/{PINNED_COMMIT}/"
MIRROR_ENV = "ISBI2012_MIRROR"
CHECKSUMS = Path(__file__).with_name("isbi2012.sha256")
DEFAULT_DATA_DIR = Path("data/isbi2012")
NUM_SLICES = 30
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES = "train-volume.tif", "train-labels.tif", "test-volume.tif"
STACK_SOURCES = {
    TRAIN_IMAGES: "data/membrane/train/image",
    TRAIN_LABELS: "data/membrane/train/label",
    TEST_IMAGES: "data/membrane/test",
}


class DataError(cli.InputError):
    """Bad or unreachable data; the message names the problem and the fix in one line."""


# --- download ---------------------------------------------------------------------------------


def read_checksums(path=CHECKSUMS):
    """{relative path: sha256 hex digest} from a `sha256sum`-style file."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        digest, relative_path = line.split(maxsplit=1)
        sums[relative_path.strip().removeprefix("./")] = digest
    return sums


def mirror_url(mirror=None):
    """The base URL to download from: --mirror, else $ISBI2012_MIRROR, else GitHub."""
    base = mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    if not base.startswith(("http://", "https://", "file://")):
        raise DataError(
            f"mirror {base!r} is not a URL: give http(s)://... or file:///absolute/path (via --mirror or {MIRROR_ENV})"
        )
    return base.rstrip("/") + "/"


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(
            f"could not fetch {url} ({reason}): check the network, or point --mirror or "
            f"{MIRROR_ENV} at a reachable copy of zhixuhao/unet@{PINNED_COMMIT[:7]}"
        ) from None


def fetch_verified_slice(base_url, relative_path, expected_sha256):
    url = base_url + relative_path
    content = fetch(url)
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise DataError(
            f"checksum mismatch for {url} (sha256 {actual[:12]}..., expected "
            f"{expected_sha256[:12]}...): the mirror's copy is damaged or not the pinned one; "
            "use another mirror"
        )
    return skimage.io.imread(io.BytesIO(content))


def write_stack_atomically(path, stack, fix="free some space or choose another --data"):
    """Write a multi-page TIFF so that `path` either does not exist or is complete; `fix` ends
    the error message when it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as temporary:
            tifffile.imwrite(temporary, stack, photometric="minisblack")
    except OSError as error:
        raise DataError(f"cannot write {path} ({error.strerror}): {fix}") from None


def download_isbi2012(data_dir=DEFAULT_DATA_DIR, mirror=None, verbose=True, overwrite=False):
    """Fetch and verify the PNGs, then write the challenge TIFFs missing from `data_dir`.

    Every file is verified before any TIFF is written, so a bad or interrupted download leaves
    the directory as it was; TIFFs already there are kept unless `overwrite`.
    """
    existing = next(path for path in (Path(data_dir).absolute(), *Path(data_dir).absolute().parents) if path.exists())
    if not existing.is_dir():
        raise DataError(f"{existing} is a file, not a directory: give --data a directory to hold the ISBI 2012 stacks")
    missing = {name: STACK_SOURCES[name] for name in (STACK_SOURCES if overwrite else missing_stacks(data_dir))}
    base_url = mirror_url(mirror)
    checksums = read_checksums()
    if verbose:
        print(f"Downloading ISBI 2012 from {base_url} into {data_dir}/")
    stacks = {}
    for tiff_name, source_dir in missing.items():
        slices = []
        for index in range(NUM_SLICES):
            relative_path = f"{source_dir}/{index}.png"
            slices.append(fetch_verified_slice(base_url, relative_path, checksums[relative_path]))
        stacks[tiff_name] = np.stack(slices)
        if verbose:
            print(f"  {tiff_name}: {NUM_SLICES} slices fetched and verified")
    for tiff_name, stack in stacks.items():
        write_stack_atomically(Path(data_dir) / tiff_name, stack)
    return [Path(data_dir) / name for name in missing]


def missing_stacks(data_dir, names=tuple(STACK_SOURCES)):
    """The challenge TIFFs among `names` that are not in `data_dir`."""
    return [name for name in names if not (Path(data_dir) / name).exists()]


def ensure_isbi2012(data_dir=DEFAULT_DATA_DIR, mirror=None, names=tuple(STACK_SOURCES)):
    """Download ISBI 2012 unless every TIFF in `names` is already in `data_dir`."""
    if missing_stacks(data_dir, names):
        download_isbi2012(data_dir, mirror)


def build_parser():
    parser = cli.ArgumentParser("data.py", "Download ISBI 2012 as the challenge's TIFF stacks.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="directory for the TIFFs")
    parser.add_argument(
        "--mirror", help=f"base URL of a copy of zhixuhao/unet (http(s):// or file://); default ${MIRROR_ENV} or GitHub"
    )
    parser.add_argument("--force", action="store_true", help="download even if the TIFFs are there")
    return parser


def download(args):
    if not missing_stacks(args.data) and not args.force:
        print(f"ISBI 2012 already in {args.data}/ (use --force to download again)")
        return
    for path in download_isbi2012(args.data, args.mirror, overwrite=args.force):
        print(f"wrote {path}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cli.run("data.py", lambda: download(args))


if __name__ == "__main__":
    sys.exit(main())
