"""torch.autograd.Function classes, one per public variant. FlashAttnFunc, FlashAttnQKVPackedFunc
and FlashAttnKVPackedFunc keep the original module's names and positional order
(``FlashAttnFunc.apply(q, k, v, bias, causal, softmax_scale)``, then the extras
``alibi_slopes, key_padding_mask, return_lse``); FlashAttnVarlenFunc takes
``flash_attn_varlen_func``'s (flash-attn 2's) order.

Forward and a plain backward run the Triton kernels. A backward run with grad mode on --
``create_graph=True`` (a gradient penalty, a Hessian-vector product) or ``torch.func.grad`` --
needs gradients that carry a graph, which the kernels cannot give: the gradients are then
recomputed through the differentiable reference (``attention_ref``) from the saved original
inputs. That path computes in fp32 and materialises the (batch, nheads, seqlen_q, seqlen_k)
scores, i.e. O(seqlen_q * seqlen_k) memory, like any eager attention.

The Functions are new-style (``forward`` without ctx, ``setup_context``) so that torch.func
transforms accept them, and they always return the lse (torch.func lets setup_context save only
inputs and outputs). Each public class is a front whose ``apply`` calls its Function (its
``function`` attribute) and drops the lse unless ``return_lse``; it is not itself an
autograd.Function because torch.compile would trace a Function's ``forward`` directly and skip
an overridden ``apply``. ``torch.func.vmap`` is refused with our own NotImplementedError: fold
the vmapped dimension into the batch dimension instead.
"""

from __future__ import annotations

import os

import torch

from .checks import Inputs, contiguous_cu_seqlens, normalise, prepare, prepare_varlen, unpack_kv, unpack_qkv
from .kernels import Varlen, attn_bwd, attn_fwd
from .kernels.configs import INTERPRET
from .reference import attention_ref, varlen_attention_ref

__all__ = ["FlashAttnFunc", "FlashAttnQKVPackedFunc", "FlashAttnKVPackedFunc", "FlashAttnVarlenFunc"]


def check_kernel_device(q: torch.Tensor) -> None:
    """The kernels need CUDA tensors, or the interpreter, which Triton decides when the kernels
    are defined (at ``import tritonflash``), not per call. Called after validation, just before
    a launch."""
    if q.device.type == "cuda" or INTERPRET:
        return
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after tritonflash was imported: its Triton kernels were built for the GPU "
            f"then and cannot run tensors on {q.device}. Set TRITON_INTERPRET=1 before importing tritonflash "
            "(or triton), or unset it to run CPU tensors of the public functions through the reference."
        )
    raise RuntimeError(
        f"the Triton kernels need CUDA tensors, got q on {q.device}. CPU tensors run them only in the Triton "
        "interpreter, and TRITON_INTERPRET=1 must be set before importing tritonflash (or triton): the kernels "
        "are built when tritonflash is imported. flash_attn_func and the other public functions run the "
        "reference on CPU tensors without it."
    )


def _kernel_forward(inp: Inputs, varlen: Varlen | None = None):
    check_kernel_device(inp.q)
    kpm = inp.key_padding_mask.view(torch.uint8) if inp.key_padding_mask is not None else None
    return attn_fwd(inp.q, inp.k, inp.v, inp.bias, inp.alibi_slopes, kpm, inp.causal, inp.softmax_scale, varlen=varlen)


def _kernel_backward(inp: Inputs, out, lse, dout, bias_needs_grad, dq=None, dk=None, dv=None, varlen=None):
    kpm = inp.key_padding_mask.view(torch.uint8) if inp.key_padding_mask is not None else None
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dbias = attn_bwd(
        dout, inp.q, inp.k, inp.v, out, lse, inp.bias, inp.alibi_slopes, kpm, inp.causal, inp.softmax_scale,
        dq=dq, dk=dk, dv=dv, bias_grad=bias_needs_grad, varlen=varlen,
    )
    if dbias is not None:
        dbias = dbias.reshape(inp.bias_shape)
    return dq, dk, dv, dbias


