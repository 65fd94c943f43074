"""The reference oracle (``attention_ref``) checked on its own: gradients by finite differences
in float64, the semantics table of docs/semantics.md against a loop over rows, fully masked rows, and
GQA. Every kernel test trusts this file."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import tritonflash
from tritonflash import attention_ref
from tritonflash.bias import MASKED_BIAS

F64 = torch.float64
B, H = 2, 3


def make(b, sq, sk, h, d=4, hk=None, dtype=F64, requires_grad=True):
    hk = h if hk is None else hk
    q = torch.randn(b, sq, h, d, dtype=dtype)
    k = torch.randn(b, sk, hk, d, dtype=dtype)
    v = torch.randn(b, sk, hk, d, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def bias_of(shape, b, h, sq, sk, dtype=F64):
    sizes = dict(b=b, h=h, sq=sq, sk=sk)
    return torch.randn(tuple(sizes.get(s, s) for s in shape), dtype=dtype)


BIAS_SHAPES = [
    pytest.param((1, "h", 1, "sk"), id="bias-1-h-1-sk"),
    pytest.param(("b", 1, 1, "sk"), id="bias-b-1-1-sk"),
    pytest.param((1, "h", "sq", "sk"), id="bias-1-h-sq-sk"),
    pytest.param(("b", "h", "sq", "sk"), id="bias-b-h-sq-sk"),
    pytest.param(("sq", "sk"), id="bias-sq-sk"),
]
SEQLENS = [
    pytest.param(3, 5, id="sq3-sk5"),
    pytest.param(5, 2, id="sq5-sk2"),
]
CAUSAL = [pytest.param(False, id="full"), pytest.param(True, id="causal")]


def gradcheck(fn, inputs, fast_mode=True):
    """Finite differences in float64. The callers pass upcast=False: upcast=True computes in
    float32 even for float64 inputs (see test_upcast_keeps_float64). fast_mode compares
    random projections of the Jacobians (torch's fast gradcheck), which keeps the CPU tier fast;
    test_gradcheck_full_jacobian checks whole Jacobians on a few cases."""
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast_mode)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS)
@pytest.mark.parametrize("shape", BIAS_SHAPES)
def test_gradcheck_with_bias(shape, seqlen_q, seqlen_k, causal):
    """d(out)/d(q, k, v, bias) by finite differences, for every bias shape the kernels support
    (broadcast dims summed in the bias's gradient). sq5-sk2 causal has fully masked rows."""
    q, k, v = make(B, seqlen_q, seqlen_k, H)
    bias = bias_of(shape, B, H, seqlen_q, seqlen_k).requires_grad_()
    gradcheck(lambda q, k, v, bias: attention_ref(q, k, v, bias, causal, upcast=False), (q, k, v, bias))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS)
@pytest.mark.parametrize("slopes_shape", [pytest.param(("h",), id="slopes-h"), pytest.param(("b", "h"), id="slopes-b-h")])
def test_gradcheck_with_alibi_slopes(slopes_shape, seqlen_q, seqlen_k, causal):
    q, k, v = make(B, seqlen_q, seqlen_k, H)
    slopes = torch.rand(tuple(dict(b=B, h=H)[s] for s in slopes_shape), dtype=torch.float32) + 0.1
    bias = bias_of((1, "h", 1, "sk"), B, H, seqlen_q, seqlen_k).requires_grad_()
    gradcheck(lambda q, k, v, bias: attention_ref(q, k, v, bias, causal, upcast=False, alibi_slopes=slopes), (q, k, v, bias))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS)
def test_gradcheck_with_key_padding_mask(seqlen_q, seqlen_k, causal):
    """Batch 0 keeps its first key only; batch 1 keeps none (all its rows are dead)."""
    q, k, v = make(B, seqlen_q, seqlen_k, H)
    kpm = torch.zeros(B, seqlen_k, dtype=torch.bool)
    kpm[0, 0] = True
    bias = bias_of(("b", "h", "sq", "sk"), B, H, seqlen_q, seqlen_k).requires_grad_()
    gradcheck(lambda q, k, v, bias: attention_ref(q, k, v, bias, causal, upcast=False, key_padding_mask=kpm), (q, k, v, bias))


