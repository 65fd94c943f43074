"""The Gluon Hopper dK/dV pass (kernels/hopper_bwd.py, issue 15 item 2; by default for the calls
with a bias in ``hopper_bwd.AUTO_BIAS``, for every call it covers with ``TRITONFLASH_HOPPER_BWD=1``).

CPU tier: the switch's values (auto, 1, 0), that it stays off under the interpreter, and that
the kernel compiles for sm_90a (stand-in driver, one subprocess for every variant) within shared
memory, with async wgmma and no serialised wgmma. GPU tier (sm_90 only): flash_attn_func's
gradients with the switch on against the reference (docs/testing.md's rule), a spy asserting
the Gluon pass ran, bitwise-equal gradients from two runs, and the default's dispatch. The GPU
smoke tests come first (a barrier hang shows early; run the file under `timeout`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import assert_gluon_compiled, check_against_reference, compile_gluon_cases, learned_bias, make_qkv, refused_by_gluon_backward, spy_calls
from tritonflash import flash_attn_func
from tritonflash.kernels import backward, hopper_bwd, hopper_dbias
from tritonflash.kernels.common import NO_FEATURES, Features

HERE = Path(__file__).parent
ON_SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
sm90 = pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU (H100/H200)")


@pytest.fixture
def bwd_calls(monkeypatch):
    """Turns the Gluon dK/dV pass on and records the shape of q of each call that reached it."""
    monkeypatch.setenv(backward.HOPPER_BWD_ENV, "1")
    return spy_calls(monkeypatch, hopper_bwd, "hopper_bwd_dkdv")


def _check(bwd_calls, b, sq, sk, h, hk, d, causal, dtype=torch.bfloat16):
    q, k, v = make_qkv(b, sq, sk, h, d, dtype, DEVICE, nheads_k=hk)
    out = flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, torch.randn_like(out), causal=causal)
    # Causal with seqlen_k < seqlen_q has rows that see no key: hopper_bwd_supports sends those
    # calls to the tl pass (checked here too, so that a gate change shows).
    if causal and sk < sq:
        assert not bwd_calls, "the Gluon dK/dV pass took a causal call with seqlen_k < seqlen_q"
    else:
        assert bwd_calls, "the Gluon dK/dV pass did not run"


# --------------------------------------------------------------------------------------------
# GPU smoke tier, first in the file
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("sq, sk, causal", [(1, 1, False), (64, 77, False), (200, 300, True), (1088, 1088, True)])
def test_smoke(bwd_calls, sq, sk, causal):
    _check(bwd_calls, 1, sq, sk, 2, 2, 128, causal)


# --------------------------------------------------------------------------------------------
# GPU tier
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa3", "mqa"])
@pytest.mark.parametrize("sq, sk", [(128, 128), (1000, 1000), (257, 511), (1024, 2048), (300, 100)])
def test_gradients_match_reference(bwd_calls, sq, sk, heads, head_dim, causal):
    _check(bwd_calls, 2, sq, sk, heads[0], heads[1], head_dim, causal)


@pytest.mark.gpu
@sm90
def test_packed_and_strided_layouts(bwd_calls):
    """dK/dV written into views of one packed gradient (qkv- and kv-packed calls), and q/k/v as
    (batch, heads, seqlen, dim) transposes: descriptors over their own strides."""
    from tritonflash import flash_attn_kvpacked_func, flash_attn_qkvpacked_func

    qkv = torch.randn(2, 300, 3, 4, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    ref = torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    for i in range(3):
        torch.testing.assert_close(g[:, :, i], ref[i], atol=0, rtol=0)

    q = torch.randn(2, 4, 250, 128, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    kv = torch.randn(2, 330, 2, 2, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = flash_attn_kvpacked_func(q, kv)
    k, v = (t.detach().clone().requires_grad_() for t in kv.unbind(2))
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, kv, dout)[0]
    ref = torch.autograd.grad(flash_attn_func(q, k, v), (k, v), dout)
    for i in range(2):
        torch.testing.assert_close(g[:, :, i], ref[i], atol=0, rtol=0)
    assert len(bwd_calls) >= 4


@pytest.mark.gpu
@sm90
def test_fp16(bwd_calls):
    _check(bwd_calls, 2, 300, 300, 4, 2, 128, True, dtype=torch.float16)


@pytest.mark.gpu
@sm90
def test_deterministic(bwd_calls):
    q, k, v = make_qkv(2, 1024, 1024, 8, 128, torch.bfloat16, DEVICE, nheads_k=2)
    dout = torch.randn(2, 1024, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    grads = [torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout) for _ in range(2)]
    assert len(bwd_calls) == 2
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@sm90
def test_not_taken_with_alibi_fp32_bias_or_a_row_less_bias_gradient(bwd_calls):
    """ALiBi, an fp32 bias, and a (1, h, 1, sk) bias whose gradient (key sums) the tl pass writes
    stay on tl; a random dout (a .sum() backward's stride-0 ones would be refused anyway)."""
    q, k, v = make_qkv(1, 128, 128, 2, 128, torch.bfloat16, DEVICE)
    dout = torch.randn(1, 128, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    slopes = torch.tensor([[0.5, 0.25]], device=DEVICE)
    torch.autograd.grad(flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes), (q, k, v), dout)
    fp32 = torch.randn(1, 2, 128, 128, device=DEVICE, requires_grad=True)
    torch.autograd.grad(flash_attn_func(q, k, v, fp32, True), (q, k, v, fp32), dout)
    cols = torch.randn(1, 2, 1, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    torch.autograd.grad(flash_attn_func(q, k, v, cols, False), (q, k, v, cols), dout)
    assert not bwd_calls


@pytest.mark.gpu
@sm90
def test_row_less_bias_gradient_stays_on_tl(bwd_calls):
    """seqlen_q = 1: a (1, h, 1, sk) bf16 bias passes hopper._bias_ok, but its gradient is the key
    sums the tl dK/dV pass writes (attn_bwd's dbias_cols): with requires_grad the Gluon pass must
    not run; without, it may."""
    q, k, v = make_qkv(2, 1, 128, 2, 128, torch.bfloat16, DEVICE)
    dout = torch.randn(2, 1, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(1, 2, 1, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = flash_attn_func(q, k, v, bias, False)
    check_against_reference(out, q, k, v, dout, bias=bias)
    assert not bwd_calls
    torch.autograd.grad(flash_attn_func(q, k, v, bias.detach(), False), (q, k, v), dout)
    assert len(bwd_calls) == 1


@pytest.mark.gpu
@sm90
def test_bias_variant_fp16(bwd_calls):
    q, k, v = make_qkv(2, 200, 304, 4, 128, torch.float16, DEVICE, nheads_k=2)
    bias = learned_bias((1, 4, 200, 304), torch.float16, DEVICE)
    out = flash_attn_func(q, k, v, bias, True)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias, causal=True)
    assert bwd_calls


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bias_dims", ["heads", "full", "shared"])
# (200, 300) and (64, 50): the last CTA's second key half lies past seqlen_k (not loaded: the
# predicated expect-tx path).
@pytest.mark.parametrize("sq, sk", [(128, 128), (257, 512), (300, 104), (50, 77), (200, 300), (64, 50)])
def test_bias_variant_matches_reference(bwd_calls, sq, sk, bias_dims, head_dim, causal):
    """The BIAS variant: a 16-bit bias with rows (its gradient from the dbias pass), padded
    rows where seqlen_k * 2 bytes is not a multiple of 16, GQA."""
    b, h, hk = 2, 6, 2
    q, k, v = make_qkv(b, sq, sk, h, head_dim, torch.bfloat16, DEVICE, nheads_k=hk)
    lead = {"heads": (1, h), "full": (b, h), "shared": (1, 1)}[bias_dims]
    bias = learned_bias((*lead, sq, sk), torch.bfloat16, DEVICE, row_pad=(-sk) % 8)
    out = flash_attn_func(q, k, v, bias, causal)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias, causal=causal)
    assert bool(bwd_calls) is not (causal and sk < sq)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_takes_the_bias_calls_of_auto_bias(monkeypatch, head_dim):
    """With the switch unset, the Gluon pass takes a causal call with a learned bias (AUTO_BIAS:
    d64 and d128), correctly and bit-reproducibly; non-causal with a bias only at d128; no call
    without a bias."""
    monkeypatch.delenv(backward.HOPPER_BWD_ENV, raising=False)
    calls = spy_calls(monkeypatch, hopper_bwd, "hopper_bwd_dkdv")
    q, k, v = make_qkv(2, 300, 384, 4, head_dim, torch.bfloat16, DEVICE, nheads_k=2)
    bias = learned_bias((1, 4, 300, 384), torch.bfloat16, DEVICE)
    out = flash_attn_func(q, k, v, bias, True)
    dout = torch.randn_like(out)
    check_against_reference(out, q, k, v, dout, bias=bias, causal=True)
    assert len(calls) == 1
    grads = [torch.autograd.grad(flash_attn_func(q, k, v, bias, True), (q, k, v, bias), dout) for _ in range(2)]
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)
    assert len(calls) == 3
    flash_attn_func(q, k, v, bias, False).backward(dout)
    assert len(calls) == 3 + (head_dim == 128)
    for causal in (True, False):
        flash_attn_func(q, k, v, None, causal).backward(dout)
    assert len(calls) == 3 + (head_dim == 128)


@pytest.mark.gpu
@sm90
def test_bias_variant_masking_biases_and_determinism(bwd_calls, monkeypatch):
    """-inf bias rows (a row with no visible key: zero gradients, no NaN), a NaN bias at a key the
    causal diagonal hides (the tl forward: the Gluon one lets it reach its row, a documented
    deviation), bitwise-equal gradients from two runs, and the Gluon dbias pass beside it."""
    monkeypatch.setenv("TRITONFLASH_HOPPER_FWD", "0")
    monkeypatch.setenv(backward.HOPPER_DBIAS_ENV, "1")
    q, k, v = make_qkv(2, 192, 256, 4, 128, torch.bfloat16, DEVICE)
    bias = torch.randn(1, 4, 192, 256, device=DEVICE).to(torch.bfloat16)
    bias[0, 1, 7] = float("-inf")
    bias[0, 2, 3, 100] = float("nan")  # hidden from row 3 (keys <= 67), read by the first CTA's second half
    bias.requires_grad_()
    dout = torch.randn(2, 192, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    grads = [torch.autograd.grad(flash_attn_func(q, k, v, bias, True), (q, k, v, bias), dout) for _ in range(2)]
    assert len(bwd_calls) == 2
    for a, b_ in zip(*grads):
        assert torch.isfinite(a).all() and torch.equal(a, b_)
    assert (grads[0][0][:, 7, 1] == 0).all()  # dq of the row with no visible key
    # dK/dV against the tl pass (another summation order: within a few bf16 steps).
    monkeypatch.setenv(backward.HOPPER_BWD_ENV, "0")
    tl = torch.autograd.grad(flash_attn_func(q, k, v, bias, True), (k, v), dout)
    assert len(bwd_calls) == 2
    for ours, theirs in zip(grads[0][1:3], tl):
        assert ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item() < 2e-2


# --------------------------------------------------------------------------------------------
# CPU tier
# --------------------------------------------------------------------------------------------

# The switches of the Gluon backward passes: this dK/dV pass (auto: calls with a bias whose
# (head dim, causal) is in hopper_bwd.AUTO_BIAS) and the bias-gradient pass (kernels/hopper_dbias.py,
# tests/test_hopper_dbias.py; on unless set to 0). The getters take the call's (causal, has
# bias, head dim) where they need them.
def _dkdv_getter(causal=False, has_bias=False, head_dim=64):
    return backward._hopper_bwd_module(causal, has_bias, head_dim)


SWITCHES = [
    pytest.param(backward.HOPPER_BWD_ENV, _dkdv_getter, hopper_bwd, id="dkdv"),
    pytest.param(backward.HOPPER_DBIAS_ENV, backward._hopper_dbias_module, hopper_dbias, id="dbias"),
]
DEFAULT_ON = {backward.HOPPER_BWD_ENV: False, backward.HOPPER_DBIAS_ENV: True}


@pytest.mark.parametrize("env, getter, module", SWITCHES)
@pytest.mark.parametrize("raw, on", [(None, None), ("", None), ("0", False), (" 1 ", True)])
def test_switch(monkeypatch, env, getter, module, raw, on):
    on = DEFAULT_ON[env] if on is None else on
    if raw is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, raw)
    monkeypatch.setattr(backward, "INTERPRET", False)
    assert (getter() is module) is on


@pytest.mark.parametrize("raw", [None, "", " Auto "])
@pytest.mark.parametrize("causal, has_bias, head_dim", [(True, True, 64), (True, True, 128), (False, True, 64),
                                                         (False, True, 128), (True, False, 64), (False, False, 128)])
def test_dkdv_auto_takes_bias_calls_where_faster(monkeypatch, raw, causal, has_bias, head_dim):
    """The default (auto) takes the calls with a bias that AUTO_BIAS lists (causal d64, d128) and
    nothing else; 1 takes every call, 0 none (whatever hopper_bwd_supports then says)."""
    if raw is None:
        monkeypatch.delenv(backward.HOPPER_BWD_ENV, raising=False)
    else:
        monkeypatch.setenv(backward.HOPPER_BWD_ENV, raw)
    monkeypatch.setattr(backward, "INTERPRET", False)
    assert hopper_bwd.AUTO_BIAS == {(64, True), (128, True), (128, False)}
    expected = has_bias and (head_dim, causal) in hopper_bwd.AUTO_BIAS
    assert (backward._hopper_bwd_module(causal, has_bias, head_dim) is hopper_bwd) is expected
    for forced, on in (("1", True), ("0", False)):
        monkeypatch.setenv(backward.HOPPER_BWD_ENV, forced)
        assert (backward._hopper_bwd_module(causal, has_bias, head_dim) is hopper_bwd) is on


@pytest.mark.parametrize("env, getter, module", SWITCHES)
def test_switch_refuses_other_values(monkeypatch, env, getter, module):
    monkeypatch.setenv(env, "yes")
    with pytest.raises(ValueError, match=env):
        getter()


@pytest.mark.parametrize("env, getter, module", SWITCHES)
def test_off_under_the_interpreter(monkeypatch, env, getter, module):
    monkeypatch.setenv(env, "1")
    monkeypatch.setattr(backward, "INTERPRET", True)
    assert getter() is None


def _call(b=2, sq=200, sk=300, h=4, hk=2, d=128, dtype=torch.bfloat16, **over):
    """hopper_bwd_supports' arguments for an attn_bwd call on CPU stand-in tensors (never read):
    the sizes make q/k/v/dout/dk/dv and lse, ``over`` replaces any argument."""
    q, k = torch.empty(b, sq, h, d, dtype=dtype), torch.empty(b, sk, hk, d, dtype=dtype)
    args = dict(q=q, k=k, v=k, dout=q, dk=torch.empty_like(k), dv=torch.empty_like(k), lse=torch.empty(b, h, sq), bias=None,
                alibi_slopes=None, key_padding_mask=None, causal=False, softmax_scale=0.125, varlen=None, features=NO_FEATURES,
                capability=(9, 0))
    args.update(over)
    return args


SUPPORTS = [
    pytest.param({}, True, id="bf16-d128-gqa2"),
    pytest.param(dict(d=64), True, id="d64"),
    pytest.param(dict(dtype=torch.float16), True, id="fp16"),
    pytest.param(dict(hk=1), True, id="mqa"),
    pytest.param(dict(causal=True), True, id="causal-sk-longer"),
    pytest.param(dict(sq=300, sk=100), True, id="noncausal-sq-longer"),
    pytest.param(dict(causal=True, features=Features(window=(-1, 0))), True, id="causal-as-window-right0"),
    pytest.param(dict(dk=torch.empty(2, 300, 3, 2, 128, dtype=torch.bfloat16)[:, :, 1]), True, id="dk-view-of-packed"),
    # refused: the tl pass runs these
    pytest.param(dict(capability=(8, 0)), False, id="sm80"),
    pytest.param(dict(dtype=torch.float32), False, id="fp32"),
    pytest.param(dict(d=96), False, id="d96"),
    pytest.param(dict(sq=300, sk=100, causal=True), False, id="causal-sq-longer"),
    pytest.param(dict(b=0), False, id="empty-batch"),
    pytest.param(dict(sq=0), False, id="empty-seqlen-q"),
    pytest.param(dict(softmax_scale=0.0), False, id="zero-scale"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 304, dtype=torch.bfloat16)[..., :300]), True, id="bias-padded-rows"),
    pytest.param(dict(bias=torch.empty(2, 4, 200, 304, dtype=torch.bfloat16)[..., :300]), True, id="full-bias"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 300)), False, id="fp32-bias"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 300, dtype=torch.bfloat16)), False, id="bias-rows-unaligned"),
    pytest.param(dict(bias=torch.empty(1, 4, 1, 304, dtype=torch.bfloat16)[..., :300]), False, id="row-less-bias"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 1, dtype=torch.bfloat16).expand(1, 4, 200, 300)), False, id="key-broadcast-bias"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 304, dtype=torch.float16)[..., :300]), False, id="bias-dtype-not-q"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 304, dtype=torch.bfloat16)[..., :300].expand(2, 4, 200, 300)), True,
                 id="batch-expanded-bias"),
] + refused_by_gluon_backward(2, 200, 300, 4, 128)


