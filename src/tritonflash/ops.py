"""torch.library custom ops: the forward and backward of every public function, so that
torch.compile treats the kernels as opaque nodes (no graph break, no tracing into Triton's
launcher or its interpreter) and CUDA graphs can capture them.

| op | inputs | returns |
|---|---|---|
| ``tritonflash::fwd`` | q, k, v, *OPTIONS, *SCALARS | out, lse |
| ``tritonflash::fwd_qkvpacked`` | qkv, *OPTIONS, *SCALARS | out, lse |
| ``tritonflash::fwd_kvpacked`` | q, kv, *OPTIONS, *SCALARS | out, lse |
| ``tritonflash::fwd_varlen`` | q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks, dropout_seed, *SCALARS | out, lse |
| ``tritonflash::bwd{,_qkvpacked,_kvpacked}`` | dout, primals, out, lse, *OPTIONS, *SCALARS, bias_grad, sinks_grad | primal grads, dbias, dsinks |
| ``tritonflash::bwd_varlen`` | dout, q, k, v, out, lse, *(fwd_varlen's after v), sinks_grad | dq, dk, dv, dsinks |
| ``tritonflash::fwd_kvcache`` | q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, bias, alibi_slopes, sinks, KV_SCALARS | out, lse |

OPTIONS = (bias, alibi_slopes, key_padding_mask, sinks, dropout_seed, attn_mask), each
optional; SCALARS = (causal, softmax_scale, window_left, window_right, softcap, dropout_p).
KV_SCALARS = (causal, softmax_scale, window_left, window_right, softcap, num_splits, max_keys)
(``fwd_kvcache``: inference only, no autograd formula, no backward op).
dbias / dsinks that were not asked for are empty (0,) tensors. The ops are building blocks for
the public functions, which validate first: the ops trust their inputs (as the low-level
functions' unchecked halves in ``lowlevel.py``, which they call) and never read a device value on
the host; ``max_seqlen_q/k`` size the varlen launch. Outputs are new contiguous tensors.

Each forward op has the autograd formula of ``autograd.py`` (register_autograd), the public
functions reach the ops through new-style autograd.Functions with the same formula (torch.func
needs them), and vmap raises NotImplementedError. In eager mode they call the implementations
below directly (``autograd.OP_IMPLS``, skipping the dispatcher); a recorded or transformed call
(``checks.needs_dispatch``) goes through the op.
"""

from __future__ import annotations

import torch

from . import lowlevel
from .autograd import (
    KVPACKED,
    OP_IMPLS,
    QKVPACKED,
    SEPARATE,
    _no_vmap,
    padded_backward,
    padded_setup_context,
    scalar_features,
    varlen_backward,
    varlen_setup_context,
)
from .checks import normalise

__all__ = ["fwd", "bwd", "fwd_qkvpacked", "bwd_qkvpacked", "fwd_kvpacked", "bwd_kvpacked", "fwd_varlen", "bwd_varlen",
           "fwd_kvcache"]

_OPTIONS = "Tensor? bias, Tensor? alibi_slopes, Tensor? key_padding_mask, Tensor? sinks, Tensor? dropout_seed, Tensor? attn_mask"
_SCALARS = "bool causal, float softmax_scale, int window_left, int window_right, float softcap, float dropout_p"
_PRIMALS = {SEPARATE: ("q", "k", "v"), QKVPACKED: ("qkv",), KVPACKED: ("q", "kv")}
_PUBLIC = {SEPARATE: "FlashAttnFunc", QKVPACKED: "FlashAttnQKVPackedFunc", KVPACKED: "FlashAttnKVPackedFunc"}


def _nothing(like):
    return torch.empty(0, device=like.device, dtype=torch.float32)


def _inputs(layout, primals, options, scalars):
    bias, slopes, kpm = options[:3]
    causal, scale = scalars[:2]
    q, k, v = layout.unpack(*primals)
    return normalise(q, k, v, bias, causal, scale, slopes, kpm, scalar_features(options, scalars))