@pytest.mark.parametrize("case", [
    pytest.param("no-bias", id="no-bias"),
    pytest.param("scale", id="softmax_scale-0.7"),
    pytest.param("gqa", id="gqa-h4-hk2"),
    pytest.param("mqa-causal", id="mqa-h3-hk1-causal"),
    pytest.param("neg-inf-entries", id="bias-with--inf-entries"),
    pytest.param("neg-inf-rows", id="bias--inf-whole-rows"),
    pytest.param("reorder", id="reorder_ops"),
])
def test_gradcheck_other_cases(case):
    sq, sk = 4, 3
    kwargs = dict(upcast=False)
    causal = False
    if case == "gqa":
        q, k, v = make(B, sq, sk, 4, hk=2)
    elif case == "mqa-causal":
        q, k, v = make(B, sq, sk, 3, hk=1)
        causal = True
    else:
        q, k, v = make(B, sq, sk, H)
    inputs = [q, k, v]
    if case == "scale":
        kwargs["softmax_scale"] = 0.7
    if case == "reorder":
        kwargs["reorder_ops"] = True
    if case.startswith("neg-inf"):
        bias = torch.randn(B, H, sq, sk, dtype=F64)
        if case == "neg-inf-entries":
            bias[0, 1, :, 1] = -math.inf
            bias[1, 2, 3, :2] = -math.inf
        else:
            bias[0, 1, 2, :] = -math.inf
            bias[1, :, 0, :] = -math.inf
        inputs.append(bias.requires_grad_())
        gradcheck(lambda q, k, v, bias: attention_ref(q, k, v, bias, causal, **kwargs), tuple(inputs))
    else:
        gradcheck(lambda q, k, v: attention_ref(q, k, v, None, causal, **kwargs), tuple(inputs))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seqlen_q, seqlen_k", [pytest.param(2, 3, id="sq2-sk3"), pytest.param(3, 2, id="sq3-sk2")])
def test_gradcheck_full_jacobian(seqlen_q, seqlen_k, causal):
    """Whole Jacobians (not projections) of q, k, v and a (b, 1, sq, sk) bias, small shapes."""
    q, k, v = make(2, seqlen_q, seqlen_k, 2, d=2)
    bias = torch.randn(2, 1, seqlen_q, seqlen_k, dtype=F64, requires_grad=True)
    gradcheck(lambda q, k, v, bias: attention_ref(q, k, v, bias, causal, upcast=False), (q, k, v, bias), fast_mode=False)


def test_upcast_keeps_float64():
    """The default upcast=True computes in fp32 'at least': float64 inputs must not be rounded
    to float32 (gradcheck of the default call would fail)."""
    q, k, v = make(1, 3, 4, 2)
    out64 = attention_ref(q, k, v, upcast=False)
    out_default = attention_ref(q, k, v)
    assert torch.equal(out_default, out64)


# ---- semantics against a loop over rows ------------------------------------------------------


