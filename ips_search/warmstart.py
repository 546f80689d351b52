"""Warm start: pretrain the patch encoder to recognise single digits in a patch.

Training IPS from scratch on Megapixel MNIST can stay at chance: the scores that
pick patches and the encoder that reads them must both be right before either gets
a useful gradient. A short supervised pretraining of the encoder breaks that loop:
it learns to classify P x P patches that hold one TRAIN-pool digit (fully or mostly
inside, with the canvases' scribble noise around it) into the digit's class, plus an
11th class for patches with only noise or nothing. Validation and TEST-pool digits are
never used.

The result depends only on the fields in :func:`warm_start_fields`; it is computed
once, cached on disk (``torch.save``, read with ``weights_only=True``) and in memory,
and returned as the encoder's ``state_dict`` (the linear head is dropped).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ips_search.config import DataConfig, IPSConfig
from ips_search.data import DATASETS
from ips_search.data.cache import cache_file, cached
from ips_search.data.digits import DigitPool, digit_pools, split_validation
from ips_search.data.strokes import stroke_bank, with_dihedral
from ips_search.errors import ConfigError
from ips_search.model.encoders import build_encoder

FORMAT_VERSION = 2
DEFAULT_STEPS = 150  # ~40 s of one CPU thread for small-cnn, D=128, P=32; ~99% single-patch accuracy
BATCH_SIZE = 128
LR = 2e-3
NOISE_CLASS = 10  # label of noise-only / empty patches
P_NOISE_ONLY = 0.2  # share of noise-only / empty patches (most canvas patches hold no digit)
EDGE_MARGIN = 0.2  # a digit may stick out of the patch by up to this share of its size per side


def supports_warm_start(data_cfg: DataConfig) -> bool:
    """Whether :func:`pretrained_encoder_state` applies to this dataset (its kind's patches look like the digit
    canvases')."""
    return DATASETS[data_cfg.dataset].warm_start


def _warm_start_datasets() -> str:
    return ", ".join(k.name for k in DATASETS.entries() if k.warm_start)


class DigitPatchSampler:
    """Random ``(x (B, C, P, P) float32 in [0, 1], y (B,) int64)`` single-digit patches.

    A patch is a window into a canvas-like scene: with probability ``1 - P_NOISE_ONLY``
    one digit whose top-left corner lies within ``EDGE_MARGIN * S`` of the patch (so at
    least ~64% of its box is inside when P >= S), plus Poisson-many scribble strokes at the density
    of a canvas (never over the digit's box, as on the canvases); labels are the digit
    class or ``NOISE_CLASS``.
    """

    def __init__(self, pool: DigitPool, patch_size: int, data_cfg: DataConfig, n_chan: int, seed: int) -> None:
        self.pool, self.P, self.S, self.n_chan = pool, patch_size, data_cfg.digit_size, n_chan
        self.rng = np.random.default_rng([seed, 9])
        self.bank = with_dihedral(stroke_bank(512, self.S, self.rng)) if data_cfg.n_noise else None
        # Expected strokes whose S-box reaches into a P-window on a canvas: n_noise * window area / placement area.
        free = max(1, data_cfg.canvas_size - self.S + 1)
        self.noise_rate = data_cfg.n_noise * min(1.0, ((self.P + self.S - 1) / free) ** 2)
        margin = round(EDGE_MARGIN * self.S)
        self.lo, self.hi = min(0, self.P - self.S) - margin, max(0, self.P - self.S) + margin

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        P, S, rng = self.P, self.S, self.rng
        buf = np.zeros((batch, P + 2 * S, P + 2 * S), dtype=np.float32)  # window with an S-wide border
        labels = np.full(batch, NOISE_CLASS, dtype=np.int64)
        has_digit = rng.random(batch) >= P_NOISE_ONLY
        for b in range(batch):
            box = None
            if has_digit[b]:
                src = int(rng.integers(len(self.pool)))
                y, x = rng.integers(self.lo, self.hi + 1, size=2) + S
                buf[b, y : y + S, x : x + S] = self.pool.images[src]
                labels[b], box = self.pool.labels[src], (y, x)
            if self.bank is None:
                continue
            for _ in range(rng.poisson(self.noise_rate)):
                y, x = rng.integers(1, P + S, size=2)  # stroke box overlaps the window
                if box is not None and abs(y - box[0]) < S and abs(x - box[1]) < S:
                    continue  # canvases keep strokes off digit boxes
                stroke = self.bank[rng.integers(len(self.bank))]
                np.maximum(buf[b, y : y + S, x : x + S], stroke, out=buf[b, y : y + S, x : x + S])
        x = torch.from_numpy(np.rint(buf[:, S : S + P, S : S + P] * 255) / 255)  # canvases are stored as uint8
        x = x.unsqueeze(1).expand(-1, self.n_chan, -1, -1).contiguous()  # (B, C, P, P)
        return x, torch.from_numpy(labels)


def warm_start_fields(model_cfg: IPSConfig, data_cfg: DataConfig, steps: int) -> dict:
    """Every setting that changes the pretrained weights (the cache key)."""
    return {
        "version": FORMAT_VERSION,
        "encoder": model_cfg.encoder,
        "architecture": repr(build_encoder(model_cfg)),  # a changed encoder never loads stale weights
        "imagenet": model_cfg.pretrained,
        "dim": model_cfg.dim,
        "n_chan": model_cfg.n_chan,
        "patch_size": model_cfg.patch_size,
        "digits": data_cfg.digits,
        "digit_size": data_cfg.digit_size,
        "n_noise": data_cfg.n_noise,
        "canvas_size": data_cfg.canvas_size,
        "seed": data_cfg.seed,
        "val_fraction": data_cfg.val_fraction,  # its digits are held out of pretraining
        "steps": steps,
    }


def _pretrain(
    model_cfg: IPSConfig, data_cfg: DataConfig, steps: int, progress: bool, device: torch.device
) -> dict[str, object]:
    """Train encoder + linear head; returns ``{"encoder": state, "head": state, "train_acc", "seconds"}``."""
    start = time.perf_counter()
    train_pool, _ = digit_pools(
        data_cfg.digits, data_cfg.digit_size, data_cfg.seed, data_cfg.cache_dir, data_cfg.download
    )
    train_pool, _ = split_validation(train_pool, data_cfg.val_fraction, data_cfg.seed)  # never the val digits
    sampler = DigitPatchSampler(train_pool, model_cfg.patch_size, data_cfg, model_cfg.n_chan, data_cfg.seed)
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the caller's RNG
        torch.manual_seed(data_cfg.seed)
        encoder = build_encoder(model_cfg)
        head = nn.Linear(model_cfg.dim, NOISE_CLASS + 1)
    model = nn.Sequential(encoder, head).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 0
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    recent: list[float] = []
    bar = tqdm(range(steps), desc="warm start: pretraining encoder", disable=not progress, leave=False)
    first_done = None  # the first step pays one-off costs: later steps give the steady per-step time
    for step in bar:
        if step == 1:
            first_done = time.perf_counter()
        x, y = sampler.sample(BATCH_SIZE)
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, 11)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [(logits.argmax(1) == y).float().mean().item()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{sum(recent) / len(recent):.3f}", refresh=False)
    encoder.cpu()
    return {
        "encoder": {k: v.detach().clone() for k, v in encoder.state_dict().items()},
        "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "train_acc": sum(recent) / max(1, len(recent)),
        "seconds": time.perf_counter() - start,
        "step_seconds": (time.perf_counter() - first_done) / (steps - 1) if first_done else None,
    }


def pretrained_encoder_state(
    model_cfg: IPSConfig,
    data_cfg: DataConfig,
    steps: int = DEFAULT_STEPS,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of ``build_encoder(model_cfg)`` after digit-patch pretraining.

    Patches have the model's P (``model_cfg.patch_size``) and ``model_cfg.n_chan``
    channels (the grayscale digit repeated); digits, noise and seed come from
    ``data_cfg``. Cached on disk under ``data_cfg``'s cache dir and in memory, so
    only the first call for a setting trains (``steps`` batches of 128, a tqdm bar
    when ``progress``). ``device`` defaults to CUDA when available.
    """
    if not supports_warm_start(data_cfg):
        raise ConfigError(
            f"warm start needs the digit dataset (dataset: {_warm_start_datasets()}), not {data_cfg.dataset!r}; "
            "set warm_start: false"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"warm-start steps must be a positive integer, got {steps!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    payload = cached(
        "warmstart",
        warm_start_fields(model_cfg, data_cfg, steps),
        lambda: _pretrain(model_cfg, data_cfg, steps, progress, dev),
        data_cfg.cache_dir,
    )
    return payload["encoder"]


def warm_start_cached(model_cfg: IPSConfig, data_cfg: DataConfig, steps: int = DEFAULT_STEPS) -> bool:
    """Whether :func:`pretrained_encoder_state` would load these weights from disk (no pretraining)."""
    return cache_file("warmstart", warm_start_fields(model_cfg, data_cfg, steps), data_cfg.cache_dir).exists()


def pretrain_seconds(model_cfg: IPSConfig, data_cfg: DataConfig, steps: int = DEFAULT_STEPS, sample: int = 3) -> float:
    """Rough CPU time of the pretraining, timed on ``sample`` (>= 2) steps (for ``--dry-run``; nothing is cached)."""
    timed = _pretrain(model_cfg, data_cfg, max(2, sample), False, torch.device("cpu"))
    return float(timed["seconds"]) + steps * float(timed["step_seconds"])


def apply_warm_start(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`pretrained_encoder_state` into ``encoder`` (strict: same architecture)."""
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"warm-start weights do not fit this encoder ({first}); build it with the same encoder, dim and n_chan"
        ) from None
