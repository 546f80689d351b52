"""``dataset: features``: IPS over pre-extracted patch embeddings, one HDF5 file per slide.

Layout (TRIDENT / CLAM; ``ips-search-extract`` writes the same): ``<root>/<slide>.h5`` holds

* ``features``: ``(N, D)`` float32 or float16, one embedding per patch (N varies per slide);
* ``coords`` (optional): ``(N, 2)`` integer top-left ``(x, y)`` of each patch at level 0, with the
  attributes TRIDENT writes (``patch_size``, ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ...) or CLAM's (``patch_size``, ``patch_level``, ``downsample``);

plus a manifest CSV ``slide,label[,split][,patient]`` (``slide`` = file name without ``.h5``; ``split`` one of
train / val / test; ``patient``, or ``case_id`` or ``group``, the patient each slide was cut from: without it each
slide is its own patient). CLAM's dataset CSV (``case_id,slide_id,label``) is read as it is: ``slide_id`` is the
slide, ``case_id`` its patient. Without a ``split`` column the slides are split by patient with ``seed``
(:func:`~ips_search.data.checks.patient_splits`): about ``test_fraction`` of the patients for test, then about
``val_fraction`` of the rest for validation, each draw stratified by label; with one, a split that lists no ``val``
slides gets about ``val_fraction`` of its train patients. Labels are class indices ``0..K-1`` when every label is a
non-negative integer, else class names (sorted).

Items are ``(source, {"label": int64 scalar})``: a :class:`H5FeatureSource` (lazy, reads only the
rows asked for) or, with ``feature_items: tensor`` (``auto`` picks it when every slide has the same,
small N; given for slides of different N it is a ConfigError), the slide's ``(N, D)`` float32 tensor.
The dataset holds file names and patch counts, plus the tensor items it has read, up to ``KEEP_BYTES``
per split (a small cohort is read once per trial, not once per epoch; a large one stays on disk), and opens
no file it keeps: each source opens its file on first read, in the process that reads (DataLoader workers
included), and closes it when dropped.

Checks (:mod:`ips_search.data.checks`): a ``slide`` name must stay inside ``root`` (no ``../x``, no absolute
path); a patient cell may not be blank, and a split column may not put one patient's slides in two splits; the
cohort, the train split, and a validation or test split of two or more slides need two classes; no file may sit in
two splits (same file, or same content up to 64 MB); features read with NaN or Inf stop the trial with the file
named.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ips_search.config import DataConfig, Task
from ips_search.data.checks import (
    check_classes,
    check_disjoint,
    check_finite,
    check_patients,
    inside,
    patient_column,
    patient_splits,
    read_patients,
)
from ips_search.data.preview import DataPreview
from ips_search.data.registry import DATASETS, DatasetKind, DataSplits, item_geometry
from ips_search.errors import ConfigError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
SLIDE_COLUMNS = ("slide", "slide_id")  # slide_id: CLAM's dataset CSV
TENSOR_ITEM_LIMIT = 1 << 24  # auto: in-RAM tensor items only up to N * D = 16 M values (64 MB float32)
# Tensor items are kept after their first read, up to this many bytes per split and process: a small cohort is
# then read from disk once per trial, not once per epoch (opening a small file costs more than reading it)
KEEP_BYTES = 256 << 20
DENSE_READ = 4  # read a contiguous slab instead of scattered rows when it is at most this many times larger


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("dataset: features needs h5py; pip install h5py") from None
    return h5py


class H5FeatureSource:
    """One slide's patch embeddings, read lazily: ``read(index (k,) int64) -> (k, D) float32``.

    Satisfies the lazy patch-source protocol (``len``, ``patch_shape``, ``read``, ``coords``). The
    file is opened on the first read in the reading process (a handle never crosses a fork or a
    pickle) and closed when the source is garbage-collected or :meth:`close` d.
    """

    def __init__(self, path: str | os.PathLike[str], n: int, dim: int) -> None:
        self.path, self.n, self.patch_shape = str(path), int(n), (int(dim),)
        self._file = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"H5FeatureSource({self.path!r}, n={self.n}, dim={self.patch_shape[0]})"

    def _features(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = _h5py().File(self.path, "r"), os.getpid()
        return self._file["features"]

    def read(self, index: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows ``index`` ``(k,)`` (any order, repeats allowed) as float32 ``(k, D)``.

        h5py's fancy indexing needs increasing, unique indices, so the rows are read sorted and put back
        in the order asked; when the rows asked are dense enough, one contiguous slab is read instead.
        """
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        if len(index) == 0:
            return torch.empty(0, *self.patch_shape)
        if index.min() < 0 or index.max() >= self.n:
            raise IndexError(f"patch index out of range [0, {self.n}) for {self.path}")
        unique, inverse = np.unique(index, return_inverse=True)  # sorted
        features = self._features()
        lo, hi = int(unique[0]), int(unique[-1]) + 1
        if hi - lo <= DENSE_READ * len(unique):
            rows = features[lo:hi][unique - lo]  # (k_unique, D)
        else:
            rows = features[unique]
        return check_finite(torch.from_numpy(np.ascontiguousarray(rows[inverse], dtype=np.float32)), self.path)

    def read_all(self) -> torch.Tensor:
        """The whole slide, float32 ``(N, D)``."""
        return check_finite(torch.from_numpy(np.asarray(self._features()[:], dtype=np.float32)), self.path)

    @property
    def coords(self) -> np.ndarray | None:
        """``(N, 2)`` int64 top-left ``(x, y)`` at level 0, or None when the file has none (read on access)."""
        with _h5py().File(self.path, "r") as f:
            return np.asarray(f["coords"][:], dtype=np.int64) if "coords" in f else None

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._pid = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: h5py may already be gone
            pass

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}