def _grads_with_graph(fn, inputs, needs_grad, dout):
    """Gradients of ``fn(*inputs)`` (the reference) that carry a graph to ``inputs`` and
    ``dout``; None where no gradient is needed, zeros where the output does not depend on an
    input (e.g. an all-empty varlen batch).

    A backward returns each input's own partial derivative. Differentiating w.r.t. the inputs
    themselves would give total derivatives when one input is computed from another (q and a
    kv stacked from q): each is differentiated through a fresh alias instead."""
    with torch.enable_grad():
        inputs = [x.view_as(x) if need else x for x, need in zip(inputs, needs_grad)]
        wanted = [x for x, need in zip(inputs, needs_grad) if need]
        out = fn(*inputs)
        grads = [None] * len(wanted)
        if out.requires_grad:
            grads = torch.autograd.grad(out, wanted, dout, create_graph=True, allow_unused=True)
    grads = iter(grads)
    result = []
    for x, need in zip(inputs, needs_grad):
        g = next(grads) if need else None
        result.append(torch.zeros_like(x) if need and g is None else g)
    return result


def _no_vmap(name):
    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            f"torch.func.vmap over {name} is not supported: the kernels batch over their own batch dimension; "
            "fold the vmapped dimension into it (e.g. x.flatten(0, 1) and back) or loop"
        )

    return staticmethod(vmap)


