"""``slides``: whole-slide images and big scenes, read lazily from disk (see docs/slides.md).

Inputs (one of):

* ``root: DIR`` in ImageFolder layout, ``DIR/<class>/*`` (seeded split) or ``DIR/train|test/<class>/*``;
* ``manifest: cohort.csv`` with columns ``path,label``, an optional ``split`` (``train``/``test``; otherwise a
  seeded split) and an optional patient column (``patient``, ``case_id`` or ``group``; without it each slide is its
  own patient); relative paths resolve against the CSV's folder;
* neither, with ``cohort_size: n``: ``n`` synthetic slides of side ``slide_size`` generated once into the cache
  directory (:mod:`.generate`), half of them with small "tumour" lesions.

The test split is about 20% of the slides (at most about ``n_test``) when not given, validation about
``val_fraction`` of the rest: both drawn by patient with ``seed`` and stratified by label
(:func:`~ips_search.data.checks.patient_splits`). Each dataset's ``item_ids`` name its slides (the file names
without extension, or, where two share one, the paths as the manifest gives them or relative to ``root``) and
``patients`` their patients. Items are ``(SlidePatchSource, {"label": int64 scalar})``: the source holds the
coordinates of the patches that pass the foreground filter (:mod:`.tissue`, cached per file and settings) and reads
pixels only when asked.
Every file is checked when the datasets are built, from its headers and a thumbnail: a missing, unsupported,
corrupt or truncated file, a level it lacks, a slide smaller than one patch, or a slide without foreground is a
one-line :class:`ConfigError` naming the file, before any training starts. A manifest's relative path must stay
in the manifest's folder (``../x`` is refused; an absolute path is taken as given); a plain image is decoded whole,
so one whose header claims more than ``max_pixels`` is refused. Then the cohort (:mod:`ips_search.data.checks`):
no slide listed twice, no blank patient cell, no patient in two splits of a split column; two classes in all, in
train, and in a validation or test split of two or more slides; no file in two splits.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ips_search.config import DataConfig, Task
from ips_search.data import folder
from ips_search.data.cache import cache_key, cache_root, cached_npy, file_lock
from ips_search.data.checks import (
    check_classes,
    check_disjoint,
    check_patients,
    inside,
    patient_column,
    patient_splits,
    read_patients,
)
from ips_search.data.images import pixel_limit
from ips_search.data.preview import DataPreview
from ips_search.data.registry import DATASETS, DatasetKind, DataSplits, item_geometry
from ips_search.data.slides import tissue
from ips_search.data.slides.generate import generate_cohort
from ips_search.data.slides.readers import READABLE_EXTS, SlideReader, detect, open_slide
from ips_search.data.slides.source import SlidePatchSource
from ips_search.errors import ConfigError

__all__ = ["SlideDataset", "SlidePatchSource", "build", "open_slide", "slide_entries", "make_source"]

COORDS_VERSION = 1  # bump when the foreground rule changes so old coordinate files are not reused
COHORT_VERSION = 3  # 3: real tissue, DAB-positive lesions (generate.COHORT_TEXTURE); old cohorts are not reused
TEST_FRACTION = 0.2
SPLITS = ("train", "test")


class SlideDataset(Dataset):
    """Items are ``(source, {task: target})``: a lazy :class:`SlidePatchSource` and int64 scalar targets;
    ``item_ids`` (the slides' names) and ``patients`` are aligned with them."""

    def __init__(
        self,
        sources: list[SlidePatchSource],
        targets: dict[str, torch.Tensor],
        classes: list[str],
        n_chan: int,
        item_ids: list[str] | None = None,
        patients: list[str] | None = None,
    ) -> None:
        self.sources = sources
        self.targets = targets
        self.classes = classes
        self.n_chan = n_chan
        self.paths = [s.path for s in sources]
        self.item_ids = [s.path.stem for s in sources] if item_ids is None else list(item_ids)
        self.patients = list(self.item_ids if patients is None else patients)
        assert len(self.item_ids) == len(self.patients) == len(sources), "one name and one patient per slide"

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[SlidePatchSource, dict[str, torch.Tensor]]:
        return self.sources[i], {k: v[i] for k, v in self.targets.items()}

    @property
    def n_patches(self) -> list[int]:
        """N of each item (slides differ in size and tissue)."""
        return [len(s) for s in self.sources]


@dataclass
class SlideEntries:
    """The listed slides before any file is opened: paths, class indices, given split (or None), each slide's name
    (:func:`slide_names`) and patient (its name where no patient column gives one)."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    splits: list[str] | None
    names: list[str]
    patients: list[str]
    by_patient: bool = False  # a patient column gave the patients


def slide_names(paths: list[Path], written: list[str]) -> list[str]:
    """Each slide's name: its file name without extension where no two slides share one, else the path as
    ``written`` (in the manifest, or relative to the folder): unique across the cohort whenever the paths are."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else list(written)


def _read_manifest(manifest: Path) -> SlideEntries:
    if not manifest.is_file():
        raise ConfigError(f"manifest {manifest} does not exist; set manifest to a CSV with columns path,label")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read manifest {manifest} ({exc}); save it as a UTF-8 CSV") from None
    missing = [c for c in ("path", "label") if c not in columns]
    if not rows or missing:
        what = "has no rows" if not rows else f"lacks column(s) {', '.join(missing)}"
        raise ConfigError(f"manifest {manifest} {what}; give it a header line path,label[,split] and one row per slide")
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in rows]
    paths, names, splits = [], [], []
    for line, row in enumerate(rows, start=2):
        if not row["path"] or not row["label"]:
            raise ConfigError(f"manifest {manifest} line {line} has an empty path or label; fill it in or delete it")
        path = Path(row["path"]).expanduser()
        path = path if path.is_absolute() else inside(manifest.parent, path, f"manifest {manifest} line {line}")
        if not path.is_file():
            raise ConfigError(f"manifest {manifest} line {line} names a missing file {path}; fix the path or the row")
        split = row.get("split", "")
        if "split" in columns and split not in SPLITS:
            raise ConfigError(f"manifest {manifest} line {line} has split {split!r}; use train or test")
        paths.append(path)
        names.append(row["label"])
        splits.append(split)
    numeric = all(n.lstrip("-").isdigit() for n in names)
    classes = sorted(set(names), key=int if numeric else str)
    labels = [classes.index(n) for n in names]
    slides = slide_names(paths, [row["path"] for row in rows])
    patients = read_patients(rows, slides, f"manifest {manifest}")
    given = splits if "split" in columns else None
    return SlideEntries(paths, labels, classes, given, slides, patients, patient_column(columns) is not None)


