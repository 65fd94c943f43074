"""torch.library custom ops and torch.compile (issue 13, part 1).

Every public entry point reaches the kernels through the ``torch.ops.tritonflash`` ops, so
torch.compile(fullgraph=True) treats them as opaque nodes: no graph break, no tracing into the
launcher or the interpreter, and no host read on the varlen path. ``opcheck`` checks each op's
schema, fake implementation, autograd registration and AOT dispatch with dynamic shapes.

Compiled results are compared with eager ones bitwise: the backend is ``aot_eager`` (AOTAutograd
with the ops as they are, no Inductor codegen, fast on the CPU tier), so the same kernels run on
the same inputs. Shapes are tiny: on the CPU tier the kernels run in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

import tritonflash
from conftest import DEVICE
from tritonflash import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    gen_slopes,
)
from tritonflash.layers import GroupedQueryAttention

F16 = torch.float16
OPS = torch.ops.tritonflash
BACKEND = "aot_eager"


def _t(*shape, dtype=F16, grad=True):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=DEVICE)


def _grads(out, inputs):
    torch.manual_seed(7)
    dout = torch.randn_like(out)
    return torch.autograd.grad(out, inputs, dout)


def _assert_compiled_equal(fn, inputs, seed=None):
    """fn compiled with fullgraph=True (a graph break raises) gives eager's out and gradients,
    bitwise."""
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)
    if seed is not None:
        torch.manual_seed(seed)
    got = compiled(*inputs)
    got_grads = _grads(got, inputs)
    if seed is not None:
        torch.manual_seed(seed)
    want = fn(*inputs)
    want_grads = _grads(want, inputs)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert g is not None and torch.equal(g, w)


# ---- opcheck -----------------------------------------------------------------------------------


def _scalars(causal=True, scale=0.25, window=(-1, -1), softcap=0.0, dropout_p=0.0):
    return (causal, scale, window[0], window[1], softcap, dropout_p)


def _padded_cases():
    b, sq, sk, h, hk, d = 2, 3, 5, 2, 1, 16
    slopes = gen_slopes(h, device=DEVICE)
    kpm = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    kpm[1, -2:] = False
    bias = _t(1, h, sq, sk, dtype=torch.float32)
    sinks = _t(h, dtype=torch.float32)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    sep = (_t(b, sq, h, d), _t(b, sk, hk, d), _t(b, sk, hk, d))
    return [
        pytest.param("", sep, (bias, slopes, kpm, None, None, None), _scalars(), id="sep-bias-alibi-kpm"),
        pytest.param("", sep, (None, None, None, sinks, seed, None), _scalars(False, 0.3, (2, 1), 4.0, 0.25), id="sep-features"),
        pytest.param("_qkvpacked", (_t(b, sq, 3, h, d),), (None, None, None, None, None, None), _scalars(), id="qkvpacked"),
        pytest.param("_kvpacked", (_t(b, sq, h, d), _t(b, sk, 2, hk, d)), (bias, None, kpm, None, None, None), _scalars(False),
                     id="kvpacked"),
    ]


@pytest.mark.parametrize("suffix, primals, options, scalars", _padded_cases())
def test_opcheck_padded_ops(suffix, primals, options, scalars):
    fwd, bwd = getattr(OPS, "fwd" + suffix), getattr(OPS, "bwd" + suffix)
    # The packed ops share the separate op's implementation: AOT dispatch with dynamic shapes
    # (the slowest check, many interpreter launches) runs for the separate layout only.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if suffix == "":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(fwd, (*primals, *options, *scalars), test_utils=utils)
    with torch.no_grad():
        out, lse = fwd(*primals, *options, *scalars)
    # The backward ops have no autograd of their own (a backward that needs a graph runs the
    # reference instead): their inputs are plain tensors.
    detached = [None if x is None else x.detach() for x in (*primals, *options)]
    bias_grad, sinks_grad = options[0] is not None, options[3] is not None
    n = len(primals)
    torch.library.opcheck(bwd, (torch.randn_like(out), *detached[:n], out, lse, *detached[n:], *scalars, bias_grad, sinks_grad),
                          test_utils=utils)


def test_opcheck_varlen_ops():
    cu = _cu([2, 0, 3])
    q, k, v = _t(5, 2, 16), _t(5, 1, 16), _t(5, 1, 16)
    sinks = _t(2, dtype=torch.float32)
    args = (cu, cu.clone(), 3, 3, gen_slopes(2, device=DEVICE), sinks, None, *_scalars(window=(1, 0), softcap=3.0))
    torch.library.opcheck(OPS.fwd_varlen, (q, k, v, *args))
    with torch.no_grad():
        out, lse = OPS.fwd_varlen(q, k, v, *args)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    args = (*args[:5], sinks.detach(), *args[6:])
    torch.library.opcheck(OPS.bwd_varlen, (torch.randn_like(out), qd, kd, vd, out, lse, *args, True))


# ---- torch.compile of every entry point --------------------------------------------------------


def test_compile_flash_attn_func_bias_grad_alibi_kpm_features():
    b, sq, sk, h, hk, d = 2, 5, 7, 4, 2, 16
    slopes = gen_slopes(h, device=DEVICE)
    kpm = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    kpm[1, -2:] = False

    def fn(q, k, v, bias):
        return flash_attn_func(q, k, v, bias, True, alibi_slopes=slopes, key_padding_mask=kpm, softcap=5.0, window_size=(3, 0))

    _assert_compiled_equal(fn, (_t(b, sq, h, d), _t(b, sk, hk, d), _t(b, sk, hk, d), _t(1, h, sq, sk, dtype=torch.float32)))


def test_compile_flash_attn_func_sinks_dropout_mask_reproducible():
    """Dropout's seed is drawn outside the op (an input): compiled and eager draw the same mask
    from the same generator state."""
    b, s, h, d = 2, 6, 2, 16
    amask = torch.rand(b, 1, s, s, device=DEVICE) > 0.3

    def fn(q, k, v, sinks):
        return flash_attn_func(q, k, v, sinks=sinks, dropout_p=0.2, attn_mask=amask)

    _assert_compiled_equal(fn, (_t(b, s, h, d), _t(b, s, h, d), _t(b, s, h, d), _t(h, dtype=torch.float32)), seed=3)


def test_compile_packed_variants():
    _assert_compiled_equal(lambda qkv: flash_attn_qkvpacked_func(qkv, causal=True), (_t(2, 6, 3, 2, 16),))
    bias = _t(2, 1, 1, 7, dtype=torch.float32)
    _assert_compiled_equal(lambda q, kv, bias: flash_attn_kvpacked_func(q, kv, bias), (_t(2, 4, 2, 16), _t(2, 7, 2, 1, 16), bias))


def test_compile_varlen_makes_no_host_read(monkeypatch):
    """The compiled varlen path reads nothing on the host -- cu_seqlens are not copied (the
    launch is sized by max_seqlen_q/k), alibi slopes not checked -- in tracing or at run time:
    Tensor.tolist / item / __bool__ raise while the compiled function runs."""
    lq, lk = [3, 0, 5], [4, 2, 5]
    cu_q, cu_k = _cu(lq), _cu(lk)
    slopes = torch.rand(3, 4, device=DEVICE)

    def fn(q, k, v, sinks):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True, alibi_slopes=slopes, sinks=sinks, return_lse=False)

    inputs = (_t(8, 4, 16), _t(11, 2, 16), _t(11, 2, 16), _t(4, dtype=torch.float32))
    want = fn(*inputs)
    want_grads = _grads(want, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)

    def host_read(self, *args, **kwargs):
        raise AssertionError("a device value was read on the host")

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__bool__"):
            m.setattr(torch.Tensor, name, host_read)
        got = compiled(*inputs)
        torch.manual_seed(7)
        dout = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, inputs, dout)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


def test_compile_varlen_packed_variants():
    cu = _cu([2, 4])
    _assert_compiled_equal(lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, cu, 4, causal=True), (_t(6, 3, 2, 16),))
    cu_k = _cu([3, 1])
    _assert_compiled_equal(lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 4, 3), (_t(6, 2, 16), _t(4, 2, 2, 16)))


def test_compile_layer():
    layer = GroupedQueryAttention(64, 4, 2, attn_impl="triton", device=DEVICE, dtype=F16)
    slopes = gen_slopes(4, device=DEVICE)
    params = tuple(layer.parameters())

    def fn(x, *params):
        return layer(x, alibi_slopes=slopes)[0]

    _assert_compiled_equal(fn, (_t(2, 6, 64), *params))


# ---- inference: inputs that need no gradient, torch.no_grad, torch.inference_mode ----------------


@pytest.mark.parametrize("mode", ["no-grad-inputs", "no_grad", "inference_mode"])
def test_compile_inference_matches_eager(mode):
    """Regression: with no input requiring grad (a generate() decode step under no_grad or
    inference_mode), dynamo failed on the autograd.Function ('AutogradFunctionContextVariable'
    object has no attribute 'proxy'). The fronts call the forward op directly then. Padded,
    packed and varlen (one tensor as q, k and v, cu_seqlens twice) in one compiled graph."""
    context = {"no-grad-inputs": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    cu = _cu([3, 0, 4])
    slopes = gen_slopes(2, device=DEVICE)

    def fn(q, k, v, qkv, kv, qv):
        return (flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, softcap=4.0),
                flash_attn_qkvpacked_func(qkv, causal=True),
                flash_attn_kvpacked_func(q, kv, window_size=(2, 1)),
                flash_attn_varlen_func(qv, qv, qv, cu, cu, 4, 4, causal=True, return_lse=True)[1],
                flash_attn_varlen_qkvpacked_func(torch.stack([qv] * 3, 1), cu, 4))

    with context():
        inputs = (_t(2, 3, 2, 16, grad=False), _t(2, 5, 1, 16, grad=False), _t(2, 5, 1, 16, grad=False),
                  _t(2, 3, 3, 2, 16, grad=False), _t(2, 5, 2, 1, 16, grad=False), _t(7, 2, 16, grad=False))
        got = torch.compile(fn, fullgraph=True, backend=BACKEND)(*inputs)
        want = fn(*inputs)
    for g, w in zip(got, want):
        assert not g.requires_grad and torch.equal(g, w)


# ---- dynamic shapes ---------------------------------------------------------------------------


def test_compile_dynamic_shapes_and_float_arguments():
    """torch.compile(dynamic=True): the float arguments arrive as symbolic floats (the finite
    checks trace: math.isfinite broke the graph) and one graph serves every shape and
    max_seqlen. Compiled == eager bitwise, gradients too."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def padded(q, k, v, softcap, scale):
        return flash_attn_func(q, k, v, causal=True, softcap=softcap, softmax_scale=scale)

    def varlen(q, k, v, cu, max_seqlen, softcap):
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True, softcap=softcap)

    for fn, make in ((padded, lambda n: (_t(2, n, 2, 16), _t(2, n + 1, 1, 16), _t(2, n + 1, 1, 16), 4.0, 0.3)),
                     (varlen, lambda n: (_t(2 * n, 2, 16), _t(2 * n, 2, 16), _t(2 * n, 2, 16), _cu([n - 1, n + 1]), n + 1, 4.0))):
        counter = CompileCounterWithBackend(BACKEND)
        compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=True)
        frames = []
        for n in (3, 5):
            inputs = make(n)
            tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
            got, want = compiled(*inputs), fn(*inputs)
            assert torch.equal(got, want)
            for g, w in zip(_grads(got, tensors), _grads(want, tensors)):
                assert torch.equal(g, w)
            frames.append(counter.frame_count)
        assert frames[1] == frames[0], "a new shape recompiled"  # (the first compile may restart once)