def loop_attention(q, k, v, bias, causal, scale, slopes, kpm):
    """docs/semantics.md's table written as a loop in float64: one query row at a time."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, h, d, dtype=F64)
    lse = torch.full((b, h, sq), -math.inf, dtype=F64)
    bias4 = None if bias is None else bias.double().reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(b, h, sq, sk)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                scores = []
                for j in range(sk):
                    visible = (not causal or j <= i + sk - sq) and (kpm is None or bool(kpm[bi, j]))
                    s = float(q[bi, i, hi].double() @ k[bi, j, kh].double()) * scale
                    if bias4 is not None:
                        s += float(bias4[bi, hi, i, j])
                    if slopes is not None:
                        # ALiBi is applied in fp32 (docs/semantics.md): an fp32 product, exact distance.
                        slope = slopes[bi, hi] if slopes.dim() == 2 else slopes[hi]
                        s -= float(slope.float() * abs(i + sk - sq - j))
                    scores.append(s if visible else -math.inf)
                m = max(scores)
                if m == -math.inf:
                    continue
                w = [math.exp(s - m) for s in scores]
                total = sum(w)
                lse[bi, hi, i] = m + math.log(total)
                for j in range(sk):
                    out[bi, i, hi] += (w[j] / total) * v[bi, j, kh].double()
    return out, lse


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seqlen_q, seqlen_k", [
    pytest.param(3, 5, id="sq3-sk5"),
    pytest.param(5, 3, id="sq5-sk3-dead-rows"),
    pytest.param(4, 4, id="sq4-sk4"),
    pytest.param(1, 4, id="sq1-sk4-decode"),
])
@pytest.mark.parametrize("extras", [
    pytest.param("plain", id="plain"),
    pytest.param("bias", id="bias-b-1-sq-sk"),
    pytest.param("alibi", id="alibi-b-h"),
    pytest.param("kpm-gqa-scale", id="kpm-gqa-h4-hk2-scale0.3"),
    pytest.param("all", id="bias-alibi-kpm"),
])
def test_matches_row_loop(seqlen_q, seqlen_k, causal, extras):
    """Bottom-right causal alignment, bias broadcast, ALiBi distances, key padding, GQA head
    mapping, softmax_scale default 1/sqrt(d), lse natural log: the oracle agrees with a loop."""
    h, hk, d = 4, (2 if extras == "kpm-gqa-scale" else 4), 5
    q, k, v = make(B, seqlen_q, seqlen_k, h, d=d, hk=hk, requires_grad=False)
    bias = slopes = kpm = None
    scale = 0.3 if extras == "kpm-gqa-scale" else None
    if extras in ("bias", "all"):
        bias = torch.randn(B, 1, seqlen_q, seqlen_k)
    if extras in ("alibi", "all"):
        slopes = torch.rand(B, h) + 0.1
    if extras in ("kpm-gqa-scale", "all"):
        kpm = torch.rand(B, seqlen_k) > 0.4
        kpm[0] = True
    out, lse = attention_ref(q, k, v, bias, causal, scale, upcast=False, alibi_slopes=slopes, key_padding_mask=kpm, return_lse=True)
    out_loop, lse_loop = loop_attention(q, k, v, bias, causal, scale if scale is not None else d ** -0.5, slopes, kpm)
    torch.testing.assert_close(out, out_loop, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_loop))
    torch.testing.assert_close(lse.double(), lse_loop, rtol=1e-6, atol=1e-6)  # lse is fp32


# ---- fully masked rows -----------------------------------------------------------------------


def _dead_row_case(case, dtype):
    """(q, k, v, kwargs, dead) with dead a (b, h, sq) bool of the rows with no visible key."""
    b, h, sq, sk = 2, 3, 5, 4
    q, k, v = make(b, sq, sk, h, d=8, dtype=dtype)
    kwargs = {}
    dead = torch.zeros(b, h, sq, dtype=torch.bool)
    if case == "neg-inf-bias-rows":
        bias = torch.randn(b, h, sq, sk, dtype=torch.float32)
        bias[0, 1, 2, :] = -math.inf
        bias[1, :, 4, :] = -math.inf
        dead[0, 1, 2] = True
        dead[1, :, 4] = True
        kwargs["bias"] = bias.requires_grad_()
    elif case == "neg-inf-bias-broadcast":
        bias = torch.zeros(b, 1, sq, 1)
        bias[1, 0, 1] = -math.inf
        dead[1, :, 1] = True
        kwargs["bias"] = bias.requires_grad_()
    elif case == "finfo-min-twice":
        # A mask built as the sum of two finfo.min masks overflows to -inf in its own dtype.
        mask = torch.zeros(b, 1, 1, sk, dtype=torch.float16)
        mask[0] = torch.finfo(torch.float16).min
        kwargs["bias"] = (mask + mask).requires_grad_()
        dead[0] = True
    elif case in ("finfo-min-fp32", "finfo-min-bf16"):
        # finfo.min-style masks of fp32 / bf16 are at or below bias.MASKED_BIAS: masked.
        bdtype = torch.float32 if case.endswith("fp32") else torch.bfloat16
        bias = torch.randn(b, h, sq, sk).to(bdtype)
        bias[1, 2, 3, :] = torch.finfo(bdtype).min
        dead[1, 2, 3] = True
        kwargs["bias"] = bias.requires_grad_()
    elif case == "causal-sq-gt-sk":
        kwargs["causal"] = True
        dead[:, :, : sq - sk] = True
    elif case == "kpm-all-false":
        kpm = torch.ones(b, sk, dtype=torch.bool)
        kpm[1] = False
        kwargs["key_padding_mask"] = kpm
        dead[1] = True
    else:
        raise AssertionError(case)
    return q, k, v, kwargs, dead


DEAD_CASES = [
    pytest.param("neg-inf-bias-rows", id="neg-inf-bias-rows"),
    pytest.param("neg-inf-bias-broadcast", id="neg-inf-bias-b-1-sq-1"),
    pytest.param("finfo-min-twice", id="fp16-finfo-min-twice"),
    pytest.param("finfo-min-fp32", id="fp32-finfo-min-row"),
    pytest.param("finfo-min-bf16", id="bf16-finfo-min-row"),
    pytest.param("causal-sq-gt-sk", id="causal-sq5-sk4"),
    pytest.param("kpm-all-false", id="key-padding-all-false"),
]
PRECISIONS = [
    pytest.param(F64, False, id="fp64"),
    pytest.param(torch.float16, True, id="fp16-upcast"),
    pytest.param(torch.bfloat16, False, id="bf16-no-upcast"),
]


@pytest.mark.parametrize("dtype, upcast", PRECISIONS)
@pytest.mark.parametrize("case", DEAD_CASES)
def test_fully_masked_rows(case, dtype, upcast):
    """A row with no visible key gives out 0, lse -inf and zero gradients, never NaN; its
    dout does not leak into dk, dv or the bias gradient (docs/semantics.md, fully masked rows)."""
    q, k, v, kwargs, dead = _dead_row_case(case, dtype)
    assert dead.any() and not dead.all()
    bias = kwargs.get("bias")
    out, lse = attention_ref(q, k, v, upcast=upcast, return_lse=True, **kwargs)
    dead_bshd = dead.transpose(1, 2)  # [b, sq, h]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[dead_bshd] == 0).all()
    assert (lse[dead] == -math.inf).all() and torch.isfinite(lse[~dead]).all()
    assert lse.dtype == torch.promote_types(q.dtype, torch.float32)
    assert torch.isfinite(out[~dead_bshd]).all()

    wanted = [q, k, v] + ([bias] if bias is not None else [])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, wanted, dout, retain_graph=True)
    for name, g in zip("qkvb", grads):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
    assert (grads[0][dead_bshd] == 0).all(), "dq of a dead row must be 0"
    # Dead rows contribute nothing: the same gradients with their dout zeroed.
    live_grads = torch.autograd.grad(out, wanted, dout.masked_fill(dead_bshd[..., None], 0))
    for name, g, g_live in zip("qkvb", grads, live_grads):
        assert torch.equal(g, g_live), f"d{name}: a dead row's dout leaked into the gradient"
    if bias is not None and bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1]):
        assert (grads[3][dead] == 0).all(), "dbias of a dead row must be 0"


@pytest.mark.parametrize("value", [
    pytest.param(torch.finfo(torch.float16).min, id="fp16-finfo-min"),
    pytest.param(-2.2e38, id="just-above-MASKED_BIAS"),
])
def test_very_negative_bias_row_is_not_a_dead_row(value):
    """A bias above bias.MASKED_BIAS over a whole row (fp16's finfo.min, or -2.2e38) is an
    ordinary finite bias: the row stays alive (finite lse, finite output, no NaN). A per-row
    constant does not change softmax, so the row is the unbiased attention, up to the rounding
    of scores of that magnitude (none at -65504 in fp32; every score equal at -2.2e38)."""
    assert value > MASKED_BIAS
    q, k, v = make(1, 3, 4, 2, d=8, dtype=torch.float32, requires_grad=False)
    bias = torch.zeros(1, 1, 3, 4)
    bias[0, 0, 1] = value
    out, lse = attention_ref(q, k, v, bias, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if value > -1e6:
        torch.testing.assert_close(out[0, 1], attention_ref(q, k, v)[0, 1], rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(out[0, 1], v[0].mean(0), rtol=1e-5, atol=1e-6)


# ---- GQA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nheads, nheads_k", [
    pytest.param(6, 2, id="h6-hk2"),
    pytest.param(4, 1, id="mqa-h4-hk1"),
    pytest.param(4, 4, id="mha-h4-hk4"),
])
@pytest.mark.parametrize("causal", CAUSAL)
def test_gqa_equals_repeated_kv(nheads, nheads_k, causal):
    """GQA is attention with each k/v head repeated for its group of nheads // nheads_k
    consecutive q heads (repeat_interleave, not tile); gradients of k/v sum over the group."""
    q, k, v = make(B, 3, 5, nheads, d=4, hk=nheads_k)
    g = nheads // nheads_k
    bias = torch.randn(1, nheads, 1, 5, dtype=F64)
    out = attention_ref(q, k, v, bias, causal, upcast=False)
    out_rep = attention_ref(q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2), bias, causal, upcast=False)
    assert torch.equal(out, out_rep)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(out_rep, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for h in range(nheads):
        kv_h = slice(h // g, h // g + 1)
        one = attention_ref(q[:, :, h:h + 1], k[:, :, kv_h], v[:, :, kv_h], bias[:, h:h + 1], causal, upcast=False)
        torch.testing.assert_close(out[:, :, h:h + 1], one, rtol=1e-12, atol=1e-12)


# ---- precision contract ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_precision_contract(dtype):
    """upcast=True is the fp32 oracle, upcast=False (reorder_ops or not) stays in the input
    dtype; out always has q's dtype, lse is fp32. The oracle is closer to float64 math."""
    q, k, v = make(2, 17, 19, 3, d=16, dtype=dtype, requires_grad=False)
    bias = torch.randn(1, 3, 17, 19)
    exact = attention_ref(q.double(), k.double(), v.double(), bias.double(), True, upcast=False)
    errs = {}
    for upcast, reorder in ((True, False), (False, False), (False, True)):
        out, lse = attention_ref(q, k, v, bias, True, upcast=upcast, reorder_ops=reorder, return_lse=True)
        assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 3, 17)
        errs[upcast, reorder] = (out.double() - exact).abs().max().item()
    assert errs[True, False] <= errs[False, False] and errs[True, False] <= errs[False, True]


def test_reference_and_bias_never_import_triton():
    """docs/semantics.md: reference.py (the CPU fallback and oracle) and bias.py are pure torch."""
    src = Path(tritonflash.__file__).parent
    for name in ("reference.py", "bias.py"):
        tree = ast.parse((src / name).read_text())
        mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if "triton" in m.split(".") or m.startswith("triton") or "kernels" in m], (name, mods)
