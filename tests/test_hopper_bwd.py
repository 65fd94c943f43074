"""The Gluon Hopper dK/dV pass (kernels/hopper_bwd.py, issue 15 item 2; EXPERIMENTAL, opt-in with
``TRITONFLASH_HOPPER_BWD=1``).

CPU tier: the switch's values, that it stays off under the interpreter, and that the kernel
compiles for sm_90a (stand-in driver, one subprocess for every variant) within shared memory,
with async wgmma and no serialised wgmma. GPU tier (sm_90 only): flash_attn_func's gradients
with the switch on against the reference (docs/testing.md's rule), a spy asserting the Gluon
pass ran, and bitwise-equal gradients from two runs. The GPU smoke tests come first (a barrier
hang shows early; run the file under `timeout`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import assert_gluon_compiled, check_against_reference, compile_gluon_cases, make_qkv, spy_calls
from tritonflash import flash_attn_func
from tritonflash.kernels import backward, hopper_bwd

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
@pytest.mark.parametrize("sq, sk", [(128, 128), (1000, 1000), (257, 511), (1024, 2048)])
def test_gradients_match_reference(bwd_calls, sq, sk, heads, head_dim, causal):
    _check(bwd_calls, 2, sq, sk, heads[0], heads[1], head_dim, causal)


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
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@sm90
def test_not_taken_with_bias_or_alibi(bwd_calls):
    q, k, v = make_qkv(1, 128, 128, 2, 128, torch.bfloat16, DEVICE)
    slopes = torch.tensor([[0.5, 0.25]], device=DEVICE)
    flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes).sum().backward()
    assert not bwd_calls


# --------------------------------------------------------------------------------------------
# CPU tier
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, on", [(None, False), ("", False), ("0", False), (" 1 ", True)])
def test_switch(monkeypatch, raw, on):
    if raw is None:
        monkeypatch.delenv(backward.HOPPER_BWD_ENV, raising=False)
    else:
        monkeypatch.setenv(backward.HOPPER_BWD_ENV, raw)
    monkeypatch.setattr(backward, "INTERPRET", False)
    assert (backward._hopper_bwd_module() is hopper_bwd) is on


def test_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(backward.HOPPER_BWD_ENV, "yes")
    with pytest.raises(ValueError, match="TRITONFLASH_HOPPER_BWD"):
        backward._hopper_bwd_module()


def test_off_under_the_interpreter(monkeypatch):
    monkeypatch.setenv(backward.HOPPER_BWD_ENV, "1")
    monkeypatch.setattr(backward, "INTERPRET", True)
    assert backward._hopper_bwd_module() is None


def test_supports_refuses_cpu_tensors_and_short_causal_keys():
    q = torch.empty(1, 8, 2, 128, dtype=torch.bfloat16)
    assert not hopper_bwd.hopper_bwd_supports(q, q, q, q, q, q, False, 0.1)
    k = torch.empty(1, 4, 2, 128, dtype=torch.bfloat16)
    assert not hopper_bwd.hopper_bwd_supports(q, k, k, q, k, k, True, 0.1, capability=(9, 0))
    assert hopper_bwd.hopper_bwd_supports(q, k, k, q, k, k, False, 0.1, capability=(9, 0))


COMPILE_CASES = [dict(d=d, causal=c, gqa=g) for d in (64, 128) for c in (False, True) for g in (1, 2)] + [
    dict(d=128, causal=True, gqa=1, dtype="float16")]


def _case_id(c):
    return f"d{c['d']}" + ("-causal" if c["causal"] else "") + (f"-gqa{c['gqa']}" if c["gqa"] > 1 else "") + (
        "-fp16" if c.get("dtype") == "float16" else "")


@pytest.fixture(scope="module")
def compiled():
    return compile_gluon_cases(HERE / "sm90_hopper_bwd_compile.py", COMPILE_CASES, _case_id)


@pytest.mark.skipif(ON_GPU, reason="the GPU tier runs the kernel itself")
@pytest.mark.parametrize("case", [_case_id(c) for c in COMPILE_CASES])
def test_compiles_for_sm90(compiled, case):
    # A few loop-invariant scalars spill at head dim 128 (3 loads a step from L1); more would
    # mean the accumulators no longer fit.
    assert_gluon_compiled(compiled[case], max_spill_bytes=256)
