"""``mnist-resized``: the reference notebook's setting, one MNIST digit per image.

Each 28x28 digit is resized (bilinear, as torchvision's ``Resize`` in the notebook)
to ``image_size`` square on access, so 500x500 images with 100-px patches give
25 patches. Train images are the first ``n_train`` of a seeded permutation of
MNIST's train split (validation is a ``val_fraction`` of those); test images are the
first ``n_test`` of a seeded permutation of MNIST's real test split (the notebook
evaluated on its train split). Needs the MNIST files on disk or ``download: true``. Each dataset's ``item_ids``
(and ``patients``: a digit is its own) are ``train-<index>`` / ``test-<index>``, the digit's index in MNIST's split.
"""

from __future__ import annotations

import numpy as np
import torch

from ips_search.config import DataConfig, Task
from ips_search.data.cache import cache_root
from ips_search.data.dataset import PatchDataset
from ips_search.data.digits import load_mnist
from ips_search.data.preview import DataPreview
from ips_search.data.registry import DATASETS, DatasetKind, DataSplits, image_splits
from ips_search.data.split import n_validation
from ips_search.errors import ConfigError

HINT = "use dataset: megapixel with digits: mnist (real digits, offline)"


def layout(cfg: DataConfig) -> tuple[int, tuple[Task, ...]]:
    """One channel; the task ``label``, 10 classes."""
    return 1, (Task("label", 10),)


def build_splits(cfg: DataConfig) -> tuple[PatchDataset, PatchDataset, PatchDataset]:
    """Train/val/test datasets of 1-channel ``image_size`` images, target ``label``."""
    if cfg.n_train < 2:
        raise ConfigError(f"n_train must be at least 2 (train and validation images), got {cfg.n_train}")
    splits = []
    for train, n, stream in ((True, cfg.n_train, 5), (False, cfg.n_test, 6)):
        images, labels = load_mnist(cfg.cache_dir, train, cfg.download, HINT)
        if n > len(labels):
            which = "n_train" if train else "n_test"
            raise ConfigError(f"{which} {n} is more than the {len(labels)} MNIST images; use {which} <= {len(labels)}")
        pick = torch.from_numpy(np.random.default_rng([cfg.seed, stream]).permutation(len(labels))[:n])
        keys = [f"{'train' if train else 'test'}-{i:05d}" for i in pick.tolist()]
        splits.append((images[pick].unsqueeze(1), {"label": labels[pick]}, keys))  # (n, 1, 28, 28) uint8

    n_val = n_validation(cfg.n_train, cfg.val_fraction)
    args = dict(patch_size=cfg.patch_size, stride=cfg.patch_stride, image_size=cfg.image_size)
    (train_images, train_targets, train_keys), (test_images, test_targets, test_keys) = splits
    train = PatchDataset(
        train_images, train_targets, indices=torch.arange(n_val, cfg.n_train), item_ids=train_keys, **args
    )
    val = PatchDataset(train_images, train_targets, indices=torch.arange(n_val), item_ids=train_keys, **args)
    test = PatchDataset(test_images, test_targets, item_ids=test_keys, **args)
    return train, val, test


def build(cfg: DataConfig) -> DataSplits:
    return image_splits(cfg, build_splits)


def preview(cfg: DataConfig) -> DataPreview:
    """MNIST on disk, or ``download: true``."""
    what = f"MNIST digits resized to {cfg.image_size} px"
    if (cache_root(cfg.cache_dir) / "mnist" / "MNIST" / "raw").is_dir():
        return DataPreview(what, cached=True)
    if not cfg.download:
        raise ConfigError(
            f"MNIST is not on disk under {cache_root(cfg.cache_dir) / 'mnist'}; set download: true to fetch it "
            f"(needs internet) or {HINT}"
        )
    return DataPreview(what, cached=False, disk_bytes=55_000_000, detail="download: true fetches MNIST once")


DATASETS.register(
    DatasetKind("mnist-resized", build=build, preview=preview, image_side=lambda cfg: cfg.image_size, layout=layout)
)
