"""Regression tests for the public API's failures found by outside probes (issue 11): double
backward, flash-attn 2's varlen calling convention, all-empty varlen batches, the varlen launch
size, non-finite ALiBi slopes, pad/unpad validation, torch.func, and TRITON_INTERPRET set after
import. Each test's docstring names the bug it guards.

Shapes are tiny: on the CPU tier every call runs the Triton kernels in the interpreter.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, ON_GPU
from tritonflash import (
    FlashAttnFunc,
    FlashAttnKVPackedFunc,
    FlashAttnQKVPackedFunc,
    FlashAttnVarlenFunc,
    attention_ref,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    gen_slopes,
    pad_input,
    unpad_input,
)

F16, BF16 = torch.float16, torch.bfloat16
autograd_mod = importlib.import_module("tritonflash.autograd")
SRC = Path(__file__).resolve().parents[1] / "src"


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _leaf(shape, dtype=F16):
    return torch.randn(shape, dtype=dtype, device=DEVICE).requires_grad_(True)


def _close(a, b):
    """Same math, but the fp16/bf16 partial gradients of an input used several times (a kv
    stacked from q) may be summed in another order: a few rounding steps of the dtype apart."""
    tol = {F16: 4e-3, BF16: 1.6e-2}.get(a.dtype)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _varlen_loop(q, k, v, cu_q, cu_k, causal, slopes):
    """Independent per-sequence oracle: attention_ref on each sequence (fp32 math)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        qi, ki, vi = q[cq[i]:cq[i + 1]][None], k[ck[i]:ck[i + 1]][None], v[ck[i]:ck[i + 1]][None]
        if qi.shape[1] == 0:
            continue
        if ki.shape[1] == 0:
            outs.append(qi[0] * 0)
            continue
        s = None if slopes is None else slopes[i]
        outs.append(attention_ref(qi, ki, vi, None, causal, alibi_slopes=s)[0])
    return torch.cat(outs)


# ---- 1. double backward ----------------------------------------------------------------------


def _sep_inputs():
    b, sq, sk, h, hk, d = 2, 5, 7, 4, 2, 16
    q, k, v = _leaf((b, sq, h, d)), _leaf((b, sk, hk, d)), _leaf((b, sk, hk, d))
    bias = (0.5 * torch.randn(1, h, sq, sk, device=DEVICE)).requires_grad_(True)
    kpm = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    kpm[1, -3:] = False
    slopes = gen_slopes(h, device=DEVICE)
    return q, k, v, bias, slopes, kpm


