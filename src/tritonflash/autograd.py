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

from .checks import Inputs, contiguous_cu_seqlens, draw_dropout_seed, normalise, prepare, prepare_varlen, unpack_kv, unpack_qkv
from .kernels import Varlen, attn_bwd, attn_fwd
from .kernels.common import Features
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
    return attn_fwd(inp.q, inp.k, inp.v, inp.bias, inp.alibi_slopes, kpm, inp.causal, inp.softmax_scale, varlen=varlen,
                    features=inp.features)


def _kernel_backward(inp: Inputs, out, lse, dout, bias_needs_grad, dq=None, dk=None, dv=None, varlen=None, sinks_needs_grad=False):
    """(dq, dk, dv, dbias, dsinks) from the kernels; dbias in the user's bias shape."""
    kpm = inp.key_padding_mask.view(torch.uint8) if inp.key_padding_mask is not None else None
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dbias, dsinks = attn_bwd(
        dout, inp.q, inp.k, inp.v, out, lse, inp.bias, inp.alibi_slopes, kpm, inp.causal, inp.softmax_scale,
        dq=dq, dk=dk, dv=dv, bias_grad=bias_needs_grad, varlen=varlen, features=inp.features, sinks_grad=sinks_needs_grad,
    )
    if dbias is not None:
        dbias = dbias.reshape(inp.bias_shape)
    return dq, dk, dv, dbias, dsinks


# The score features travel through the Functions as these inputs, in this order, after the
# original ones: (window_size, softcap, sinks, dropout_p, dropout_seed, attn_mask).
def _feature_kwargs(window_size, softcap, sinks, dropout_p, dropout_seed, attn_mask):
    return dict(window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed,
                attn_mask=attn_mask)


def _features(window_size, softcap, sinks, dropout_p, dropout_seed, attn_mask) -> Features:
    """``Features`` of inputs that forward validated already (the backward rebuilds them)."""
    if attn_mask is not None:
        attn_mask = attn_mask[(None,) * (4 - attn_mask.dim())]
    left, right = window_size
    return Features((int(left), int(right)), float(softcap), sinks, float(dropout_p), dropout_seed if dropout_p > 0 else None,
                    attn_mask)


def _ref_features(features: Features, shape=None) -> dict:
    """The reference's keywords for ``features``; ``shape`` (batch, nheads, seqlen_q, seqlen_k)
    to rebuild the dropout mask from the seed (a host read: only the double-backward path)."""
    from .reference import dropout_keep_mask

    mask = None
    if features.dropout_p > 0.0 and shape is not None:
        mask = dropout_keep_mask(features.seed, shape, features.dropout_p, device=features.seed.device)
    return dict(window_size=features.window, softcap=features.softcap, sinks=features.sinks, dropout_p=features.dropout_p,
                dropout_mask=mask, attn_mask=features.attn_mask)


def _seed_for(dropout_p, q):
    """The dropout seed drawn before the Function runs, so that it is one of its inputs (saved
    for the backward, visible to torch.func). Non-tensor q: validation names it later."""
    if not isinstance(q, torch.Tensor):
        return None
    return draw_dropout_seed(dropout_p, q.device)


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


def _save_features(ctx, window_size, softcap, sinks, dropout_p, dropout_seed, attn_mask):
    """Non-tensor features on ctx; returns the tensors to save (sinks, seed, attn_mask)."""
    ctx.window_size, ctx.softcap, ctx.dropout_p = window_size, softcap, dropout_p
    return sinks, dropout_seed, attn_mask


def _saved_features(ctx, sinks, dropout_seed, attn_mask) -> Features:
    return _features(ctx.window_size, ctx.softcap, sinks, ctx.dropout_p, dropout_seed, attn_mask)


class _FlashAttn(torch.autograd.Function):
    """(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features) -> (out, lse)."""

    @staticmethod
    def forward(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features):
        return _kernel_forward(prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, **_feature_kwargs(*features)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, bias, alibi_slopes, key_padding_mask, out, lse, *_save_features(ctx, *features))
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, slopes, kpm, out, lse, sinks, seed, amask = ctx.saved_tensors
        feats = _saved_features(ctx, sinks, seed, amask)
        if torch.is_grad_enabled():
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])

            def ref(q, k, v, bias, sinks):
                f = _ref_features(feats._replace(sinks=sinks), shape)
                return attention_ref(q, k, v, bias, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes, key_padding_mask=kpm, **f)

            dq, dk, dv, dbias, dsinks = _grads_with_graph(ref, (q, k, v, bias, sinks), ctx.needs_input_grad[:4] + ctx.needs_input_grad[10:11],
                                                          dout)
        else:
            inp = normalise(q, k, v, bias, ctx.causal, ctx.softmax_scale, slopes, kpm, feats)
            dq, dk, dv, dbias, dsinks = _kernel_backward(inp, out, lse, dout, ctx.needs_input_grad[3],
                                                         sinks_needs_grad=ctx.needs_input_grad[10])
        return dq, dk, dv, dbias, None, None, None, None, None, None, dsinks, None, None, None

    vmap = _no_vmap("FlashAttnFunc")


