"""The readable PyTorch oracle for every backend, and the CPU fallback.

Follows the semantics table (docs/semantics.md) exactly; never imports Triton. The semantics
live in four functions used by everything that computes attention in plain torch
(``attention_ref``, ``varlen_attention_ref`` and the layers' 'torch' and 'flash' backends):

- ``score_terms``: what is added to a score (bias, ALiBi) and which scores are masked (bias
  entries at or below ``MASKED_BIAS``, key padding, bottom-right causal, the sliding window,
  the boolean ``attn_mask``);
- ``attention_scores``: ``scale * q k^T`` (GQA heads mapped), capped by ``softcap``, plus
  ``score_terms``;
- ``attention_weights``: the softmax over keys (and the per-head ``sinks`` logit), with rows
  that see no key giving weights 0, lse -inf and zero gradients instead of 0/0;
- ``attention_values``: weights times V, where a key a row cannot see never contributes
  (``attention_scores`` does the same for K): a NaN in a padded or causally hidden key never
  reaches the rows that cannot see it.

Dropout (``dropout_p``) multiplies the weights by ``dropout_keep_mask / (1 - dropout_p)``
after the softmax: ``dropout_keep_mask`` computes, from the seed, the same keep-mask the
kernels draw.
"""

from __future__ import annotations

import math

import torch

from .bias import alibi_slopes_to_bias, masked_bias_entries

__all__ = ["attention_ref", "varlen_attention_ref", "kvcache_attention_ref", "kvcache_gather", "score_terms", "attention_scores",
           "attention_weights", "attention_values", "repeat_kv", "dropout_keep_mask"]

UNBOUNDED = (-1, -1)


