"""Public functions: validate, normalise views, dispatch.

CUDA tensors run the Triton kernels. CPU tensors run the reference (``attention_ref``) with
the same semantics, unless ``TRITON_INTERPRET=1``, in which case the Triton kernels
themselves run in the Triton interpreter; that variable must be set before tritonflash (or
triton) is imported, since the kernels are built then.
"""

from __future__ import annotations

import os

import torch

from .autograd import FlashAttnFunc, FlashAttnKVPackedFunc, FlashAttnQKVPackedFunc, FlashAttnVarlenFunc, _seed_for
from .checks import prepare, prepare_varlen, unpack_kv, unpack_qkv, unpack_varlen_kv, unpack_varlen_qkv
from .reference import attention_ref, varlen_attention_ref

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]


def _use_kernels(x) -> bool:
    # Anything that is not a tensor goes on to validation, which names the argument. A CPU
    # tensor with TRITON_INTERPRET=1 set only after import reaches the kernel path too, where it
    # is refused after validation (autograd.check_kernel_device says how to fix it).
    return not isinstance(x, torch.Tensor) or x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse, **features):
    features["dropout_seed"] = _seed_for(features["dropout_p"], q)
    inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, **features)
    return attention_ref(
        inp.q, inp.k, inp.v, bias, inp.causal, inp.softmax_scale,
        alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask, return_lse=return_lse, **inp.reference_kwargs(),
    )


def flash_attn_func(
    q, k, v, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0,
    attn_mask=None, return_lse=False,
):
    """Scaled dot-product attention ``softmax(cap(scale * q k^T) + bias + alibi) v``.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with
    nheads % nheads_k == 0 (GQA/MQA, k/v never expanded). fp16 or bf16, headdim 1..256.
    bias: broadcastable to (batch, nheads, seqlen_q, seqlen_k), fp32/fp16/bf16; if it
    requires grad its gradient has its own shape. causal: aligned bottom-right.
    alibi_slopes: (nheads,) or (batch, nheads) fp32, finite (checked on the host, except
    during CUDA graph capture and torch.compile tracing), ALiBi computed in-kernel.
    key_padding_mask: (batch, seqlen_k) bool, True = keep.
    window_size: (left, right), -1 = unbounded: query i sees key j iff
    i + sk - sq - left <= j <= i + sk - sq + right (causal = right 0); blocks outside are skipped.
    softcap: > 0 caps the scaled score to softcap * tanh(score / softcap) before bias and ALiBi.
    sinks: (nheads,) fp32 (may require grad): one extra logit per row that takes probability
    and contributes no value; lse includes it.
    dropout_p: dropout on the normalised probabilities (out = (P * M / (1 - p)) v), the mask
    drawn from the default generator of q's device (torch.manual_seed reproduces it).
    attn_mask: bool broadcastable to (batch, nheads, seqlen_q, seqlen_k), True = attend.
    Returns out (batch, seqlen_q, nheads, headdim), and lse (batch, nheads, seqlen_q) fp32
    when ``return_lse`` (no gradient flows through lse on the kernel path).

    Gradients come from the backward kernels. A backward that must itself be differentiable
    (``create_graph=True``, ``torch.func.grad``) recomputes them through ``attention_ref``
    instead: fp32 math and O(seqlen_q * seqlen_k) memory per (batch, head), like eager attention.
    """
    features = dict(window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, attn_mask=attn_mask)
    if not _use_kernels(q):
        return _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse, **features)
    return FlashAttnFunc.apply(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse, **features)


def flash_attn_qkvpacked_func(
    qkv, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0,
    attn_mask=None, return_lse=False,
):
    """``flash_attn_func`` on a packed qkv (batch, seqlen, 3, nheads, headdim), used as views."""
    features = dict(window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, attn_mask=attn_mask)
    if not _use_kernels(qkv):
        q, k, v = unpack_qkv(qkv)
        return _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse, **features)
    return FlashAttnQKVPackedFunc.apply(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse, **features)