def _double_backward_cases():
    """(id, make() -> (ours(*leaves), ref(*leaves), leaves))."""

    def func(apply):
        def make():
            q, k, v, bias, slopes, kpm = _sep_inputs()
            if apply:
                def ours(q, k, v, bias):
                    return FlashAttnFunc.apply(q, k, v, bias, True, 0.3, slopes, kpm)
            else:
                def ours(q, k, v, bias):
                    return flash_attn_func(q, k, v, bias, True, 0.3, alibi_slopes=slopes, key_padding_mask=kpm)

            def ref(q, k, v, bias):
                return attention_ref(q, k, v, bias, True, 0.3, alibi_slopes=slopes, key_padding_mask=kpm)

            return ours, ref, (q, k, v, bias)
        return make

    def qkvpacked(apply):
        def make():
            qkv = _leaf((2, 6, 3, 2, 16), BF16)
            if apply:
                def ours(qkv):
                    return FlashAttnQKVPackedFunc.apply(qkv, None, True)
            else:
                def ours(qkv):
                    return flash_attn_qkvpacked_func(qkv, causal=True)

            def ref(qkv):
                return attention_ref(*qkv.unbind(2), None, True)

            return ours, ref, (qkv,)
        return make

    def kvpacked(apply):
        def make():
            q, kv = _leaf((2, 4, 4, 16)), _leaf((2, 6, 2, 2, 16))
            bias = torch.randn(2, 1, 1, 6, device=DEVICE).requires_grad_(True)
            if apply:
                def ours(q, kv, bias):
                    return FlashAttnKVPackedFunc.apply(q, kv, bias, False)
            else:
                def ours(q, kv, bias):
                    return flash_attn_kvpacked_func(q, kv, bias)

            def ref(q, kv, bias):
                return attention_ref(q, *kv.unbind(2), bias)

            return ours, ref, (q, kv, bias)
        return make

    def varlen(which):
        def make():
            lq, lk = [3, 0, 5, 2], [4, 2, 5, 0]
            cu_q, cu_k = _cu(lq), _cu(lk)
            h, hk, d = 4, 2, 16
            slopes = torch.rand(len(lq), h, device=DEVICE)
            q, k, v = _leaf((sum(lq), h, d)), _leaf((sum(lk), hk, d)), _leaf((sum(lk), hk, d))
            if which == "apply":
                def ours(q, k, v):
                    return FlashAttnVarlenFunc.apply(q, k, v, cu_q, cu_k, 5, 5, 0.0, None, True, slopes)
            else:
                def ours(q, k, v):
                    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True, alibi_slopes=slopes)

            def ref(q, k, v):
                return _varlen_loop(q, k, v, cu_q, cu_k, True, slopes)

            return ours, ref, (q, k, v)
        return make

    def varlen_packed():
        lens = [3, 6]
        cu = _cu(lens)
        qkv = _leaf((sum(lens), 3, 2, 16))

        def ours(qkv):
            return flash_attn_varlen_qkvpacked_func(qkv, cu, 6, 0.0, None, True)

        def ref(qkv):
            return _varlen_loop(*qkv.unbind(1), cu, cu, True, None)

        return ours, ref, (qkv,)

    def kv_from_q():
        q = _leaf((2, 5, 2, 16))

        def ours(q):
            return FlashAttnKVPackedFunc.apply(q, torch.stack([q, q], dim=2), None, True)

        def ref(q):
            return attention_ref(q, q, q, None, True)

        return ours, ref, (q,)

    return [
        pytest.param(func(False), id="flash_attn_func-bias-alibi-kpm-gqa-causal"),
        pytest.param(func(True), id="FlashAttnFunc.apply"),
        pytest.param(qkvpacked(False), id="flash_attn_qkvpacked_func-bf16"),
        pytest.param(qkvpacked(True), id="FlashAttnQKVPackedFunc.apply"),
        pytest.param(kvpacked(False), id="flash_attn_kvpacked_func-bias-b11s"),
        pytest.param(kvpacked(True), id="FlashAttnKVPackedFunc.apply"),
        pytest.param(kv_from_q, id="FlashAttnKVPackedFunc.apply-kv-stacked-from-q"),
        pytest.param(varlen("func"), id="flash_attn_varlen_func-empty-seqs-alibi"),
        pytest.param(varlen("apply"), id="FlashAttnVarlenFunc.apply"),
        pytest.param(varlen_packed, id="flash_attn_varlen_qkvpacked_func"),
    ]


@pytest.mark.parametrize("make", _double_backward_cases())
def test_double_backward_matches_reference(make):
    """Regression: backward with create_graph=True (a gradient penalty) returned gradients
    without a graph (dq.grad_fn None), so second derivatives were silently wrong (k.grad 84%
    off). Now the first-order gradients carry a graph and the second derivatives equal those
    of the differentiable reference."""
    ours, ref, leaves = make()
    out = ours(*leaves)
    dout = torch.randn_like(out).requires_grad_(True)
    grads = torch.autograd.grad(out, leaves, dout, create_graph=True)
    assert all(g.grad_fn is not None for g in grads), "first-order gradients must carry a graph"
    out_ref = ref(*leaves)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout, create_graph=True)
    for g, r in zip(grads, grads_ref):
        _close(g, r)
    # A gradient penalty, differentiated w.r.t. the inputs and w.r.t. dout.
    weights = [torch.randn_like(g) for g in grads]
    penalty = sum((w * g.float()).sum() + (g.float() ** 2).sum() for w, g in zip(weights, grads))
    penalty_ref = sum((w * g.float()).sum() + (g.float() ** 2).sum() for w, g in zip(weights, grads_ref))
    second = torch.autograd.grad(penalty, leaves + (dout,))
    second_ref = torch.autograd.grad(penalty_ref, leaves + (dout,))
    for x, s, r in zip(leaves + (dout,), second, second_ref):
        assert s.shape == x.shape and s.dtype == x.dtype
        _close(s, r)


def test_first_order_backward_still_runs_the_kernels(monkeypatch):
    """The reference recomputation is for create_graph=True only: a plain backward launches the
    backward kernels and never the reference."""
    calls = []
    inner = autograd_mod.attn_bwd

    def spy(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran in a first-order backward")

    monkeypatch.setattr(autograd_mod, "attn_bwd", spy)
    monkeypatch.setattr(autograd_mod, "attention_ref", no_ref)
    q, k, v, bias, slopes, kpm = _sep_inputs()
    out = flash_attn_func(q, k, v, bias, True, alibi_slopes=slopes, key_padding_mask=kpm)
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.randn_like(out))
    assert calls == [1] and all(g.grad_fn is None for g in grads)


