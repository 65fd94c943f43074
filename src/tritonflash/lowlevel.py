"""The original module's low-level functions, ``_flash_attn_forward`` and
``_flash_attn_backward``: one forward or one backward of the Triton kernels on validated
inputs, with no autograd. Ring / context-parallel attention calls them block by block and
combines the blocks by their lse (docs/semantics.md, "Low-level functions").

The custom ops (``ops.py``) wrap the unchecked halves of these functions (``forward``,
``backward`` and their varlen forms): the ops' callers validate first, and the ops never read a
device value on the host.
"""

from __future__ import annotations

import torch

from .autograd import _distinct, _kernel_backward, _kernel_forward, check_kernel_device, op_arguments
from .checks import Inputs, check_bool, check_tensor, contiguous_cu_seqlens, needs_dispatch, prepare
from .kernels import Varlen

__all__ = ["_flash_attn_forward", "_flash_attn_backward"]


# ---- unchecked: what the custom ops run ----------------------------------------------------------


def forward(inp: Inputs, varlen: Varlen | None = None):
    """(out, lse) of validated inputs; out is a new contiguous tensor."""
    out = torch.empty(inp.q.shape, dtype=inp.q.dtype, device=inp.q.device)
    return _kernel_forward(inp, varlen, out=out)


def backward(inp: Inputs, dout, out, lse, dq, dk, dv, bias_grad: bool, sinks_grad: bool, varlen: Varlen | None = None):
    """Write dq, dk, dv (any views with a unit last stride) and return (dbias, dsinks), each
    None unless asked for: dbias in the user's bias shape and dtype, dsinks fp32 (nheads,)."""
    check_kernel_device(inp.q)
    out = out if out.stride(-1) == 1 else out.contiguous()
    _, _, _, dbias, dsinks = _kernel_backward(inp, out, lse.contiguous(), dout, bias_grad, dq, dk, dv, varlen=varlen,
                                              sinks_needs_grad=sinks_grad)
    return dbias, dsinks


def _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> Varlen:
    return Varlen(contiguous_cu_seqlens(cu_seqlens_q), contiguous_cu_seqlens(cu_seqlens_k), int(max_seqlen_q), int(max_seqlen_k))