def _folder_entries(root: Path, paths: list[Path], labels: list[int], classes: list[str], splits: list[str] | None):
    """The slides of a class-folder layout: each its own patient, named by :func:`slide_names`."""
    names = slide_names(paths, [p.relative_to(root).as_posix() for p in paths])
    return SlideEntries(paths, labels, classes, splits, names, list(names))


def _generated_manifest(cfg: DataConfig) -> Path:
    fields = {"v": COHORT_VERSION, "n": cfg.cohort_size, "size": cfg.slide_size, "seed": cfg.seed}
    target = cache_root(cfg.cache_dir) / "slides-cohort" / cache_key(fields)
    manifest = target / "manifest.csv"
    if not manifest.exists():
        target.mkdir(parents=True, exist_ok=True)
        with file_lock(target / "generate"):
            if not manifest.exists():
                generate_cohort(target, cfg.cohort_size, cfg.slide_size, cfg.seed)
    return manifest


def slide_entries(cfg: DataConfig) -> SlideEntries:
    """The slides ``cfg`` lists (manifest, folder or generated cohort), unopened."""
    if cfg.manifest:
        return _read_manifest(Path(cfg.manifest).expanduser())
    if cfg.root:
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data root {root} does not exist or is not a folder; set root to a folder of classes")
        if (root / "train").is_dir() and (root / "test").is_dir():
            classes, train_paths, train_labels = folder.scan(root / "train", exts=READABLE_EXTS)
            _, test_paths, test_labels = folder.scan(root / "test", classes, exts=READABLE_EXTS)
            splits = ["train"] * len(train_paths) + ["test"] * len(test_paths)
            return _folder_entries(root, train_paths + test_paths, train_labels + test_labels, classes, splits)
        classes, paths, labels = folder.scan(root, exts=READABLE_EXTS)
        return _folder_entries(root, paths, labels, classes, None)
    if cfg.cohort_size:
        return _read_manifest(_generated_manifest(cfg))
    raise ConfigError(
        "dataset: slides needs root (a folder of class folders), manifest (a CSV path,label) or cohort_size "
        "(synthetic slides); set one of them"
    )