class _FlashAttnQKVPacked(torch.autograd.Function):
    """(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features) -> (out, lse)."""

    @staticmethod
    def forward(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features):
        q, k, v = unpack_qkv(qkv)
        return _kernel_forward(prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, **_feature_kwargs(*features)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features = inputs
        out, lse = output
        ctx.save_for_backward(qkv, bias, alibi_slopes, key_padding_mask, out, lse, *_save_features(ctx, *features))
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        qkv, bias, slopes, kpm, out, lse, sinks, seed, amask = ctx.saved_tensors
        feats = _saved_features(ctx, sinks, seed, amask)
        if torch.is_grad_enabled():
            shape = (qkv.shape[0], qkv.shape[3], qkv.shape[1], qkv.shape[1])

            def ref(qkv, bias, sinks):
                q, k, v = qkv.unbind(2)
                f = _ref_features(feats._replace(sinks=sinks), shape)
                return attention_ref(q, k, v, bias, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes, key_padding_mask=kpm, **f)

            dqkv, dbias, dsinks = _grads_with_graph(ref, (qkv, bias, sinks), ctx.needs_input_grad[:2] + ctx.needs_input_grad[8:9], dout)
        else:
            inp = normalise(*qkv.unbind(2), bias, ctx.causal, ctx.softmax_scale, slopes, kpm, feats)
            dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
            _, _, _, dbias, dsinks = _kernel_backward(inp, out, lse, dout, ctx.needs_input_grad[1], *dqkv.unbind(2),
                                                      sinks_needs_grad=ctx.needs_input_grad[8])
        return dqkv, dbias, None, None, None, None, None, None, dsinks, None, None, None

    vmap = _no_vmap("FlashAttnQKVPackedFunc")


class _FlashAttnKVPacked(torch.autograd.Function):
    """(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features) -> (out, lse)."""

    @staticmethod
    def forward(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features):
        k, v = unpack_kv(kv)
        return _kernel_forward(prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, **_feature_kwargs(*features)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, *features = inputs
        out, lse = output
        ctx.save_for_backward(q, kv, bias, alibi_slopes, key_padding_mask, out, lse, *_save_features(ctx, *features))
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, bias, slopes, kpm, out, lse, sinks, seed, amask = ctx.saved_tensors
        feats = _saved_features(ctx, sinks, seed, amask)
        if torch.is_grad_enabled():
            shape = (q.shape[0], q.shape[2], q.shape[1], kv.shape[1])

            def ref(q, kv, bias, sinks):
                k, v = kv.unbind(2)
                f = _ref_features(feats._replace(sinks=sinks), shape)
                return attention_ref(q, k, v, bias, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes, key_padding_mask=kpm, **f)

            dq, dkv, dbias, dsinks = _grads_with_graph(ref, (q, kv, bias, sinks), ctx.needs_input_grad[:3] + ctx.needs_input_grad[9:10], dout)
        else:
            inp = normalise(q, *kv.unbind(2), bias, ctx.causal, ctx.softmax_scale, slopes, kpm, feats)
            dkv = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
            dq, _, _, dbias, dsinks = _kernel_backward(inp, out, lse, dout, ctx.needs_input_grad[2], None, *dkv.unbind(2),
                                                       sinks_needs_grad=ctx.needs_input_grad[9])
        return dq, dkv, dbias, None, None, None, None, None, None, dsinks, None, None, None

    vmap = _no_vmap("FlashAttnKVPackedFunc")


class _FlashAttnVarlen(torch.autograd.Function):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
    causal, alibi_slopes, window_size, softcap, sinks, dropout_seed) -> (out, lse, longest_q,
    longest_k): the longest sequences (ints) are outputs so that setup_context can keep them
    for the backward's launch."""

    @staticmethod
    def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                alibi_slopes, window_size, softcap, sinks, dropout_seed):
        inp, longest_q, longest_k = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   dropout_p, causal, softmax_scale, alibi_slopes, window_size=window_size,
                                                   softcap=softcap, sinks=sinks, dropout_seed=dropout_seed)
        if q.shape[0] == 0 or k.shape[0] == 0:
            # No query rows, or no key in any sequence: nothing to launch; rows without keys
            # give out 0 and lse -inf, as for one such sequence.
            check_kernel_device(inp.q)
            lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
            if sinks is not None:  # rows with only the sink: lse = the sink
                lse = sinks.detach()[:, None].expand(q.shape[1], q.shape[0]).contiguous()
            return torch.zeros_like(q), lse, longest_q, longest_k
        varlen = Varlen(contiguous_cu_seqlens(cu_seqlens_q), contiguous_cu_seqlens(cu_seqlens_k), longest_q, longest_k)
        return (*_kernel_forward(inp, varlen), longest_q, longest_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (q, k, v, cu_seqlens_q, cu_seqlens_k, _, _, dropout_p, softmax_scale, causal, alibi_slopes, window_size, softcap, sinks,
         dropout_seed) = inputs
        out, lse, longest_q, longest_k = output
        ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, out, lse,
                              *_save_features(ctx, window_size, softcap, sinks, dropout_p, dropout_seed, None)[:2])
        ctx.causal, ctx.softmax_scale, ctx.longest = causal, softmax_scale, (longest_q, longest_k)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse, _dlongest_q, _dlongest_k):
        q, k, v, cu_q, cu_k, slopes, out, lse, sinks, seed = ctx.saved_tensors
        feats = _saved_features(ctx, sinks, seed, None)
        none7, none3 = (None,) * 7, (None,) * 3
        sinks_grad = ctx.needs_input_grad[13]
        if torch.is_grad_enabled():
            def ref(q, k, v, sinks):
                return varlen_attention_ref(q, k, v, cu_q, cu_k, ctx.causal, ctx.softmax_scale, alibi_slopes=slopes,
                                            window_size=feats.window, softcap=feats.softcap, sinks=sinks, dropout_p=feats.dropout_p,
                                            dropout_seed=None if seed is None else int(seed.item()))

            dq, dk, dv, dsinks = _grads_with_graph(ref, (q, k, v, sinks), ctx.needs_input_grad[:3] + (sinks_grad,), dout)
            return dq, dk, dv, *none7, None, None, None, dsinks, None
        if q.shape[0] == 0 or k.shape[0] == 0:
            dsinks = torch.zeros_like(sinks) if sinks_grad else None
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), *none7, *none3, dsinks, None
        inp = normalise(q, k, v, None, ctx.causal, ctx.softmax_scale, slopes, features=feats)
        varlen = Varlen(contiguous_cu_seqlens(cu_q), contiguous_cu_seqlens(cu_k), *ctx.longest)
        dq, dk, dv, _, dsinks = _kernel_backward(inp, out, lse, dout, False, varlen=varlen, sinks_needs_grad=sinks_grad)
        return dq, dk, dv, *none7, *none3, dsinks, None

    vmap = _no_vmap("FlashAttnVarlenFunc")