def varlen_forward(inp: Inputs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int):
    """Varlen (out, lse (nheads, total_q)); ``max_seqlen_q/k`` size the launch. A batch with no
    query row or no key launches nothing: out 0, lse -inf (the sink's logit with sinks)."""
    q, k = inp.q, inp.k
    if q.shape[0] == 0 or k.shape[0] == 0:
        check_kernel_device(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        sinks = inp.features.sinks
        if sinks is not None:  # rows with only the sink: lse = the sink
            lse = sinks.detach()[:, None].expand(q.shape[1], q.shape[0]).contiguous()
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), lse
    return forward(inp, _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def varlen_backward(inp: Inputs, dout, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                    max_seqlen_k: int, sinks_grad: bool):
    """Varlen gradients into dq, dk, dv; returns dsinks (or None)."""
    if inp.q.shape[0] == 0 or inp.k.shape[0] == 0:
        for g in (dq, dk, dv):
            g.zero_()
        sinks = inp.features.sinks
        return torch.zeros_like(sinks) if sinks_grad and sinks is not None else None
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return backward(inp, dout, out, lse, dq, dk, dv, False, sinks_grad, varlen)[1]


# ---- the public low-level functions ------------------------------------------------------------


def _op_args(inp: Inputs, q, k, v, bias, alibi_slopes, key_padding_mask, *saved):
    """q, k, v [, out, lse], OPTIONS, SCALARS of ``torch.ops.tritonflash.fwd`` / ``bwd``."""
    return _distinct(q, k, v, *saved, *op_arguments(inp, bias, alibi_slopes, key_padding_mask))


def _check_seed(dropout_p, dropout_seed):
    if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and dropout_p > 0.0 and dropout_seed is None:
        raise ValueError(
            "dropout_seed is required with dropout_p > 0: pass the same (1,) int64 tensor on q's device to "
            "_flash_attn_forward and _flash_attn_backward, e.g. torch.randint(0, 2**62, (1,), dtype=torch.int64, "
            "device=q.device)"
        )


def _flash_attn_forward(
    q, k, v, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0,
    attn_mask=None, dropout_seed=None,
):
    """One forward of the kernels, no autograd: returns ``(out, lse, softmax_scale)`` with out
    (batch, seqlen_q, nheads, headdim) in q's dtype (a new contiguous tensor), lse (batch, nheads,
    seqlen_q) fp32 natural log, and the scale used (``1/sqrt(headdim)`` when None).

    Arguments and validation as ``flash_attn_func`` (same errors). ``dropout_p > 0`` needs
    ``dropout_seed``, a (1,) int64 tensor on q's device, passed again to the backward. Always
    runs the Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    _check_seed(dropout_p, dropout_seed)
    inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, window_size=window_size,
                  softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed, attn_mask=attn_mask)
    if needs_dispatch((q, k, v, bias, alibi_slopes, key_padding_mask, sinks, attn_mask, dropout_seed)):
        # Traced code (ring attention under torch.compile, export, make_fx) reaches the kernels
        # through the custom op, an opaque node: tracing into Triton's launcher (or its
        # interpreter) breaks the graph. The same rule as the public functions' (checks.py).
        with torch.no_grad():
            out, lse = torch.ops.tritonflash.fwd(*_op_args(inp, q, k, v, bias, alibi_slopes, key_padding_mask))
    else:
        out, lse = forward(inp)
    return out, lse, inp.softmax_scale


def _check_like(name, x, shape, dtype, device, unit_last=False):
    check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    if unit_last and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride on its last dim (the kernels write rows), got strides {x.stride()}")


def _flash_attn_backward(
    do, q, k, v, o, lse, dq, dk, dv, bias=None, causal=False, softmax_scale=None, *,
    alibi_slopes=None, key_padding_mask=None, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0,
    attn_mask=None, dropout_seed=None, bias_grad=None, dsinks=None,
):
    """One backward of the kernels, no autograd: writes the gradients of q, k, v into ``dq``,
    ``dk``, ``dv`` (tensors of q's, k's and v's shapes and dtype with a unit last stride, e.g.
    views of one packed buffer) and returns ``dbias`` (in the bias's own shape and dtype,
    summed over its broadcast dims) or None.

    ``do``, ``o``, ``lse``: the output's gradient, and the output and lse that
    ``_flash_attn_forward`` returned for the same inputs (same features, same ``dropout_seed``).
    ``bias_grad``: whether to compute dbias; None (default) means ``bias.requires_grad``.
    ``dsinks``: an fp32 (nheads,) tensor that receives the sinks' gradient (overwritten, not
    accumulated); None computes none. Other arguments as ``_flash_attn_forward``."""
    _check_seed(dropout_p, dropout_seed)
    inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, window_size=window_size,
                  softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed, attn_mask=attn_mask)
    _check_like("do", do, q.shape, q.dtype, q.device)
    _check_like("o", o, q.shape, q.dtype, q.device)
    _check_like("lse", lse, (q.shape[0], q.shape[2], q.shape[1]), torch.float32, q.device)
    for name, g, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_like(name, g, x.shape, x.dtype, x.device, unit_last=True)
    if bias_grad is None:
        bias_grad = bias is not None and bias.requires_grad
    check_bool("bias_grad", bias_grad)
    if bias_grad and bias is None:
        raise ValueError("bias_grad=True needs a bias")
    if dsinks is not None:
        if sinks is None:
            raise ValueError("dsinks was given without sinks: pass the sinks whose gradient it receives")
        _check_like("dsinks", dsinks, sinks.shape, torch.float32, q.device)
    if needs_dispatch((do, q, k, v, o, lse, dq, dk, dv, bias, alibi_slopes, key_padding_mask, sinks, attn_mask, dropout_seed, dsinks)):
        # through the backward op, then into the given buffers (see the forward)
        with torch.no_grad():
            gq, gk, gv, dbias, ds = torch.ops.tritonflash.bwd(
                do, *_op_args(inp, q, k, v, bias, alibi_slopes, key_padding_mask, o, lse), bias_grad, dsinks is not None)
            dq.copy_(gq)
            dk.copy_(gk)
            dv.copy_(gv)
        dbias = dbias if bias_grad else None
    else:
        dbias, ds = backward(inp, do, o, lse, dq, dk, dv, bias_grad, dsinks is not None)
    if dsinks is not None:
        dsinks.copy_(ds)
    return dbias
