"""The readable PyTorch oracle for every backend, and the CPU fallback.

Follows the semantics table (docs/semantics.md) exactly; never imports Triton. The semantics
live in four functions used by everything that computes attention in plain torch
(``attention_ref``, ``varlen_attention_ref`` and the layers' 'torch' and 'flash' backends):

- ``score_terms``: what is added to a score (bias, ALiBi) and which scores are masked (bias
  entries at or below ``MASKED_BIAS``, key padding, bottom-right causal);
- ``attention_scores``: ``scale * q k^T`` (GQA heads mapped) plus ``score_terms``;
- ``attention_weights``: the softmax over keys, with rows that see no key giving weights 0,
  lse -inf and zero gradients instead of 0/0;
- ``attention_values``: weights times V, where a key a row cannot see never contributes
  (``attention_scores`` does the same for K): a NaN in a padded or causally hidden key never
  reaches the rows that cannot see it.
"""

from __future__ import annotations

import math

import torch

from .bias import alibi_slopes_to_bias, masked_bias_entries

__all__ = ["attention_ref", "varlen_attention_ref", "score_terms", "attention_scores", "attention_weights", "attention_values",
           "repeat_kv"]


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
) -> torch.Tensor:
    """``scores`` plus every term the semantics add to a score, in this order: the bias (its
    entries at or below ``MASKED_BIAS`` count as -inf), ALiBi ``-slope * |i + seqlen_k - seqlen_q - j|``
    (computed in fp32), then -inf where the key is padded (``key_padding_mask`` False) or
    causally invisible (bottom-right: ``j > i + seqlen_k - seqlen_q``).

    ``scores`` broadcasts to (batch, nheads, seqlen_q, seqlen_k); the result has the broadcast
    shape of scores and the terms, in scores' dtype. Zeros give the additive mask alone."""
    if bias is not None:
        bias = bias.masked_fill(masked_bias_entries(bias), float("-inf"))
        scores = scores + bias.to(scores.dtype)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes_to_bias(alibi_slopes, seqlen_q, seqlen_k).to(scores.dtype)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    if causal:
        i = torch.arange(seqlen_q, device=scores.device).view(-1, 1)
        j = torch.arange(seqlen_k, device=scores.device).view(1, -1)
        scores = scores.masked_fill(j > i + seqlen_k - seqlen_q, float("-inf"))
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
) -> torch.Tensor:
    """Masked scores (batch, nheads, seqlen_q, seqlen_k) in q's dtype: ``scale * q k^T`` (scale
    default ``1 / sqrt(d)``) plus ``score_terms``. q (batch, seqlen_q, nheads, d), k (batch,
    seqlen_k, nheads_k, d). ``reorder_ops`` scales k instead of q (a different rounding)."""
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
    scores = score_terms(scores, seqlen_q, k.shape[1], bias, causal, alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask)
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


def attention_weights(scores: torch.Tensor, return_lse: bool = False):
    """Softmax of masked ``scores`` over the last (key) dim. A row with no visible key (every
    score -inf) would be 0/0: it is neutralised before the softmax and zeroed after, so its
    weights are 0, its lse -inf and its gradients 0, never NaN. Returns the weights (scores'
    dtype), and the fp32-or-wider natural-log lse of the rows with ``return_lse``."""
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
):
    """Attention computed with plain torch ops (differentiable, any device).

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d), nheads % nheads_k == 0.
    ``upcast=True`` computes in fp32 (the oracle); ``upcast=False`` stays in the input dtype
    (the "same precision as the kernel" baseline of the tolerance rule). ``reorder_ops`` scales k
    instead of q, to perturb rounding like a different kernel would.
    Output has q's dtype; ``lse`` (batch, nheads, seqlen_q) is fp32, natural log.
    """
    dtype_og = q.dtype
    if upcast:
        # At least fp32; float64 stays float64 (gradcheck).
        up = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(up), k.to(up), v.to(up)
    scores = attention_scores(q, k, bias, causal, softmax_scale, alibi_slopes=alibi_slopes,
                              key_padding_mask=key_padding_mask, reorder_ops=reorder_ops)
    attn, lse = attention_weights(scores, return_lse=True)
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
):
    """``attention_ref`` (fp32 math unless ``upcast=False``; ``reorder_ops`` as there) on each
    sequence of a packed variable-length batch: q
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
            lses.append(torch.full((nheads, qi.shape[1]), float("-inf"), device=q.device))
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[i]
        o, lse = attention_ref(qi, ki, vi, None, causal, softmax_scale, upcast, reorder_ops, alibi_slopes=slopes, return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else torch.zeros_like(q)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else torch.full((nheads, 0), float("-inf"), device=q.device)
    return out, lse
