"""The autograd of every public variant, and the kernel launch helpers.

Path of a call: the public function (api.py) -> a front here (``FlashAttnFunc.apply`` ...:
validate with checks.py, draw the dropout seed) -> a new-style autograd.Function whose forward
is a custom op (``torch.ops.tritonflash.fwd*``, ops.py; the op alone when no input needs a
gradient or grad mode is off, see ``_apply``; in eager mode the op's Python implementation
without the dispatcher, see ``_run``) -> the low-level functions' unchecked
halves (lowlevel.py) -> ``_kernel_forward`` / ``_kernel_backward`` below -> kernels/.
FlashAttnFunc, FlashAttnQKVPackedFunc and FlashAttnKVPackedFunc keep the original module's
names and positional order (``FlashAttnFunc.apply(q, k, v, bias, causal, softmax_scale)``, then
``alibi_slopes, key_padding_mask, return_lse``); FlashAttnVarlenFunc takes
``flash_attn_varlen_func``'s (flash-attn 2's) order.

The autograd formulas (``padded_backward``, ``varlen_backward``) serve both the Functions and
the forward ops' own registration (register_autograd). A plain backward calls the backward op
(the kernels). A backward run with grad mode on -- ``create_graph=True`` (a gradient penalty,
a Hessian-vector product) or ``torch.func.grad`` -- needs gradients that carry a graph, which
the kernels cannot give: they are then recomputed through the differentiable reference
(``attention_ref``) from the saved inputs, in fp32 with O(seqlen_q * seqlen_k) memory. Under
torch.compile the backward is traced with grad mode off: the backward op.

The Functions exist besides the ops' registered autograd because torch.func transforms need
new-style Functions (``setup_context``); ``torch.func.vmap`` is refused with our own
NotImplementedError (fold the vmapped dimension into the batch). The fronts are not
Functions themselves because torch.compile traces a Function's ``forward`` directly and skips
an overridden ``apply``. Validation happens in the fronts, before any op: under torch.compile
it runs at trace time on fake tensors (shapes, dtypes, devices) and skips what reads values
(checks.host_sync_allowed).
"""

from __future__ import annotations

import inspect
import os
from typing import NamedTuple

import torch

from .checks import Inputs, draw_dropout_seed, needs_dispatch, prepare, prepare_varlen, reference_kwargs, unpack_kv, unpack_qkv
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


def _kernel_forward(inp: Inputs, varlen: Varlen | None = None, out=None):
    check_kernel_device(inp.q)
    kpm = inp.key_padding_mask.view(torch.uint8) if inp.key_padding_mask is not None else None
    return attn_fwd(inp.q, inp.k, inp.v, inp.bias, inp.alibi_slopes, kpm, inp.causal, inp.softmax_scale, out=out,
                    varlen=varlen, features=inp.features)


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


def _no_vmap(name, op=None):
    where = f" (op {op})" if op else ""

    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            f"torch.func.vmap over {name} is not supported{where}: the kernels batch over their own batch dimension; "
            "fold the vmapped dimension into it (e.g. x.flatten(0, 1) and back) or loop"
        )

    return staticmethod(vmap)


# ---- the autograd formulas, shared by the Functions below and the custom ops (ops.py) -----------
#
# Every op and every Function takes the same inputs: the primal tensors of its layout, then
# OPTIONS = (bias, alibi_slopes, key_padding_mask, sinks, dropout_seed, attn_mask) and SCALARS =
# (causal, softmax_scale, window_left, window_right, softcap, dropout_p), all validated and
# normalised by the caller (softmax_scale a float, the window two ints). Varlen: (q, k, v,
# cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks, dropout_seed,
# *SCALARS).

N_OPTIONS = 6
BIAS, SINKS = 0, 3  # their places in OPTIONS


# The Python implementations of the ops by op name ("fwd", "bwd_kvpacked", "fwd_varlen", ...),
# registered by ops.py: eager calls run them directly (Layout.forward/backward, _varlen_forward).
OP_IMPLS: dict[str, object] = {}


class Layout(NamedTuple):
    """A padded-batch layout: its primal tensors and the ops that compute it."""

    name: str  # op name suffix ("" for separate q, k, v)
    n_primals: int
    unpack: object  # primals -> (q, k, v) views

    def forward(self, *args):
        """The forward op on ``args``; in eager mode its implementation without the dispatcher
        (checks.needs_dispatch: same computation, tens of microseconds less a call)."""
        return _run("fwd" + self.name, args)

    def backward(self, *args):
        """The backward op on ``args``, as ``forward``."""
        return _run("bwd" + self.name, args)


def _varlen_forward(*args):
    """tritonflash::fwd_varlen on ``args``, without the dispatcher in eager mode (as Layout.forward)."""
    return _run("fwd_varlen", args)


def _run(op_name, args):
    impl = OP_IMPLS.get(op_name)
    if impl is None or needs_dispatch(args):
        return getattr(torch.ops.tritonflash, op_name)(*args)
    return impl(*args)