# ---- 2. varlen calling convention ---------------------------------------------------------------


def _varlen_inputs():
    lens = [3, 6, 1]
    cu = _cu(lens)
    qkv = torch.randn(sum(lens), 3, 2, 16, dtype=F16, device=DEVICE)
    q, k, v = qkv.unbind(1)
    return qkv, q, k, v, cu, max(lens)


def test_varlen_positional_order_is_flash_attn_2s():
    """Regression: flash_attn_varlen_func(q, k, v, cu, cu, m, m, 0.0, causal=True) -- flash-attn
    2's convention, dropout_p at position 8 -- ran with softmax_scale=0.0 (uniform attention).
    Positions 8, 9, 10 are now dropout_p, softmax_scale, causal in all three varlen variants."""
    qkv, q, k, v, cu, m = _varlen_inputs()
    want = flash_attn_varlen_func(q, k, v, cu, cu, m, m, softmax_scale=0.3, causal=True)
    assert torch.equal(flash_attn_varlen_func(q, k, v, cu, cu, m, m, 0.0, 0.3, True), want)
    assert torch.equal(flash_attn_varlen_qkvpacked_func(qkv, cu, m, 0.0, 0.3, True), want)
    assert torch.equal(flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], cu, cu, m, m, 0.0, 0.3, True), want)
    assert torch.equal(FlashAttnVarlenFunc.apply(q, k, v, cu, cu, m, m, 0.0, 0.3, True), want)
    default_scale = flash_attn_varlen_func(q, k, v, cu, cu, m, m, 0.0, causal=True)
    torch.testing.assert_close(default_scale, _varlen_loop(q, k, v, cu, cu, True, None), atol=2e-3, rtol=0)


def _varlen_calls():
    def sep(*extra):
        qkv, q, k, v, cu, m = _varlen_inputs()
        return flash_attn_varlen_func(q, k, v, cu, cu, m, m, *extra)

    def qkvp(*extra):
        qkv, _, _, _, cu, m = _varlen_inputs()
        return flash_attn_varlen_qkvpacked_func(qkv, cu, m, *extra)

    def kvp(*extra):
        qkv, q, _, _, cu, m = _varlen_inputs()
        return flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], cu, cu, m, m, *extra)

    def apply(*extra):
        qkv, q, k, v, cu, m = _varlen_inputs()
        return FlashAttnVarlenFunc.apply(q, k, v, cu, cu, m, m, *extra)

    return [pytest.param(f, id=n) for f, n in ((sep, "varlen"), (qkvp, "varlen-qkvpacked"),
                                               (kvp, "varlen-kvpacked"), (apply, "FlashAttnVarlenFunc.apply"))]


@pytest.mark.parametrize("call", _varlen_calls())
@pytest.mark.parametrize("dropout_p, exc, match", [
    pytest.param(None, TypeError, r"^dropout_p must be a float, got NoneType", id="None-old-convention"),
    pytest.param(True, TypeError, r"^dropout_p must be a float, got bool", id="bool"),
    pytest.param("0.0", TypeError, r"^dropout_p must be a float, got str", id="str"),
    pytest.param(1.0, ValueError, r"^dropout_p must be in \[0, 1\), got 1\.0", id="1.0"),
    pytest.param(-0.1, ValueError, r"^dropout_p must be in \[0, 1\), got -0\.1", id="negative"),
    pytest.param(float("nan"), ValueError, r"^dropout_p must be in \[0, 1\), got nan", id="nan"),
])
def test_varlen_dropout_p_is_validated(call, dropout_p, exc, match):
    """dropout_p must be a number in [0, 1); the old order's softmax_scale=None at position 8
    (``..., m, m, None, True``) fails naming dropout_p instead of running."""
    with pytest.raises(exc, match=match):
        call(dropout_p)


# ---- all-empty varlen batches, launch size -----------------------------------------------------


