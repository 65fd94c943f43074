"""torch.autograd.Function classes, one per public variant, with the original module's names
and positional order: ``FlashAttnFunc.apply(q, k, v, bias, causal, softmax_scale)``, then the
extras ``alibi_slopes, key_padding_mask, return_lse``."""

from __future__ import annotations

import torch

from .checks import Inputs, prepare, prepare_varlen, unpack_kv, unpack_qkv
from .kernels import Varlen, attn_bwd, attn_fwd

__all__ = ["FlashAttnFunc", "FlashAttnQKVPackedFunc", "FlashAttnKVPackedFunc", "FlashAttnVarlenFunc"]


def _forward(ctx, inp: Inputs, return_lse: bool, varlen: Varlen | None = None):
    kpm = inp.key_padding_mask.view(torch.uint8) if inp.key_padding_mask is not None else None
    out, lse = attn_fwd(inp.q, inp.k, inp.v, inp.bias, inp.alibi_slopes, kpm, inp.causal, inp.softmax_scale, varlen=varlen)
    ctx.save_for_backward(inp.q, inp.k, inp.v, out, lse, inp.bias, inp.alibi_slopes, kpm)
    ctx.varlen = varlen
    ctx.causal = inp.causal
    ctx.softmax_scale = inp.softmax_scale
    ctx.bias_shape = inp.bias_shape
    ctx.mark_non_differentiable(lse)
    return (out, lse) if return_lse else out


def _backward(ctx, dout, bias_needs_grad, dq=None, dk=None, dv=None):
    q, k, v, out, lse, bias, slopes, kpm = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dbias_rows = bias.shape[2] if (bias is not None and bias_needs_grad) else 0
    dq, dk, dv, dbias = attn_bwd(
        dout, q, k, v, out, lse, bias, slopes, kpm, ctx.causal, ctx.softmax_scale,
        dq=dq, dk=dk, dv=dv, dbias_rows=dbias_rows, varlen=ctx.varlen,
    )
    if dbias is not None:
        # Sum over the dims the bias broadcasts along (deterministic torch reductions).
        dbias = dbias.sum_to_size(bias.shape).reshape(ctx.bias_shape).to(bias.dtype)
    return dq, dk, dv, dbias


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias=None, causal=False, softmax_scale=None, alibi_slopes=None,
                key_padding_mask=None, return_lse=False):
        return _forward(ctx, prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask), return_lse)

    @staticmethod
    def backward(ctx, dout, *_):
        dq, dk, dv, dbias = _backward(ctx, dout, ctx.needs_input_grad[3])
        return dq, dk, dv, dbias, None, None, None, None, None


class FlashAttnQKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias=None, causal=False, softmax_scale=None, alibi_slopes=None,
                key_padding_mask=None, return_lse=False):
        q, k, v = unpack_qkv(qkv)
        ctx.packed = (qkv.shape, qkv.dtype, qkv.device)
        inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
        return _forward(ctx, inp, return_lse)

    @staticmethod
    def backward(ctx, dout, *_):
        shape, dtype, device = ctx.packed
        dqkv = torch.empty(shape, dtype=dtype, device=device)
        dq, dk, dv = dqkv.unbind(2)
        _, _, _, dbias = _backward(ctx, dout, ctx.needs_input_grad[1], dq, dk, dv)
        return dqkv, dbias, None, None, None, None, None


class FlashAttnKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, bias=None, causal=False, softmax_scale=None, alibi_slopes=None,
                key_padding_mask=None, return_lse=False):
        k, v = unpack_kv(kv)
        ctx.packed = (kv.shape, kv.dtype, kv.device)
        inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
        return _forward(ctx, inp, return_lse)

    @staticmethod
    def backward(ctx, dout, *_):
        shape, dtype, device = ctx.packed
        dkv = torch.empty(shape, dtype=dtype, device=device)
        dk, dv = dkv.unbind(2)
        dq, _, _, dbias = _backward(ctx, dout, ctx.needs_input_grad[2], None, dk, dv)
        return dq, dkv, dbias, None, None, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    """Packed variable-length batch: q (total_q, h, d), k/v (total_k, h_k, d), int32
    cumulative sequence lengths. Returns out (total_q, h, d) [and lse (h, total_q)]."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                causal=False, alibi_slopes=None, return_lse=False):
        inp = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, alibi_slopes)
        return _forward(ctx, inp, return_lse, Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))

    @staticmethod
    def backward(ctx, dout, *_):
        dq, dk, dv, _ = _backward(ctx, dout, False)
        return dq, dk, dv, None, None, None, None, None, None, None, None