SEPARATE = Layout("", 3, lambda q, k, v: (q, k, v))
QKVPACKED = Layout("_qkvpacked", 1, lambda qkv: qkv.unbind(2))
KVPACKED = Layout("_kvpacked", 2, lambda q, kv: (q, *kv.unbind(2)))


def op_arguments(inp: Inputs, bias, alibi_slopes, key_padding_mask) -> tuple:
    """OPTIONS + SCALARS of validated inputs (the user's bias, slopes and mask tensors: the
    bias gradient has the bias's own shape)."""
    f = inp.features
    return (bias, alibi_slopes, key_padding_mask, f.sinks, f.seed, f.attn_mask,
            inp.causal, inp.softmax_scale, f.window[0], f.window[1], f.softcap, f.dropout_p)


def scalar_features(options, scalars) -> Features:
    """``Features`` of OPTIONS + SCALARS that the front validated already (the ops and the
    backward rebuild them)."""
    _, _, _, sinks, seed, amask = options
    _, _, left, right, softcap, dropout_p = scalars
    if amask is not None:
        amask = amask[(None,) * (4 - amask.dim())]
    return Features((int(left), int(right)), float(softcap), sinks, float(dropout_p), seed if dropout_p > 0 else None, amask)


def padded_setup_context(layout: Layout):
    def setup_context(ctx, inputs, output):
        n = layout.n_primals
        ctx.save_for_backward(*inputs[:n + N_OPTIONS], *output)
        ctx.scalars = tuple(inputs[n + N_OPTIONS:])
        ctx.mark_non_differentiable(output[1])

    return setup_context


def padded_backward(layout: Layout):
    """The backward of a layout's forward op: the bwd op (the kernels), or, with grad mode on
    (create_graph=True, torch.func.grad), the differentiable reference. Returns a gradient for
    every input of the forward op."""

    def backward(ctx, dout, _dlse):
        n = layout.n_primals
        saved = ctx.saved_tensors
        primals, options, (out, lse) = saved[:n], saved[n:n + N_OPTIONS], saved[n + N_OPTIONS:]
        causal, scale = ctx.scalars[:2]
        needs = ctx.needs_input_grad
        need_bias = bool(needs[n + BIAS]) and options[BIAS] is not None
        need_sinks = bool(needs[n + SINKS]) and options[SINKS] is not None
        if torch.is_grad_enabled():
            bias, slopes, kpm, sinks = options[:4]
            q, k, v = layout.unpack(*primals)
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            feats = scalar_features(options, ctx.scalars)

            def ref(*args):
                q, k, v = layout.unpack(*args[:n])
                f = reference_kwargs(feats._replace(sinks=args[n + 1]), shape)
                return attention_ref(q, k, v, args[n], causal, scale, alibi_slopes=slopes, key_padding_mask=kpm, **f)

            *grads, dbias, dsinks = _grads_with_graph(ref, (*primals, bias, sinks), (*needs[:n], need_bias, need_sinks), dout)
        else:
            *grads, dbias, dsinks = layout.backward(dout, *primals, out, lse, *options, *ctx.scalars, need_bias, need_sinks)
            grads = [g if need else None for g, need in zip(grads, needs[:n])]
            dbias = dbias if need_bias else None
            dsinks = dsinks if need_sinks else None
        rest = [None] * (N_OPTIONS + len(ctx.scalars))
        rest[BIAS], rest[SINKS] = dbias, dsinks
        return (*grads, *rest)

    return backward


def varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, slopes, sinks, seed, *scalars = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, slopes, sinks, seed, *output)
    ctx.max_seqlens, ctx.scalars = (max_q, max_k), tuple(scalars)
    ctx.mark_non_differentiable(output[1])


def varlen_backward(ctx, dout, _dlse):
    q, k, v, cu_q, cu_k, slopes, sinks, seed, out, lse = ctx.saved_tensors
    causal, scale, left, right, softcap, dropout_p = ctx.scalars
    needs = ctx.needs_input_grad
    need_sinks = bool(needs[8]) and sinks is not None
    if torch.is_grad_enabled():
        def ref(q, k, v, sinks):
            return varlen_attention_ref(q, k, v, cu_q, cu_k, causal, scale, alibi_slopes=slopes, window_size=(left, right),
                                        softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                                        dropout_seed=None if seed is None or dropout_p == 0 else int(seed.item()))

        dq, dk, dv, dsinks = _grads_with_graph(ref, (q, k, v, sinks), (*needs[:3], need_sinks), dout)
    else:
        dq, dk, dv, dsinks = _run("bwd_varlen", (dout, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, slopes, sinks, seed,
                                                 *ctx.scalars, need_sinks))
        dq, dk, dv = (g if need else None for g, need in zip((dq, dk, dv), needs[:3]))
        dsinks = dsinks if need_sinks else None
    return dq, dk, dv, None, None, None, None, None, dsinks, None, None, None, None, None, None, None


# ---- the Functions: the ops' autograd, new-style for torch.func ----------------------------------


def _with_signature(fn):
    """``fn`` with its signature computed once: ``Function.apply`` binds the arguments to
    ``forward``'s signature on every call, and ``inspect.signature`` returns a ``__signature__``
    as it is instead of rebuilding it (~20-40 us a call on the host)."""
    fn.__signature__ = inspect.signature(fn)
    return fn


