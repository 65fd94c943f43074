"""Public functions: validate, normalise views, dispatch.

CUDA tensors run the Triton kernels. CPU tensors run the reference (``attention_ref``) with
the same semantics, unless ``TRITON_INTERPRET=1``, in which case the Triton kernels
themselves run in the Triton interpreter.
"""

from __future__ import annotations

import os

import torch

from .autograd import FlashAttnFunc, FlashAttnKVPackedFunc, FlashAttnQKVPackedFunc
from .checks import prepare, unpack_kv, unpack_qkv
from .reference import attention_ref

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]


def _use_kernels(x) -> bool:
    # Anything that is not a tensor goes on to validation, which names the argument.
    return not isinstance(x, torch.Tensor) or x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse):
    inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
    return attention_ref(
        inp.q, inp.k, inp.v, bias, inp.causal, inp.softmax_scale,
        alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask, return_lse=return_lse,
    )


def flash_attn_func(
    q, k, v, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, return_lse=False,
):
    """Scaled dot-product attention ``softmax(scale * q k^T + bias + alibi) v``.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with
    nheads % nheads_k == 0 (GQA/MQA, k/v never expanded). fp16 or bf16, headdim 1..256.
    bias: broadcastable to (batch, nheads, seqlen_q, seqlen_k), fp32/fp16/bf16; if it
    requires grad its gradient has its own shape. causal: aligned bottom-right.
    alibi_slopes: (nheads,) or (batch, nheads) fp32, ALiBi computed in-kernel.
    key_padding_mask: (batch, seqlen_k) bool, True = keep.
    Returns out (batch, seqlen_q, nheads, headdim), and lse (batch, nheads, seqlen_q) fp32
    when ``return_lse``.
    """
    if not _use_kernels(q):
        return _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse)
    return FlashAttnFunc.apply(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse)


def flash_attn_qkvpacked_func(
    qkv, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, return_lse=False,
):
    """``flash_attn_func`` on a packed qkv (batch, seqlen, 3, nheads, headdim), used as views."""
    if not _use_kernels(qkv):
        q, k, v = unpack_qkv(qkv)
        return _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse)
    return FlashAttnQKVPackedFunc.apply(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse)


def flash_attn_kvpacked_func(
    q, kv, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, return_lse=False,
):
    """``flash_attn_func`` with a packed kv (batch, seqlen_k, 2, nheads_k, headdim), used as views."""
    if not _use_kernels(q):
        k, v = unpack_kv(kv)
        return _reference(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse)
    return FlashAttnKVPackedFunc.apply(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, return_lse)