@pytest.mark.parametrize("over, expected", SUPPORTS)
def test_hopper_bwd_supports(over, expected):
    assert hopper_bwd.hopper_bwd_supports(**_call(**over)) is expected


def test_hopper_bwd_supports_asks_the_device_for_cpu_tensors():
    args = _call()
    del args["capability"]
    assert hopper_bwd.hopper_bwd_supports(**args) is False


COMPILE_CASES = [dict(d=d, causal=c, gqa=g) for d in (64, 128) for c in (False, True) for g in (1, 2)] + [
    dict(d=128, causal=True, gqa=1, dtype="float16")] + [
    dict(d=d, causal=c, gqa=1, bias="heads") for d in (64, 128) for c in (False, True)] + [
    dict(d=128, causal=True, gqa=2, bias="full"), dict(d=128, causal=True, gqa=1, bias="heads", dtype="float16")]


def _case_id(c):
    return f"d{c['d']}" + ("-causal" if c["causal"] else "") + (f"-gqa{c['gqa']}" if c["gqa"] > 1 else "") + (
        "-fp16" if c.get("dtype") == "float16" else "") + (f"-bias-{c['bias']}" if c.get("bias") else "")


@pytest.fixture(scope="module")
def compiled():
    return compile_gluon_cases(HERE / "sm90_hopper_bwd_compile.py", COMPILE_CASES, _case_id)


@pytest.mark.skipif(ON_GPU, reason="the GPU tier runs the kernel itself")
@pytest.mark.parametrize("case", [_case_id(c) for c in COMPILE_CASES])
def test_compiles_for_sm90(compiled, case):
    # A few loop-invariant scalars spill at head dim 128 (3 loads a step from L1); more would
    # mean the accumulators no longer fit.
    # The BIAS variant's transposed tile read adds ~50 bytes at d128 (228-248 B compiled here).
    assert_gluon_compiled(compiled[case], max_spill_bytes=320 if "bias" in case else 256)
