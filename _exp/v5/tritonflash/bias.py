"""Bias helpers shared by every backend: ALiBi slopes and bias shape rules (pure torch)."""

from __future__ import annotations

import math

import torch

# Bias entries at or below this count as -inf (masked). It is the fp32 value below which
# bias * log2(e) overflows to -inf in fp32: the kernels add the bias in log2 units, so there such
# entries are -inf without a test, and a row masked that way is a row with no visible key
# (output 0, lse -inf), in the kernels and the reference alike. finfo.min-style masks of fp32
# and bf16 (about -3.4e38) are below it; fp16 cannot reach it.
MASKED_BIAS = -2.3586576387363357e38

__all__ = ["MASKED_BIAS", "masked_bias_entries", "gen_slopes", "build_alibi_bias", "bias_broadcast_shape", "alibi_slopes_to_bias"]


def masked_bias_entries(bias: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the bias entries that count as -inf (compared in fp32 or wider: a
    16-bit comparison would round MASKED_BIAS first)."""
    wide = bias if bias.dtype in (torch.float32, torch.float64) else bias.float()
    return wide <= MASKED_BIAS


def gen_slopes(n_heads: int, alibi_bias_max: int = 8, device=None) -> torch.Tensor:
    """ALiBi slopes as MPT computes them, shape ``(n_heads,)`` fp32.

    For a head count that is not a power of two, slopes are computed for the next
    power of two and the odd-indexed ones are taken first, then the even ones (MPT's rule),
    so the first ``n_heads`` slopes cover the whole range.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def build_alibi_bias(
    n_heads: int,
    seq_len: int,
    full: bool = False,
    alibi_bias_max: int = 8,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """MPT's materialised ALiBi bias.

    ``full=False`` gives ``(1, n_heads, 1, seq_len)`` with values ``-slope * (seq_len - 1 - j)``
    (a per-key vector; under a causal mask it equals the distance form up to a per-row
    constant, which softmax ignores). ``full=True`` gives ``(1, n_heads, seq_len, seq_len)``
    with ``-slope * |i - j|``. Prefer ``alibi_slopes=gen_slopes(n_heads)`` on the kernels:
    same result, computed in fp32 in-kernel, no O(N^2) memory.
    """
    dist = torch.arange(1 - seq_len, 1, dtype=torch.int32, device=device).view(1, 1, 1, seq_len)
    if full:
        dist = dist - torch.arange(1 - seq_len, 1, dtype=torch.int32, device=device).view(1, 1, seq_len, 1)
        dist = dist.abs().mul(-1)
    slopes = gen_slopes(n_heads, alibi_bias_max, device=device).view(1, n_heads, 1, 1)
    bias = dist * slopes
    return bias.to(dtype=dtype) if dtype is not None else bias


def bias_broadcast_shape(bias_shape, batch: int, nheads: int, seqlen_q: int, seqlen_k: int):
    """Return ``bias_shape`` left-padded to rank 4, or ``None`` if it does not broadcast
    to ``(batch, nheads, seqlen_q, seqlen_k)``."""
    shape = tuple(bias_shape)
    if len(shape) > 4:
        return None
    shape = (1,) * (4 - len(shape)) + shape
    for have, want in zip(shape, (batch, nheads, seqlen_q, seqlen_k)):
        if have not in (1, want):
            return None
    return shape


def alibi_slopes_to_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """The fp32 bias that ``alibi_slopes`` adds: ``-slope * |i + seqlen_k - seqlen_q - j|``,
    shape ``(1 or batch, nheads, seqlen_q, seqlen_k)``. Used by the reference path."""
    slopes = alibi_slopes.float()
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0)
    dev = slopes.device
    i = torch.arange(seqlen_q, device=dev).view(-1, 1)
    j = torch.arange(seqlen_k, device=dev).view(1, -1)
    dist = (i + seqlen_k - seqlen_q - j).abs().float()
    return -slopes[:, :, None, None] * dist
