"""Source digits for the synthetic datasets, split into disjoint TRAIN and TEST pools.

* ``sklearn`` (default, offline): the 1797 8x8 digits bundled with scikit-learn,
  upscaled with bilinear interpolation to ``digit_size``; a seeded, per-class 75/25
  split into TRAIN and TEST pools.
* ``mnist``: torchvision's MNIST; its train split is the TRAIN pool and its test
  split the TEST pool. Needs the files under ``<cache>/mnist`` already, or
  ``download: true`` (network access is opt-in).

Every digit keeps a global source id (its index in the source; MNIST test digits
are offset by 60000) so tests can prove the pools are disjoint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ips_search.data.cache import cache_root
from ips_search.data.split import n_validation
from ips_search.errors import ConfigError

SKLEARN_TRAIN_FRACTION = 0.75
MNIST_TRAIN_SIZE = 60_000  # offset of MNIST test-split source ids


@dataclass(frozen=True)
class DigitPool:
    """``images`` float32 (n, S, S) in [0, 1], ``labels`` int64 (n,), ``ids`` int64 (n,) global source ids."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


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


def _sklearn_pools(digit_size: int, seed: int) -> tuple[DigitPool, DigitPool]:
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
    return (
        DigitPool(images[train_mask], labels[train_mask], ids[train_mask]),
        DigitPool(images[~train_mask], labels[~train_mask], ids[~train_mask]),
    )


def _mnist_pools(digit_size: int, cache_dir: str | None, download: bool) -> tuple[DigitPool, DigitPool]:
    pools = []
    for train, offset in ((True, 0), (False, MNIST_TRAIN_SIZE)):
        data, labels = load_mnist(cache_dir, train, download, hint="use digits: sklearn")
        images = _resize(data.float() / 255.0, digit_size).numpy()
        ids = np.arange(len(labels), dtype=np.int64) + offset
        pools.append(DigitPool(images, labels.numpy(), ids))
    return pools[0], pools[1]


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
    if source == "sklearn":
        return _sklearn_pools(digit_size, seed)
    if source == "mnist":
        return _mnist_pools(digit_size, cache_dir, download)
    raise ConfigError(f"unknown digit source {source!r}; use digits: sklearn or digits: mnist")


def digit_pools(
    source: str = "sklearn",
    digit_size: int = 28,
    seed: int = 0,
    cache_dir: str | None = None,
    download: bool = False,
) -> tuple[DigitPool, DigitPool]:
    """The disjoint ``(TRAIN, TEST)`` digit pools; cached in-process (treat the arrays as read-only).

    ``seed`` only matters for ``sklearn`` (which digits go to which pool); MNIST's
    own train/test split is used as is.
    """
    if source == "mnist":
        seed = 0  # the split is MNIST's own; don't load it once per seed
        cache_dir = str(cache_root(cache_dir))
    return _pools(source, digit_size, seed, cache_dir if source == "mnist" else None, download)