def _function(name, layout):
    """A new-style Function with a layout's forward op as forward and the shared formulas.
    The ops' own autograd (register_autograd) is not enough: torch.func transforms need
    new-style Functions, and vmap gets our own error."""
    def forward(*args):
        return layout.forward(*args)

    return type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(_with_signature(forward)),
        setup_context=staticmethod(padded_setup_context(layout)),
        backward=staticmethod(padded_backward(layout)),
        vmap=_no_vmap(f"Flash{name[7:]}Func"),
        __doc__=f"(*primals, *OPTIONS, *SCALARS) -> (out, lse) through torch.ops.tritonflash.fwd{layout.name}.",
    ))


_FlashAttn = _function("_FlashAttn", SEPARATE)
_FlashAttnQKVPacked = _function("_FlashAttnQKVPacked", QKVPACKED)
_FlashAttnKVPacked = _function("_FlashAttnKVPacked", KVPACKED)


class _FlashAttnVarlen(torch.autograd.Function):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks,
    dropout_seed, *SCALARS) -> (out, lse) through torch.ops.tritonflash.fwd_varlen;
    ``max_seqlen_q/k`` size the launch."""

    @staticmethod
    @_with_signature
    def forward(*args):
        return _varlen_forward(*args)

    setup_context = staticmethod(varlen_setup_context)
    backward = staticmethod(varlen_backward)
    vmap = _no_vmap("FlashAttnVarlenFunc")


# ---- the fronts: validate, draw the dropout seed, apply ------------------------------------------


def _distinct(*args):
    """``args`` with a tensor that appears again (``cu_seqlens`` passed as both q's and k's,
    q = k = v) replaced by an alias view there: torch.compile cannot trace a Function given the
    same tensor twice (a graph break). Gradients flow through the view as usual. Compared with
    ``is``, not ``id()``: dynamo (torch 2.11) cannot take the id of a tensor made inside the
    compiled code (a packed input's unbind view, the dropout seed, a layer's projections) or
    of one read from a closure."""
    out = []
    for i, x in enumerate(args):
        if isinstance(x, torch.Tensor) and any(isinstance(y, torch.Tensor) and x is y for y in args[:i]):
            x = x.view_as(x)
        out.append(x)
    return out


def _apply(function, op, args):
    """``function.apply(*args)`` when autograd must record the call (grad mode on and an input
    requiring grad), else the forward op itself: same op, same result, no graph either way.
    torch.compile cannot trace a Function whose inputs need no gradient (dynamo's
    'AutogradFunctionContextVariable' has no proxy: inference under torch.no_grad,
    torch.inference_mode, a generate() decode step), and the op is all such a call needs.
    Both conditions are trace-time constants that dynamo guards on."""
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in args):
        return function.apply(*args)
    return op(*args)


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
        inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask,
                      window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_seed=seed,
                      attn_mask=attn_mask)
        out, lse = _apply(_FlashAttn, SEPARATE.forward, _distinct(q, k, v, *op_arguments(inp, bias, alibi_slopes, key_padding_mask)))
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
        q, k, v = unpack_qkv(qkv)
        inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask,
                      window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_seed=seed,
                      attn_mask=attn_mask)
        out, lse = _apply(_FlashAttnQKVPacked, QKVPACKED.forward, _distinct(qkv, *op_arguments(inp, bias, alibi_slopes, key_padding_mask)))
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
        k, v = unpack_kv(kv)
        inp = prepare(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask,
                      window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_seed=seed,
                      attn_mask=attn_mask)
        out, lse = _apply(_FlashAttnKVPacked, KVPACKED.forward, _distinct(q, kv, *op_arguments(inp, bias, alibi_slopes, key_padding_mask)))
        return (out, lse) if return_lse else out


class FlashAttnVarlenFunc:
    """``FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None, return_lse=False, *,
    window_size=(-1, -1), softcap=0.0, sinks=None, validate=True)``, as ``flash_attn_varlen_func``:
    q (total_q, h, d), k/v (total_k, h_k, d), int32 cumulative sequence lengths. Returns out
    (total_q, h, d) [and lse (h, total_q)]."""

    function = _FlashAttnVarlen

    @staticmethod
    def apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
              causal=False, alibi_slopes=None, return_lse=False, *, window_size=(-1, -1), softcap=0.0, sinks=None,
              validate=True):
        seed = _seed_for(dropout_p, q)
        inp, launch_q, launch_k = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                                 causal, softmax_scale, alibi_slopes, validate=validate,
                                                 window_size=window_size, softcap=softcap, sinks=sinks, dropout_seed=seed)
        f = inp.features
        args = _distinct(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, f.sinks, f.seed)
        out, lse = _apply(_FlashAttnVarlen, _varlen_forward,
                          (*args[:5], launch_q, launch_k, *args[5:], inp.causal, inp.softmax_scale, f.window[0], f.window[1],
                           f.softcap, f.dropout_p))
        return (out, lse) if return_lse else out
