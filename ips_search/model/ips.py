"""IPSNet: patch encoder + iterative patch selection + cross-attention aggregation.

Training step (Bergner et al., ICLR 2023):

1. ``ips(patches)``: no-grad, eval mode. Stream the image's N patches, keeping the
   M (``memory_size``) best-scoring ones in a memory buffer; each iteration scores
   the buffer together with the next I (``iteration_size``) patches and keeps the
   top M. Memory does not grow with N.
2. ``forward(mem_patch, mem_idx)``: re-encode only the M kept patches with
   gradients, aggregate them with the cross-attention transformer, classify.

Unlike the reference notebook, which encodes each iteration's I patches in its
own encoder call, ``ips`` encodes ``encode_chunk`` patches per call (the chunk,
not N, bounds memory) and runs the same top-M iterations over the embeddings.
The selection is the same; ``ips_impl="reference"`` keeps the notebook's loop for
comparison.

``ips`` also takes a list of B lazy patch sources (:mod:`ips_search.data.source`; N may differ per image):
each image is selected on its own, its patches read a chunk at a time in a background thread while the
encoder runs on the previous chunk, so host memory holds a few chunks and the M kept embeddings, whatever N.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ips_search.config import IPSConfig
from ips_search.data.source import PatchSource, read_patches
from ips_search.errors import ConfigError
from ips_search.model.encoders import build_encoder
from ips_search.model.fold import FoldedEncoder, try_fold
from ips_search.model.prefetch import Prefetcher
from ips_search.model.transformer import PositionalEncoding, Transformer

PREFETCH_DEPTH = 2  # chunks a source's reader thread may run ahead of the encoder
ORIENT_PATCHES = 4096  # at most this many patches per source image in orient_scores (evenly spaced)


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def _running_statistics(norms: list[nn.Module]) -> Iterator[None]:
    """BatchNorm layers ``norms`` normalizing with (and not updating) their running statistics, then as before."""
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.train(mode)


class _EmbeddingStream:
    """Hands out the embeddings of patches ``0..N-1`` in order, encoding a chunk at a time."""

    def __init__(self, chunks: Iterator[torch.Tensor]) -> None:
        self.chunks = chunks
        self.pending: torch.Tensor | None = None  # (B, k, D) encoded, not yet taken

    def take(self, k: int) -> torch.Tensor:  # -> (B, k, D)
        parts = []
        while k > 0:
            if self.pending is None or self.pending.shape[1] == 0:
                self.pending = next(self.chunks)
            parts.append(self.pending[:, :k])
            k -= parts[-1].shape[1]
            self.pending = self.pending[:, parts[-1].shape[1] :]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _gather_rows(patches: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``patches[b, order[b]]`` for every image b: ``(B, N, ...)``, ``(B, n)`` -> ``(B, n, ...)``."""
    index = order.view(*order.shape, *(1,) * (patches.dim() - 2)).expand(-1, -1, *patches.shape[2:])
    return torch.gather(patches, 1, index)