def _no_kernels(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched for an empty batch")

    monkeypatch.setattr(autograd_mod, "attn_fwd", launched)
    monkeypatch.setattr(autograd_mod, "attn_bwd", launched)


@pytest.mark.parametrize("lq, lk", [
    pytest.param([0, 0, 0], [0, 0, 0], id="all-empty"),
    pytest.param([0, 0], [3, 4], id="no-queries"),
    pytest.param([2, 3], [0, 0], id="no-keys"),
])
def test_varlen_all_empty_batch_returns_zeros(monkeypatch, lq, lk):
    """Regression: empty sequences were allowed one by one, but a batch of only empty
    sequences was refused with 'seqlen_q and seqlen_k must be >= 1' (arguments varlen does not
    have). Now it returns out 0 and lse -inf (and zero gradients) without launching."""
    _no_kernels(monkeypatch)
    h, d = 2, 16
    q, k, v = _leaf((sum(lq), h, d)), _leaf((sum(lk), h, d)), _leaf((sum(lk), h, d))
    out, lse = flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), return_lse=True)
    assert out.shape == q.shape and (out == 0).all()
    assert lse.shape == (h, sum(lq)) and (lse == float("-inf")).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), allow_unused=True)
    for g, x in zip(grads, (q, k, v)):
        assert g is not None and g.shape == x.shape and (g == 0).all()


def test_varlen_launch_uses_the_longest_sequence(monkeypatch):
    """Regression: max_seqlen_q/k far above the longest sequence were passed on to the launch
    grid (programs with nothing to do). Any value >= the longest sequence is accepted, as in
    flash-attn, and the launch uses the longest sequence computed from cu_seqlens."""
    seen = []
    for name in ("attn_fwd", "attn_bwd"):
        inner = getattr(autograd_mod, name)

        def spy(*args, inner=inner, **kwargs):
            seen.append(kwargs["varlen"])
            return inner(*args, **kwargs)

        monkeypatch.setattr(autograd_mod, name, spy)
    lq, lk = [3, 7, 0], [5, 2, 4]
    q, k, v = _leaf((sum(lq), 2, 16)), _leaf((sum(lk), 2, 16)), _leaf((sum(lk), 2, 16))
    out = flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), 4096, 100_000, causal=True)
    out.backward(torch.randn_like(out))
    assert [(s.max_seqlen_q, s.max_seqlen_k) for s in seen] == [(7, 5), (7, 5)]
    seen.clear()
    exact = flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), 7, 5, causal=True)
    assert torch.equal(out, exact)


# ---- non-finite ALiBi slopes -----------------------------------------------------------------


def _slopes_calls():
    def sep(slopes):
        q = torch.randn(1, 3, 4, 16, dtype=F16, device=DEVICE)
        return flash_attn_func(q, q, q, alibi_slopes=slopes)

    def apply(slopes):
        q = torch.randn(1, 3, 4, 16, dtype=F16, device=DEVICE)
        return FlashAttnFunc.apply(q, q, q, None, False, None, slopes)

    def varlen(slopes):
        q = torch.randn(3, 4, 16, dtype=F16, device=DEVICE)
        cu = _cu([3])
        return flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, alibi_slopes=slopes)

    return [pytest.param(f, id=n) for f, n in ((sep, "flash_attn_func"), (apply, "FlashAttnFunc.apply"), (varlen, "varlen"))]


@pytest.mark.parametrize("call", _slopes_calls())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dispatch", ["kernels", "reference"])
def test_non_finite_alibi_slopes_raise(monkeypatch, call, bad, dispatch):
    """Regression: a NaN/inf ALiBi slope was accepted and gave NaN outputs. Now ValueError naming
    alibi_slopes and the offending entry, on the kernel and the reference path."""
    if dispatch == "reference" and (ON_GPU or call.__name__ == "apply"):
        pytest.skip("the reference path serves CPU tensors of the public functions")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if dispatch == "kernels" else "0")
    slopes = gen_slopes(4, device=DEVICE)
    slopes[2] = bad
    with pytest.raises(ValueError, match=rf"^alibi_slopes must be finite, got {bad} at index \(2,\)"):
        call(slopes)


def test_non_finite_slopes_check_is_skipped_while_compiling(monkeypatch):
    """The finiteness check reads the slopes on the host: under torch.compile tracing (and CUDA
    graph capture) it is skipped rather than breaking the graph."""
    from tritonflash.checks import check_alibi_slopes

    slopes = torch.full((4,), float("nan"), device=DEVICE)
    with pytest.raises(ValueError, match="finite"):
        check_alibi_slopes(slopes, 1, 4, slopes.device)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert check_alibi_slopes(slopes, 1, 4, slopes.device).shape == (1, 4)