def test_no_graph_break_reported_by_explain():
    q, k, v = _t(1, 3, 2, 16), _t(1, 4, 2, 16), _t(1, 4, 2, 16)
    explanation = torch._dynamo.explain(lambda q, k, v: flash_attn_func(q, k, v, causal=True))(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_eager_varlen_still_validates_cu_seqlens_and_validate_false_skips():
    q = _t(5, 2, 16, grad=False)
    bad = torch.tensor([0, 3, 2, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        flash_attn_varlen_func(q, q, q, bad, bad, 3, 3)
    good = _cu([2, 3])
    with pytest.raises(TypeError, match="validate must be a bool"):
        flash_attn_varlen_func(q, q, q, good, good, 3, 3, validate=1)
    assert torch.equal(flash_attn_varlen_func(q, q, q, good, good, 3, 3, validate=False), flash_attn_varlen_func(q, q, q, good, good, 3, 3))


def test_ops_are_registered_and_exported():
    for name in ("fwd", "bwd", "fwd_qkvpacked", "bwd_qkvpacked", "fwd_kvpacked", "bwd_kvpacked", "fwd_varlen", "bwd_varlen"):
        assert hasattr(OPS, name)
    assert tritonflash._flash_attn_forward is tritonflash.lowlevel._flash_attn_forward


# ---- GPU tier: CUDA graphs ---------------------------------------------------------------------


@pytest.mark.gpu
def test_compile_reduce_overhead_cuda_graphs_match_eager():
    """mode='reduce-overhead' captures the compiled step in a CUDA graph: the ops read nothing on
    the host, so capture works; replays give eager's out and gradients.

    Distinct varlen q, k, v: one tensor passed as all three gets dq + dk + dv, which Inductor
    sums in fp32 and rounds once where eager rounds each bf16 add (1 ulp apart, seen on CPU).
    slopes and cu_seqlens come from the closure, cu_seqlens twice (torch 2.11's dynamo could not
    take their id())."""
    b, s, h, d = 2, 128, 4, 64
    slopes = gen_slopes(h, device="cuda")
    cu = _cu([100, 156])

    def fn(q, k, v, qv, kv, vv):
        out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
        outv = flash_attn_varlen_func(qv, kv, vv, cu, cu, 156, 156, causal=True)
        return out.float().sum() + outv.float().sum()

    def bf16(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    inputs = (bf16(b, s, h, d), bf16(b, s, h, d), bf16(b, s, h, d), bf16(256, h, d), bf16(256, h, d), bf16(256, h, d))
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        got = compiled(*inputs)
        got_grads = [g.clone() for g in torch.autograd.grad(got, inputs)]
        got = got.clone()
    want = fn(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-2)  # fp32 sums of 2^17 terms, any order
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
def test_cuda_graph_capture_of_eager_call():
    """torch.cuda.graphs capture of flash_attn_func with ALiBi and of the varlen function with
    validate=False: nothing syncs during capture."""
    q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.float16)
    qv = torch.randn(96, 4, 64, device="cuda", dtype=torch.float16)
    cu = _cu([40, 56])
    slopes = gen_slopes(4, device="cuda")
    want = flash_attn_func(q, q, q, causal=True, alibi_slopes=slopes)
    wantv = flash_attn_varlen_func(qv, qv, qv, cu, cu, 56, 56, causal=True)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flash_attn_func(q, q, q, causal=True, alibi_slopes=slopes)
        with torch.cuda.graph(graph):
            got = flash_attn_func(q, q, q, causal=True, alibi_slopes=slopes)
            gotv = flash_attn_varlen_func(qv, qv, qv, cu, cu, 56, 56, causal=True, validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want) and torch.equal(gotv, wantv)
