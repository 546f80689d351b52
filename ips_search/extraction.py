"""Patch-embedding extraction: a frozen encoder over a dataset's patches, one HDF5 file per image.

``python -m ips_search.extract --space NAME`` (or ``ips-search-extract``) runs a frozen encoder over every
image of a dataset (megapixel, mnist-resized, folder; any dataset whose items are ``(patches (N, C, P, P),
targets)`` or ``(source with .read, targets)``) and writes, per image, ``<split>-<index>.h5`` in the
TRIDENT layout that ``dataset: features`` reads (``features`` ``(N, D)``, ``coords`` ``(N, 2)`` with the attributes
TRIDENT writes: ``patch_size``, ``patch_size_level0``, ``overlap``, ``name``, ``savetodir``, and for slides
``level0_width`` / ``level0_height`` and, where the slide gives its mpp, ``level0_magnification`` /
``target_magnification``; CLAM's ``patch_level`` / ``downsample`` beside them), plus ``labels.csv``
(``slide,label,split``, the source's own splits). Encoders:

* ``warm-start``: the cached digit-pretrained encoder of :mod:`ips_search.warmstart` (megapixel data),
  built from ``model`` (``encoder``, ``dim``) up to its embedding;
* ``random-init``: ``model``'s encoder (``encoder``, ``dim``) as initialised with the data's seed, frozen: an
  offline baseline for any dataset (random convolutions keep colour and texture), not a pretrained encoder;
* ``resnet18-imagenet`` / ``resnet50-imagenet``: torchvision ImageNet weights (downloads once; opt-in);
* a path to a TorchScript file (``torch.jit.save``) mapping ``(n, C, P, P) -> (n, D)``.

TorchScript is code: loading the file runs the program saved in it. It is loaded only from a path a user named,
on this command's ``--encoder`` or in a search space's ``data.extract.encoder`` (the search's driver extracts
before any trial runs); the report never loads one (``run_torchscript=False``), so a path that only an experiment
folder's files name is never run. Name only files you trust.

The output folder is ``<cache>/features-<hash>``, the hash of every setting that changes the embeddings
(data, encoder, patch size, dtype), so it is built once per setting. It is resumable: each image is
written to ``<name>.h5.tmp`` and renamed when complete, finished images are skipped, and ``labels.csv``
is written last, so its presence marks a complete extraction. A lock file keeps concurrent trials from
extracting the same folder twice.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ips_search.config import DataConfig, IPSConfig, Registry, Rule, build_config, check_fields, positive_int
from ips_search.data import DATASETS, DataGeometry, build_datasets, data_geometry, dataset_kind, preview_datasets
from ips_search.data.cache import cache_key, cache_root
from ips_search.data.preview import DataPreview
from ips_search.errors import ConfigError
from ips_search.model.encoders import ENCODERS, build_encoder
from ips_search.warmstart import DEFAULT_STEPS, apply_warm_start, pretrained_encoder_state, supports_warm_start

FORMAT_VERSION = 2  # 2: all of TRIDENT's coords attributes (magnifications, slide size, overlap, name)
IMAGENET = {"resnet18-imagenet": "resnet18", "resnet50-imagenet": "resnet50"}
RANDOM_INIT = "random-init"
MANIFEST = "labels.csv"
SPLIT_ORDER = ("train", "val", "test")
SETTINGS = "extraction.json"

try:  # POSIX only; elsewhere concurrent extractions of one folder just repeat work
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


@dataclass
class ExtractConfig:
    """What to extract: ``source`` (the ``from`` data section), ``encoder`` and how to store it."""

    source: DataConfig
    encoder: str = "warm-start"  # warm-start | random-init | resnet18-imagenet | resnet50-imagenet | TorchScript
    model: dict[str, Any] = field(default_factory=dict)  # warm-start, random-init: IPSConfig fields (encoder, dim)
    dtype: str = "float16"  # float16 | float32, as stored; reads are float32
    batch_size: int = 256  # patches per encoder call
    warm_start_steps: int | None = None  # default: warmstart.DEFAULT_STEPS

    def validate(self, where: str) -> None:
        check_fields(self, where, EXTRACT_RULES)  # types and ranges, as for data, model and train
        if dataset_kind(self.source, f"{where}.from.dataset").features:
            raise ConfigError(f"{where}.from is a features dataset; extract from an image dataset (e.g. megapixel)")
        if self.encoder not in FROZEN_ENCODERS and not Path(self.encoder).expanduser().is_file():
            raise ConfigError(
                f"{where}.encoder {self.encoder!r} is neither one of {', '.join(FROZEN_ENCODERS)} "
                "nor an existing TorchScript file; name one or give the file's path"
            )
        frozen = frozen_encoder(self)
        if frozen.warm_start and not supports_warm_start(self.source):
            warm = ", ".join(k.name for k in DATASETS.entries() if k.warm_start)
            raise ConfigError(
                f"{where}.encoder {frozen.name} needs dataset: {warm} in {where}.from, "
                f"not {self.source.dataset!r}; use resnet18-imagenet or a TorchScript file"
            )
        if frozen.uses_model:  # built from extract.model
            model = build_config(IPSConfig, dict(self.model), f"{where}.model", prefix=f"{where}.model")
            ENCODERS.get(model.encoder, f"{where}.model.encoder")


EXTRACT_RULES = {
    "encoder": Rule(
        lambda v: isinstance(v, str) and v.strip() != "",
        "an encoder name or a TorchScript file's path",
        "name an extraction encoder (warm-start, random-init, resnet18-imagenet, ...) or give the file's path",
    ),
    "dtype": Rule(lambda v: v in ("float16", "float32"), "float16 or float32", "choose float16 or float32"),
    "batch_size": positive_int(),
    "warm_start_steps": positive_int("leave it out for the default, or give a number of steps"),
    "model": Rule(lambda v: isinstance(v, dict), "a mapping of model settings", "write it like {encoder: small-cnn}"),
}


def is_torchscript(cfg: ExtractConfig) -> bool:
    """The encoder is a TorchScript file (code), not one of the named encoders."""
    return cfg.encoder not in FROZEN_ENCODERS


def parse_extract(raw: Any, where: str = "data.extract") -> ExtractConfig:
    """An :class:`ExtractConfig` from a space's ``extract`` mapping; every problem is one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping like {{from: {{dataset: megapixel}}, encoder: warm-start}}")
    known = {"from", "encoder", "model", "dtype", "batch_size", "warm_start_steps"}
    unknown = sorted(set(map(str, raw)) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; known keys: {', '.join(sorted(known))}")
    if not isinstance(raw.get("from"), dict):
        raise ConfigError(f"{where}.from must be the data section to extract from, like {{dataset: megapixel}}")
    source = build_config(DataConfig, dict(raw["from"]), f"{where}.from", prefix=f"{where}.from")
    cfg = ExtractConfig(source=source, **{k: v for k, v in raw.items() if k != "from"})
    cfg.validate(where)
    return cfg


# -- encoders -------------------------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _encoder_model_cfg(cfg: ExtractConfig, geometry: DataGeometry) -> IPSConfig:
    """``extract.model`` cut to the source data's patches (its geometry is the data's, as for training)."""
    model = {k: v for k, v in cfg.model.items() if k not in ("n_chan", "patch_size", "patch_stride", "tasks")}
    return geometry.model_config(IPSConfig(**model))


@dataclass(frozen=True)
class FrozenEncoder:
    """One extraction encoder (``data.extract.encoder``): ``build(cfg, geometry, progress)`` gives the frozen
    ``(n, C, P, P) -> (n, D)`` module for the source data's geometry, ``identity(cfg)`` what identifies its weights
    (the cache key)."""

    name: str
    build: Callable[[ExtractConfig, DataGeometry, bool], nn.Module]
    identity: Callable[[ExtractConfig], dict[str, Any]]
    uses_model: bool = False  # built from extract.model (encoder, dim)
    warm_start: bool = False  # pretrained on digit patches: the source must support the warm start


# Named extraction encoders; any other ``data.extract.encoder`` is a TorchScript file's path
FROZEN_ENCODERS: Registry[FrozenEncoder] = Registry("extraction encoder", "data.extract.encoder")


def _warm_start(cfg: ExtractConfig, geometry: DataGeometry, progress: bool) -> nn.Module:
    model_cfg = _encoder_model_cfg(cfg, geometry)
    encoder = build_encoder(model_cfg)
    steps = cfg.warm_start_steps or DEFAULT_STEPS
    apply_warm_start(encoder, pretrained_encoder_state(model_cfg, cfg.source, steps=steps, progress=progress))
    return encoder


def _random_init(cfg: ExtractConfig, geometry: DataGeometry, progress: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the same weights on every machine, whatever ran before
        torch.manual_seed(cfg.source.seed)
        return build_encoder(_encoder_model_cfg(cfg, geometry))


def _imagenet(arch: str) -> Callable[[ExtractConfig, DataGeometry, bool], nn.Module]:
    def build(cfg: ExtractConfig, geometry: DataGeometry, progress: bool) -> nn.Module:
        width = 512 if arch == "resnet18" else 2048  # native: no projection appended
        try:
            return build_encoder(geometry.model_config(IPSConfig(encoder=arch, pretrained=True, dim=width)))
        except ConfigError:
            raise ConfigError(
                f"could not download ImageNet weights for {arch}; connect to the internet once, "
                "or extract with encoder warm-start or a TorchScript file"
            ) from None

    return build


def _torchscript(cfg: ExtractConfig, geometry: DataGeometry, progress: bool) -> nn.Module:
    path = Path(cfg.encoder).expanduser()
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise ConfigError(f"cannot load {path} as TorchScript ({first}); save it with torch.jit.save") from None


FROZEN_ENCODERS.register(
    FrozenEncoder(
        "warm-start",
        _warm_start,
        lambda cfg: {"kind": "warm-start", "model": cfg.model, "steps": cfg.warm_start_steps},
        uses_model=True,
        warm_start=True,
    )
)
FROZEN_ENCODERS.register(
    FrozenEncoder(
        RANDOM_INIT,
        _random_init,
        lambda cfg: {"kind": RANDOM_INIT, "model": cfg.model, "seed": cfg.source.seed},
        uses_model=True,
    )
)
for _name, _arch in IMAGENET.items():
    FROZEN_ENCODERS.register(
        FrozenEncoder(_name, _imagenet(_arch), lambda cfg, a=_arch: {"kind": "imagenet", "arch": a})
    )
TORCHSCRIPT = FrozenEncoder(
    "torchscript",
    _torchscript,
    lambda cfg: {"kind": "torchscript", "sha256": _file_digest(Path(cfg.encoder).expanduser())},
)
NAMED_ENCODERS = tuple(FROZEN_ENCODERS)


def frozen_encoder(cfg: ExtractConfig) -> FrozenEncoder:
    """The registered encoder ``cfg.encoder`` names, else the TorchScript file's loader."""
    return FROZEN_ENCODERS[cfg.encoder] if cfg.encoder in FROZEN_ENCODERS else TORCHSCRIPT


def encoder_identity(cfg: ExtractConfig) -> dict[str, Any]:
    """What identifies the encoder's weights, for the cache key."""
    return frozen_encoder(cfg).identity(cfg)


def extraction_fields(cfg: ExtractConfig) -> dict[str, Any]:
    """Every setting that changes the extracted files (the folder's hash)."""
    source = {k: v for k, v in dataclasses.asdict(cfg.source).items() if k not in ("cache_dir", "download")}
    return {"version": FORMAT_VERSION, "source": source, "encoder": encoder_identity(cfg), "dtype": cfg.dtype}


def feature_folder(cfg: ExtractConfig, cache_dir: str | None = None) -> Path:
    """``<cache>/features-<hash of extraction_fields>``."""
    return cache_root(cache_dir or cfg.source.cache_dir) / f"features-{cache_key(extraction_fields(cfg))}"


def build_frozen_encoder(cfg: ExtractConfig, geometry: DataGeometry | None = None, progress: bool = True) -> nn.Module:
    """The frozen encoder ``(n, C, P, P) -> (n, D)`` for the source data's ``geometry`` (None: read from the source's
    config, or its files where N varies), in eval mode."""
    geometry = geometry or data_geometry(cfg.source) or build_datasets(cfg.source).geometry
    encoder = frozen_encoder(cfg).build(cfg, geometry, progress)
    for param in encoder.parameters():  # ScriptModules have no requires_grad_()
        param.requires_grad_(False)
    return encoder.eval()


# -- the resumable core ---------------------------------------------------------------------------------------------
def _grid_coords(dataset: Any, n: int) -> np.ndarray | None:
    """Top-left ``(x, y)`` of a PatchDataset's N patches (row-major grid), or None when it has no grid."""
    grid, stride = getattr(dataset, "grid", None), getattr(dataset, "stride", None)
    if grid is None or stride is None or grid[0] * grid[1] != n:
        return None
    rows, cols = np.divmod(np.arange(n), grid[1])
    return np.stack([cols * stride, rows * stride], axis=1).astype(np.int64)  # (N, 2)


# TRIDENT's magnification from a level-0 mpp (trident WSI._fetch_magnification): the scanner's nominal objective
MAGNIFICATIONS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))  # (mpp below, magnification)