# ---- pad / unpad -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, exc, match", [
    pytest.param(lambda: ([[1.0]], torch.ones(1, 1, dtype=torch.bool)), TypeError,
                 r"^hidden must be a torch\.Tensor, got list", id="hidden-list"),
    pytest.param(lambda: (torch.randn(2, 3, 4), [[True] * 3] * 2), TypeError,
                 r"^attention_mask must be a torch\.Tensor, got list", id="mask-list"),
    pytest.param(lambda: (torch.randn(5), torch.ones(5, dtype=torch.bool)), ValueError,
                 r"^hidden must have shape \(batch, seqlen, \.\.\.\), got \(5,\)", id="hidden-rank1"),
    pytest.param(lambda: (torch.randn(2, 3, 4), torch.zeros(2, 3)), TypeError,
                 r"^attention_mask must be bool or an integer dtype \(nonzero = keep\), got torch\.float32", id="mask-float"),
    pytest.param(lambda: (torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool)), ValueError,
                 r"^attention_mask must have shape \(batch, seqlen\) = \(2, 3\), got \(3, 2\)", id="mask-shape"),
    pytest.param(lambda: (torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError,
                 r"^attention_mask must be on hidden's device cpu, got meta", id="mask-device"),
])
def test_unpad_input_bad_input(args, exc, match):
    """Regression: unpad_input raised AttributeError / IndexError on bad input; now a
    TypeError / ValueError naming the argument, what was expected and what was received."""
    with pytest.raises(exc, match=match):
        unpad_input(*args())


@pytest.mark.parametrize("args, exc, match", [
    pytest.param(lambda: ([1.0], torch.tensor([0]), 1, 2), TypeError, r"^hidden must be a torch\.Tensor, got list", id="hidden-list"),
    pytest.param(lambda: (torch.randn(2, 4), [0, 1], 1, 2), TypeError, r"^indices must be a torch\.Tensor, got list", id="indices-list"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([0.0, 1.0]), 1, 2), TypeError,
                 r"^indices must have an integer dtype, got torch\.float32", id="indices-float"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([True, False]), 1, 2), TypeError,
                 r"^indices must have an integer dtype, got torch\.bool", id="indices-bool"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([[0, 1]]), 1, 2), ValueError,
                 r"^indices must have shape \(total,\), got \(1, 2\)", id="indices-rank2"),
    pytest.param(lambda: (torch.randn(3, 4), torch.tensor([0, 1]), 1, 2), ValueError,
                 r"^hidden must have one row per index \(2\), got 3 rows", id="rows-count"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([0, 9]), 2, 3), ValueError,
                 r"^indices must lie in \[0, batch \* seqlen\) = \[0, 6\), got values in \[0, 9\]", id="index-too-large"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([-1, 0]), 2, 3), ValueError,
                 r"^indices must lie in \[0, batch \* seqlen\) = \[0, 6\), got values in \[-1, 0\]", id="index-negative"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([0, 1]), 2.0, 3), TypeError, r"^batch must be an int, got float", id="batch-float"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([0, 1]), 2, True), TypeError, r"^seqlen must be an int, got bool", id="seqlen-bool"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([0, 1]), -1, 3), ValueError, r"^batch must be >= 0, got -1", id="batch-negative"),
    pytest.param(lambda: (torch.randn(2, 4), torch.tensor([0, 1], device="meta"), 2, 3), ValueError,
                 r"^indices must be on hidden's device cpu, got meta", id="indices-device"),
])
def test_pad_input_bad_input(args, exc, match):
    """Regression: pad_input raised IndexError (out-of-range index: on a GPU a device-side
    assert) or AttributeError; now a TypeError / ValueError naming the argument."""
    with pytest.raises(exc, match=match):
        pad_input(*args())


def test_pad_unpad_accept_integer_masks_and_empty_batches():
    """HF-style int64 masks are masks (nonzero = keep); an all-padded batch round-trips."""
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    xu, idx, cu, mx = unpad_input(x, mask)
    assert xu.shape == (2, 3) and cu.tolist() == [0, 2, 2] and mx == 2
    assert torch.equal(pad_input(xu, idx, 2, 4)[mask.bool()], x[mask.bool()])
    xu, idx, cu, mx = unpad_input(x, torch.zeros(2, 4, dtype=torch.bool))
    assert xu.shape == (0, 3) and mx == 0 and (pad_input(xu, idx, 2, 4) == 0).all()


# ---- torch.func ----------------------------------------------------------------------------------


