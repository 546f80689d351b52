"""``folder``: your own images in ImageFolder layout.

Layouts (class names = sub-folder names, sorted; class index = position):

* ``root/<class>/*.png|jpg|...``: a seeded split, stratified by class; the test set is about
  20% of the images but at most about ``n_test``; validation is about ``val_fraction`` of the rest.
* ``root/train/<class>/...`` and ``root/test/<class>/...``: used as given;
  validation is a seeded, stratified ``val_fraction`` of ``train``. ``test`` may lack a class.

Each image is its own patient: the draws are :func:`~ips_search.data.checks.patient_splits` (test with ``seed``,
validation with ``seed + 1``), as for slides. Each dataset's ``item_ids`` (and ``patients``) are its images' paths
relative to ``root``.

Images may have any size: each is resized keeping its aspect ratio so the longer
side is ``image_size``, then zero-padded (black) to a centred square. ``n_chan`` 1
converts everything to grayscale; ``n_chan`` 3 to RGB (a grayscale image is
repeated over the 3 channels; transparency is composited onto black).

All images are decoded once per machine at build time (so a truncated or unreadable
file is reported then, by name, not in the middle of training) into a uint8
``(n, n_chan, image_size, image_size)`` array in the cache directory
(``n * n_chan * image_size**2`` bytes on disk; 1000 RGB images at 512 px: 0.8 GB)
that every trial memory-maps: pages are shared through the page cache, not copied
per trial, and a trial holds only the images it is reading. The array is keyed by
each file's path, size and modification time, so an edited image is decoded again.
For images too big to resize, see ``dataset: slides``; an image whose header claims more than ``max_pixels``
pixels is refused before it is decoded, and 16-bit images are scaled by their range (:mod:`ips_search.data.images`).

Before anything is decoded the cohort is checked (:mod:`ips_search.data.checks`): two classes in all, in train,
and in a validation or test split of two or more images; no file in two splits (same file or same bytes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ips_search.config import DataConfig, Task
from ips_search.data.cache import cache_key, cache_root, cached_memmap
from ips_search.data.checks import check_classes, check_disjoint, patient_splits
from ips_search.data.dataset import PatchDataset
from ips_search.data.images import open_image, pil_high_depth_to_uint8, pixel_limit
from ips_search.data.preview import DataPreview, human_bytes
from ips_search.data.registry import DATASETS, DatasetKind, DataSplits, image_splits
from ips_search.errors import ConfigError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TEST_FRACTION = 0.2
DECODE_VERSION = 2  # bump when load_image changes so old decoded arrays are not reused (2: float images in [0, 1])
_DECODED: dict[str, np.ndarray] = {}  # in-process: same files + settings -> the open memory map


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> list[Path]:
    files = (p for p in folder.rglob("*") if p.suffix.lower() in exts and not p.name.startswith("."))
    return sorted(p for p in files if p.is_file())


def scan(
    split_root: Path, classes: list[str] | None = None, exts: tuple[str, ...] = IMAGE_EXTS
) -> tuple[list[str], list[Path], list[int]]:
    """Class names, image paths (files ending in one of ``exts``) and labels under ``split_root/<class>/``."""
    found = [d.name for d in _visible_dirs(split_root)]
    if not found:
        raise ConfigError(
            f"no class folders in {split_root}; put images in one sub-folder per class ({split_root}/<class>/*.png)"
        )
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(
            f"{split_root} has class folder(s) {', '.join(unknown)} that train/ lacks; add them to train/"
        )
    paths, labels = [], []
    for name in found:
        files = _images_in(split_root / name, exts)
        if not files:
            raise ConfigError(
                f"class folder {split_root / name} has no images ({', '.join(exts)}); add images or remove it"
            )
        paths += files
        labels += [classes.index(name)] * len(files)
    return classes, paths, labels


def _to_mode(im: Image.Image, n_chan: int) -> Image.Image:
    im = pil_high_depth_to_uint8(im)  # 16/32-bit grayscale: rescaled by its range, PIL would clip at 255
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return im.convert("L" if n_chan == 1 else "RGB")


def load_image(path: Path, size: int, n_chan: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode, convert, resize (longer side = ``size``) and pad to ``(C, size, size)`` uint8.

    The size is read from the header first: an image over ``max_pixels`` is refused before it is decoded."""
    with open_image(path, max_pixels) as im:  # an unreadable file or one too big: a ConfigError naming it
        im.load()  # decode now: a truncated file raises here
        im = _to_mode(im, n_chan)
    w, h = im.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new(im.mode, (size, size))
    canvas.paste(im, ((size - new_w) // 2, (size - new_h) // 2))
    arr = np.array(canvas, dtype=np.uint8)  # a writable copy
    return arr[None] if n_chan == 1 else arr.transpose(2, 0, 1)  # (C, size, size)


def decode_cached(
    paths: list[Path], size: int, n_chan: int, cache_dir: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """All ``paths`` decoded by :func:`load_image` into one read-only memory-mapped uint8 ``(n, C, size, size)``.

    The array lives in the cache directory, keyed by each file's identity (resolved path, size, mtime) and the
    settings: the first build on a machine decodes (and so reports an unreadable file by name), every later one,
    in any process, maps the finished file and shares its pages with the others."""
    fields = {
        "version": DECODE_VERSION,
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths],
        "size": size,
        "n_chan": n_chan,
    }
    key = cache_key(fields) + str(cache_root(cache_dir))
    if key not in _DECODED:

        def fill(out: np.ndarray) -> None:
            for i, p in enumerate(tqdm(paths, desc="decoding images", delay=2.0, leave=False)):
                out[i] = load_image(p, size, n_chan, max_pixels)

        shape = (len(paths), n_chan, size, size)
        if len(_DECODED) >= 4:  # keep a few maps open, not every one ever built
            _DECODED.pop(next(iter(_DECODED)))
        _DECODED[key] = cached_memmap("folder-decoded", fields, shape, np.uint8, fill, cache_dir)
    return _DECODED[key]


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only map: PatchDataset only ever reads (and copies) rows
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


@dataclass
class FolderPlan:
    """The images a folder config lists and how they are split, found without decoding a pixel."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]
    splits: dict[str, np.ndarray]  # train / val / test: indices into paths, sorted

    @property
    def item_ids(self) -> list[str]:
        """Each image's path relative to ``root`` (posix): its name in the cohort, unique."""
        return [p.relative_to(self.root).as_posix() for p in self.paths]


def _root(cfg: DataConfig) -> Path:
    """``cfg.root``, checked to be a folder, and ``n_chan`` one a folder can hold."""
    if not cfg.root:
        raise ConfigError("dataset: folder needs root; set root to a folder with one sub-folder per class")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root {root} does not exist or is not a folder; set root to a folder of class folders")
    if cfg.n_chan not in (1, 3):
        raise ConfigError(f"n_chan must be 1 (grayscale) or 3 (RGB) for dataset: folder, got {cfg.n_chan!r}")
    return root


def layout(cfg: DataConfig) -> tuple[int, tuple[Task, ...]]:
    """``n_chan`` channels; the task ``label`` over the class folders (``root/train``'s where it is split): their
    names only, nothing scanned deeper or decoded. :func:`plan` finds the same classes."""
    root = _root(cfg)
    split = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    return cfg.n_chan, (Task("label", max(1, len(_visible_dirs(split)))),)


def plan(cfg: DataConfig) -> FolderPlan:
    """Scan ``cfg.root``, split it (seeded), and check the cohort (:mod:`ips_search.data.checks`); no decoding."""
    root = _root(cfg)
    pixel_limit(cfg.max_pixels)
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        present, missing = ("train", "test") if has_train else ("test", "train")
        raise ConfigError(
            f"{root} has {present}/ but no {missing}/; add {root}/{missing}/<class>/ or put class folders in {root}"
        )
    if has_train:
        classes, train_paths, train_labels = scan(root / "train")
        _, test_paths, test_labels = scan(root / "test", classes)
        paths, labels = train_paths + test_paths, train_labels + test_labels
        given: list[str] | None = ["train"] * len(train_paths) + ["test"] * len(test_paths)
    else:
        classes, paths, labels = scan(root)
        if len(paths) < 3:
            raise ConfigError(f"found {len(paths)} image(s) in {root}; need at least 3 (train, validation and test)")
        given = None
    ids = [p.relative_to(root).as_posix() for p in paths]
    test_fraction = min(TEST_FRACTION, cfg.n_test / len(paths))  # about 20%, but no more than about n_test images
    where = f"image folder {root}"
    drawn = patient_splits(ids, labels, given, test_fraction, cfg.val_fraction, cfg.seed, where, unit="image")
    splits = {k: np.array([i for i, s in enumerate(drawn) if s == k], dtype=np.int64) for k in ("train", "val", "test")}
    given = ("test",) if has_train else ()  # a seeded draw may land on one class by chance: not refused
    check_classes({k: [labels[i] for i in idx] for k, idx in splits.items()}, classes, f"image folder {root}", given)
    check_disjoint({k: [paths[i] for i in idx] for k, idx in splits.items()}, f"image folder {root}", cfg.cache_dir)
    return FolderPlan(root, classes, paths, labels, splits)


def build_splits(cfg: DataConfig) -> tuple[PatchDataset, PatchDataset, PatchDataset]:
    """Train/val/test datasets of ``n_chan`` x ``image_size`` x ``image_size`` images; target ``label``."""
    p = plan(cfg)
    images = _as_tensor(decode_cached(p.paths, cfg.image_size, cfg.n_chan, cfg.cache_dir, cfg.max_pixels))
    targets = {"label": torch.tensor(p.labels, dtype=torch.long)}
    args = dict(patch_size=cfg.patch_size, stride=cfg.patch_stride, item_ids=p.item_ids)
    train, val, test = (
        PatchDataset(images, targets, indices=torch.from_numpy(p.splits[k]), **args) for k in ("train", "val", "test")
    )
    for ds in (train, val, test):
        ds.classes, ds.paths = p.classes, [p.paths[j] for j in ds.indices.tolist()]
    return train, val, test


def build(cfg: DataConfig) -> DataSplits:
    return image_splits(cfg, build_splits)


def preview(cfg: DataConfig) -> DataPreview:
    """The class folders scanned, split and checked, and every file's header read (its size within
    ``max_pixels``); nothing decoded."""
    p = plan(cfg)  # the cohort's checks: classes per split, no file in two splits
    for path in p.paths:
        with open_image(path, cfg.max_pixels):  # the header read as load_image will: unreadable or too big is refused
            pass
    what = f"folder {p.root} ({len(p.paths)} images at {cfg.image_size} px)"
    size = len(p.paths) * cfg.n_chan * cfg.image_size**2
    return DataPreview(what, cached=False, detail=f"headers read; decoded on the first run ({human_bytes(size)})")


DATASETS.register(
    DatasetKind("folder", build=build, preview=preview, image_side=lambda cfg: cfg.image_size, layout=layout)
)