def _register_padded(layout):
    n = layout.n_primals
    names = _PRIMALS[layout]
    primals_schema = ", ".join(f"Tensor {x}" for x in names)
    grads_schema = ", ".join("Tensor" for _ in names)

    def fwd_impl(*args):
        primals, options, scalars = args[:n], args[n:n + 6], args[n + 6:]
        return lowlevel.forward(_inputs(layout, primals, options, scalars))

    def fwd_fake(*args):
        q, _, _ = layout.unpack(*args[:n])
        return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)

    def bwd_impl(dout, *args):
        primals, (out, lse), options = args[:n], args[n:n + 2], args[n + 2:n + 8]
        scalars, (bias_grad, sinks_grad) = args[n + 8:n + 14], args[n + 14:]
        grads = [x.new_empty(x.shape) for x in primals]
        dq, dk, dv = layout.unpack(*grads)
        dbias, dsinks = lowlevel.backward(_inputs(layout, primals, options, scalars), dout, out, lse, dq, dk, dv,
                                          bias_grad, sinks_grad)
        dbias = _nothing(dout) if dbias is None else dbias.contiguous()
        return (*grads, dbias, _nothing(dout) if dsinks is None else dsinks)

    def bwd_fake(dout, *args):
        primals, options, (bias_grad, sinks_grad) = args[:n], args[n + 2:n + 8], args[n + 14:]
        bias, sinks = options[0], options[3]
        dbias = bias.new_empty(bias.shape) if bias_grad and bias is not None else _nothing(dout)
        dsinks = sinks.new_empty(sinks.shape) if sinks_grad and sinks is not None else _nothing(dout)
        return (*(x.new_empty(x.shape) for x in primals), dbias, dsinks)

    fwd = torch.library.custom_op(
        f"tritonflash::fwd{layout.name}", fwd_impl, mutates_args=(),
        schema=f"({primals_schema}, {_OPTIONS}, {_SCALARS}) -> (Tensor, Tensor)",
    )
    fwd.register_fake(fwd_fake)
    bwd = torch.library.custom_op(
        f"tritonflash::bwd{layout.name}", bwd_impl, mutates_args=(),
        schema=f"(Tensor dout, {primals_schema}, Tensor out, Tensor lse, {_OPTIONS}, {_SCALARS}, bool bias_grad, "
               f"bool sinks_grad) -> ({grads_schema}, Tensor, Tensor)",
    )
    bwd.register_fake(bwd_fake)
    OP_IMPLS["fwd" + layout.name], OP_IMPLS["bwd" + layout.name] = fwd_impl, bwd_impl
    fwd.register_autograd(padded_backward(layout), setup_context=padded_setup_context(layout))
    # The public functions call the op directly when nothing needs a gradient (a vmap too):
    # the message names the Function that users know.
    fwd.register_vmap(_no_vmap(_PUBLIC[layout], f"tritonflash::fwd{layout.name}").__func__)
    return fwd, bwd


fwd, bwd = _register_padded(SEPARATE)
fwd_qkvpacked, bwd_qkvpacked = _register_padded(QKVPACKED)
fwd_kvpacked, bwd_kvpacked = _register_padded(KVPACKED)


def _varlen_inputs(q, k, v, slopes, sinks, seed, scalars):
    causal, scale = scalars[:2]
    return normalise(q, k, v, None, causal, scale, slopes, None, scalar_features((None, None, None, sinks, seed, None), scalars))


_VARLEN = ("Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? alibi_slopes, "
           "Tensor? sinks, Tensor? dropout_seed")


def _fwd_varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks, dropout_seed, *scalars):
    inp = _varlen_inputs(q, k, v, alibi_slopes, sinks, dropout_seed, scalars)
    return lowlevel.varlen_forward(inp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


fwd_varlen = torch.library.custom_op("tritonflash::fwd_varlen", _fwd_varlen_impl, mutates_args=(),
                                     schema=f"(Tensor q, Tensor k, Tensor v, {_VARLEN}, {_SCALARS}) -> (Tensor, Tensor)")


@fwd_varlen.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_varlen_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks,
                     dropout_seed, *args):
    scalars, sinks_grad = args[:6], args[6]
    inp = _varlen_inputs(q, k, v, alibi_slopes, sinks, dropout_seed, scalars)
    dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))
    dsinks = lowlevel.varlen_backward(inp, dout, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      sinks_grad)
    return dq, dk, dv, _nothing(dout) if dsinks is None else dsinks


bwd_varlen = torch.library.custom_op(
    "tritonflash::bwd_varlen", _bwd_varlen_impl, mutates_args=(),
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_VARLEN}, {_SCALARS}, "
           "bool sinks_grad) -> (Tensor, Tensor, Tensor, Tensor)",
)
OP_IMPLS["fwd_varlen"], OP_IMPLS["bwd_varlen"] = _fwd_varlen_impl, _bwd_varlen_impl


@bwd_varlen.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks, dropout_seed, *args):
    sinks_grad = args[6]
    dsinks = sinks.new_empty(sinks.shape) if sinks_grad and sinks is not None else _nothing(dout)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


fwd_varlen.register_autograd(varlen_backward, setup_context=varlen_setup_context)
fwd_varlen.register_vmap(_no_vmap("FlashAttnVarlenFunc", "tritonflash::fwd_varlen").__func__)


# ---- KV-cache decoding (issue 14) ------------------------------------------------------------
# The attention of flash_attn_with_kvcache over caches that already hold the appended tokens
# (the public function appends with plain in-place torch ops before calling it, so the op
# mutates nothing). seqlens_k (b,) int32 = the valid length L of each sequence; max_keys a
# host-side bound on L used by num_splits=0, or -1 (then the capacity). Inference only: no
# autograd formula (the public function refuses inputs that require grad).

@torch.library.custom_op(
    "tritonflash::fwd_kvcache", mutates_args=(),
    schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? cache_batch_idx, Tensor? block_table, "
           "Tensor? bias, Tensor? alibi_slopes, Tensor? sinks, bool causal, float softmax_scale, int window_left, "
           "int window_right, float softcap, int num_splits, int max_keys) -> (Tensor, Tensor)")
def fwd_kvcache(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, bias, alibi_slopes, sinks, *scalars):
    from .kvcache import _forward

    return _forward(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, bias, alibi_slopes, sinks, *scalars)


@fwd_kvcache.register_fake
def _(q, *args):
    b, sq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


fwd_kvcache.register_vmap(_no_vmap("flash_attn_with_kvcache", "tritonflash::fwd_kvcache").__func__)