def _func_cases():
    def sep(q):
        k = v = q.detach()[:, :3]
        return FlashAttnFunc.apply(q, k, v, None, True)

    def qkvp(q):
        return FlashAttnQKVPackedFunc.apply(torch.stack([q, q, q], dim=2), None, True)

    def kvp(q):
        return FlashAttnKVPackedFunc.apply(q, torch.stack([q, q], dim=2), None, True)

    def varlen(q):
        flat = q.flatten(0, 1)
        cu = _cu([q.shape[1]] * q.shape[0])
        return FlashAttnVarlenFunc.apply(flat, flat, flat, cu, cu, q.shape[1], q.shape[1], 0.0, None, True)

    def ref(fn):
        def r(q):
            if fn is sep:
                return attention_ref(q, q[:, :3].detach(), q[:, :3].detach(), None, True)
            out = attention_ref(q, q, q, None, True)
            return out.flatten(0, 1) if fn is varlen else out
        return r

    return [pytest.param(f, ref(f), id=n) for f, n in ((sep, "FlashAttnFunc"), (qkvp, "FlashAttnQKVPackedFunc"),
                                                       (kvp, "FlashAttnKVPackedFunc"), (varlen, "FlashAttnVarlenFunc"))]


@pytest.mark.parametrize("fn, ref", _func_cases())
def test_torch_func_grad_matches_reference(fn, ref):
    """Regression: torch.func.grad over our autograd Functions failed with torch's internal
    'must override the setup_context staticmethod'. They are new-style Functions now; under
    torch.func.grad the backward runs through the differentiable reference (it asks for a graph)."""
    q = torch.randn(2, 5, 2, 16, dtype=F16, device=DEVICE)
    w = torch.randn(2, 5, 2, 16, dtype=F16, device=DEVICE)

    def loss(f):
        def weighted_sum(q):
            out = f(q)
            return (out.float() * w.reshape(out.shape).float()).sum()
        return weighted_sum

    got = torch.func.grad(loss(fn))(q)
    want = torch.func.grad(loss(ref))(q)
    _close(got, want)


@pytest.mark.parametrize("fn, ref", _func_cases())
def test_torch_func_vmap_raises_our_error(fn, ref):
    """Regression: torch.func.vmap failed with torch's internal setup_context message. Now a
    NotImplementedError of ours that says how to batch instead."""
    q = torch.randn(3, 2, 5, 2, 16, dtype=F16, device=DEVICE)
    with pytest.raises(NotImplementedError, match=r"torch\.func\.vmap over Flash\w+ is not supported.*batch dimension"):
        torch.func.vmap(fn)(q)


# ---- TRITON_INTERPRET set after import ------------------------------------------------------------


def test_triton_interpret_set_after_import_raises_clear_error():
    """Regression: setting TRITON_INTERPRET=1 after ``import tritonflash`` made CPU tensors take
    the kernel path with kernels built for the GPU ('0 active drivers'). Now a RuntimeError says
    it must be set before importing, after validation (bad input still gets its own error); an
    autograd class given CPU tensors without the interpreter says how to run them."""
    code = "\n".join([
        "import os, torch, tritonflash",
        "q = torch.randn(1, 3, 2, 16, dtype=torch.float16)",
        "def show(f):",
        "    try:",
        "        f()",
        "        print('NO ERROR')",
        "    except (RuntimeError, TypeError) as e:",
        "        print(type(e).__name__ + ':', e)",
        "show(lambda: tritonflash.FlashAttnFunc.apply(q, q, q))",
        "os.environ['TRITON_INTERPRET'] = '1'",
        "show(lambda: tritonflash.flash_attn_func(q, q, q))",
        "show(lambda: tritonflash.FlashAttnFunc.apply(q, q, q))",
        "show(lambda: tritonflash.flash_attn_func(q, q, q, causal=1))",
    ])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line]
    assert len(lines) == 4, res.stdout
    assert lines[0].startswith("RuntimeError: the Triton kernels need CUDA tensors, got q on cpu"), lines[0]
    assert "TRITON_INTERPRET=1 must be set before importing tritonflash" in lines[0], lines[0]
    for line in lines[1:3]:
        assert line.startswith("RuntimeError: TRITON_INTERPRET=1 was set after tritonflash was imported"), line
        assert "Set TRITON_INTERPRET=1 before importing tritonflash" in line, line
    assert lines[3] == "TypeError: causal must be a bool, got int", lines[3]