class _FlashAttn(torch.autograd.Function):
    """(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask) -> (out, lse)."""

    @staticmethod
    def forward(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask):
        return _kernel_forward(prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, bias, alibi_slopes, key_padding_mask, out, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, slopes, kpm, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            def ref(q, k, v, bias):
                return attention_ref(q, k, v, bias, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes, key_padding_mask=kpm)

            grads = _grads_with_graph(ref, (q, k, v, bias), ctx.needs_input_grad[:4], dout)
        else:
            inp = normalise(q, k, v, bias, ctx.causal, ctx.softmax_scale, slopes, kpm)
            grads = _kernel_backward(inp, out, lse, dout, ctx.needs_input_grad[3])
        return (*grads, None, None, None, None)

    vmap = _no_vmap("FlashAttnFunc")


class _FlashAttnQKVPacked(torch.autograd.Function):
    """(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask) -> (out, lse)."""

    @staticmethod
    def forward(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask):
        q, k, v = unpack_qkv(qkv)
        return _kernel_forward(prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask = inputs
        out, lse = output
        ctx.save_for_backward(qkv, bias, alibi_slopes, key_padding_mask, out, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        qkv, bias, slopes, kpm, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            def ref(qkv, bias):
                q, k, v = qkv.unbind(2)
                return attention_ref(q, k, v, bias, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes, key_padding_mask=kpm)

            dqkv, dbias = _grads_with_graph(ref, (qkv, bias), ctx.needs_input_grad[:2], dout)
        else:
            inp = normalise(*qkv.unbind(2), bias, ctx.causal, ctx.softmax_scale, slopes, kpm)
            dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
            _, _, _, dbias = _kernel_backward(inp, out, lse, dout, ctx.needs_input_grad[1], *dqkv.unbind(2))
        return dqkv, dbias, None, None, None, None

    vmap = _no_vmap("FlashAttnQKVPackedFunc")


class _FlashAttnKVPacked(torch.autograd.Function):
    """(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask) -> (out, lse)."""

    @staticmethod
    def forward(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask):
        k, v = unpack_kv(kv)
        return _kernel_forward(prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask = inputs
        out, lse = output
        ctx.save_for_backward(q, kv, bias, alibi_slopes, key_padding_mask, out, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, bias, slopes, kpm, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            def ref(q, kv, bias):
                k, v = kv.unbind(2)
                return attention_ref(q, k, v, bias, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes, key_padding_mask=kpm)

            dq, dkv, dbias = _grads_with_graph(ref, (q, kv, bias), ctx.needs_input_grad[:3], dout)
        else:
            inp = normalise(q, *kv.unbind(2), bias, ctx.causal, ctx.softmax_scale, slopes, kpm)
            dkv = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
            dq, _, _, dbias = _kernel_backward(inp, out, lse, dout, ctx.needs_input_grad[2], None, *dkv.unbind(2))
        return dq, dkv, dbias, None, None, None, None

    vmap = _no_vmap("FlashAttnKVPackedFunc")


class _FlashAttnVarlen(torch.autograd.Function):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
    causal, alibi_slopes) -> (out, lse, longest_q, longest_k): the longest sequences (ints) are
    outputs so that setup_context can keep them for the backward's launch."""

    @staticmethod
    def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                alibi_slopes):
        inp, longest_q, longest_k = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   dropout_p, causal, softmax_scale, alibi_slopes)
        if q.shape[0] == 0 or k.shape[0] == 0:
            # No query rows, or no key in any sequence: nothing to launch; rows without keys
            # give out 0 and lse -inf, as for one such sequence.
            check_kernel_device(inp.q)
            lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
            return torch.zeros_like(q), lse, longest_q, longest_k
        varlen = Varlen(contiguous_cu_seqlens(cu_seqlens_q), contiguous_cu_seqlens(cu_seqlens_k), longest_q, longest_k)
        return (*_kernel_forward(inp, varlen), longest_q, longest_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, _, _, _, softmax_scale, causal, alibi_slopes = inputs
        out, lse, longest_q, longest_k = output
        ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.longest = causal, softmax_scale, (longest_q, longest_k)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse, _dlongest_q, _dlongest_k):
        q, k, v, cu_q, cu_k, slopes, out, lse = ctx.saved_tensors
        none = (None,) * 8
        if torch.is_grad_enabled():
            def ref(q, k, v):
                return varlen_attention_ref(q, k, v, cu_q, cu_k, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes)

            return (*_grads_with_graph(ref, (q, k, v), ctx.needs_input_grad[:3], dout), *none)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), *none
        inp = normalise(q, k, v, None, ctx.causal, ctx.softmax_scale, slopes)
        varlen = Varlen(contiguous_cu_seqlens(cu_q), contiguous_cu_seqlens(cu_k), *ctx.longest)
        dq, dk, dv, _ = _kernel_backward(inp, out, lse, dout, False, varlen=varlen)
        return dq, dk, dv, *none

    vmap = _no_vmap("FlashAttnVarlenFunc")


class FlashAttnFunc:
    """``FlashAttnFunc.apply(q, k, v, bias=None, causal=False, softmax_scale=None,
    alibi_slopes=None, key_padding_mask=None, return_lse=False)``, as ``flash_attn_func``."""

    function = _FlashAttn

    @staticmethod
    def apply(q, k, v, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
              return_lse=False):
        out, lse = _FlashAttn.apply(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
        return (out, lse) if return_lse else out


class FlashAttnQKVPackedFunc:
    """``FlashAttnQKVPackedFunc.apply(qkv, bias=None, causal=False, softmax_scale=None,
    alibi_slopes=None, key_padding_mask=None, return_lse=False)``, as ``flash_attn_qkvpacked_func``."""

    function = _FlashAttnQKVPacked

    @staticmethod
    def apply(qkv, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
              return_lse=False):
        out, lse = _FlashAttnQKVPacked.apply(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
        return (out, lse) if return_lse else out


class FlashAttnKVPackedFunc:
    """``FlashAttnKVPackedFunc.apply(q, kv, bias=None, causal=False, softmax_scale=None,
    alibi_slopes=None, key_padding_mask=None, return_lse=False)``, as ``flash_attn_kvpacked_func``."""

    function = _FlashAttnKVPacked

    @staticmethod
    def apply(q, kv, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
              return_lse=False):
        out, lse = _FlashAttnKVPacked.apply(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
        return (out, lse) if return_lse else out


class FlashAttnVarlenFunc:
    """``FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None, return_lse=False)``, as
    ``flash_attn_varlen_func``: q (total_q, h, d), k/v (total_k, h_k, d), int32 cumulative
    sequence lengths. Returns out (total_q, h, d) [and lse (h, total_q)]."""

    function = _FlashAttnVarlen

    @staticmethod
    def apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
              causal=False, alibi_slopes=None, return_lse=False):
        out, lse, _, _ = _FlashAttnVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                dropout_p, softmax_scale, causal, alibi_slopes)
        return (out, lse) if return_lse else out
