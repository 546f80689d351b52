"""Typed configuration that flows from the search space to the model.

``ExperimentConfig`` = data + model + training settings of one trial. The search
space (``space.py``) fills it from YAML and sampled values; the trainable, the
training loop, the datasets and :class:`~ips_search.model.IPSNet` each read only
their own part.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ips_search.errors import ConfigError

ENCODERS = ("resnet18", "resnet50", "resnet18-2", "resnet18-3", "resnet50-2", "resnet50-3", "small-cnn", "projector")
LOADING_MODES = ("eager", "eager-sequential", "lazy")
SHUFFLES = ("none", "batch", "instance")
DATASETS = ("megapixel", "mnist-resized", "folder", "slides", "features")
MEGAPIXEL_TASKS = ("majority", "max", "top", "multilabel")


@dataclass(frozen=True)
class Task:
    """One prediction target: one query token and one head in the transformer.

    ``multi_label`` tasks use a sigmoid per class (BCE loss); others a softmax (CE loss).
    """

    name: str
    n_class: int
    multi_label: bool = False


@dataclass
class IPSConfig:
    """Model settings for :class:`~ips_search.model.IPSNet`.

    M = ``memory_size`` (patches kept), I = ``iteration_size`` (patches scored per
    iteration), P = ``patch_size``, D = ``dim``.
    """

    n_class: int = 10
    n_chan: int = 1  # image channels C; for the projector encoder, the embedding width D_in of the features
    memory_size: int = 5  # M
    iteration_size: int = 5  # I
    patch_size: int = 100  # P
    patch_stride: int | None = None  # defaults to patch_size (non-overlapping)
    encoder: str = "resnet18"
    pretrained: bool = False  # ImageNet weights (downloads; opt-in)
    dim: int = 512  # D
    heads: int = 8  # H
    d_k: int = 64
    d_v: int = 64
    d_inner: int = 2048
    dropout: float = 0.1
    attn_dropout: float = 0.1
    use_pos: bool = False  # 1-D sinusoidal positional encoding of the patch index
    orient_scores: bool = True  # before training, flip heads that score background first (IPSNet.orient_scores)
    tasks: tuple[Task, ...] = ()  # empty: one softmax task "label" with n_class classes
    encode_chunk: int = 256  # patches per encoder call in the no-grad IPS pass
    loading: str = "eager"  # eager | eager-sequential | lazy
    # training only: stream the patches in a random order (one per batch, or one per image), as the original IPS
    # code can; with several heads a patch's score depends on its company, so the order changes what is kept
    shuffle: str = "none"  # none | batch | instance
    fold_bn: bool = True  # fold BatchNorm into convs for the no-grad pass (same result, faster)
    ips_dtype: str = "float32"  # float32 | bfloat16: autocast dtype of the no-grad pass
    ips_impl: str = "streaming"  # streaming (chunked encoding) | reference (the notebook's per-iteration loop)
    max_patches: int = 100_000  # positional-encoding table size

    def __post_init__(self) -> None:
        if not self.tasks:
            self.tasks = (Task("label", self.n_class),)
        self.tasks = tuple(Task(**t) if isinstance(t, dict) else t for t in self.tasks)
        if self.patch_stride is None:
            self.patch_stride = self.patch_size
        self.validate()

    @property
    def stride(self) -> int:
        assert self.patch_stride is not None
        return self.patch_stride

    def validate(self) -> None:
        for name in ("memory_size", "iteration_size", "patch_size", "n_chan", "dim", "heads", "encode_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}; set it to 1 or more")
        if self.stride < 1:
            raise ConfigError(f"patch_stride must be a positive integer, got {self.patch_stride!r}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        if self.loading not in LOADING_MODES:
            raise ConfigError(f"unknown loading mode {self.loading!r}; choose one of {', '.join(LOADING_MODES)}")
        if self.shuffle not in SHUFFLES:
            raise ConfigError(f"unknown shuffle {self.shuffle!r}; choose one of {', '.join(SHUFFLES)}")
        if self.ips_impl not in ("streaming", "reference"):
            raise ConfigError(f"ips_impl must be streaming or reference, got {self.ips_impl!r}")
        if self.ips_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"ips_dtype must be float32 or bfloat16, got {self.ips_dtype!r}")
        for task in self.tasks:
            if task.n_class < 1:
                raise ConfigError(f"task {task.name!r} needs at least one class, got {task.n_class}")


@dataclass
class DataConfig:
    """Which dataset and how it is cut into patches (P = ``patch_size``)."""

    dataset: str = "megapixel"
    patch_size: int = 32
    patch_stride: int | None = None
    # megapixel
    canvas_size: int = 256
    digit_size: int = 28
    n_digits: int = 5
    n_noise: int = 20  # scribble strokes; the paper uses 50 on 1500x1500 canvases
    n_train: int = 1500  # canvases with training-split digits (validation is carved from these)
    n_test: int = 500
    val_fraction: float = 0.2
    tasks: tuple[str, ...] = ("majority",)
    digits: Literal["sklearn", "mnist"] = "sklearn"
    augment_digits: bool = False  # train canvases only: each placed digit randomly rotated, scaled and sheared
    # megapixel, mnist-resized, folder: every read of a *training* image shifts it by up to this many pixels (zero
    # fill), so the patch grid cuts its content differently each epoch; validation and test images never move
    augment_shift: int = 0
    # mnist-resized
    image_size: int = 500
    # folder, slides, features
    root: str | None = None  # folder: class folders; slides: class folders of slides; features: the .h5 files
    n_chan: int = 3
    # slides and features: a CSV listing the items (slides: path,label[,split]; features: slide,label[,split])
    manifest: str | None = None
    # slides: whole-slide images / big scenes read lazily (patch_size and patch_stride are pixels at `level`)
    level: int | None = None  # pyramid level (0 = full resolution); default 0 unless mpp is set
    mpp: float | None = None  # target microns per pixel: read at the nearest level, resampled to it
    min_foreground: float = 0.5  # keep patches at least this tissue fraction (Otsu); 0 keeps every patch
    cohort_size: int = 0  # no root/manifest: generate this many synthetic slides into the cache dir
    slide_size: int = 3072  # side (level 0 pixels) of the generated slides
    # features (see ips_search/data/features.py)
    extract: dict[str, Any] | None = None  # extraction settings: the features are extracted on first use
    test_fraction: float = 0.2  # features without a split column: share of slides held out for test
    feature_items: str = "auto"  # auto | tensor | source: items as in-RAM (N, D) tensors or lazy sources
    slides_root: str | None = None  # features: the slides they were cut from (<slide>.<ext>), for attention maps
    # common
    seed: int = 0
    download: bool = False  # opt-in network access (MNIST)
    cache_dir: str | None = None  # default: $IPS_SEARCH_CACHE or ~/.cache/ips-search

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if self.patch_stride is None:
            self.patch_stride = self.patch_size
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name in ("patch_size", "canvas_size", "digit_size", "n_train", "n_test", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.patch_stride, int) or isinstance(self.patch_stride, bool) or self.patch_stride < 1:
            raise ConfigError(f"patch_stride must be a positive integer, got {self.patch_stride!r}")
        if not isinstance(self.augment_digits, bool):
            raise ConfigError(f"augment_digits must be true or false, got {self.augment_digits!r}")
        if not isinstance(self.augment_shift, int) or isinstance(self.augment_shift, bool) or self.augment_shift < 0:
            raise ConfigError(f"augment_shift must be 0 or a positive number of pixels, got {self.augment_shift!r}")
        if self.augment_shift and self.dataset in ("slides", "features"):
            raise ConfigError(
                f"augment_shift applies to whole images (megapixel, mnist-resized, folder), not to {self.dataset}; "
                "remove it from data:"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be between 0 and 1, got {self.test_fraction!r}")
        if self.feature_items not in ("auto", "tensor", "source"):
            raise ConfigError(f"feature_items must be auto, tensor or source, got {self.feature_items!r}")
        if self.extract is not None and not isinstance(self.extract, dict):
            raise ConfigError(f"extract must be a mapping like {{from: {{dataset: megapixel}}}}, got {self.extract!r}")
        for task in self.tasks:
            if task not in MEGAPIXEL_TASKS:
                raise ConfigError(f"unknown task {task!r}; choose from {', '.join(MEGAPIXEL_TASKS)}")
        self._validate_slides()

    def _validate_slides(self) -> None:
        level = self.level
        if level is not None and (not isinstance(level, int) or isinstance(level, bool) or level < 0):
            raise ConfigError(f"level must be 0 (full resolution) or a positive integer, got {self.level!r}")
        if self.mpp is not None:
            if not isinstance(self.mpp, (int, float)) or isinstance(self.mpp, bool) or self.mpp <= 0:
                raise ConfigError(f"mpp must be a positive number of microns per pixel, got {self.mpp!r}")
            if self.level is not None:
                raise ConfigError("set either level or mpp for dataset: slides, not both")
        fg = self.min_foreground
        if not isinstance(fg, (int, float)) or isinstance(fg, bool) or not 0.0 <= fg <= 1.0:
            raise ConfigError(f"min_foreground must be between 0 and 1 (0 keeps every patch), got {fg!r}")
        for name in ("cohort_size", "slide_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be 0 or a positive integer, got {value!r}")


@dataclass
class TrainConfig:
    """Optimisation settings: AdamW with linear warm-up then cosine decay."""

    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0
    warm_start: bool = True  # start the encoder from the cached digit-pretrained weights
    amp: bool = True  # bfloat16 autocast for the training step on CUDA (no-op on CPU)
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("weight_decay", "warmup_epochs", "min_lr_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be a positive number or null, got {self.grad_clip!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class ExperimentConfig:
    """Everything one trial needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: IPSConfig = field(default_factory=IPSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        return cls(
            data=DataConfig(**d.get("data", {})),
            model=IPSConfig(**d.get("model", {})),
            train=TrainConfig(**d.get("train", {})),
        )


def build_config(section: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a config dataclass, turning unknown keys into a one-line ConfigError."""
    known = {f.name for f in dataclasses.fields(section)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; known keys: {', '.join(sorted(known))}")
    try:
        return section(**values)
    except TypeError as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from None
