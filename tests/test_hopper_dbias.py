"""The Gluon Hopper bias-gradient pass (kernels/hopper_dbias.py, issue 15 item 3; default on
sm_90, off with ``TRITONFLASH_HOPPER_DBIAS=0``).

CPU tier (the switch's own tests are test_hopper_bwd.py's, for both Gluon backward passes): which calls
it takes (``hopper_dbias_supports``), and that the kernel compiles for sm_90a (stand-in driver, one
subprocess for every variant) within shared memory, with async wgmma that ptxas did not
serialise. GPU tier (sm_90 only): flash_attn_func's gradients with the switch on against the
reference (docs/testing.md's rule) for every bias layout it takes, a spy asserting the Gluon pass
ran, bitwise-equal gradients from two runs and the tl pass's answer where both run. The GPU
smoke tests come first (a barrier hang shows early; run the file under `timeout`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import (
    assert_gluon_compiled,
    check_against_reference,
    compile_gluon_cases,
    learned_bias,
    make_qkv,
    refused_by_gluon_backward,
    run_compile_script,
    spy_calls,
)
from tritonflash import flash_attn_func
from tritonflash.kernels import backward, hopper_dbias
from tritonflash.kernels.common import NO_FEATURES, Features

HERE = Path(__file__).parent
ON_SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
sm90 = pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU (H100/H200)")


@pytest.fixture
def dbias_calls(monkeypatch):
    """Turns the Gluon bias-gradient pass on and records the shape of q of each call that reached it."""
    monkeypatch.setenv(backward.HOPPER_DBIAS_ENV, "1")
    return spy_calls(monkeypatch, hopper_dbias, "hopper_dbias")


def _check(dbias_calls, b, sq, sk, h, hk, d, causal, bias_dims="heads", dtype=torch.bfloat16, taken=True):
    q, k, v = make_qkv(b, sq, sk, h, d, dtype, DEVICE, nheads_k=hk)
    lead = {"heads": (1, h), "full": (b, h), "shared": (1, 1), "batch": (b, 1)}[bias_dims]
    bias = learned_bias((*lead, sq, sk), dtype, DEVICE)
    out = flash_attn_func(q, k, v, bias, causal)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias, causal=causal)
    assert bool(dbias_calls) is taken, f"the Gluon bias-gradient pass {'did not run' if taken else 'ran'}"


# --------------------------------------------------------------------------------------------
# GPU smoke tier, first in the file
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("sq, sk, causal", [(16, 8, False), (64, 80, False), (200, 304, True), (1088, 1088, True)])
def test_smoke(dbias_calls, sq, sk, causal):
    _check(dbias_calls, 2, sq, sk, 2, 2, 64, causal)


# --------------------------------------------------------------------------------------------
# GPU tier
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bias_dims", ["heads", "full", "shared", "batch"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("sq, sk", [(128, 128), (1000, 1000), (257, 512), (50, 72), (300, 104)])
def test_gradients_match_reference(dbias_calls, sq, sk, heads, bias_dims, head_dim, causal):
    # Causal with seqlen_k < seqlen_q has rows that see no key: the tl pass takes it.
    _check(dbias_calls, 2, sq, sk, heads[0], heads[1], head_dim, causal, bias_dims, taken=not (causal and sk < sq))


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_persistent_grid_walks_many_tiles(dbias_calls, head_dim, causal):
    """Far more tiles than SMs, not a multiple of the grid: each CTA walks tiles of several slices,
    ragged query blocks (a missing second 64-row half) and, causal, tiles with no step, the
    ring and both bias buffers running on from one to the next."""
    b, sq, sk, h = 2, 300, 1000, 8
    n_tiles = b * h * -(-sq // hopper_dbias.BLOCK_M) * -(-sk // hopper_dbias.block_n(head_dim))
    sms = hopper_dbias._sm_count(torch.device(DEVICE))
    assert n_tiles > 2 * sms and n_tiles % sms != 0
    _check(dbias_calls, b, sq, sk, h, 4, head_dim, causal, "full")


@pytest.mark.gpu
@sm90
def test_fp16(dbias_calls):
    _check(dbias_calls, 2, 300, 304, 4, 2, 128, True, dtype=torch.float16)


@pytest.mark.gpu
@sm90
def test_broadcast_and_padded_bias_layouts(dbias_calls):
    """A batch-expanded bias (stride 0: a gradient per batch, summed by autograd into the base)
    and a bias whose rows are padded in memory (row stride > seqlen_k)."""
    q, k, v = make_qkv(3, 136, 136, 4, 64, torch.bfloat16, DEVICE, nheads_k=2)
    base = learned_bias((1, 4, 136, 136), torch.bfloat16, DEVICE)
    expanded = base.expand(3, 4, 136, 136)
    out = flash_attn_func(q, k, v, expanded, True)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=base, causal=True)
    padded = learned_bias((1, 4, 136, 136), torch.bfloat16, DEVICE, row_pad=8)
    out = flash_attn_func(q, k, v, padded, False)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=padded)
    assert len(dbias_calls) == 2


@pytest.mark.gpu
@sm90
def test_masking_biases(dbias_calls, monkeypatch):
    """-inf entries (a row with no visible key gets a zero gradient) and, under causal masking, a
    NaN bias at a key the diagonal hides: its gradient is 0, and no NaN reaches other entries.
    The tl forward (the Gluon one lets a NaN bias at a hidden key reach its row, a documented
    deviation)."""
    monkeypatch.setenv("TRITONFLASH_HOPPER_FWD", "0")
    q, k, v = make_qkv(2, 192, 256, 4, 64, torch.bfloat16, DEVICE)
    bias = torch.randn(1, 4, 192, 256, device=DEVICE).to(torch.bfloat16)
    bias[0, 1, 7] = float("-inf")  # row 7 of head 1 sees no key
    bias[0, 2, 3, 250] = float("nan")  # hidden from row 3 (sees keys <= 3 + 64)
    bias.requires_grad_()
    out = flash_attn_func(q, k, v, bias, True)
    (grad,) = torch.autograd.grad(out, bias, torch.randn_like(out))
    assert dbias_calls
    assert torch.isfinite(grad).all()
    assert (grad[0, 1, 7] == 0).all() and grad[0, 2, 3, 250] == 0


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("head_dim", [64, 128])
def test_non_finite_k_and_v_at_hidden_keys(dbias_calls, monkeypatch, head_dim):
    """NaN in K and inf in V at the last key of batch 0, which the causal diagonal hides from
    every row but the last: the bias gradient of those rows is the one with finite values there
    (docs/semantics.md, "Invisible keys"), bit for bit."""
    monkeypatch.setenv("TRITONFLASH_HOPPER_FWD", "0")
    sq, sk = 192, 256
    q, k, v = make_qkv(2, sq, sk, 4, head_dim, torch.bfloat16, DEVICE, requires_grad=False)
    bias = learned_bias((1, 4, sq, sk), torch.bfloat16, DEVICE)
    dout = torch.randn(2, sq, 4, head_dim, device=DEVICE, dtype=torch.bfloat16)
    (clean,) = torch.autograd.grad(flash_attn_func(q, k, v, bias, True), bias, dout)
    k, v = k.clone(), v.clone()
    k[0, -1], v[0, -1] = float("nan"), float("inf")
    (dirty,) = torch.autograd.grad(flash_attn_func(q, k, v, bias, True), bias, dout)
    assert len(dbias_calls) == 2
    assert torch.equal(dirty[:, :, : sq - 1], clean[:, :, : sq - 1])


@pytest.mark.gpu
@sm90
def test_head_expanded_bias_and_negative_scale(dbias_calls):
    """A head-expanded bias (stride 0, size h: a gradient per head, summed by autograd) and a
    negative softmax_scale (finite scales are valid; the tl forward runs then)."""
    q, k, v = make_qkv(2, 136, 200, 4, 64, torch.bfloat16, DEVICE, nheads_k=2)
    base = learned_bias((2, 1, 136, 200), torch.bfloat16, DEVICE)
    out = flash_attn_func(q, k, v, base.expand(2, 4, 136, 200), True)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=base, causal=True)
    bias = learned_bias((1, 4, 136, 200), torch.bfloat16, DEVICE)
    out = flash_attn_func(q, k, v, bias, False, -0.2)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias, softmax_scale=-0.2)
    assert len(dbias_calls) == 2


@pytest.mark.gpu
@sm90
def test_deterministic_and_equal_to_the_tl_pass_within_rounding(dbias_calls, monkeypatch):
    q, k, v = make_qkv(4, 1024, 1024, 8, 64, torch.bfloat16, DEVICE)
    bias = learned_bias((1, 8, 1024, 1024), torch.bfloat16, DEVICE)
    dout = torch.randn(4, 1024, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    grads = [torch.autograd.grad(flash_attn_func(q, k, v, bias, True), bias, dout)[0] for _ in range(2)]
    assert len(dbias_calls) == 2
    assert torch.equal(grads[0], grads[1])
    monkeypatch.setenv(backward.HOPPER_DBIAS_ENV, "0")
    (tl,) = torch.autograd.grad(flash_attn_func(q, k, v, bias, True), bias, dout)
    assert len(dbias_calls) == 2
    # Both sum 4 batches in fp32 and round once to bf16: within a few bf16 steps of each other.
    assert ((grads[0].float() - tl.float()).abs().max() / tl.float().abs().max()).item() < 2e-2


@pytest.mark.gpu
@sm90
def test_not_taken_with_alibi_or_fp32_bias(dbias_calls):
    q, k, v = make_qkv(1, 128, 128, 2, 64, torch.bfloat16, DEVICE)
    slopes = torch.tensor([[0.5, 0.25]], device=DEVICE)
    bias = learned_bias((1, 2, 128, 128), torch.bfloat16, DEVICE)
    flash_attn_func(q, k, v, bias, True, alibi_slopes=slopes).float().square().sum().backward()
    flash_attn_func(q, k, v, learned_bias((1, 2, 128, 128), torch.float32, DEVICE), True).float().square().sum().backward()
    assert not dbias_calls


# --------------------------------------------------------------------------------------------
# CPU tier
# --------------------------------------------------------------------------------------------

def _call(b=2, sq=200, sk=304, h=4, hk=2, d=64, dtype=torch.bfloat16, bias_shape=None, **over):
    """hopper_dbias_supports' arguments for an attn_bwd call on CPU stand-in tensors (never read):
    the sizes make q/k/v/dout, lse and a (1, h, sq, sk) bias; ``over`` replaces any argument."""
    q, k = torch.empty(b, sq, h, d, dtype=dtype), torch.empty(b, sk, hk, d, dtype=dtype)
    bias = torch.empty(bias_shape or (1, h, sq, sk), dtype=dtype)
    args = dict(q=q, k=k, v=k, dout=q, lse=torch.empty(b, h, sq), bias=bias, alibi_slopes=None, key_padding_mask=None,
                causal=False, softmax_scale=0.125, varlen=None, features=NO_FEATURES, capability=(9, 0))
    args.update(over)
    return args


SUPPORTS = [
    pytest.param({}, True, id="bf16-d64-gqa2-heads"),
    pytest.param(dict(d=128), True, id="d128"),
    pytest.param(dict(dtype=torch.float16), True, id="fp16"),
    pytest.param(dict(hk=1), True, id="mqa"),
    pytest.param(dict(causal=True), True, id="causal-sk-longer"),
    pytest.param(dict(sq=300, sk=104), True, id="noncausal-sq-longer"),
    pytest.param(dict(bias_shape=(2, 4, 200, 304)), True, id="full-bias"),
    pytest.param(dict(bias_shape=(1, 1, 200, 304)), True, id="shared-bias"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 304, dtype=torch.bfloat16).expand(2, 4, 200, 304)), True, id="batch-expanded"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 312, dtype=torch.bfloat16)[..., :304]), True, id="padded-rows"),
    pytest.param(dict(causal=True, features=Features(window=(-1, 0))), True, id="causal-as-window-right0"),
    pytest.param(dict(softmax_scale=-0.5), True, id="negative-scale"),
    # refused: the tl pass runs these
    pytest.param(dict(capability=(8, 0)), False, id="sm80"),
    pytest.param(dict(bias=None), False, id="no-bias"),
    pytest.param(dict(dtype=torch.float32), False, id="fp32"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 304)), False, id="fp32-bias"),
    pytest.param(dict(bias=torch.empty(1, 4, 1, 304, dtype=torch.bfloat16)), False, id="row-bias"),
    # The bias rows are padded to 16 bytes, but the gradient (contiguous) would not be.
    pytest.param(dict(sk=300, bias=torch.empty(1, 4, 200, 304, dtype=torch.bfloat16)[..., :300]), False, id="dbias-rows-unaligned"),
    # Rows of 608 bytes (aligned), base 2 bytes past an aligned address.
    pytest.param(dict(bias=torch.empty(4 * 200 * 304 + 1, dtype=torch.bfloat16)[1:].view(1, 4, 200, 304)), False,
                 id="bias-base-unaligned"),
    pytest.param(dict(d=96), False, id="d96"),
    pytest.param(dict(sq=304, sk=104, causal=True, bias_shape=(1, 4, 304, 104)), False, id="causal-sq-longer"),
    pytest.param(dict(b=0), False, id="empty-batch"),
    pytest.param(dict(softmax_scale=float("nan")), False, id="nan-scale"),
] + refused_by_gluon_backward(2, 200, 304, 4, 64)


@pytest.mark.parametrize("over, expected", SUPPORTS)
def test_hopper_dbias_supports(over, expected):
    assert hopper_dbias.hopper_dbias_supports(**_call(**over)) is expected


def test_hopper_dbias_supports_asks_the_device_for_cpu_tensors():
    args = _call()
    del args["capability"]
    assert hopper_dbias.hopper_dbias_supports(**args) is False


COMPILE_CASES = [dict(d=d, causal=c, gqa=g) for d in (64, 128) for c in (False, True) for g in (1, 2)] + [
    dict(d=64, causal=True, bias="full"), dict(d=128, causal=False, bias="shared", dtype="float16")]


def _case_id(c):
    return (f"d{c['d']}" + ("-causal" if c["causal"] else "") + (f"-gqa{c['gqa']}" if c.get("gqa", 1) > 1 else "")
            + (f"-{c['bias']}" if "bias" in c else "") + ("-fp16" if c.get("dtype") == "float16" else ""))


@pytest.fixture(scope="module")
def compiled():
    return compile_gluon_cases(HERE / "sm90_hopper_dbias_compile.py", COMPILE_CASES, _case_id)


@pytest.mark.skipif(ON_GPU, reason="the GPU tier runs the kernel itself")
@pytest.mark.parametrize("case", [_case_id(c) for c in COMPILE_CASES])
def test_compiles_for_sm90(compiled, case):
    # Up to 24 bytes spill at d64 (the persistent loop's tile state); more would mean the three
    # score-sized fp32 tiles of a warpgroup no longer fit.
    assert_gluon_compiled(compiled[case], max_spill_bytes=32)


def test_kernel_arithmetic_matches_autograd():
    """benchmarks/experiments/gluon_dbias.py --formula: the kernel's arithmetic written in torch
    (log2 units, the causal mask folded into the bias as -inf, a -inf lse read as +inf) against
    autograd through the reference, with GQA, seqlen_k > seqlen_q, a row with no visible key and
    a NaN bias at a hidden key. Guards the math; the GPU tier checks the kernel."""
    script = HERE.parent / "benchmarks" / "experiments" / "gluon_dbias.py"
    proc, _ = run_compile_script(script, "--formula", timeout=300)
    assert proc.returncode == 0 and "formula check passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