class IPSNet(nn.Module):
    """Iterative Patch Selection network configured by :class:`IPSConfig`."""

    def __init__(self, cfg: IPSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        # oneDNN's convolutions run faster on NHWC: ~20% of a ResNet-18 training pass on CPU (bench_original.py)
        self._channels_last = any(isinstance(m, nn.Conv2d) for m in self.encoder.modules())
        if self._channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.transf = Transformer(
            len(cfg.tasks), cfg.heads, cfg.dim, cfg.d_k, cfg.d_v, cfg.d_inner, cfg.attn_dropout, cfg.dropout
        )
        self.pos_enc = PositionalEncoding(cfg.dim) if cfg.use_pos else None
        self.heads = nn.ModuleDict({t.name: nn.Linear(cfg.dim, t.n_class) for t in cfg.tasks})
        self._folded: FoldedEncoder | None = None
        self._fold_tried = False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- building blocks ---------------------------------------------------------------------------------------------
    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Embed a flat batch of patches: ``(n, C, P, P) -> (n, D)``.

        A training batch of one patch (M = 1 with a batch of one image, or an epoch's last batch when the train set
        size % B == 1) goes through the encoder's BatchNorms with their running statistics, as evaluation does, and
        leaves those as they are: one value per channel (the projector's, a ResNet's 1 x 1 maps) has no batch
        variance, and BatchNorm would raise. Dropping the batch instead would skip its image for the epoch (every
        image of a one-image train set)."""
        if self._channels_last and patches.dim() == 4:
            patches = patches.contiguous(memory_format=torch.channels_last)
        if self.training and patches.shape[0] == 1:
            norms = [m for m in self.encoder.modules() if isinstance(m, BATCH_NORMS)]  # of the encoder as it is now
            with _running_statistics(norms):
                return self.encoder(patches)
        return self.encoder(patches)

    def _embed(self, emb: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if self.pos_enc is not None and idx is not None:
            emb = emb + self.pos_enc(idx)
        return emb

    def score(self, emb: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention scores ``(B, L)`` of embeddings ``(B, L, D)``, averaged over heads and tasks."""
        return self.transf.get_scores(self._embed(emb, idx))

    # -- selection ---------------------------------------------------------------------------------------------------
    def _no_grad_encoder(self):
        if not self.cfg.fold_bn:
            return self.encode
        if not self._fold_tried:
            dtype = torch.bfloat16 if self.cfg.ips_dtype == "bfloat16" else torch.float32
            # built outside inference mode (ips runs in it): parameters created there are inference tensors, and a
            # Linear whose weight is later re-pointed at the live one by refresh() then fails ("do not track version
            # counter"); convs escaped it only because refresh copies them to channels-last
            with torch.inference_mode(False):
                self._folded, self._fold_tried = try_fold(self.encoder, dtype), True
        if self._folded is None:
            return self.encode
        self._folded.refresh()
        return self._folded

    def _autocast(self, device: torch.device):
        if self.cfg.ips_dtype == "bfloat16" and self._folded is None:  # the folded copy is natively bfloat16
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _select_top(self, emb: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the k best-scoring of ``emb`` ``(B, L, D)`` and their patch indices ``idx`` ``(B, L)``."""
        top = torch.topk(self.score(emb.float(), idx), k, dim=-1).indices  # (B, k)
        return torch.gather(emb, 1, top.unsqueeze(-1).expand(-1, -1, emb.shape[-1])), torch.gather(idx, 1, top)

    def _select_streaming(
        self, patches: torch.Tensor, device: torch.device, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mem_idx ``(B, M)`` for ``patches`` ``(B, N, C, P, P)`` (on any device), streamed in ``order``."""
        B, N = patches.shape[:2]
        encoder = self._no_grad_encoder()
        step = max(1, self.cfg.encode_chunk // B)  # patches per image per encoder call

        def chunks() -> Iterator[torch.Tensor]:
            for s in range(0, N, step):
                if order is None:
                    chunk = patches[:, s : s + step].to(device, non_blocking=True)  # (B, n, C, P, P)
                else:
                    chunk = _gather_rows(patches, order[:, s : s + step].to(patches.device)).to(device)
                with self._autocast(device):
                    yield encoder(chunk.flatten(0, 1)).view(B, chunk.shape[1], -1)  # (B, n, D)

        return self._iterate(_EmbeddingStream(chunks()), B, N, device, order)

    def _iterate(
        self, stream: _EmbeddingStream, B: int, N: int, device: torch.device, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The top-M iterations over the embeddings of patches ``0..N-1`` (``N > M``), or of ``order`` ``(B, N)``
        when the patches stream in another order (their indices, and so their positional encodings, go with them):
        mem_idx ``(B, M)``."""
        M, I = self.cfg.memory_size, self.cfg.iteration_size

        def idx(start: int, end: int) -> torch.Tensor:  # (B, end - start); never (B, N), which grows with N
            if order is not None:
                return order[:, start:end].to(device)
            return torch.arange(start, end, device=device).unsqueeze(0).expand(B, -1)

        mem_emb, mem_idx = stream.take(M), idx(0, M)
        for start in range(M, N, I):
            end = min(start + I, N)
            all_emb = torch.cat((mem_emb, stream.take(end - start)), dim=1)  # (B, M + I, D)
            all_idx = torch.cat((mem_idx, idx(start, end)), dim=1)
            mem_emb, mem_idx = self._select_top(all_emb, all_idx, M)
        return mem_idx

    def _select_source(self, source: PatchSource, device: torch.device, depth: int) -> torch.Tensor:
        """mem_idx ``(M,)`` of one lazy source: chunks of ``encode_chunk`` patches read ``depth`` ahead; all ``N``
        patches when ``N <= M`` (no selection)."""
        N, step = len(source), self.cfg.encode_chunk
        if N <= self.cfg.memory_size:
            return torch.arange(N, device=device)
        encoder = self._no_grad_encoder()
        pin = device.type == "cuda"

        def read(start: int) -> torch.Tensor:  # (n, *patch_shape) on the host, pinned for an async copy on CUDA
            chunk = read_patches(source, np.arange(start, min(start + step, N), dtype=np.int64))
            return chunk.pin_memory() if pin else chunk

        with Prefetcher(read, range(0, N, step), depth) as reads:

            def chunks() -> Iterator[torch.Tensor]:
                for chunk in reads:
                    chunk = chunk.to(device, non_blocking=True)
                    with self._autocast(device):
                        yield encoder(chunk).unsqueeze(0)  # (1, n, D)

            return self._iterate(_EmbeddingStream(chunks()), 1, N, device)[0]

    def _select_reference(
        self, patches: torch.Tensor, device: torch.device, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reference notebook's loop: one encoder call per iteration of I patches."""
        B, N = patches.shape[:2]
        M, I = self.cfg.memory_size, self.cfg.iteration_size
        if order is not None:
            patches = _gather_rows(patches, order.to(patches.device))
        idx = order.to(device) if order is not None else torch.arange(N, device=device).unsqueeze(0).expand(B, -1)
        mem_emb = self.encode(patches[:, :M].to(device).flatten(0, 1)).view(B, M, -1)
        mem_idx = idx[:, :M]
        for start in range(M, N, I):
            end = min(start + I, N)
            iter_emb = self.encode(patches[:, start:end].to(device).flatten(0, 1)).view(B, end - start, -1)
            all_emb = torch.cat((mem_emb, iter_emb), dim=1)
            mem_emb, mem_idx = self._select_top(all_emb, torch.cat((mem_idx, idx[:, start:end]), 1), M)
        return mem_idx

    def shuffle_order(self, B: int, N: int) -> torch.Tensor | None:
        """The order ``(B, N)`` a training batch streams in under ``cfg.shuffle`` (``None``: as stored).

        ``batch`` draws one permutation for the whole batch, ``instance`` one per image, from torch's global
        generator (seeded per trial), as the original IPS code does; evaluation never shuffles."""
        if self.cfg.shuffle == "none" or not self.training:
            return None
        if self.cfg.shuffle == "batch":
            return torch.randperm(N).unsqueeze(0).expand(B, -1)
        return torch.argsort(torch.rand(B, N), dim=1)

    @torch.no_grad()
    def ips(
        self,
        patches: torch.Tensor | Sequence[PatchSource],
        prefetch: bool = True,
        order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select M of N patches: ``(B, N, C, P, P) -> (mem_patch (B, M, C, P, P), mem_idx (B, M))``.

        Runs without gradients in eval mode; the module's mode is restored after.
        With ``M >= N`` all patches are kept (``mem_idx`` = 0..N-1). ``cfg.loading``:
        ``eager`` moves the batch to the model's device first; ``eager-sequential``
        one image at a time; ``lazy`` leaves patches where they are and moves each
        encoder chunk (and finally the M kept patches) to the device.

        ``order`` ``(B, N)``: stream each image's patches in this order (with their indices, so a patch keeps its
        positional encoding); by default :meth:`shuffle_order` (``cfg.shuffle``, in training only). ``mem_idx``
        always holds the stored indices.

        ``patches`` may instead be a list of B patch sources (N may differ per image; any ``patch_shape``):
        see :meth:`_ips_sources`. ``prefetch=False`` reads their chunks in this thread (for comparison). Sources
        stream in file order.
        """
        if not isinstance(patches, torch.Tensor):
            return self._ips_sources(list(patches), PREFETCH_DEPTH if prefetch else 0)
        device = self.device
        B, N = patches.shape[:2]
        if self.cfg.memory_size >= N:
            return patches.to(device), torch.arange(N, device=device).unsqueeze(0).expand(B, -1).clone()
        order = order if order is not None else self.shuffle_order(B, N)
        select = self._select_reference if self.cfg.ips_impl == "reference" else self._select_streaming
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                if self.cfg.loading == "eager":
                    patches = patches.to(device, non_blocking=True)
                    mem_idx = select(patches, device, order)
                elif self.cfg.loading == "eager-sequential":
                    rows = [None if order is None else order[b : b + 1] for b in range(B)]
                    mem_idx = torch.cat([select(patches[b : b + 1].to(device), device, rows[b]) for b in range(B)])
                else:  # lazy
                    mem_idx = select(patches, device, order)
        finally:
            self.train(was_training)
        mem_idx = mem_idx.clone()  # a normal tensor, usable outside inference mode
        gather_idx = mem_idx.to(patches.device).view(B, -1, *(1,) * (patches.dim() - 2))
        mem_patch = torch.gather(patches, 1, gather_idx.expand(-1, -1, *patches.shape[2:]))
        return mem_patch.to(device, non_blocking=True), mem_idx

    def _ips_sources(self, sources: list[PatchSource], depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ips`` over lazy sources: ``mem_patch (B, M, *patch_shape)`` on the model's device, ``mem_idx (B, M)``.

        Every image is selected on its own (as ``loading: eager-sequential`` does; ``loading`` and ``ips_impl``
        don't apply), streaming its N patches through the encoder ``encode_chunk`` at a time. Each image of a batch
        of several needs N >= M (N == M keeps all); a smaller one is a ConfigError, since their memories are stacked
        and must all hold M. A batch of one image keeps all of its N < M patches (``(1, N, ...)``, the same as with
        M = N): the full-bag reference run (M = the largest N, batch size 1) trains on every patch of every image.
        ``mem_idx`` rows are ascending: the kept patches are then read back in file order.
        """
        M = self.cfg.memory_size
        if not sources:
            raise ValueError("ips needs at least one patch source")
        for b, source in enumerate(sources):
            if len(source) < M and len(sources) > 1:
                raise ConfigError(
                    f"image {b} of the batch has {len(source)} patches, fewer than memory_size {M}; "
                    f"lower memory_size to {len(source)}, leave out images with fewer than {M} patches, "
                    "or use batch_size 1 (which keeps all of a smaller image's patches)"
                )
        device = self.device
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                rows = [self._select_source(source, device, depth) for source in sources]  # B x (M,)
        finally:
            self.train(was_training)
        mem_idx = torch.stack(rows).sort(dim=1).values  # (B, M), a normal tensor outside inference mode
        host_idx = mem_idx.cpu().numpy()
        mem_patch = torch.stack([read_patches(s, host_idx[b]) for b, s in enumerate(sources)])  # (B, M, *shape)
        if device.type == "cuda":
            mem_patch = mem_patch.pin_memory()
        return mem_patch.to(device, non_blocking=True), mem_idx

    @torch.no_grad()
    def orient_scores(self, patches: torch.Tensor | Sequence[PatchSource]) -> torch.Tensor:
        """Start every attention head scoring unusual patches above common ones; ``patches`` ``(B, N, C, P, P)``
        are a few training images. Returns each head's correlation before (``(H,)``; negative ones were flipped).

        A data-driven init, run once before training (``train.build_model``). On sparse images (5 digits on a
        blank canvas, tissue on a white slide) a head that prefers the background fills the memory with
        identical background patches; identical keys give the query and keys no gradient, so training never
        leaves chance: 4 of 8 seeds of the default search's best config (docs/ips.md). The selection rule is
        untouched: the same weights still choose the notebook's patches. ``patches`` may also be a list of patch
        sources, of which at most ``ORIENT_PATCHES`` evenly spaced patches each are encoded.
        """
        if not isinstance(patches, torch.Tensor):
            return self._orient_sources(list(patches))
        was_training = self.training
        self.eval()
        try:
            B, N = patches.shape[:2]
            flat = patches.flatten(0, 1)  # (B*N, C, P, P)
            step = self.cfg.encode_chunk
            emb = torch.cat([self.encode(flat[s : s + step].to(self.device)) for s in range(0, len(flat), step)])
            idx = torch.arange(N, device=emb.device).expand(B, N)  # (B, N)
            emb = self._embed(emb.view(B, N, -1), idx).flatten(0, 1)  # (B*N, D)
            return self.transf.crs_attn.orient_heads(emb)
        finally:
            self.train(was_training)

    def _orient_sources(self, sources: list[PatchSource]) -> torch.Tensor:
        """``orient_scores`` over lazy sources: up to ``ORIENT_PATCHES`` evenly spaced patches of each image."""
        was_training = self.training
        self.eval()
        try:
            step = self.cfg.encode_chunk
            embs = []
            for source in sources:
                N = len(source)
                idx = np.unique(np.linspace(0, N - 1, min(N, ORIENT_PATCHES)).round().astype(np.int64))  # (n,)
                emb = torch.cat(
                    [
                        self.encode(read_patches(source, idx[s : s + step]).to(self.device))
                        for s in range(0, len(idx), step)
                    ]
                )  # (n, D)
                embs.append(self._embed(emb.unsqueeze(0), torch.from_numpy(idx).to(self.device)[None])[0])
            return self.transf.crs_attn.orient_heads(torch.cat(embs))  # over (sum n, D)
        finally:
            self.train(was_training)

    # -- aggregation -------------------------------------------------------------------------------------------------
    def forward(self, mem_patch: torch.Tensor, mem_idx: torch.Tensor | None = None):
        """Encode the kept patches ``(B, M, C, P, P)`` with gradients and predict.

        Returns logits ``(B, n_class)`` for one task, or a dict of them keyed by task name.
        """
        B, M = mem_patch.shape[:2]
        mem_emb = self.encode(mem_patch.flatten(0, 1)).view(B, M, -1)  # (B, M, D)
        image_emb = self.transf(self._embed(mem_emb, mem_idx))  # (B, T, D)
        logits = {t.name: self.heads[t.name](image_emb[:, i]) for i, t in enumerate(self.cfg.tasks)}
        return next(iter(logits.values())) if len(logits) == 1 else logits

    def predict(self, patches: torch.Tensor | Sequence[PatchSource]):
        """``ips`` then ``forward``: the whole pipeline for a batch of patches (a tensor or a list of sources)."""
        return self(*self.ips(patches))