def magnification(mpp: float | None) -> int | None:
    """The nominal objective magnification TRIDENT gives a slide of ``mpp`` microns per level-0 pixel (0.25: 40,
    0.5: 20), or None where it gives none (mpp unknown, or 2.4 and more)."""
    return next((mag for below, mag in MAGNIFICATIONS if mpp is not None and mpp < below), None)


def _number(value: float) -> int | float:
    """An int where the value is whole (TRIDENT writes its sizes and magnifications as ints)."""
    return int(value) if float(value).is_integer() else float(value)


def _level_attrs(source: Any) -> dict[str, Any]:
    """TRIDENT's coords attributes for a slide source read at a pyramid level: coords stay level-0 pixels, a patch
    covers ``patch_size_level0`` of them (the read size times the level's downsample), the slide is
    ``level0_width x level0_height``, and, where the file gives its mpp, ``level0_magnification`` and the
    ``target_magnification`` a patch is seen at (TRIDENT's reader needs both); CLAM's ``patch_level`` and
    ``downsample`` beside them."""
    if not hasattr(source, "patch_size_level0"):
        return {}
    reader = source.reader
    level = int(getattr(source, "level", 0))
    downsample = float(reader.downsamples[level])
    size0 = float(source.patch_size_level0)
    width, height = reader.dimensions[0]
    attrs = {
        "patch_size_level0": _number(size0),
        "patch_level": level,
        "downsample": [downsample] * 2,
        "level0_width": int(width),
        "level0_height": int(height),
    }
    mag = magnification(reader.mpp)
    if mag is not None:
        attrs["level0_magnification"] = mag
        attrs["target_magnification"] = _number(round(mag * source.patch_size / size0, 6))
    return attrs


