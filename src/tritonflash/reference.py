"""The readable PyTorch oracle for every backend, and the CPU fallback.

Follows the semantics table of docs/semantics.md exactly; never imports Triton.
"""

from __future__ import annotations

import math

import torch

from .bias import alibi_slopes_to_bias, masked_bias_entries

__all__ = ["attention_ref"]


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
    (the "same precision as the kernel" baseline of the tolerance rule). ``reorder_ops``
    scales k instead of q, to perturb rounding like a different kernel would.
    Output has q's dtype; ``lse`` (batch, nheads, seqlen_q) is fp32, natural log.
    """
    dtype_og = q.dtype
    if upcast:
        # At least fp32; float64 stays float64 (gradcheck).
        up = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(up), k.to(up), v.to(up)
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if nheads != nheads_k:
        k = k.repeat_interleave(nheads // nheads_k, dim=2)
        v = v.repeat_interleave(nheads // nheads_k, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if bias is not None:
        bias = bias.masked_fill(masked_bias_entries(bias), float("-inf"))
        scores = scores + bias.to(scores.dtype)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes_to_bias(alibi_slopes, seqlen_q, seqlen_k).to(scores.dtype)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    if causal:
        i = torch.arange(seqlen_q, device=q.device).view(-1, 1)
        j = torch.arange(seqlen_k, device=q.device).view(1, -1)
        scores = scores.masked_fill(j > i + seqlen_k - seqlen_q, float("-inf"))
    # A row with no visible key: softmax would be 0/0. docs/semantics.md asks for output 0, lse -inf
    # and zero gradients, so the row is neutralised before softmax and zeroed after.
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(dead, 0.0)
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).masked_fill(dead.squeeze(-1), float("-inf"))
    attn = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    out = torch.einsum("bhts,bshd->bthd", attn.to(v.dtype), v).to(dtype_og)
    return (out, lse) if return_lse else out