def _coord_fields(path: Path, level: int, read_size: int, stride: int, min_foreground: float) -> dict:
    stat = path.stat()
    return {
        "v": COORDS_VERSION,
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "level": level,
        "read_size": read_size,
        "stride": stride,
        "min_foreground": float(min_foreground),
    }


def _check_level(reader: SlideReader, cfg: DataConfig) -> tuple[int, int, int]:
    """``(level, read_size, stride)`` at the level that is read, or a one-line error naming the file."""
    path = reader.path
    if cfg.mpp is not None and reader.mpp is None:
        raise ConfigError(f"slide {path} does not record its microns per pixel; set level instead of mpp")
    level, resample = tissue.pick_level(reader, cfg.level, cfg.mpp)
    if level >= reader.level_count:
        raise ConfigError(
            f"slide {path} has no level {level} (it has levels 0-{reader.level_count - 1}); "
            f"set level to at most {reader.level_count - 1} or use mpp"
        )
    read_size = max(1, round(cfg.patch_size * resample))
    stride = max(1, round(cfg.patch_stride * resample))
    width, height = reader.dimensions[level]
    if read_size > min(width, height):
        raise ConfigError(
            f"slide {path} is {width}x{height} at level {level}, smaller than one {read_size}px patch; "
            "use a smaller patch_size or a finer level, or remove the slide"
        )
    return level, read_size, stride


def make_source(path: str | Path, cfg: DataConfig) -> SlidePatchSource:
    """Check one slide and build its source (coordinates from the on-disk cache when already computed)."""
    path = Path(path).expanduser()
    kind = detect(path, cfg.max_pixels)
    reader = open_slide(path, kind, cfg.cache_dir, cfg.max_pixels)
    try:
        level, read_size, stride = _check_level(reader, cfg)
        coords = cached_npy(
            "slides-coords",
            _coord_fields(path, level, read_size, stride, cfg.min_foreground),
            lambda: tissue.compute_coords(reader, level, read_size, stride, cfg.min_foreground),
            cfg.cache_dir,
        )
    finally:
        reader.close()
    if len(coords) == 0:
        raise ConfigError(
            f"slide {path} has no patch with at least {cfg.min_foreground:g} foreground; "
            "lower min_foreground (0 keeps every patch) or remove the slide"
        )
    return SlidePatchSource(
        path, coords, cfg.patch_size, level, read_size, cfg.n_chan, kind, cfg.cache_dir, max_pixels=cfg.max_pixels
    )