def _register_collate() -> None:
    """The default collate turns a batch of sources into a list (a source is not a tensor it could stack)."""
    from torch.utils.data._utils.collate import default_collate_fn_map

    default_collate_fn_map[H5FeatureSource] = lambda batch, *, collate_fn_map=None: list(batch)


_register_collate()


@dataclass(frozen=True)
class SlideFile:
    """A slide's file as scanned: its patch count N and feature width D."""

    slide: str
    path: Path
    n: int
    dim: int


class FeatureDataset(Dataset):
    """Items ``(H5FeatureSource or (N, D) float32 tensor, {"label": int64 scalar})``; see the module docstring.

    ``item_ids`` are the slides' names, ``patients`` their patients (the slides' names where the manifest has no
    patient column), both aligned with the items."""

    def __init__(
        self,
        files: list[SlideFile],
        labels: list[int],
        classes: list[str],
        as_tensors: bool,
        patients: list[str] | None = None,
    ) -> None:
        self.files, self.as_tensors = files, as_tensors
        self.targets = {"label": torch.tensor(labels, dtype=torch.long)}
        self.classes = classes
        self.paths = [f.path for f in files]
        self.item_ids = [f.slide for f in files]
        self.patients = list(self.item_ids if patients is None else patients)
        assert len(self.patients) == len(files), "one patient per slide"
        self.n_chan = files[0].dim if files else 0  # D: the projector's input width
        self._kept: dict[int, torch.Tensor] = {}  # tensor items read so far, up to KEEP_BYTES
        self._kept_bytes = 0

    def __len__(self) -> int:
        return len(self.files)

    def source(self, i: int) -> H5FeatureSource:
        f = self.files[i]
        return H5FeatureSource(f.path, f.n, f.dim)

    def __getitem__(self, i: int):
        target = {k: v[i] for k, v in self.targets.items()}
        if not self.as_tensors:
            return self.source(i), target
        item = self._kept.get(i)
        if item is None:
            source = self.source(i)
            item = source.read_all()  # (N, D) float32
            source.close()
            if self._kept_bytes + item.nbytes <= KEEP_BYTES:
                self._kept[i], self._kept_bytes = item, self._kept_bytes + item.nbytes
        return item, target

    def __getstate__(self) -> dict:
        """DataLoader workers and pickles start with nothing kept: each process reads (and keeps) its own."""
        return {**self.__dict__, "_kept": {}, "_kept_bytes": 0}


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The manifest's rows as dicts, keyed ``slide`` (or CLAM's ``slide_id``), ``label``, and where present ``split``
    and a patient column (:data:`~ips_search.data.checks.PATIENT_COLUMNS`); other columns are kept, unread."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            slide = next((c for c in SLIDE_COLUMNS if c in columns), "slide")
            missing = [c for c in (slide, "label") if c not in columns]
            if missing:
                raise ConfigError(
                    f"manifest {path} lacks column(s) {', '.join(missing)}; its header must be "
                    "slide,label[,split][,patient] (or CLAM's case_id,slide_id,label)"
                )
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            if slide != "slide":
                rows = [{**row, "slide": row[slide]} for row in rows]
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path} ({exc.strerror}); set data.manifest to a CSV file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"manifest {path} is not UTF-8 text; save it as a CSV file") from None
    if not rows:
        raise ConfigError(f"manifest {path} lists no slides; add one slide,label row per slide")
    return rows


