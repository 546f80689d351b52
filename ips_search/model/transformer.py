"""Cross-attention transformer that scores patches and aggregates the kept ones.

One learned query token per task attends over the patch embeddings. Its attention
weights, averaged over heads and tasks, are the patch scores that IPS ranks; its
output, after an MLP, feeds that task's head. Mirrors the reference notebook
(``MultiHeadCrossAttention``, ``MLP``, ``Transformer.get_scores``) so that the same
weights give the same scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadCrossAttention(nn.Module):
    """T learned queries attend over a sequence of L embeddings of width D."""

    def __init__(self, n_token: int, heads: int, dim: int, d_k: int, d_v: int, attn_dropout: float, dropout: float):
        super().__init__()
        self.n_token, self.heads, self.d_k, self.d_v = n_token, heads, d_k, d_v
        self.q = nn.Parameter(torch.empty(1, n_token, dim))
        bound = math.sqrt(1 / d_k)
        nn.init.uniform_(self.q, a=-bound, b=bound)
        self.q_w = nn.Linear(dim, heads * d_k, bias=False)
        self.k_w = nn.Linear(dim, heads * d_k, bias=False)
        self.v_w = nn.Linear(dim, heads * d_v, bias=False)
        self.fc = nn.Linear(heads * d_v, dim, bias=False)
        self.temperature = d_k**0.5
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, H, T, L)`` of the queries over ``x`` ``(B, L, D)``."""
        B, L = x.shape[:2]
        q = self.q_w(self.q).view(1, self.n_token, self.heads, self.d_k).transpose(1, 2)  # (1, H, T, d_k)
        k = self.k_w(x).view(B, L, self.heads, self.d_k).transpose(1, 2)  # (B, H, L, d_k)
        attn = torch.matmul(q / self.temperature, k.transpose(2, 3))  # (B, H, T, L)
        return self.attn_dropout(torch.softmax(attn, dim=-1))

    @torch.no_grad()
    def orient_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Flip each head whose scores of embeddings ``x`` ``(n, D)`` fall with their distance from the median one.

        Keys have no bias, so a head's logit is linear in the embedding and a random init ranks the common
        embedding (background) above the unusual ones (content) for about half of the heads. Negating a head's
        rows of ``q_w`` negates its logits. Returns each head's correlation before flipping ``(H,)``.
        """
        q = self.q_w(self.q).view(self.n_token, self.heads, self.d_k)  # (T, H, d_k)
        k = self.k_w(x).view(-1, self.heads, self.d_k)  # (n, H, d_k)
        logits = torch.einsum("thd,nhd->nh", q, k) / self.n_token  # (n, H), mean over the T queries
        dist = (x - x.median(dim=0).values).norm(dim=1)  # (n,)
        corr = _standardise(logits).mul(_standardise(dist).unsqueeze(1)).mean(0)  # (H,)
        self.q_w.weight.view(self.heads, self.d_k, -1)[corr < 0] *= -1
        return corr

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, T, D)
        B, L = x.shape[:2]
        v = self.v_w(x).view(B, L, self.heads, self.d_v).transpose(1, 2)  # (B, H, L, d_v)
        out = torch.matmul(self.attention(x), v)  # (B, H, T, d_v)
        out = out.transpose(1, 2).reshape(B, self.n_token, -1)  # (B, T, H * d_v)
        out = self.dropout(self.fc(out)) + self.q
        return self.layer_norm(out)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance along dim 0 (a constant column stays zero)."""
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-12)


class MLP(nn.Module):
    """Position-wise feed-forward block with residual and post-LayerNorm."""

    def __init__(self, dim: int, d_inner: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(dim, d_inner)
        self.w_2 = nn.Linear(d_inner, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dropout(self.w_2(torch.relu(self.w_1(x)))))


class Transformer(nn.Module):
    """Cross-attention + MLP. ``n_token`` = number of tasks (one query each)."""

    def __init__(
        self,
        n_token: int = 1,
        heads: int = 8,
        dim: int = 512,
        d_k: int = 64,
        d_v: int = 64,
        d_inner: int = 2048,
        attn_dropout: float = 0.1,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.crs_attn = MultiHeadCrossAttention(n_token, heads, dim, d_k, d_v, attn_dropout, dropout)
        self.mlp = MLP(dim, d_inner, dropout)

    def get_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Patch scores ``(B, L)``: attention averaged over heads, then over tasks."""
        attn = self.crs_attn.attention(x)  # (B, H, T, L)
        return attn.mean(dim=1).transpose(1, 2).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, T, D)
        return self.mlp(self.crs_attn(x))


class PositionalEncoding(nn.Module):
    """1-D sinusoidal encoding of a patch's index in the image (Vaswani et al.), computed for the indices asked.

    No table: one of rows up to the largest N would hold N x D floats in every trial (51 MB at 100,000 x 128),
    while IPS only ever encodes the M + I indices of one iteration; and any index has an encoding, so no setting
    bounds N."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (ceil(D/2),)
        self.register_buffer("freq", freq, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, L, D)
        angle = idx.to(torch.float32).unsqueeze(-1) * self.freq  # (B, L, ceil(D/2))
        out = angle.new_empty(*idx.shape, self.dim)  # (B, L, D), the angles' dtype and device
        out[..., 0::2] = torch.sin(angle)
        out[..., 1::2] = torch.cos(angle[..., : self.dim // 2])
        return out