def split_cohort(entries: SlideEntries, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Train / val / test indices into ``entries`` (the given split, or one drawn by patient:
    :func:`~ips_search.data.checks.patient_splits`), the cohort checked (:mod:`ips_search.data.checks`: no patient
    in two splits, classes per split, no file in two splits)."""
    where = f"manifest {cfg.manifest}" if cfg.manifest else f"slide folder {cfg.root}" if cfg.root else "the slides"
    if entries.splits is not None and "test" not in entries.splits:
        raise ConfigError("the slides' split column names no test slide; mark some rows test or drop the column")
    if entries.splits is None and len(entries.paths) < 3:
        raise ConfigError(f"found {len(entries.paths)} slide(s); need at least 3 (train, validation and test)")
    # about 20% for test, but no more than about n_test slides
    test_fraction = min(TEST_FRACTION, cfg.n_test / max(1, len(entries.paths)))
    unit = "patient" if entries.by_patient else "slide"
    drawn = patient_splits(
        entries.patients, entries.labels, entries.splits, test_fraction, cfg.val_fraction, cfg.seed, where, unit
    )
    splits = {k: np.array([i for i, s in enumerate(drawn) if s == k], dtype=np.int64) for k in ("train", "val", "test")}
    check_patients({k: [entries.patients[i] for i in idx] for k, idx in splits.items()}, where)
    given = ("test",) if entries.splits is not None else ()  # a seeded draw may land on one class by chance
    check_classes({k: [entries.labels[i] for i in idx] for k, idx in splits.items()}, entries.classes, where, given)
    check_disjoint({k: [entries.paths[i] for i in idx] for k, idx in splits.items()}, where, cfg.cache_dir)
    first: dict[Path, int] = {}
    for i, path in enumerate(entries.paths):  # twice in one split: check_disjoint compares splits only
        j = first.setdefault(path.resolve(), i)
        if j != i:
            raise ConfigError(
                f"{where} lists {path} twice (as {entries.names[j]!r} and {entries.names[i]!r}); keep one row per slide"
            )
    return splits


def build(cfg: DataConfig) -> DataSplits:
    """Train/val/test :class:`SlideDataset`\\ s, the one task ``label``; N is each slide's tissue patches."""
    if cfg.n_chan not in (1, 3):
        raise ConfigError(f"n_chan must be 1 (grayscale) or 3 (RGB) for dataset: slides, got {cfg.n_chan!r}")
    pixel_limit(cfg.max_pixels)
    entries = slide_entries(cfg)
    sources = [make_source(p, cfg) for p in tqdm(entries.paths, desc="checking slides", delay=2.0, leave=False)]
    splits = split_cohort(entries, cfg)
    labels = torch.tensor(entries.labels, dtype=torch.long)

    def subset(idx: np.ndarray) -> SlideDataset:
        names, patients = [entries.names[i] for i in idx], [entries.patients[i] for i in idx]
        return SlideDataset(
            [sources[i] for i in idx], {"label": labels[idx]}, entries.classes, cfg.n_chan, names, patients
        )

    train, val, test = subset(splits["train"]), subset(splits["val"]), subset(splits["test"])
    counts = [n for ds in (train, val, test) for n in ds.n_patches]
    geometry = item_geometry(cfg, cfg.n_chan, (Task("label", len(entries.classes)),), counts)
    return DataSplits(train, val, test, geometry)


def preview(cfg: DataConfig) -> DataPreview:
    """``--dry-run``: every listed slide's headers read and its level checked; nothing decoded or generated."""
    if not (cfg.manifest or cfg.root) and cfg.cohort_size:
        fields = {"v": COHORT_VERSION, "n": cfg.cohort_size, "size": cfg.slide_size, "seed": cfg.seed}
        cached = (cache_root(cfg.cache_dir) / "slides-cohort" / cache_key(fields) / "manifest.csv").exists()
        what = f"{cfg.cohort_size} generated slides of {cfg.slide_size} px"
        if not cached:
            return DataPreview(what, cached=False, detail="written tile by tile on the first run")
    pixel_limit(cfg.max_pixels)
    entries = slide_entries(cfg)
    plain = 0
    for path in entries.paths:
        kind = detect(path, cfg.max_pixels)  # headers only: a missing, unsupported, truncated or too big file fails
        if kind == "memmap":  # a plain image: decoded once on the first run, its header is the check
            plain += 1
            continue
        reader = open_slide(path, kind, cfg.cache_dir, cfg.max_pixels)
        try:
            _check_level(reader, cfg)
        finally:
            reader.close()
    split_cohort(entries, cfg)  # the cohort's checks, as build does them
    what = f"{len(entries.paths)} slides ({', '.join(entries.classes)})"
    detail = "headers and levels checked; tissue coordinates computed once on the first run"
    if plain:
        detail += f"; {plain} plain image(s) decoded once into the cache"
    return DataPreview(what, cached=False, detail=detail)


DATASETS.register(DatasetKind("slides", build=build, preview=preview))