# Keyword-only on every front: the score features (docs/semantics.md).
class FlashAttnFunc:
    """``FlashAttnFunc.apply(q, k, v, bias=None, causal=False, softmax_scale=None,
    alibi_slopes=None, key_padding_mask=None, return_lse=False, *, window_size=(-1, -1),
    softcap=0.0, sinks=None, dropout_p=0.0, attn_mask=None)``, as ``flash_attn_func``."""

    function = _FlashAttn

    @staticmethod
    def apply(q, k, v, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
              return_lse=False, *, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0, attn_mask=None):
        seed = _seed_for(dropout_p, q)
        out, lse = _FlashAttn.apply(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask,
                                    window_size, softcap, sinks, dropout_p, seed, attn_mask)
        return (out, lse) if return_lse else out


class FlashAttnQKVPackedFunc:
    """``FlashAttnQKVPackedFunc.apply(qkv, bias=None, causal=False, softmax_scale=None,
    alibi_slopes=None, key_padding_mask=None, return_lse=False, *, <features>)``, as
    ``flash_attn_qkvpacked_func``."""

    function = _FlashAttnQKVPacked

    @staticmethod
    def apply(qkv, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
              return_lse=False, *, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0, attn_mask=None):
        seed = _seed_for(dropout_p, qkv)
        out, lse = _FlashAttnQKVPacked.apply(qkv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask,
                                             window_size, softcap, sinks, dropout_p, seed, attn_mask)
        return (out, lse) if return_lse else out


class FlashAttnKVPackedFunc:
    """``FlashAttnKVPackedFunc.apply(q, kv, bias=None, causal=False, softmax_scale=None,
    alibi_slopes=None, key_padding_mask=None, return_lse=False, *, <features>)``, as
    ``flash_attn_kvpacked_func``."""

    function = _FlashAttnKVPacked

    @staticmethod
    def apply(q, kv, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
              return_lse=False, *, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0, attn_mask=None):
        seed = _seed_for(dropout_p, q)
        out, lse = _FlashAttnKVPacked.apply(q, kv, bias, causal, softmax_scale, alibi_slopes, key_padding_mask,
                                            window_size, softcap, sinks, dropout_p, seed, attn_mask)
        return (out, lse) if return_lse else out


class FlashAttnVarlenFunc:
    """``FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None, return_lse=False, *,
    window_size=(-1, -1), softcap=0.0, sinks=None)``, as ``flash_attn_varlen_func``: q
    (total_q, h, d), k/v (total_k, h_k, d), int32 cumulative sequence lengths. Returns out
    (total_q, h, d) [and lse (h, total_q)]."""

    function = _FlashAttnVarlen

    @staticmethod
    def apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
              causal=False, alibi_slopes=None, return_lse=False, *, window_size=(-1, -1), softcap=0.0, sinks=None):
        seed = _seed_for(dropout_p, q)
        out, lse, _, _ = _FlashAttnVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                dropout_p, softmax_scale, causal, alibi_slopes, window_size, softcap, sinks, seed)
        return (out, lse) if return_lse else out
