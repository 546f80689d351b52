"""Megapixel-MNIST-style canvases (Katharopoulos & Fleuret 2019, as used by IPS).

Each ``canvas_size`` square canvas holds ``n_digits`` digits (default 5) at random
non-overlapping positions (bounding boxes never intersect, top edges all differ so
"top-most" is unique) plus ``n_noise`` scribble strokes (see :mod:`strokes`) that
never touch a digit box. ``n_digits // 2 + 1`` digits (3 of 5) share the target
class; each of the others has its own class, different from the target and from
each other. Tasks:

* ``majority``: the class that appears most often (10 classes);
* ``max``: the largest digit value on the canvas (10 classes);
* ``top``: the class of the digit with the smallest top edge (10 classes);
* ``multilabel``: 10-dim 0/1 vector of the classes present (sigmoid/BCE task).

Train canvases use only TRAIN-pool digits and test canvases only TEST-pool digits
(:mod:`digits`). Validation takes ``val_fraction`` of the ``n_train`` canvases, drawn
from a held-out ``val_fraction`` of the TRAIN-pool digits (:func:`digits.split_validation`),
so validation, like test, measures digits the model never trained on. With
``augment_digits`` every digit placed on a *train* canvas gets a random affine distortion
(:func:`jitter_digit`), so training sees more shapes than the pool holds.
Canvases are deterministic in ``seed``, generated once and cached on disk as uint8
``(n, H, W)`` with their metadata (digit classes, boxes ``(y0, x0, y1, x1)`` with
exclusive ends, and source ids). Each dataset's ``item_ids`` (and ``patients``: a canvas is its own) are canvas
keys ``train-00012``, ``val-00003``, ``test-00007`` (the split it was generated for and its index there).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ips_search.config import DataConfig, Task
from ips_search.data.cache import cache_file, cache_key, cached
from ips_search.data.dataset import PatchDataset
from ips_search.data.digits import DigitPool, digit_pools, digit_source, split_validation
from ips_search.data.preview import DataPreview
from ips_search.data.registry import DATASETS, DatasetKind, DataSplits, image_splits
from ips_search.data.split import n_validation
from ips_search.data.strokes import stroke_bank, with_dihedral
from ips_search.errors import ConfigError

FORMAT_VERSION = 3  # bump when generation changes so old cache files are not reused
N_CLASS = 10
MAX_BANK = 1024  # distinct strokes per split, each used in 8 flips/rotations
TASKS = {
    "majority": Task("majority", N_CLASS),
    "max": Task("max", N_CLASS),
    "top": Task("top", N_CLASS),
    "multilabel": Task("multilabel", N_CLASS, multi_label=True),
}


def majority_count(n_digits: int) -> int:
    """How many digits share the target class (3 of 5)."""
    return n_digits // 2 + 1


def _check(cfg: DataConfig) -> None:
    if not isinstance(cfg.n_digits, int) or not 1 <= cfg.n_digits <= 2 * (N_CLASS - 1) + 1:
        raise ConfigError(f"n_digits must be between 1 and {2 * (N_CLASS - 1) + 1}, got {cfg.n_digits!r}")
    if not isinstance(cfg.n_noise, int) or cfg.n_noise < 0:
        raise ConfigError(f"n_noise must be 0 or a positive integer, got {cfg.n_noise!r}")
    if cfg.digit_size > cfg.canvas_size:
        raise ConfigError(
            f"digit_size {cfg.digit_size} is larger than canvas_size {cfg.canvas_size}; use a larger canvas_size"
        )
    # Non-overlapping boxes with distinct tops: leave generous room so rejection sampling is fast.
    if cfg.n_digits * cfg.digit_size**2 > 0.4 * cfg.canvas_size**2 or cfg.n_digits > cfg.canvas_size - cfg.digit_size:
        raise ConfigError(
            f"{cfg.n_digits} digits of {cfg.digit_size}px do not fit on a {cfg.canvas_size}px canvas; "
            "use a larger canvas_size, a smaller digit_size or fewer n_digits"
        )
    if cfg.n_train < 2:
        raise ConfigError(f"n_train must be at least 2 (train and validation canvases), got {cfg.n_train}")
    if not cfg.tasks:
        raise ConfigError(f"tasks is empty; choose one or more of {', '.join(TASKS)}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ConfigError(f"tasks {list(cfg.tasks)} lists a task twice; list each task once")


def _overlaps(y: np.ndarray, x: np.ndarray, boxes: list[tuple[int, int, int, int]], size: int) -> np.ndarray:
    """For candidate top-lefts ``(m,)``, whether a ``size`` box intersects any of ``boxes``."""
    hit = np.zeros(len(y), dtype=bool)
    for y0, x0, y1, x1 in boxes:
        hit |= (y < y1) & (y + size > y0) & (x < x1) & (x + size > x0)
    return hit


def _place_digits(rng: np.random.Generator, k: int, size: int, canvas: int) -> list[tuple[int, int, int, int]]:
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(k):
        for _attempt in range(100):
            y, x = rng.integers(0, canvas - size + 1, size=(2, 64))  # 64 candidates at once
            ok = ~_overlaps(y, x, boxes, size)
            for b in boxes:  # distinct top edges keep "top-most digit" unambiguous
                ok &= y != b[0]
            if ok.any():
                j = int(np.argmax(ok))
                boxes.append((int(y[j]), int(x[j]), int(y[j]) + size, int(x[j]) + size))
                break
        else:  # pragma: no cover - _check leaves enough room
            raise ConfigError(f"could not place {k} non-overlapping digits on a {canvas}px canvas; enlarge canvas_size")
    return boxes


MAX_ROTATION_DEG, SCALE_RANGE, MAX_SHEAR = 15.0, (0.85, 1.1), 0.15


def jitter_digit(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (S, S) in [0, 1] rotated, scaled and sheared about its centre (bilinear), same size and range."""
    from scipy.ndimage import affine_transform  # scikit-learn's own dependency

    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    scale, shear = rng.uniform(*SCALE_RANGE), rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    c, s = np.cos(angle), np.sin(angle)
    forward = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input ones
    centre = (np.array(image.shape) - 1) / 2
    out = affine_transform(image, inverse, offset=centre - inverse @ centre, order=1, mode="constant", cval=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _generate_split(
    pool: DigitPool, n: int, cfg: DataConfig, rng: np.random.Generator, desc: str, augment: bool = False
) -> dict[str, torch.Tensor]:
    S, C, k = cfg.digit_size, cfg.canvas_size, cfg.n_digits
    by_class = [np.flatnonzero(pool.labels == c) for c in range(N_CLASS)]
    if any(len(members) == 0 for members in by_class):
        raise ConfigError(f"the {desc} digit pool lacks a class; use digits: mnist or digits: sklearn")
    bank = with_dihedral(stroke_bank(min(MAX_BANK, max(1, n * cfg.n_noise)), S, rng)) if cfg.n_noise else None
    n_major = majority_count(k)
    jitter_rng = np.random.default_rng([cfg.seed, 6]) if augment else None  # own stream: scenes stay the same

    canvases = np.zeros((n, C, C), dtype=np.uint8)
    classes = np.zeros((n, k), dtype=np.int64)
    boxes = np.zeros((n, k, 4), dtype=np.int64)
    ids = np.zeros((n, k), dtype=np.int64)
    canvas = np.zeros((C, C), dtype=np.float32)
    for i in tqdm(range(n), desc=f"megapixel {desc} canvases", delay=2.0, leave=False):
        target = int(rng.integers(N_CLASS))
        others = rng.choice([c for c in range(N_CLASS) if c != target], size=k - n_major, replace=False)
        cls = rng.permutation(np.concatenate([np.full(n_major, target), others]))
        digit_boxes = _place_digits(rng, k, S, C)
        canvas[:] = 0
        for j, (c, (y0, x0, y1, x1)) in enumerate(zip(cls, digit_boxes, strict=True)):
            src = int(rng.choice(by_class[c]))
            digit = jitter_digit(pool.images[src], jitter_rng) if jitter_rng is not None else pool.images[src]
            np.maximum(canvas[y0:y1, x0:x1], digit, out=canvas[y0:y1, x0:x1])
            classes[i, j], boxes[i, j], ids[i, j] = c, (y0, x0, y1, x1), pool.ids[src]
        if bank is not None:  # strokes anywhere except on a digit box (they may cross each other)
            y, x = rng.integers(0, C - S + 1, size=(2, 4 * cfg.n_noise + 16))
            free = ~_overlaps(y, x, digit_boxes, S)
            which = rng.integers(len(bank), size=cfg.n_noise)
            for yy, xx, b in zip(y[free][: cfg.n_noise], x[free][: cfg.n_noise], which, strict=False):
                np.maximum(canvas[yy : yy + S, xx : xx + S], bank[b], out=canvas[yy : yy + S, xx : xx + S])
        canvases[i] = np.rint(canvas * 255)
    return {
        "canvases": torch.from_numpy(canvases),
        "classes": torch.from_numpy(classes),
        "boxes": torch.from_numpy(boxes),
        "source_ids": torch.from_numpy(ids),
    }


def generation_fields(cfg: DataConfig) -> dict:
    """Every DataConfig field that changes the generated canvases (the cache key)."""
    return {
        "version": FORMAT_VERSION,
        "canvas_size": cfg.canvas_size,
        "digit_size": cfg.digit_size,
        "n_digits": cfg.n_digits,
        "n_noise": cfg.n_noise,
        "n_train": cfg.n_train,
        "val_fraction": cfg.val_fraction,
        "augment_digits": cfg.augment_digits,
        "n_test": cfg.n_test,
        "digits": digit_source(cfg.digits).key,  # the source's key: its digits, not just its config name
        "seed": cfg.seed,
    }


def generate(cfg: DataConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Generate ``{"train": {...}, "val": {...}, "test": {...}}`` (no caching); each holds uint8 ``canvases``
    ``(n, H, W)``, int64 ``classes`` ``(n, k)``, ``boxes`` ``(n, k, 4)`` and ``source_ids`` ``(n, k)``."""
    train_pool, test_pool = digit_pools(cfg.digits, cfg.digit_size, cfg.seed, cfg.cache_dir, cfg.download)
    train_pool, val_pool = split_validation(train_pool, cfg.val_fraction, cfg.seed)
    n_val = n_validation(cfg.n_train, cfg.val_fraction)
    return {
        "train": _generate_split(
            train_pool, cfg.n_train - n_val, cfg, np.random.default_rng([cfg.seed, 2]), "train", cfg.augment_digits
        ),
        "val": _generate_split(val_pool, n_val, cfg, np.random.default_rng([cfg.seed, 4]), "validation"),
        "test": _generate_split(test_pool, cfg.n_test, cfg, np.random.default_rng([cfg.seed, 3]), "test"),
    }


def load_canvases(cfg: DataConfig) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`generate`, cached in memory and on disk under the cache dir."""
    _check(cfg)
    return cached("megapixel", generation_fields(cfg), lambda: generate(cfg), cfg.cache_dir)


PREVIEW_CANVASES = 8  # canvases generated to time the generation
# seconds per canvas by cache key: timed once per process, so a dry run's patch sizes (which share the canvases)
# print one data line, not one per timing
_PER_CANVAS: dict[str, float] = {}


def preview(cfg: DataConfig) -> DataPreview:
    """Whether the canvases are cached; if not, their disk size and a generation time timed on a few canvases."""
    _check(cfg)
    what = f"megapixel canvases ({cfg.n_train} train + {cfg.n_test} test, {cfg.canvas_size} px)"
    digits = f"digits: {cfg.digits}, {digit_source(cfg.digits).what}"
    if cache_file("megapixel", generation_fields(cfg), cfg.cache_dir).exists():
        return DataPreview(what, cached=True, detail=digits)
    key = cache_key(generation_fields(cfg))
    if key not in _PER_CANVAS:
        train_pool, _ = digit_pools(cfg.digits, cfg.digit_size, cfg.seed, cfg.cache_dir, cfg.download)
        start = time.perf_counter()
        _generate_split(train_pool, PREVIEW_CANVASES, cfg, np.random.default_rng([cfg.seed, 2]), "preview")
        _PER_CANVAS[key] = (time.perf_counter() - start) / PREVIEW_CANVASES
    per_canvas = _PER_CANVAS[key]
    n = cfg.n_train + cfg.n_test
    return DataPreview(
        what, cached=False, disk_bytes=n * cfg.canvas_size**2, build_seconds=n * per_canvas, detail=digits
    )


def targets_from_meta(classes: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """All task targets from per-canvas digit ``classes`` ``(n, k)`` and ``boxes`` ``(n, k, 4)``."""
    onehot = torch.zeros(len(classes), N_CLASS).scatter_(1, classes, 1.0)  # (n, 10) presence
    counts = torch.zeros(len(classes), N_CLASS, dtype=torch.long).scatter_add_(1, classes, torch.ones_like(classes))
    top = boxes[:, :, 0].argmin(1, keepdim=True)  # digit with the smallest top edge
    return {
        "majority": counts.argmax(1),
        "max": classes.max(1).values,
        "top": classes.gather(1, top).squeeze(1),
        "multilabel": onehot,
    }


def layout(cfg: DataConfig) -> tuple[int, tuple[Task, ...]]:
    """One channel; the tasks ``cfg.tasks`` names."""
    return 1, tuple(TASKS[t] for t in cfg.tasks)


def build_splits(cfg: DataConfig) -> tuple[PatchDataset, PatchDataset, PatchDataset]:
    """Train/val/test datasets (1 channel, ``canvas_size`` square) with the targets of ``cfg.tasks``."""
    data = load_canvases(cfg)
    splits = {}
    for name, part in data.items():
        images = part["canvases"].unsqueeze(1)  # (n, 1, H, W), a view
        targets = targets_from_meta(part["classes"], part["boxes"])
        meta = {k: part[k] for k in ("classes", "boxes", "source_ids")}
        keys = [f"{name}-{i:05d}" for i in range(len(images))]
        splits[name] = (images, {t: targets[t] for t in cfg.tasks}, meta, keys)

    train, val, test = (
        PatchDataset(images, targets, cfg.patch_size, cfg.patch_stride, meta=meta, item_ids=keys)
        for images, targets, meta, keys in (splits[name] for name in ("train", "val", "test"))
    )
    return train, val, test


def build(cfg: DataConfig) -> DataSplits:
    return image_splits(cfg, build_splits)


DATASETS.register(
    DatasetKind(
        "megapixel",
        build=build,
        preview=preview,
        image_side=lambda cfg: cfg.canvas_size,
        layout=layout,
        warm_start=True,
    )
)