def flash_attn_kvpacked_func(
    q, kv, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0,
    attn_mask=None, return_lse=False,
):
    """``flash_attn_func`` with a packed kv (batch, seqlen_k, 2, nheads_k, headdim), used as views."""
    features = dict(window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, attn_mask=attn_mask)
    if not _use_kernels(q):
        k, v = unpack_kv(kv)
        return _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse, **features)
    return FlashAttnKVPackedFunc.apply(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse, **features)


def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                      alibi_slopes, return_lse, window_size, softcap, sinks, validate=True):
    seed = _seed_for(dropout_p, q)
    inp, _, _ = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                               softmax_scale, alibi_slopes, validate=validate, window_size=window_size, softcap=softcap,
                               sinks=sinks, dropout_seed=seed)
    f = inp.features
    return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, inp.causal, inp.softmax_scale,
                                alibi_slopes=alibi_slopes, return_lse=return_lse, window_size=f.window, softcap=f.softcap,
                                sinks=f.sinks, dropout_p=f.dropout_p, dropout_seed=None if seed is None else int(seed.item()))


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False, *,
    alibi_slopes=None, window_size=(-1, -1), softcap=0.0, sinks=None, return_lse=False, validate=True,
):
    """Attention over a packed batch of variable-length sequences (no padding), in flash-attn 2's
    positional order.

    q: (total_q, nheads, headdim), k/v: (total_k, nheads_k, headdim); ``cu_seqlens_q/k`` int32
    (batch + 1,) cumulative lengths starting at 0 (zero-length sequences allowed, all of them
    too: rows without keys give out 0 and lse -inf); ``max_seqlen_q/k`` at least the longest
    sequence (a larger value is accepted; the launch is sized by the longest sequence).
    ``dropout_p``, ``window_size``, ``softcap`` and ``sinks`` as in ``flash_attn_func`` (the
    dropout mask takes the sequence index as its batch index). Causal and the window are
    aligned bottom-right per sequence. Additive bias tensors are not supported here
    (use ``flash_attn_func`` on a padded batch with ``key_padding_mask``); ALiBi via
    ``alibi_slopes`` ((nheads,) or (batch, nheads) fp32) is. Returns out (total_q, nheads,
    headdim) and, with ``return_lse``, lse (nheads, total_q).

    ``cu_seqlens_q/k``'s contents are checked on the host (two device-to-host copies) and the
    launch is sized by the longest sequences read there, except under torch.compile, during
    CUDA graph capture and with ``validate=False``: then nothing is read on the host and the
    launch is sized by ``max_seqlen_q/k``, which must be at least the longest sequences
    (unchecked: a smaller value gives wrong results for the longer sequences).
    """
    if not _use_kernels(q):
        return _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                                 causal, alibi_slopes, return_lse, window_size, softcap, sinks, validate)
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                                     causal, alibi_slopes, return_lse, window_size=window_size, softcap=softcap, sinks=sinks,
                                     validate=validate)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, *,
                                     alibi_slopes=None, window_size=(-1, -1), softcap=0.0, sinks=None, return_lse=False,
                                     validate=True):
    """``flash_attn_varlen_func`` on a packed qkv (total, 3, nheads, headdim), used as views."""
    q, k, v = unpack_varlen_qkv(qkv)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                                  alibi_slopes=alibi_slopes, window_size=window_size, softcap=softcap, sinks=sinks,
                                  return_lse=return_lse, validate=validate)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, *, alibi_slopes=None, window_size=(-1, -1), softcap=0.0,
                                    sinks=None, return_lse=False, validate=True):
    """``flash_attn_varlen_func`` with a packed kv (total_k, 2, nheads_k, headdim), used as views."""
    k, v = unpack_varlen_kv(kv)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                                  causal, alibi_slopes=alibi_slopes, window_size=window_size, softcap=softcap, sinks=sinks,
                                  return_lse=return_lse, validate=validate)
