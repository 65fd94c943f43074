"""The original module's low-level functions, ``_flash_attn_forward`` / ``_flash_attn_backward``
(issue 13, part 0): bitwise the same out, lse and gradients as ``flash_attn_func``, gradients
written into given buffers (views of a packed one), and block-by-block use as in ring
attention (two key halves combined by their lse). Tiny shapes: the interpreter on the CPU tier.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from tritonflash import _flash_attn_backward, _flash_attn_forward, flash_attn_func, gen_slopes

F16 = torch.float16


def _t(*shape, dtype=F16):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _public(q, k, v, bias, dout, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    sinks = kw.pop("sinks", None)
    sinks_leaf = None if sinks is None else sinks.detach().clone().requires_grad_(True)
    out, lse = flash_attn_func(*leaves, True, 0.3, return_lse=True, sinks=sinks_leaf, **kw)
    wanted = leaves + ([sinks_leaf] if sinks is not None else [])
    grads = torch.autograd.grad(out, wanted, dout)
    return out, lse, grads


@pytest.mark.parametrize("features", [
    pytest.param({}, id="bias-alibi-kpm"),
    pytest.param({"window_size": (2, 0), "softcap": 4.0, "dropout_p": 0.25}, id="window-softcap-dropout"),
    pytest.param({"sinks": True}, id="sinks"),
])
def test_bitwise_equal_to_flash_attn_func(features):
    b, sq, sk, h, hk, d = 2, 5, 7, 4, 2, 16
    q, k, v = _t(b, sq, h, d), _t(b, sk, hk, d), _t(b, sk, hk, d)
    bias = _t(1, h, sq, sk, dtype=torch.float32)
    kpm = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    kpm[0, -3:] = False
    kw = dict(alibi_slopes=gen_slopes(h, device=DEVICE), key_padding_mask=kpm)
    features = dict(features)
    if features.pop("sinks", False):
        kw["sinks"] = _t(h, dtype=torch.float32)
    kw.update(features)
    dout = _t(b, sq, h, d)
    seed = None
    if kw.get("dropout_p", 0.0) > 0:
        torch.manual_seed(11)
    want_out, want_lse, want_grads = _public(q, k, v, bias, dout, **kw)
    if kw.get("dropout_p", 0.0) > 0:
        torch.manual_seed(11)  # the public function draws its seed the same way
        seed = torch.randint(0, 2**62, (1,), device=DEVICE, dtype=torch.int64)

    out, lse, scale = _flash_attn_forward(q, k, v, bias, True, 0.3, dropout_seed=seed, **kw)
    assert scale == 0.3 and torch.equal(out, want_out) and torch.equal(lse, want_lse)
    # dq, dk, dv as views of one packed buffer (k and v share shapes here)
    dq = torch.full_like(q, float("nan"))
    dkv = torch.full((b, sk, 2, hk, d), float("nan"), dtype=F16, device=DEVICE)
    dk, dv = dkv.unbind(2)
    dsinks = None if "sinks" not in kw else torch.full((h,), float("nan"), device=DEVICE)
    dbias = _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, bias, True, 0.3, dropout_seed=seed, bias_grad=True,
                                 dsinks=dsinks, **kw)
    got = [dq, dk, dv, dbias] + ([dsinks] if dsinks is not None else [])
    for g, w in zip(got, want_grads):
        assert torch.equal(g, w)


def test_bias_grad_defaults_to_requires_grad():
    q = _t(1, 3, 2, 16)
    bias = _t(1, 2, 3, 3, dtype=torch.float32)
    out, lse, _ = _flash_attn_forward(q, q, q, bias)
    grads = [torch.empty_like(q) for _ in range(3)]
    assert _flash_attn_backward(torch.ones_like(out), q, q, q, out, lse, *grads, bias) is None
    dbias = _flash_attn_backward(torch.ones_like(out), q, q, q, out, lse, *grads, bias.requires_grad_(True))
    assert dbias.shape == bias.shape and dbias.grad_fn is None


def test_compiled_fullgraph_equals_eager():
    """torch.compile(fullgraph=True) of code calling the low-level functions (a ring step)
    compiles (the kernels through the custom ops, not traced) and gives eager's out, lse and
    gradients, written into the given buffers, bitwise."""
    b, s, h, d = 1, 6, 2, 16
    q, k, v, dout = _t(b, s, h, d), _t(b, s, h, d), _t(b, s, h, d), _t(b, s, h, d)
    bias, sinks = _t(1, h, s, s, dtype=torch.float32), torch.randn(h, device=DEVICE)
    kpm = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    kpm[:, -2:] = False

    def step(q, k, v, bias, sinks, dout):
        out, lse, _ = _flash_attn_forward(q, k, v, bias, True, 0.3, key_padding_mask=kpm, sinks=sinks)
        buf = torch.empty(b, s, 3, h, d, dtype=q.dtype, device=q.device)
        dq, dk, dv = buf.unbind(2)
        dsinks = torch.empty(h, device=q.device)
        dbias = _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, bias, True, 0.3, key_padding_mask=kpm, sinks=sinks,
                                     bias_grad=True, dsinks=dsinks)
        return out, lse, buf, dbias, dsinks

    want = step(q, k, v, bias, sinks, dout)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, bias, sinks, dout)
    for name, g, w in zip(("out", "lse", "dqkv", "dbias", "dsinks"), got, want):
        assert torch.equal(g, w), name


def test_ring_attention_two_key_blocks_combined_by_lse():
    """Ring / context-parallel use: attend to each half of the keys, then merge by lse; the
    merged output equals attention over all keys, and so do the gradients summed over the
    blocks (each block's backward uses the merged out and lse)."""
    b, sq, sk, h, d = 2, 6, 10, 2, 16
    q, k, v = _t(b, sq, h, d), _t(b, sk, h, d), _t(b, sk, h, d)
    dout = _t(b, sq, h, d)
    halves = [(k[:, :5], v[:, :5]), (k[:, 5:], v[:, 5:])]
    outs, lses = zip(*[_flash_attn_forward(q, kk, vv)[:2] for kk, vv in halves])
    lse = torch.logaddexp(lses[0], lses[1])
    weights = [torch.exp(x - lse).transpose(1, 2)[..., None] for x in lses]  # (b, sq, h, 1)
    out = sum(w * o.float() for w, o in zip(weights, outs)).to(F16)
    full_out, full_lse, _ = _flash_attn_forward(q, k, v)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, full_out, rtol=2e-3, atol=2e-3)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=DEVICE)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for i, (kk, vv) in enumerate(halves):
        dqi, dki, dvi = torch.empty_like(q), dk[:, 5 * i:5 * i + 5], dv[:, 5 * i:5 * i + 5]
        _flash_attn_backward(dout, q, kk, vv, full_out, full_lse, dqi, dki, dvi)
        dq += dqi.float()
    full = [torch.empty_like(x) for x in (q, k, v)]
    _flash_attn_backward(dout, q, k, v, full_out, full_lse, *full)
    torch.testing.assert_close(dq.to(F16), full[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dk, full[1], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dv, full[2], rtol=2e-3, atol=2e-3)


def _lse(q, shape=(1, 2, 3)):
    # On q's device: a CPU lse with CUDA q fails the device check first (the GPU tier).
    return torch.zeros(shape, device=q.device)


@pytest.mark.parametrize("call, exc, match", [
    pytest.param(lambda q: _flash_attn_forward(q, q, q, dropout_p=0.1), ValueError, r"^dropout_seed is required", id="seed"),
    pytest.param(lambda q: _flash_attn_forward(q.float(), q, q), TypeError, r"^q must be float16 or bfloat16", id="dtype"),
    pytest.param(lambda q: _flash_attn_backward(q, q, q, q, q, _lse(q), q.clone(), q.clone(), q.clone()[..., :8]),
                 ValueError, r"^dv must have shape \(1, 3, 2, 16\)", id="dv-shape"),
    pytest.param(lambda q: _flash_attn_backward(q, q, q, q, q, _lse(q), q.clone(), q.clone(),
                                                torch.empty(1, 3, 2, 32, dtype=F16, device=q.device)[..., ::2]),
                 ValueError, r"^dv must have a unit stride", id="dv-stride"),
    pytest.param(lambda q: _flash_attn_backward(q, q, q, q, q, _lse(q, (1, 3, 2)), *[q.clone()] * 3), ValueError,
                 r"^lse must have shape \(1, 2, 3\)", id="lse-shape"),
    pytest.param(lambda q: _flash_attn_backward(q, q, q, q, q, torch.zeros(1, 2, 3, device="meta"), *[q.clone()] * 3),
                 ValueError, r"^lse must be on q's device", id="lse-device"),
    pytest.param(lambda q: _flash_attn_backward(q, q, q, q, q, _lse(q), *[q.clone()] * 3, bias_grad=True),
                 ValueError, r"^bias_grad=True needs a bias", id="bias_grad"),
    pytest.param(lambda q: _flash_attn_backward(q, q, q, q, q, _lse(q), *[q.clone()] * 3, dsinks=torch.zeros(2, device=q.device)),
                 ValueError, r"^dsinks was given without sinks", id="dsinks"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_t(1, 3, 2, 16))


def _spy_impls(monkeypatch):
    """Wraps the ops' Python implementations (autograd.OP_IMPLS) to count the calls that skip the dispatcher."""
    from tritonflash import autograd

    calls = []
    for name, impl in list(autograd.OP_IMPLS.items()):
        def spy(*args, _name=name, _impl=impl):
            calls.append(_name)
            return _impl(*args)
        monkeypatch.setitem(autograd.OP_IMPLS, name, spy)
    return calls


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """Eager forward and backward run the ops' implementations directly (host time: the
    dispatcher costs tens of microseconds a call), with the op's results."""
    calls = _spy_impls(monkeypatch)
    q, k, v = (_t(1, 6, 2, 16).requires_grad_(True) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    out.sum().backward()
    assert calls == ["fwd", "bwd"]
    with torch.no_grad():
        again = flash_attn_func(q, k, v, causal=True)
    assert calls == ["fwd", "bwd", "fwd"]
    assert torch.equal(again, out.detach())
    q2, k2, v2 = (x.detach() for x in (q, k, v))
    assert torch.equal(torch.ops.tritonflash.fwd(q2, k2, v2, *([None] * 6), True, 16 ** -0.5, -1, -1, 0.0, 0.0)[0], again)


def test_traced_calls_go_through_the_op(monkeypatch):
    """Under a dispatch mode (make_fx, as torch.compile and export trace) the op itself is
    called, not its implementation: the graph holds tritonflash::fwd."""
    from torch.fx.experimental.proxy_tensor import make_fx

    calls = _spy_impls(monkeypatch)
    q, k, v = (_t(1, 6, 2, 16) for _ in range(3))
    gm = make_fx(lambda q, k, v: flash_attn_func(q, k, v, causal=True))(q, k, v)
    assert calls == []
    assert any(n.target is torch.ops.tritonflash.fwd.default for n in gm.graph.nodes)


def test_jit_trace_records_the_op(monkeypatch):
    """torch.jit.trace can record the op, not the Triton launches inside its implementation:
    a traced call goes through the op, and the traced function recomputes on new inputs."""
    calls = _spy_impls(monkeypatch)
    q, k, v = (_t(1, 6, 2, 16) for _ in range(3))
    traced = torch.jit.trace(lambda q, k, v: flash_attn_func(q, k, v, causal=True), (q, k, v), check_trace=False)
    assert calls == []
    assert "tritonflash::fwd" in str(traced.graph)
    q2 = _t(1, 6, 2, 16)
    assert torch.equal(traced(q2, k, v), flash_attn_func(q2, k, v, causal=True))


def test_varlen_eager_calls_skip_the_dispatcher(monkeypatch):
    """flash_attn_varlen_func too: eager forward and backward run fwd_varlen/bwd_varlen's
    implementations, with the op's results; make_fx still records tritonflash::fwd_varlen."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tritonflash import flash_attn_varlen_func

    calls = _spy_impls(monkeypatch)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    q, k, v = (_t(8, 2, 16).requires_grad_(True) for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    out.sum().backward()
    assert calls == ["fwd_varlen", "bwd_varlen"]
    q2, k2, v2 = (x.detach() for x in (q, k, v))
    through_op = torch.ops.tritonflash.fwd_varlen(q2, k2, v2, cu, cu, 5, 5, None, None, None, True, 16 ** -0.5, -1, -1, 0.0, 0.0)
    assert torch.equal(through_op[0], out.detach())
    gm = make_fx(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True))(q2, k2, v2)
    assert calls == ["fwd_varlen", "bwd_varlen"]
    assert any(n.target is torch.ops.tritonflash.fwd_varlen.default for n in gm.graph.nodes)


def test_profiled_calls_go_through_the_op(monkeypatch):
    """Under the autograd profiler the op is called, so that traces show tritonflash::fwd."""
    calls = _spy_impls(monkeypatch)
    q, k, v = (_t(1, 6, 2, 16) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        flash_attn_func(q, k, v, causal=True)
    assert calls == []
    assert any(e.key == "tritonflash::fwd" for e in prof.key_averages())