def _chunks(patches: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """A source (``.read``) or a tensor ``(N, C, P, P)``, ``batch_size`` patches at a time."""
    n = len(patches)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield patches.read(np.arange(start, stop)) if hasattr(patches, "read") else patches[start:stop]


def _label(targets: dict[str, torch.Tensor], where: str) -> int:
    if len(targets) != 1:
        raise ConfigError(f"{where} has {len(targets)} tasks; extraction writes one label per image: keep one task")
    value = next(iter(targets.values()))
    if value.dim() != 0:
        raise ConfigError(f"{where}'s task is multi-label; extraction writes one class per image: use a softmax task")
    return int(value)


def _targets(dataset: Any, i: int) -> dict[str, torch.Tensor]:
    """Item ``i``'s targets without loading its image, where the dataset keeps them apart (PatchDataset does)."""
    if isinstance(getattr(dataset, "targets", None), dict):
        return {k: v[i] for k, v in dataset.targets.items()}
    return dataset[i][1]


def write_slide(
    path: Path,
    chunks: Iterator[torch.Tensor],
    n: int,
    coords: np.ndarray | None,
    dtype: str,
    attrs: dict[str, Any],
    encoder: str | None = None,
) -> None:
    """Write one image's embeddings (``chunks`` of ``(k, D)``, N rows in all) to ``path`` via ``<path>.tmp``.

    As TRIDENT does, both datasets carry ``name`` (the file's stem) and ``savetodir`` (its folder), ``features`` the
    ``encoder``'s name, and ``coords`` ``attrs``."""
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:  # truncates what a killed run left
        features, row = None, 0
        for emb in chunks:
            emb = emb.detach().float().cpu().flatten(1).numpy()  # (k, D)
            if features is None:
                dim = emb.shape[1]
                rows = max(1, min(n, (1 << 18) // (dim * np.dtype(dtype).itemsize)))  # ~256 KB chunks
                features = f.create_dataset("features", shape=(n, dim), dtype=dtype, chunks=(rows, dim))
            features[row : row + len(emb)] = emb
            row += len(emb)
        if features is None or row != n:
            raise RuntimeError(f"encoder produced {row} rows for {n} patches of {path.name}")
        where = {"name": path.stem, "savetodir": str(path.parent)}
        features.attrs.update({**where, **({"encoder": encoder} if encoder else {})})
        if coords is not None:
            f.create_dataset("coords", data=coords)
            f["coords"].attrs.update({**attrs, **where})
    os.replace(tmp, path)


@dataclass
class _Pending:
    """An image whose (small) patch tensor waits to be encoded together with the next ones."""

    name: str
    path: Path
    patches: torch.Tensor  # (N, C, P, P)
    coords: np.ndarray | None
    row: tuple[str, int, str]


def extract_splits(
    splits: dict[str, Any],
    encoder: Callable[[torch.Tensor], torch.Tensor],
    out_dir: Path,
    dtype: str = "float16",
    batch_size: int = 256,
    attrs: dict[str, Any] | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    encoder_name: str | None = None,
) -> Path:
    """Embed every image of ``splits`` (``{"train": ds, "val": ds, "test": ds}``) into ``out_dir``; returns
    the manifest's path. Finished images (their ``.h5`` exists) are skipped; ``labels.csv`` is written last.

    Images with fewer than ``batch_size`` patches are encoded several at a time (a 256 px canvas has 64 patches
    of 32 px), so the encoder sees full batches; each image is still its own file, written once its rows are in.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cpu")
    attrs = attrs or {}
    rows: list[tuple[str, int, str]] = []
    pending: list[_Pending] = []
    total = sum(len(ds) for ds in splits.values())
    bar = tqdm(total=total, desc=f"extracting features to {out_dir.name}", disable=not progress, leave=False)

    def encode(patches: Any) -> Iterator[torch.Tensor]:
        with torch.inference_mode():
            for chunk in _chunks(patches, batch_size):
                yield encoder(chunk.to(device))

    def flush() -> None:
        if not pending:
            return
        emb = torch.cat(list(encode(torch.cat([p.patches for p in pending]))))  # (sum of N, D)
        for p, part in zip(pending, emb.split([len(p.patches) for p in pending]), strict=True):
            write_slide(p.path, iter([part]), len(p.patches), p.coords, dtype, attrs, encoder_name)
            rows.append(p.row)
            bar.update()
        pending.clear()

    for split, dataset in splits.items():
        for i in range(len(dataset)):
            name = f"{split}-{i:06d}"
            path = out_dir / f"{name}.h5"
            if path.exists():  # finished before a kill: only its label is needed
                rows.append((name, _label(_targets(dataset, i), split), split))
                bar.update()
                continue
            patches, targets = dataset[i]
            row = (name, _label(targets, split), split)
            if hasattr(patches, "read"):  # a lazy source: streamed chunk by chunk, never held whole
                coords = getattr(patches, "coords", None)
                level = {**attrs, **_level_attrs(patches)}
                write_slide(path, encode(patches), len(patches), coords, dtype, level, encoder_name)
                rows.append(row)
                bar.update()
                continue
            pending.append(_Pending(name, path, patches, _grid_coords(dataset, len(patches)), row))
            if sum(len(p.patches) for p in pending) >= batch_size:
                flush()
        flush()
    bar.close()
    manifest = out_dir / MANIFEST
    tmp = manifest.with_name(MANIFEST + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "split"])
        writer.writerows(sorted(rows, key=lambda r: (SPLIT_ORDER.index(r[2]) if r[2] in SPLIT_ORDER else 9, r[0])))
    os.replace(tmp, manifest)
    return manifest


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def extract_device(device: str | torch.device | None) -> torch.device:
    """The device to extract on: ``cpu``, ``cuda`` or ``cuda:N`` (None: cuda when available); one ConfigError line
    for any other name, or a CUDA device this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", str(device).strip())
    if match is None:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N (e.g. cuda:0)")
    if device.strip() == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {device} asks for CUDA, but this machine has no usable CUDA GPU; use --device cpu")
    index = int(match.group(1) or 0)
    if index >= count:
        raise ConfigError(
            f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; pick one of those"
        )
    return torch.device(device.strip())


def extract(
    cfg: ExtractConfig,
    cache_dir: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    run_torchscript: bool = True,
) -> Path:
    """Extract ``cfg`` into its cache folder (once; resumes a partial one) and return the folder.

    ``run_torchscript=False`` (the report): a TorchScript encoder's finished folder is used, but one still to be
    extracted is a ConfigError instead of loading the file, which would run its code.
    """
    if cache_dir and cfg.source.cache_dir is None:  # the source data (and warm start) share the features' cache
        cfg = dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, cache_dir=cache_dir))
    folder = feature_folder(cfg, cache_dir)
    if (folder / MANIFEST).is_file():
        return folder
    if not run_torchscript and is_torchscript(cfg):
        raise ConfigError(
            f"the features of TorchScript encoder {cfg.encoder} are not extracted, and the report does not run "
            "TorchScript (it is code); extract them first with ips-search-extract, naming the file yourself"
        )
    dev = extract_device(device)
    with _folder_lock(folder):
        if (folder / MANIFEST).is_file():  # another process finished it while this one waited
            return folder
        data = build_datasets(cfg.source)
        encoder = build_frozen_encoder(cfg, data.geometry, progress).to(dev)
        P, stride = cfg.source.patch_size, cfg.source.patch_stride or cfg.source.patch_size
        # TRIDENT's overlap: pixels two neighbouring patches share, in the patch size's frame (negative: a gap)
        attrs = {
            "patch_size": P,
            "patch_size_level0": P,
            "patch_level": 0,
            "downsample": [1.0, 1.0],
            "overlap": P - stride,
        }
        with open(folder / SETTINGS, "w", encoding="utf-8") as f:
            json.dump(extraction_fields(cfg), f, indent=1, sort_keys=True, default=str)
        splits = {"train": data.train, "val": data.val, "test": data.test}
        name = cfg.encoder if not is_torchscript(cfg) else Path(cfg.encoder).name
        extract_splits(splits, encoder, folder, cfg.dtype, cfg.batch_size, attrs, dev, progress, name)
    return folder


def extracted_data_config(cfg: DataConfig, progress: bool = True, run_torchscript: bool = True) -> DataConfig:
    """``cfg`` (``dataset: features`` with ``extract``) pointed at its extracted folder, extracting on first use."""
    folder = extract(parse_extract(cfg.extract), cfg.cache_dir, progress=progress, run_torchscript=run_torchscript)
    return dataclasses.replace(cfg, root=str(folder), manifest=str(folder / MANIFEST), extract=None)


def preview(cfg: DataConfig) -> Any:
    """``--dry-run``: whether ``cfg``'s extraction exists (then its files' headers are read), and if not what its
    source data will cost; a config without ``extract`` goes to :func:`ips_search.data.preview_datasets`."""
    if cfg.extract is None or not DATASETS[cfg.dataset].features:
        return preview_datasets(cfg)
    settings = parse_extract(cfg.extract)
    folder = feature_folder(settings, cfg.cache_dir)
    if (folder / MANIFEST).is_file():
        return preview_datasets(
            dataclasses.replace(cfg, root=str(folder), manifest=str(folder / MANIFEST), extract=None)
        )
    source = preview_datasets(settings.source).line()
    return DataPreview(
        f"{settings.encoder} features of P={settings.source.patch_size} patches",
        cached=False,
        detail=f"extracted on the first run from {source}",
    )


def resolve_data(cfg: DataConfig, progress: bool = True, run_torchscript: bool = True) -> DataConfig:
    """The data config ``build_datasets`` can build: a features config with ``extract`` settings is pointed at its
    extracted files (extracted on first use, once per machine); any other config is returned as it is.

    Extraction needs an encoder, so it happens here, above ``ips_search.data``; the search's driver, its trials,
    the estimator and the report call this before ``build_datasets``. The report passes ``run_torchscript=False``:
    a TorchScript encoder named only by a trial's files is never loaded (see the module docstring)."""
    if cfg.extract is not None and DATASETS[cfg.dataset].features:
        return extracted_data_config(cfg, progress, run_torchscript)
    return cfg


# -- command line ---------------------------------------------------------------------------------------------------


def built_geometry(data: DataConfig) -> DataGeometry:
    """The geometry ``data`` gives the model: from the config alone for whole images; slides and features build (or
    load from the cache) their data, whose files decide N."""
    return data_geometry(data) or build_datasets(resolve_data(data, progress=False)).geometry