def repeat_kv(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """(batch, seqlen, nheads_k, d) -> (batch, seqlen, nheads, d): query head i reads key/value
    head ``i // (nheads // nheads_k)`` (repeat_interleave, not tile)."""
    return x if x.shape[2] == nheads else x.repeat_interleave(nheads // x.shape[2], dim=2)


def score_terms(
    scores: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    *,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window_size: tuple = UNBOUNDED,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scores`` plus every term the semantics add to a score, in this order: the bias (its
    entries at or below ``MASKED_BIAS`` count as -inf), ALiBi ``-slope * |i + seqlen_k - seqlen_q - j|``
    (computed in fp32), then -inf where the key is padded (``key_padding_mask`` False), outside
    the window (bottom-right like causal: visible iff ``i + seqlen_k - seqlen_q - left <= j <=
    i + seqlen_k - seqlen_q + right``, -1 = unbounded, ``causal`` = right 0) or where the boolean
    ``attn_mask`` (broadcastable to (batch, nheads, seqlen_q, seqlen_k)) is False.

    ``scores`` broadcasts to (batch, nheads, seqlen_q, seqlen_k); the result has the broadcast
    shape of scores and the terms, in scores' dtype. Zeros give the additive mask alone."""
    if bias is not None:
        bias = bias.masked_fill(masked_bias_entries(bias), float("-inf"))
        scores = scores + bias.to(scores.dtype)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes_to_bias(alibi_slopes, seqlen_q, seqlen_k).to(scores.dtype)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    left, right = window_size
    if causal:
        right = 0
    if left >= 0 or right >= 0:
        i = torch.arange(seqlen_q, device=scores.device).view(-1, 1)
        j = torch.arange(seqlen_k, device=scores.device).view(1, -1)
        diag = i + seqlen_k - seqlen_q
        if right >= 0:
            scores = scores.masked_fill(j > diag + right, float("-inf"))
        if left >= 0:
            scores = scores.masked_fill(j < diag - left, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    reorder_ops: bool = False,
    window_size: tuple = UNBOUNDED,
    softcap: float = 0.0,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked scores (batch, nheads, seqlen_q, seqlen_k) in q's dtype: ``scale * q k^T`` (scale
    default ``1 / sqrt(d)``), capped to ``softcap * tanh(x / softcap)`` when ``softcap > 0``,
    plus ``score_terms``. q (batch, seqlen_q, nheads, d), k (batch, seqlen_k, nheads_k, d).
    ``reorder_ops`` scales k instead of q (a different rounding)."""
    seqlen_q, nheads, d = q.shape[1], q.shape[2], q.shape[3]
    k = repeat_kv(k, nheads)
    # A key a row cannot see never affects it, whatever it holds: non-finite keys are zeroed
    # for the product (0 * NaN would reach masked scores' gradients) and their visible scores
    # set to NaN below.
    k, bad_k = _finite_rows(k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = score_terms(scores, seqlen_q, k.shape[1], bias, causal, alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask,
                         window_size=window_size, attn_mask=attn_mask)
    return scores.masked_fill((scores != float("-inf")) & bad_k.transpose(1, 2)[:, :, None, :], float("nan"))


def _finite_rows(x: torch.Tensor):
    """x (batch, seqlen, heads, d) with non-finite entries zeroed, and (batch, seqlen, heads)
    True where a row had one."""
    fin = torch.isfinite(x)
    return x.masked_fill(~fin, 0), ~fin.all(dim=-1)


def attention_values(weights: torch.Tensor, v: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``weights @ v`` (batch, seqlen_q, nheads, d) in v's dtype, where a key a row cannot see
    (its score -inf) never contributes, whatever v holds there: non-finite values are zeroed,
    and the rows that see a key with one are NaN. v (batch, seqlen_k, nheads_k, d)."""
    v, bad_v = _finite_rows(repeat_kv(v, weights.shape[1]))
    out = torch.einsum("bhts,bshd->bthd", weights.to(v.dtype), v)
    sees_bad = torch.einsum("bhts,bsh->bth", (scores != float("-inf")).float(), bad_v.float()) > 0
    return out.masked_fill(sees_bad[..., None], float("nan"))


def attention_weights(scores: torch.Tensor, return_lse: bool = False, sinks: torch.Tensor | None = None):
    """Softmax of masked ``scores`` over the last (key) dim. ``sinks`` (nheads,): one more
    logit per row of head h, ``sinks[h]``, that takes probability but has no value (the
    weights of a row then sum to less than 1; the lse includes it). A row with no visible key
    and no sink (every score -inf) would be 0/0: it is neutralised before the softmax and
    zeroed after, so its weights are 0, its lse -inf and its gradients 0, never NaN. Returns
    the weights (scores' dtype), and the fp32-or-wider natural-log lse of the rows with
    ``return_lse``."""
    if sinks is not None:
        b, h, sq, _ = scores.shape
        sink = sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, sq, 1)
        weights, lse = attention_weights(torch.cat([scores, sink], dim=-1), return_lse=True)
        weights = weights[..., :-1]
        return (weights, lse) if return_lse else weights
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(dead, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    if not return_lse:
        return weights
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return weights, lse.masked_fill(dead.squeeze(-1), float("-inf"))


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    upcast: bool = True,
    reorder_ops: bool = False,
    *,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    window_size: tuple = UNBOUNDED,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
):
    """Attention computed with plain torch ops (differentiable, any device).

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d), nheads % nheads_k == 0.
    ``upcast=True`` computes in fp32 (the oracle); ``upcast=False`` stays in the input dtype
    (the "same precision as the kernel" baseline of the tolerance rule). ``reorder_ops`` scales k
    instead of q, to perturb rounding like a different kernel would. ``window_size``,
    ``softcap``, ``attn_mask`` as in ``attention_scores``, ``sinks`` as in ``attention_weights``;
    with ``dropout_p > 0`` the weights are multiplied by ``dropout_mask`` (bool, broadcastable to
    (batch, nheads, seqlen_q, seqlen_k), True = keep; e.g. ``dropout_keep_mask``) / (1 - dropout_p).
    Output has q's dtype; ``lse`` (batch, nheads, seqlen_q) is fp32, natural log (before dropout).
    """
    dtype_og = q.dtype
    if upcast:
        # At least fp32; float64 stays float64 (gradcheck).
        up = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(up), k.to(up), v.to(up)
    scores = attention_scores(q, k, bias, causal, softmax_scale, alibi_slopes=alibi_slopes,
                              key_padding_mask=key_padding_mask, reorder_ops=reorder_ops, window_size=window_size,
                              softcap=softcap, attn_mask=attn_mask)
    attn, lse = attention_weights(scores, return_lse=True, sinks=sinks)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("attention_ref with dropout_p > 0 needs dropout_mask (e.g. dropout_keep_mask(seed, ...))")
        attn = attn * dropout_mask.to(attn.dtype) / (1.0 - dropout_p)
    out = attention_values(attn, v, scores).to(dtype_og)
    return (out, lse) if return_lse else out


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
    upcast: bool = True,
    reorder_ops: bool = False,
    window_size: tuple = UNBOUNDED,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
):
    """``attention_ref`` (fp32 math unless ``upcast=False``; ``reorder_ops``, ``window_size``,
    ``softcap``, ``sinks`` as there; dropout with the kernels' mask of ``dropout_seed``, sequence
    i taking batch index i) on each sequence of a packed variable-length batch: q
    (total_q, nheads, d), k/v (total_k, nheads_k, d), ``cu_seqlens_q/k`` (batch + 1,) cumulative
    lengths (read on the host). alibi_slopes (nheads,) or (batch, nheads). A sequence without
    keys gives out 0 and lse -inf. Returns out (total_q, nheads, d) and, with ``return_lse``,
    lse (nheads, total_q). Differentiable."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    nheads = q.shape[1]
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi, ki, vi = q[cq[i]:cq[i + 1]][None], k[ck[i]:ck[i + 1]][None], v[ck[i]:ck[i + 1]][None]
        if qi.shape[1] == 0:
            continue
        if ki.shape[1] == 0:
            outs.append(torch.zeros_like(qi[0]))
            lse = torch.full((nheads, qi.shape[1]), float("-inf"), device=q.device)
            if sinks is not None:  # the sink alone: out 0, lse = the sink
                lse = sinks.detach().float()[:, None].expand(nheads, qi.shape[1])
            lses.append(lse)
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[i]
        mask = None
        if dropout_p > 0.0:
            mask = dropout_keep_mask(dropout_seed, (1, nheads, qi.shape[1], ki.shape[1]), dropout_p, batch_start=i, device=q.device)
        o, lse = attention_ref(qi, ki, vi, None, causal, softmax_scale, upcast, reorder_ops, alibi_slopes=slopes, return_lse=True,
                               window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_mask=mask)
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else torch.zeros_like(q)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else torch.full((nheads, 0), float("-inf"), device=q.device)
    return out, lse


# Philox-4x32 as the kernels run it (Triton's tl.philox, 7 rounds): constants of Salmon et al. 2011.
_PHILOX_ROUNDS = 7
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _philox(seed: int, c0, c1, c2, c3):
    """Philox-4x32 of uint64 numpy counters (values < 2**32) under the 64-bit key ``seed``."""
    import numpy as np

    mask32 = np.uint64(0xFFFFFFFF)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    a, b = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    for _ in range(_PHILOX_ROUNDS):
        pa, pb = a * c0, b * c2  # exact: both factors < 2**32
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & mask32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & mask32
        k0 = (k0 + np.uint64(_PHILOX_W[0])) & mask32
        k1 = (k1 + np.uint64(_PHILOX_W[1])) & mask32
    return c0, c1, c2, c3


def dropout_keep_mask(seed, shape, dropout_p: float, batch_start: int = 0, device=None) -> torch.Tensor:
    """The dropout keep-mask (bool, True = keep) that the kernels draw for ``seed`` (an int or
    a one-element int64 tensor) over ``shape`` = (batch, nheads, seqlen_q, seqlen_k); batch
    index b is ``batch_start + b`` (varlen: the sequence index). Entry (b, h, i, j) is kept iff
    u / 65536 >= dropout_p, u the 16-bit half ``j % 2`` of word ``(j % 8) // 2`` of
    Philox-4x32(counter = (j // 8, i, b, h), key = seed). Computed on the host (numpy)."""
    import numpy as np

    if isinstance(seed, torch.Tensor):
        seed = int(seed.reshape(-1)[0].item())
    batch, nheads, seqlen_q, seqlen_k = shape
    groups = (seqlen_k + 7) // 8
    u64 = np.uint64
    c0 = np.arange(groups, dtype=np.uint64)[None, None, None, :]
    c1 = np.arange(seqlen_q, dtype=np.uint64)[None, None, :, None]
    c2 = (batch_start + np.arange(batch, dtype=np.uint64))[:, None, None, None]
    c3 = np.arange(nheads, dtype=np.uint64)[None, :, None, None]
    full = (batch, nheads, seqlen_q, groups)
    words = _philox(seed, *(np.broadcast_to(c, full).astype(np.uint64) for c in (c0, c1, c2, c3)))
    words = np.stack(words, axis=-1)  # (..., groups, 4)
    draws = np.stack([words & u64(0xFFFF), words >> u64(16)], axis=-1).reshape(batch, nheads, seqlen_q, groups * 8)
    threshold = min(math.ceil(dropout_p * 65536), 65536)
    keep = draws[..., :seqlen_k] >= threshold
    return torch.from_numpy(np.ascontiguousarray(keep)).to(device)


def _kvcache_lengths(cache_seqlens, batch: int, capacity: int) -> list:
    """Valid cache tokens per sequence before the call, as host ints (None = a full cache)."""
    if cache_seqlens is None:
        return [capacity] * batch
    if isinstance(cache_seqlens, torch.Tensor):
        return [int(x) for x in cache_seqlens.reshape(-1).tolist()]
    return [int(cache_seqlens)] * batch


def kvcache_gather(cache: torch.Tensor, b: int, length: int, cache_batch_idx=None, block_table=None) -> torch.Tensor:
    """The first ``length`` logical tokens (length, nheads_k, d) of sequence ``b`` of a KV cache:
    row ``cache_batch_idx[b]`` (default ``b``) of a contiguous cache (batch_cache, seqlen_cache,
    nheads_k, d), or, with ``block_table`` (batch, max_blocks), token j at slot ``j % block_size``
    of physical block ``block_table[b, j // block_size]`` of a paged cache (num_blocks,
    block_size, nheads_k, d). Reads nothing past ``length``."""
    if block_table is None:
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        return cache[row, :length]
    block_size = cache.shape[1]
    j = torch.arange(length, device=cache.device)
    phys = block_table[b].long()[j // block_size]
    return cache[phys, j % block_size]


def kvcache_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens=None,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple = UNBOUNDED,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    upcast: bool = True,
    reorder_ops: bool = False,
):
    """The semantics of ``flash_attn_with_kvcache``, without touching the cache (docs/semantics.md,
    "KV-cache decoding").

    Sequence b's keys are its ``cache_seqlens[b]`` cached tokens (``kvcache_gather``; an int applies
    to every sequence, None means the whole cache: seqlen_cache, or max_blocks * block_size when
    paged) followed by the ``s_new`` new tokens ``k[b]``/``v[b]`` when given: L = cache_seqlens[b] +
    s_new keys. Attention of q[b] (sq, nheads, d) over them is ``attention_ref`` with seqlen_k = L:
    causal, window and ALiBi aligned bottom-right to L (query i sees key j iff j <= i + L - sq),
    ``bias`` broadcastable to (batch, nheads, sq, seqlen_cache) with its first L columns used,
    softcap and sinks as there. A sequence with L = 0 gives out 0 and lse -inf (the sink alone:
    lse = the sink). Returns out (batch, sq, nheads, d) in q's dtype, and lse (batch, nheads, sq)
    fp32 with ``return_lse``."""
    batch, seqlen_q, nheads, _ = q.shape
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    lengths = _kvcache_lengths(cache_seqlens, batch, capacity)
    bias4 = None
    if bias is not None:
        bias4 = bias[(None,) * (4 - bias.dim())].expand(batch, nheads, seqlen_q, capacity)
    outs, lses = [], []
    for b in range(batch):
        kb = kvcache_gather(k_cache, b, lengths[b], cache_batch_idx, block_table)
        vb = kvcache_gather(v_cache, b, lengths[b], cache_batch_idx, block_table)
        if k is not None:
            kb, vb = torch.cat([kb, k[b]]), torch.cat([vb, v[b]])
        length = kb.shape[0]
        if length == 0:
            outs.append(torch.zeros_like(q[b:b + 1]))
            lse = torch.full((1, nheads, seqlen_q), float("-inf"), device=q.device)
            if sinks is not None:
                lse = sinks.detach().float().view(1, nheads, 1).expand(1, nheads, seqlen_q)
            lses.append(lse)
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        bias_b = None if bias4 is None else bias4[b:b + 1, :, :, :length]
        o, lse = attention_ref(q[b:b + 1], kb[None], vb[None], bias_b, causal, softmax_scale, upcast, reorder_ops,
                               alibi_slopes=slopes, return_lse=True, window_size=window_size, softcap=softcap, sinks=sinks)
        outs.append(o)
        lses.append(lse.float())
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out