def scan_file(path: Path, slide: str) -> SlideFile:
    """Open ``path`` once for its shape; every layout problem is one ConfigError naming the file."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or not isinstance(f["features"], h5py.Dataset):
                found = ", ".join(sorted(f.keys())) or "nothing"
                raise ConfigError(
                    f"{path} has no 'features' dataset (found: {found}); "
                    "write the patch embeddings as 'features' (N x D)"
                )
            shape = f["features"].shape
            if len(shape) != 2:
                raise ConfigError(f"{path}: 'features' has shape {shape}; it must be 2-D (N patches x D)")
            if "coords" in f and f["coords"].shape != (shape[0], 2):
                raise ConfigError(
                    f"{path}: 'coords' has shape {f['coords'].shape} for {shape[0]} patches; it must be (N, 2)"
                )
    except OSError as exc:
        raise ConfigError(f"cannot open {path} as HDF5 ({exc}); re-extract or remove slide {slide!r}") from None
    if shape[0] == 0:
        raise ConfigError(f"{path} has zero patches; remove slide {slide!r} from the manifest or re-extract it")
    return SlideFile(slide, path, int(shape[0]), int(shape[1]))


def _class_indices(labels: list[str], manifest: Path) -> tuple[list[int], list[str]]:
    if all(label.isdigit() for label in labels):
        n_class = max(int(label) for label in labels) + 1
        return [int(label) for label in labels], [str(c) for c in range(n_class)]
    if any(label == "" for label in labels):
        raise ConfigError(f"manifest {manifest} has a row without a label; give every slide a label")
    classes = sorted(set(labels))
    return [classes.index(label) for label in labels], classes


def _assign_splits(
    rows: list[dict[str, str]], labels: list[int], patients: list[str], cfg: DataConfig, manifest: Path
) -> list[str]:
    """Each row's split: the split column's, else drawn by patient (:func:`~ips_search.data.checks.patient_splits`)."""
    given = None
    if "split" in rows[0]:
        given = []
        for row in rows:
            split = SPLIT_ALIASES.get(row.get("split", "").lower())
            if split is None:
                raise ConfigError(
                    f"manifest {manifest}: slide {row['slide']!r} has split {row.get('split')!r}; "
                    "use train, val or test"
                )
            given.append(split)
    unit = "patient" if patient_column(rows[0]) else "slide"
    where = f"manifest {manifest}"
    return patient_splits(patients, labels, given, cfg.test_fraction, cfg.val_fraction, cfg.seed, where, unit)


def resolve(root: str | None, manifest: str | None) -> tuple[Path, Path]:
    """The feature folder and manifest path of a config (manifest default: ``<root>/labels.csv``)."""
    if not root:
        raise ConfigError("dataset: features needs data.root (a folder of <slide>.h5 files) or data.extract")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.root {folder} is not a folder; point it at the folder of <slide>.h5 files")
    path = Path(manifest).expanduser() if manifest else Path("labels.csv")
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ConfigError(f"manifest {path} not found; set data.manifest to a slide,label[,split][,patient] CSV")
    return folder, path


def read_splits(cfg: DataConfig) -> tuple[FeatureDataset, FeatureDataset, FeatureDataset, tuple[Task, ...]]:
    """Train/val/test feature datasets of ``cfg.root`` + ``cfg.manifest`` (headers read, no features) and the one
    softmax task ``label``."""
    folder, manifest = resolve(cfg.root, cfg.manifest)
    if cfg.slides_root and not Path(cfg.slides_root).expanduser().is_dir():
        raise ConfigError(
            f"data.slides_root {cfg.slides_root} is not a folder; point it at the slides the features were cut "
            "from, or remove it (attention maps then show the patches' places only)"
        )
    rows = read_manifest(manifest)
    seen: set[str] = set()
    files = []
    for row in rows:
        slide = row["slide"]
        if slide in seen:
            raise ConfigError(f"manifest {manifest} lists slide {slide!r} twice; keep one row per slide")
        seen.add(slide)
        path = inside(folder, f"{slide}.h5", f"manifest {manifest}: slide {slide!r}")
        if not path.is_file():
            raise ConfigError(
                f"manifest {manifest} has a label for slide {slide!r} but {path} does not exist; "
                "add the file or remove the row"
            )
        files.append(scan_file(path, slide))
    widths = {f.dim for f in files}
    if len(widths) > 1:
        first = files[0]
        other = next(f for f in files if f.dim != first.dim)
        raise ConfigError(
            f"{other.path} has {other.dim}-wide features but {first.path} has {first.dim}; "
            "extract every slide with the same encoder"
        )
    labels, classes = _class_indices([row["label"] for row in rows], manifest)
    patients = read_patients(rows, [row["slide"] for row in rows], f"manifest {manifest}")
    splits = _assign_splits(rows, labels, patients, cfg, manifest)
    dim, sizes = files[0].dim, {f.n for f in files}
    if cfg.feature_items == "tensor" and len(sizes) > 1:
        # said here, before training: the DataLoader would otherwise fail deep in its collate (torch.stack) in a worker
        raise ConfigError(
            f"data.feature_items: tensor batches every slide's (N, D) features, but the slides have different patch "
            f"counts (N {min(sizes)}..{max(sizes)}); set data.feature_items: source (or auto), which takes any N"
        )
    as_tensors = cfg.feature_items == "tensor" or (
        cfg.feature_items == "auto" and len(sizes) == 1 and next(iter(sizes)) * dim <= TENSOR_ITEM_LIMIT
    )
    keep = {split: [i for i, s in enumerate(splits) if s == split] for split in SPLITS}
    for split in SPLITS:
        if not keep[split]:
            raise ConfigError(f"manifest {manifest} leaves the {split} split empty; add {split} slides")
    given = [
        s
        for s in ("val", "test")
        if "split" in rows[0] and any(SPLIT_ALIASES.get(r["split"].lower()) == s for r in rows)
    ]
    check_patients({split: [patients[i] for i in idx] for split, idx in keep.items()}, f"manifest {manifest}")
    labels_of = {split: [labels[i] for i in idx] for split, idx in keep.items()}
    check_classes(labels_of, classes, f"manifest {manifest}", given)
    paths_of = {split: [files[i].path for i in idx] for split, idx in keep.items()}
    check_disjoint(paths_of, f"manifest {manifest}", cfg.cache_dir)
    parts = [
        FeatureDataset(
            [files[i] for i in keep[split]],
            [labels[i] for i in keep[split]],
            classes,
            as_tensors,
            [patients[i] for i in keep[split]],
        )
        for split in SPLITS
    ]
    return parts[0], parts[1], parts[2], (Task("label", len(classes)),)


def build(cfg: DataConfig) -> DataSplits:
    """The feature datasets; C is the embedding width D_in, each slide its own N."""
    if cfg.extract is not None:  # extraction needs an encoder: it runs above this package
        raise ConfigError(
            "features with extract settings must be extracted first; call ips_search.extraction.resolve_data(cfg) "
            "or run python -m ips_search.extract"
        )
    train, val, test, tasks = read_splits(cfg)
    counts = [f.n for split in (train, val, test) for f in split.files]
    return DataSplits(train, val, test, item_geometry(cfg, train.n_chan, tasks, counts))


def preview(cfg: DataConfig) -> DataPreview:
    """Feature files: their headers read (shapes, widths, the manifest). Extraction settings are previewed by
    :func:`ips_search.extraction.preview` (it needs the extractor)."""
    train, val, test, _ = read_splits(cfg)  # headers only: shapes, widths and the manifest's rows
    files = [f for split in (train, val, test) for f in split.files]
    return DataPreview(f"{len(files)} feature files ({files[0].dim}-d)", cached=True, detail="headers read")


DATASETS.register(DatasetKind("features", build=build, preview=preview, features=True, default_encoder="projector"))
