"""The Gluon Hopper forward (kernels/hopper.py, issue 15), the default for head dim 128 on sm_90.

CPU tier: which calls ``hopper_supports`` takes (the device check injected), the
``TRITONFLASH_HOPPER_FWD`` modes, that the dispatch stays off under the interpreter and out of
``import tritonflash``, the fast descriptor against the constructor, and that the kernel compiles
for sm_90a (stand-in driver, one subprocess for every variant) within shared memory, without
spills. GPU tier (sm_90 only): flash_attn_func with ``TRITONFLASH_HOPPER_FWD=1`` (every covered
head dim) and with the default dispatch against the reference (docs/testing.md's rule), out, lse
and the gradients of the ``tl`` backward that consumes this forward's lse, with a spy asserting
whether the Hopper kernel ran; with key padding too (right and random padding, rows without a
key, NaN/inf in padded K and V), and with an additive bias (the BIAS variant: bias shapes and broadcasts, -inf rows and blocks, dbias from
the tl backward). The GPU smoke tests come first (short and partial query blocks: a barrier
hang shows early), and strict xfails carry the known causal invisible-key deviation
(docs/semantics.md) and the BIAS variant's NaN bias at a causally hidden key (hopper.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import assert_gluon_compiled, check_against_reference, compile_gluon_cases, make_qkv, spy_calls
from tritonflash import flash_attn_func
from tritonflash.kernels import forward, hopper
from tritonflash.kernels.common import NO_FEATURES, Features, Varlen

HERE = Path(__file__).parent
ON_SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)

sm90 = pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU (H100/H200)")


def _set_mode(monkeypatch, mode):
    """TRITONFLASH_HOPPER_FWD=mode for this test; None: unset."""
    if mode is None:
        monkeypatch.delenv("TRITONFLASH_HOPPER_FWD", raising=False)
    else:
        monkeypatch.setenv("TRITONFLASH_HOPPER_FWD", mode)


def _spy(monkeypatch):
    """Records the shape of q of each call that reached the Hopper kernel."""
    return spy_calls(monkeypatch, hopper, "hopper_fwd")


@pytest.fixture
def hopper_calls(monkeypatch):
    """Turns the Hopper path on for every head dim it covers and records each call that reached it."""
    _set_mode(monkeypatch, "1")
    return _spy(monkeypatch)


@pytest.fixture
def default_calls(monkeypatch):
    """The default dispatch (TRITONFLASH_HOPPER_FWD unset), recording each call that reached the Hopper path."""
    _set_mode(monkeypatch, None)
    return _spy(monkeypatch)


def _slopes(nheads, batch=None):
    """ALiBi slopes (nheads,), or (batch, nheads) with a different set per batch entry."""
    slopes = torch.exp2(-8.0 * torch.arange(1, nheads + 1, device=DEVICE, dtype=torch.float32) / nheads)
    if batch is None:
        return slopes
    return slopes * torch.linspace(0.5, 2.0, batch, device=DEVICE)[:, None]


def _padding(batch, seqlen_k, kind):
    """A (batch, seqlen_k) bool key padding mask (True = keep). 'right': right padding with a
    different length per batch entry (the last one keeps every key); 'random': each key kept
    with probability 0.7, and key 0 padded (the first key block may leave a row without a key)."""
    if kind == "right":
        lengths = torch.tensor([max(1, seqlen_k * (i + 1) // batch) for i in range(batch)], device=DEVICE)
        return torch.arange(seqlen_k, device=DEVICE)[None, :] < lengths[:, None]
    mask = torch.rand(batch, seqlen_k, device=DEVICE) > 0.3
    mask[:, 0] = False
    return mask


def _check_forward(hopper_calls, q, k, v, calls=1, grads=False, **kwargs):
    """flash_attn_func(q, k, v, **kwargs) with the lse against the reference (docs/testing.md's
    rule), and the gradients when ``grads``; the Hopper path must have been taken ``calls`` times."""
    out, lse = flash_attn_func(q, k, v, return_lse=True, **kwargs)
    assert len(hopper_calls) == calls, f"Hopper path taken {len(hopper_calls)} times, expected {calls}"
    check_against_reference(out, q, k, v, torch.randn_like(out) if grads else None, lse=lse, check_grads=grads, **kwargs)


# --------------------------------------------------------------------------------------------
# GPU smoke tier, first in the file: the shapes most likely to hang the barriers show it early
# (run under `timeout`, docs/architecture.md)
# --------------------------------------------------------------------------------------------

SMOKE = [(1, 1, False), (64, 77, False), (1088, 1088, True)]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("seqlen_q, seqlen_k, causal", SMOKE, ids=[f"sq{q}-sk{k}-{'causal' if c else 'noncausal'}" for q, k, c in SMOKE])
def test_smoke_short_and_partial_query_blocks(hopper_calls, seqlen_q, seqlen_k, causal):
    """seqlen_q % 128 in [1, 64] (or <= 64): warpgroup 1 has no real row, its Q half is not
    loaded and q_bar expects one half's bytes; a wrong count hangs here."""
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 64, torch.bfloat16, DEVICE, requires_grad=False)
    _check_forward(hopper_calls, q, k, v, causal=causal)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("seqlen_q, seqlen_k, causal", SMOKE, ids=[f"sq{q}-sk{k}-{'causal' if c else 'noncausal'}" for q, k, c in SMOKE])
def test_smoke_key_padding(hopper_calls, seqlen_q, seqlen_k, causal):
    """The same shapes with key padding: the V-zeroing path has a warpgroup barrier inside a
    branch that every warp of the group must take alike."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 2, 64, torch.bfloat16, DEVICE, requires_grad=False)
    _check_forward(hopper_calls, q, k, v, causal=causal, key_padding_mask=_padding(2, seqlen_k, "random"))


# --------------------------------------------------------------------------------------------
# CPU tier: which calls the Hopper path takes
# --------------------------------------------------------------------------------------------


def _call(b=2, sq=200, sk=300, h=4, hk=2, d=128, dtype=torch.bfloat16, **over):
    """hopper_supports' arguments for an attn_fwd call on CPU stand-in tensors (never read):
    the sizes make q/k/v, ``over`` replaces any argument."""
    args = dict(q=torch.empty(b, sq, h, d, dtype=dtype), k=torch.empty(b, sk, hk, d, dtype=dtype), out=None, bias=None,
                alibi_slopes=None, key_padding_mask=None, causal=False, softmax_scale=0.125, varlen=None,
                features=NO_FEATURES, capability=(9, 0))
    args["v"] = args["k"]
    args.update(over)
    return args


def _strided(shape, pad, dtype=torch.bfloat16):
    """A view of ``shape`` whose last-but-one strides carry ``pad`` extra elements per row."""
    *outer, d = shape
    return torch.empty(*outer, d + pad, dtype=dtype)[..., :d]


SUPPORTS = [
    pytest.param({}, True, id="bf16-d128-sq200-sk300-gqa2"),
    pytest.param(dict(d=64), True, id="d64"),
    pytest.param(dict(dtype=torch.float16), True, id="fp16"),
    pytest.param(dict(hk=1), True, id="mqa"),
    pytest.param(dict(hk=4), True, id="mha"),
    pytest.param(dict(sq=1, sk=1), True, id="sq1-sk1"),
    pytest.param(dict(softmax_scale=hopper.MIN_SOFTMAX_SCALE), True, id="scale-at-min"),
    pytest.param(dict(causal=True), True, id="causal-sk-longer"),
    pytest.param(dict(sq=300, sk=300, causal=True), True, id="causal-square"),
    pytest.param(dict(sq=300, sk=200), True, id="noncausal-sq-longer"),
    pytest.param(dict(causal=True, features=Features(window=(-1, 0))), True, id="causal-as-window-right0"),
    pytest.param(dict(alibi_slopes=torch.empty(1, 4)), True, id="alibi-per-head"),
    pytest.param(dict(alibi_slopes=torch.empty(2, 4)), True, id="alibi-per-batch"),
    pytest.param(dict(q=torch.empty(2, 4, 200, 128, dtype=torch.bfloat16).transpose(1, 2)), True, id="q-bhsd-layout"),
    pytest.param(dict(q=_strided((2, 200, 4, 128), 8)), True, id="q-row-padding-16B"),
    pytest.param(dict(b=1, q=torch.empty(200 * 4 * 128, dtype=torch.bfloat16).as_strided((1, 200, 4, 128), (1, 512, 128, 1))),
                 True, id="batch1-any-batch-stride"),
    # key padding: attn_fwd's (batch, seqlen_k) uint8 view of the bool mask, any batch stride
    pytest.param(dict(key_padding_mask=torch.empty(2, 300, dtype=torch.uint8)), True, id="key-padding"),
    pytest.param(dict(key_padding_mask=torch.empty(2, 300, dtype=torch.uint8), causal=True,
                      alibi_slopes=torch.empty(2, 4)), True, id="key-padding-causal-alibi"),
    pytest.param(dict(key_padding_mask=torch.empty(1, 300, dtype=torch.uint8).expand(2, 300)), True,
                 id="key-padding-batch-stride0"),
    pytest.param(dict(key_padding_mask=torch.empty(2, 320, dtype=torch.uint8)[:, :300]), True, id="key-padding-row-stride"),
    pytest.param(dict(sk=1, key_padding_mask=torch.empty(4, dtype=torch.uint8).as_strided((2, 1), (1, 3))), True,
                 id="key-padding-one-key-any-stride"),
    # refused: the tl kernel runs these
    pytest.param(dict(capability=(8, 0)), False, id="sm80"),
    pytest.param(dict(capability=(10, 0)), False, id="sm100"),
    pytest.param(dict(dtype=torch.float32), False, id="fp32"),
    pytest.param(dict(d=96), False, id="d96"),
    pytest.param(dict(d=256), False, id="d256"),
    pytest.param(dict(sq=300, sk=200, causal=True), False, id="causal-sq-longer-dead-rows"),
    pytest.param(dict(softmax_scale=-0.1), False, id="negative-scale"),
    pytest.param(dict(softmax_scale=0.0), False, id="zero-scale"),
    # slope / scale is taken in fp32 in the kernel: a tiny scale could overflow it (no host read of the slopes)
    pytest.param(dict(softmax_scale=hopper.MIN_SOFTMAX_SCALE / 2), False, id="scale-below-min"),
    pytest.param(dict(softmax_scale=1e-300), False, id="scale-underflows-fp32"),
    pytest.param(dict(bias=torch.empty(1, 4, 200, 300)), False, id="bias"),
    pytest.param(dict(key_padding_mask=torch.empty(300, 2, dtype=torch.uint8).T), False, id="key-padding-column-stride"),
    pytest.param(dict(key_padding_mask=torch.empty(2, 300, dtype=torch.bool)), False, id="key-padding-bool"),
    pytest.param(dict(key_padding_mask=torch.empty(2, 299, dtype=torch.uint8)), False, id="key-padding-shape"),
    pytest.param(dict(key_padding_mask=torch.empty(2, 1, 300, dtype=torch.uint8)), False, id="key-padding-rank3"),
    pytest.param(dict(sq=300, sk=200, causal=True, key_padding_mask=torch.empty(2, 200, dtype=torch.uint8)), False,
                 id="key-padding-causal-sq-longer"),
    pytest.param(dict(varlen=Varlen(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 1, 1)), False,
                 id="varlen"),
    pytest.param(dict(features=Features(window=(16, -1))), False, id="window"),
    pytest.param(dict(features=Features(window=(-1, 0))), False, id="window-right0-noncausal"),
    pytest.param(dict(features=Features(softcap=30.0)), False, id="softcap"),
    pytest.param(dict(features=Features(sinks=torch.empty(4))), False, id="sinks"),
    pytest.param(dict(features=Features(dropout_p=0.1, seed=torch.zeros(1, dtype=torch.int64))), False, id="dropout"),
    pytest.param(dict(features=Features(attn_mask=torch.empty(1, 1, 200, 300, dtype=torch.bool))), False, id="attn-mask"),
    pytest.param(dict(q=_strided((2, 200, 4, 128), 4)), False, id="q-row-stride-not-16B"),
    pytest.param(dict(q=torch.empty(2 * 200 * 4 * 128 + 1, dtype=torch.bfloat16)[1:].view(2, 200, 4, 128)), False,
                 id="q-base-not-16B"),
    pytest.param(dict(q=torch.empty(2, 200, 4, 128, dtype=torch.bfloat16).transpose(-1, -2).contiguous().transpose(-1, -2)),
                 False, id="q-last-stride-not-1"),
    pytest.param(dict(k=torch.empty(2, 300, 1, 128, dtype=torch.bfloat16).expand(2, 300, 2, 128)), False,
                 id="k-stride0-heads"),
    pytest.param(dict(out=_strided((2, 200, 4, 128), 4)), False, id="out-row-stride-not-16B"),
    pytest.param(dict(b=0), False, id="empty-batch"),
]


@pytest.mark.parametrize("over, expected", SUPPORTS)
def test_hopper_supports(over, expected):
    assert hopper.hopper_supports(**_call(**over)) is expected


def _bias(shape, sk_alloc=None, dtype=torch.bfloat16):
    """A bias of ``shape`` (rank 4) whose rows hold ``sk_alloc`` elements (a view of the first
    shape[-1]); sk_alloc None: contiguous."""
    *outer, sk = shape
    return torch.empty(*outer, sk_alloc or sk, dtype=dtype)[..., :sk]


# hopper_supports with a bias (_call's q (2, 200, 4, 128) bf16, k (2, 300, 2, 128)): the (seqlen_q, seqlen_k)
# plane must be real and TMA-addressable (rows 16-byte aligned: 304 elements).
BIAS_SUPPORTS = [
    pytest.param(dict(bias=_bias((2, 4, 200, 300), 304)), True, id="full"),
    pytest.param(dict(bias=_bias((1, 4, 200, 300), 304)), True, id="per-head-batch1"),
    pytest.param(dict(bias=_bias((1, 4, 200, 300), 304).expand(2, 4, 200, 300)), True, id="batch-stride0"),
    pytest.param(dict(bias=_bias((2, 1, 200, 300), 304)), True, id="per-batch-heads1"),
    pytest.param(dict(bias=_bias((1, 1, 200, 300), 304).expand(2, 4, 200, 300)), True, id="shared-expanded"),
    pytest.param(dict(bias=_bias((2, 4, 200, 304)), sk=304), True, id="contiguous-sk304"),
    pytest.param(dict(bias=_bias((1, 4, 200, 300), 304), causal=True, alibi_slopes=torch.empty(2, 4)), True,
                 id="causal-alibi"),
    pytest.param(dict(bias=_bias((1, 4, 200, 300), 304, torch.float16), dtype=torch.float16), True, id="fp16"),
    pytest.param(dict(bias=_bias((1, 4, 200, 300), 304), d=64), True, id="d64"),
    pytest.param(dict(sq=1, bias=torch.empty(2 * 4 * 304, dtype=torch.bfloat16).as_strided((2, 4, 1, 300), (4 * 304, 304, 7, 1))),
                 True, id="sq1-any-row-stride"),
    pytest.param(dict(sq=1, bias=_bias((2, 4, 1, 300))), False, id="sq1-head-stride-not-16B"),
    pytest.param(dict(bias=torch.empty(4, 200, 2, 304, dtype=torch.bfloat16).permute(2, 0, 1, 3)[..., :300]), True,
                 id="batch-stride-smaller-than-rows"),
    # refused: the tl kernel runs these
    pytest.param(dict(bias=_bias((2, 4, 200, 300), 304, torch.float32)), False, id="fp32"),
    pytest.param(dict(bias=_bias((2, 4, 200, 300), 304, torch.float16)), False, id="fp16-bias-bf16-q"),
    pytest.param(dict(bias=_bias((2, 4, 1, 300), 304)), False, id="row-bias"),
    pytest.param(dict(bias=_bias((2, 4, 1, 300), 304).expand(2, 4, 200, 300)), False, id="row-bias-expanded"),
    pytest.param(dict(bias=_bias((2, 4, 200, 1)).expand(2, 4, 200, 300)), False, id="key-dim-broadcast"),
    pytest.param(dict(bias=_bias((2, 4, 200, 300))), False, id="rows-not-16B"),
    pytest.param(dict(bias=torch.empty(2, 4, 304, 200, dtype=torch.bfloat16)[:, :, :300].transpose(-1, -2)), False,
                 id="key-stride-not-1"),
    pytest.param(dict(bias=torch.empty(2 * 4 * 200 * 304 + 1, dtype=torch.bfloat16)[1:].view(2, 4, 200, 304)[..., :300]),
                 False, id="base-not-16B"),
    pytest.param(dict(bias=torch.empty(2 * 4 * 200 * 304 + 4, dtype=torch.bfloat16).as_strided(
        (2, 4, 200, 300), (4 * 200 * 304 + 4, 200 * 304, 304, 1))), False, id="batch-stride-not-16B"),
    pytest.param(dict(bias=_bias((2, 4, 200, 300), 304), key_padding_mask=torch.empty(2, 300, dtype=torch.uint8)), False,
                 id="with-key-padding"),
    pytest.param(dict(bias=_bias((2, 4, 200, 300), 304), capability=(8, 0)), False, id="sm80"),
    pytest.param(dict(bias=_bias((2, 4, 200, 300), 304), features=Features(softcap=30.0)), False, id="softcap"),
]


@pytest.mark.parametrize("over, expected", BIAS_SUPPORTS)
def test_hopper_supports_bias(over, expected):
    """The biases the BIAS variant reads by TMA are taken, the others (and a bias with key
    padding) left to the tl kernel."""
    assert hopper.hopper_supports(**_call(**over)) is expected


@pytest.mark.parametrize("shape, box_coords", [
    ((2, 4, 200, 300), (2, 4)), ((1, 4, 200, 300), (1, 4)), ((2, 1, 200, 300), (2, 1)), ((1, 1, 1, 300), (1, 1)),
])
@pytest.mark.parametrize("expand", [False, True], ids=["view", "expanded"])
def test_bias_descriptor(shape, box_coords, expand):
    """Broadcast batch/head dims (one element, or stride 0 from an expand) become one element in
    the descriptor, with a 16-byte aligned nonzero stride; the plane keeps its strides."""
    bias = _bias(shape, 304)
    if expand:
        bias = bias.expand(2, 4, *shape[2:])
    desc = hopper._bias_descriptor(bias, torch.bfloat16)
    assert tuple(desc.shape) == (*box_coords, *shape[2:])
    assert desc.block_shape == [1, 1, hopper.BLOCK_M, hopper.BLOCK_N]
    assert desc.strides[3] == 1 and all(st > 0 and (st * 2) % 16 == 0 for st in desc.strides[:3])
    assert desc.base.data_ptr() == bias.data_ptr()
    if shape[2] > 1:
        assert desc.strides[2] == 304


def test_plain_scores_still_refuses_key_padding():
    """The forward checks a mask itself; plain_scores, which the backward's Gluon passes use too,
    keeps refusing one."""
    assert hopper.plain_scores(None, None, NO_FEATURES, False) is True
    assert hopper.plain_scores(torch.empty(2, 300, dtype=torch.uint8), None, NO_FEATURES, False) is False


def test_hopper_supports_asks_the_device_for_cpu_tensors():
    """Without an injected capability, CPU tensors are never the Hopper path's."""
    args = _call()
    del args["capability"]
    assert hopper.hopper_supports(**args) is False


def test_descriptor_strides_of_single_element_dims():
    """A dim of one element keeps no stride torch happened to give it (here 1 and 0, which
    TMA would refuse): the descriptor gets the contiguous one."""
    q = torch.empty(200 * 128, dtype=torch.bfloat16).as_strided((1, 200, 1, 128), (1, 128, 0, 1))
    desc = hopper._descriptor(q, hopper.HALF_M)
    assert desc.strides == [200 * 128, 128, 128, 1]
    assert desc.block_shape == [1, hopper.HALF_M, 1, 128]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, rows", [(64, hopper.HALF_M), (128, hopper.BLOCK_N)])
@pytest.mark.parametrize("shape", [(2, 300, 4), (1, 300, 1)], ids=["b2-h4", "b1-h1"])
def test_descriptor_equals_the_checked_constructor(dtype, head_dim, rows, shape):
    """``_descriptor`` skips TensorDescriptor's constructor (host time): it must give the object
    the constructor gives, field by field, and the class must have no field it does not set
    (a Triton upgrade that adds one fails here, not on the GPU). With a batch and a head of one
    element, the constructor is given the strides _descriptor rewrites for such dims."""
    import dataclasses

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    assert {f.name for f in dataclasses.fields(TensorDescriptor)} == {"base", "shape", "strides", "block_shape", "layout", "padding"}
    b, s, h = shape
    # (b, h, s, d) memory seen as (b, s, h, d): strides (h*s*d, d, s*d, 1)
    q = torch.empty(b, s, h, head_dim, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    fast = hopper._descriptor(q, rows)
    layout = hopper.gl.NVMMASharedLayout.get_default_for([1, rows, 1, head_dim], hopper.GL_DTYPES[dtype])
    strides = [h * s * head_dim, head_dim, s * head_dim, 1]
    if h == 1:
        strides[2] = head_dim  # a dim of one element: the contiguous stride (_descriptor)
    if b == 1:
        strides[0] = s * strides[1]
    checked = TensorDescriptor(q, list(q.shape), strides, [1, rows, 1, head_dim], layout)
    assert fast.base is checked.base
    for name in ("shape", "strides", "block_shape", "layout", "padding"):
        assert getattr(fast, name) == getattr(checked, name), name
    assert type(fast) is TensorDescriptor


def test_dispatch_is_off_under_the_interpreter(monkeypatch):
    """The Gluon kernel cannot run in the interpreter: the Hopper path is off there whatever
    TRITONFLASH_HOPPER_FWD says."""
    for mode in ("1", "auto", None):
        _set_mode(monkeypatch, mode)
        assert forward._hopper_module(128) is (None if forward.INTERPRET else hopper)
    monkeypatch.setenv("TRITONFLASH_HOPPER_FWD", "0")
    assert forward._hopper_module(128) is None


@pytest.mark.parametrize("mode, head_dim, expected", [
    (None, 128, True), (None, 64, False), ("auto", 128, True), ("auto", 64, False), ("", 128, True), ("", 64, False),
    ("AUTO", 64, False), ("1", 64, True), ("1", 128, True), (" 1 ", 64, True), ("0", 128, False),
])
def test_dispatch_by_mode_and_head_dim(monkeypatch, mode, head_dim, expected):
    """Unset, empty or auto: the default head dims (DEFAULT_HEAD_DIMS, 128); 1: every head dim it
    covers; 0: never (hopper_supports decides the rest; case and spaces do not matter). The interpreter's switch is turned off
    here so that the CPU tier checks the choice too."""
    monkeypatch.setattr(forward, "INTERPRET", False)
    _set_mode(monkeypatch, mode)
    assert (forward._hopper_module(head_dim) is hopper) is expected


@pytest.mark.parametrize("mode, takes", [(None, True), ("auto", True), ("0", False), ("1", True)])
def test_dispatch_of_a_bias_by_mode(monkeypatch, mode, takes):
    """attn_fwd with a bias the BIAS variant covers at d128 (device check and both launches
    stubbed): the Hopper kernel unless TRITONFLASH_HOPPER_FWD=0, with or without the bias."""
    monkeypatch.setattr(forward, "INTERPRET", False)
    monkeypatch.setattr(hopper, "on_sm90", lambda t, capability=None: True)
    ran = []
    monkeypatch.setattr(hopper, "hopper_fwd", lambda *a, **kw: ran.append(("hopper", kw.get("bias") is not None)) or (None, None))
    monkeypatch.setattr(forward, "_launch_fwd", lambda *a, **kw: ran.append(("tl", kw["VAR"].HAS_BIAS)))
    _set_mode(monkeypatch, mode)
    q = torch.empty(2, 200, 4, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 300, 2, 128, dtype=torch.bfloat16)
    bias = _bias((1, 4, 200, 300), 304)
    forward.attn_fwd(q, k, k, bias, None, None, True, 0.125)
    assert ran == [("hopper", True) if takes else ("tl", True)]
    ran.clear()
    forward.attn_fwd(q, k, k, None, None, None, True, 0.125)
    assert ran == [("tl", False) if mode == "0" else ("hopper", False)]


@pytest.mark.parametrize("mode", ["yes", "true", "2", "off"])
def test_dispatch_refuses_an_unknown_mode(monkeypatch, mode):
    """A misspelt switch is an error naming the variable and the values, not a silent default."""
    monkeypatch.setenv("TRITONFLASH_HOPPER_FWD", mode)
    with pytest.raises(ValueError, match="TRITONFLASH_HOPPER_FWD must be 0, 1 or auto"):
        forward._hopper_module(128)


def test_import_does_not_load_the_gluon_module():
    """``import tritonflash`` must work where Gluon is missing: kernels/hopper.py is imported on first use."""
    code = ("import sys, tritonflash; assert not {'tritonflash.kernels.hopper', 'tritonflash.kernels.hopper_bwd'} & "
            "set(sys.modules), 'a Gluon module imported eagerly'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# CPU tier: the kernel compiles for sm_90a
# --------------------------------------------------------------------------------------------

# Every compiled variant: (head dim, causal, ALiBi, key padding) in all combinations, bf16, half
# of them with GQA (kv_group 1 and > 1 compile apart: Triton specialises integers equal to 1),
# and fp16 once without and once with key padding; four BIAS variants. seqlens 200/300: not multiples of the tiles,
# and seqlen_k > seqlen_q for the causal offset.
COMPILE_CASES = [
    dict(d=d, causal=c, alibi=a, gqa=2 if c == a else 1) for d in (64, 128) for c in (False, True) for a in (False, True)
] + [dict(d=128, causal=True, alibi=False, gqa=4, dtype="float16")] + [
    dict(d=d, causal=c, alibi=a, gqa=1 if c == a else 2, kpm=True) for d in (64, 128) for c in (False, True) for a in (False, True)
] + [dict(d=128, causal=True, alibi=True, gqa=4, dtype="float16", kpm=True)] + [
    # The BIAS variant (TRITONFLASH_HOPPER_FWD=1): 2 K/V/bias stages at d128, 3 at d64.
    dict(d=128, causal=True, alibi=True, gqa=2, bias="heads"), dict(d=128, causal=False, alibi=False, gqa=1, bias="full"),
    dict(d=64, causal=True, alibi=False, gqa=1, bias="full"), dict(d=64, causal=False, alibi=True, gqa=2, bias="heads"),
]


def _case_id(c):
    return (f"d{c['d']}" + ("-causal" if c["causal"] else "") + ("-alibi" if c["alibi"] else "") +
            ("-kpm" if c.get("kpm") else "") + (f"-bias-{c['bias']}" if c.get("bias") else "") +
            (f"-gqa{c['gqa']}" if c["gqa"] > 1 else "") +
            ("-fp16" if c.get("dtype") == "float16" else ""))


@pytest.fixture(scope="module")
def compiled():
    return compile_gluon_cases(HERE / "sm90_hopper_compile.py", COMPILE_CASES, _case_id)


@pytest.mark.skipif(ON_GPU, reason="the GPU tier runs the kernel itself")
@pytest.mark.parametrize("case", [_case_id(c) for c in COMPILE_CASES])
def test_compiles_for_sm90(compiled, case):
    assert_gluon_compiled(compiled[case])


# --------------------------------------------------------------------------------------------
# GPU tier (sm_90): against the reference, through the public API
# --------------------------------------------------------------------------------------------

# Also seqlen_q % 128 in [1, 64] and seqlen_q <= 64 (warpgroup 1 without a real row), seqlen_k
# < 128 (one partial key block), seqlen_q = 1; (100, 60) is non-causal only (causal refused).
SEQLENS = [(128, 128), (1000, 1000), (1024, 1024), (2048, 2048), (1000, 1536), (1024, 2048), (2048, 1000),
           (1, 1), (64, 77), (1, 147), (1088, 1088), (100, 60)]
HEADS = [(4, 4), (4, 1), (6, 2)]  # (nheads, nheads_k): MHA, MQA, GQA


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize("nheads, nheads_k", HEADS, ids=[f"h{h}-hk{k}" for h, k in HEADS])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS, ids=[f"sq{q}-sk{k}" for q, k in SEQLENS])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_forward_matches_reference(hopper_calls, dtype, seqlen_q, seqlen_k, head_dim, causal, nheads, nheads_k, alibi):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, head_dim, dtype, DEVICE, nheads_k=nheads_k, requires_grad=False)
    slopes = _slopes(nheads) if alibi else None
    takes = not (causal and seqlen_q > seqlen_k)
    _check_forward(hopper_calls, q, k, v, calls=int(takes), causal=causal, alibi_slopes=slopes)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1000, 1000), (1024, 2048)], ids=["sq1000-sk1000", "sq1024-sk2048"])
def test_backward_with_hopper_lse(hopper_calls, seqlen_q, seqlen_k, head_dim, causal, alibi):
    """The tl backward recomputes P from the forward's lse: gradients through the Hopper forward
    must match the reference's."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2)
    slopes = _slopes(6) if alibi else None
    _check_forward(hopper_calls, q, k, v, grads=True, causal=causal, alibi_slopes=slopes)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_fp16_and_bhsd_layout(hopper_calls, causal):
    """fp16, and q/k/v as (b, h, s, d) tensors transposed to (b, s, h, d): the 4-D descriptors
    take their strides as they are."""
    q, k, v = (torch.randn(2, 4, s, 128, dtype=torch.float16, device=DEVICE).transpose(1, 2) for s in (1000, 1100, 1100))
    _check_forward(hopper_calls, q, k, v, causal=causal)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_rows_past_seqlen_are_never_read(hopper_calls, causal):
    """k/v are views into buffers whose rows past seqlen_k hold NaN, in each sequence: the TMA
    boxes stop at each sequence's end (a 2-D (batch * seqlen, ...) view would read them, and the
    next sequence's rows)."""
    sq, sk, pad = 1000, 1000, 72
    q, k, v = make_qkv(2, sq, sk, 4, 128, torch.bfloat16, DEVICE, requires_grad=False)
    k_buf, v_buf = (torch.full((2, sk + pad, 4, 128), float("nan"), dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    k_buf[:, :sk], v_buf[:, :sk] = k, v
    clean = flash_attn_func(q, k, v, causal=causal)
    poisoned = flash_attn_func(q, k_buf[:, :sk], v_buf[:, :sk], causal=causal)
    assert len(hopper_calls) == 2
    assert torch.equal(clean, poisoned)


@pytest.mark.gpu
@sm90
def test_causal_schedule_with_several_l2_sections(hopper_calls):
    """Causal CTAs run longest first inside sections of (batch, head) pairs whose K/V fit in L2
    (_tile_coords): (batch, head) pairs of 2 MiB K/V fill several sections, the last one short
    (H100/H200, 50 MiB L2: 12 pairs a section, b=4 gives 12 + 12 + 8)."""
    s, h, d = 4096, 8, 128
    # The section size depends on seqlen_k, head dim and the device's L2, not on the batch.
    per_section = hopper._heads_per_l2_section(torch.empty(1, s, h, d, dtype=torch.bfloat16, device=DEVICE), h)
    b = next((b for b in range(4, 64) if (b * h) % per_section and b * h > per_section), None)
    assert b is not None, f"no batch up to 63 gives a short last section of {per_section} pairs"
    assert -(-b * h // per_section) > 1
    q, k, v = make_qkv(b, s, s, h, d, torch.bfloat16, DEVICE, requires_grad=False)
    _check_forward(hopper_calls, q, k, v, causal=True)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_softmax_scale_with_alibi(hopper_calls, scale, causal):
    """The kernel adds ALiBi in q.k units (slope / scale): a scale other than d^-0.5 moves it."""
    q, k, v = make_qkv(2, 1000, 1100, 4, 64, torch.bfloat16, DEVICE, requires_grad=False)
    slopes = _slopes(4)
    _check_forward(hopper_calls, q, k, v, causal=causal, softmax_scale=scale, alibi_slopes=slopes)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_alibi_slopes_per_batch(hopper_calls, causal):
    """(batch, nheads) slopes: the kernel reads slope (b, h) through the batch stride."""
    q, k, v = make_qkv(3, 1000, 1000, 6, 128, torch.bfloat16, DEVICE, nheads_k=2, requires_grad=False)
    slopes = _slopes(6, batch=3)
    _check_forward(hopper_calls, q, k, v, causal=causal, alibi_slopes=slopes)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp16_with_alibi_and_gqa(hopper_calls, head_dim, causal):
    q, k, v = make_qkv(2, 1000, 1100, 6, head_dim, torch.float16, DEVICE, nheads_k=2, requires_grad=False)
    slopes = _slopes(6)
    _check_forward(hopper_calls, q, k, v, causal=causal, alibi_slopes=slopes)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("mode", [None, "0"], ids=["default", "off"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_dispatch(default_calls, monkeypatch, mode, head_dim):
    """Unset: head dim 128 takes the Hopper kernel, 64 the tl kernel; TRITONFLASH_HOPPER_FWD=0:
    the tl kernel for both. Each against the reference, with the gradients."""
    _set_mode(monkeypatch, mode)
    q, k, v = make_qkv(2, 1000, 1100, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2)
    takes = mode is None and head_dim in hopper.DEFAULT_HEAD_DIMS
    _check_forward(default_calls, q, k, v, calls=int(takes), grads=True, causal=True, alibi_slopes=_slopes(6))


# --------------------------------------------------------------------------------------------
# GPU tier (sm_90): key padding
# --------------------------------------------------------------------------------------------

# seqlens not multiples of the tiles, seqlen_q = 1, seqlen_k < 128, seqlen_k > seqlen_q
KPM_SEQLENS = [(300, 300), (1, 200), (200, 1000), (1000, 1000), (64, 77), (128, 128)]


def _gpu_grid(extra=None, seqlens=None):
    """The marks and parameters of the GPU key padding and bias tests: ``extra`` (a name and its
    values: the padding kind, the bias shape) if given, ALiBi, causal, head dim, and
    (seqlen_q, seqlen_k) from ``seqlens`` if given."""
    marks = [pytest.mark.gpu, sm90]
    if extra is not None:
        marks.append(pytest.mark.parametrize(*extra))
    marks += [pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"]),
              pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"]),
              pytest.mark.parametrize("head_dim", [64, 128])]
    if seqlens is not None:
        marks.append(pytest.mark.parametrize("seqlen_q, seqlen_k", seqlens, ids=[f"sq{q}-sk{k}" for q, k in seqlens]))

    def apply(test):
        for mark in reversed(marks):
            test = mark(test)
        return test
    return apply


PADDING = ("kind", ["right", "random"])


@_gpu_grid(PADDING, KPM_SEQLENS)
def test_key_padding_matches_reference(hopper_calls, seqlen_q, seqlen_k, head_dim, causal, alibi, kind):
    """GQA (6 heads, 2 k/v heads), per-batch ALiBi slopes, three batch entries with their own padding."""
    q, k, v = make_qkv(3, seqlen_q, seqlen_k, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2, requires_grad=False)
    slopes = _slopes(6, batch=3) if alibi else None
    _check_forward(hopper_calls, q, k, v, causal=causal, alibi_slopes=slopes, key_padding_mask=_padding(3, seqlen_k, kind))


@_gpu_grid(PADDING, [(300, 300), (200, 1000)])
def test_key_padding_backward_with_hopper_lse(hopper_calls, seqlen_q, seqlen_k, head_dim, causal, alibi, kind):
    """The tl backward recomputes P from the Hopper forward's lse, key padding included."""
    q, k, v = make_qkv(3, seqlen_q, seqlen_k, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2)
    slopes = _slopes(6) if alibi else None
    _check_forward(hopper_calls, q, k, v, grads=True, causal=causal, alibi_slopes=slopes,
                   key_padding_mask=_padding(3, seqlen_k, kind))


@_gpu_grid()
def test_key_padding_rows_without_a_key(hopper_calls, head_dim, causal, alibi):
    """docs/semantics.md, fully masked rows: output 0, lse -inf, zero gradients, never NaN.
    Batch entry 0 pads every key. Entry 1 keeps keys 200.. only: the first key block leaves
    every row without a key (the running max is -inf until block 1), and under causal rows
    0..199 never see one."""
    sq = sk = 300
    q, k, v = make_qkv(2, sq, sk, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2)
    mask = torch.zeros(2, sk, dtype=torch.bool, device=DEVICE)
    mask[1, 200:] = True
    slopes = _slopes(6) if alibi else None
    out, lse = flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, key_padding_mask=mask, return_lse=True)
    assert len(hopper_calls) == 1
    assert not out.isnan().any() and not lse.isnan().any()
    dead = 200 if causal else 0  # rows of entry 1 without a key
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    assert (out[1, :dead] == 0).all() and (lse[1, :, :dead] == float("-inf")).all()
    assert torch.isfinite(lse[1, :, dead:]).all()
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for g in (dq, dk, dv):
        assert not g.isnan().any()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dq[1, :dead] == 0).all() and (dk[1, :200] == 0).all() and (dv[1, :200] == 0).all()
    check_against_reference(out, q, k, v, dout, causal=causal, alibi_slopes=slopes, key_padding_mask=mask, lse=lse)


@_gpu_grid()
def test_key_padding_nonfinite_padded_kv(hopper_calls, head_dim, causal, alibi):
    """docs/semantics.md, invisible keys: padded keys never affect a row whatever K and V hold
    there. A KV cache whose padded slots hold NaN, inf and -inf gives exactly the output and lse
    of one whose padded slots hold finite values. Padding at the end (right, one length per
    entry) and inside (keys 100..139: part of block 0, across the boundary into block 1)."""
    b, sq, sk = 3, 300, 1000
    q, k, v = make_qkv(b, sq, sk, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2, requires_grad=False)
    mask = _padding(b, sk, "right")
    mask[:, 100:140] = False
    pad = ~mask
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[pad], v_bad[pad] = float("nan"), float("inf")
    odd = torch.zeros_like(pad)
    odd[:, 1::2] = True
    k_bad[pad & odd], v_bad[pad & odd] = float("-inf"), float("nan")
    slopes = _slopes(6, batch=b) if alibi else None
    clean, lse_clean = flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, key_padding_mask=mask, return_lse=True)
    poisoned, lse_poisoned = flash_attn_func(q, k_bad, v_bad, causal=causal, alibi_slopes=slopes, key_padding_mask=mask,
                                             return_lse=True)
    assert len(hopper_calls) == 2
    assert not poisoned.isnan().any()
    assert torch.equal(clean, poisoned) and torch.equal(lse_clean, lse_poisoned)
    check_against_reference(clean, q, k, v, None, causal=causal, alibi_slopes=slopes, key_padding_mask=mask, lse=lse_clean,
                            check_grads=False)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_key_padding_default_dispatch_fp16(default_calls, causal):
    """TRITONFLASH_HOPPER_FWD unset: a key padding call at head dim 128 takes the Hopper kernel
    (fp16, q/k/v as (b, h, s, d) transposed, with the gradients)."""
    q, k, v = (torch.randn(2, h, s, 128, dtype=torch.float16, device=DEVICE).transpose(1, 2).requires_grad_()
               for h, s in ((6, 1000), (2, 1100), (2, 1100)))
    _check_forward(default_calls, q, k, v, grads=True, causal=causal, alibi_slopes=_slopes(6),
                   key_padding_mask=_padding(2, 1100, "random"))


@pytest.mark.gpu
@sm90
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known deviation (hopper.py docstring, docs/semantics.md 'Invisible keys'): under causal, "
                          "inf in V at a key a row cannot see but a later row of the same 128-key block can reaches "
                          "that row as 0 * inf = NaN in the PV wgmma (the tl kernel zeroes them)")
def test_causal_invisible_nonfinite_v_in_shared_block(hopper_calls):
    """Contract: a key a row cannot see never affects it, whatever V holds. Key 100 is visible
    to rows 100.. of the first 128-row tile, invisible to rows 0..99 of the same tile."""
    q, k, v = make_qkv(2, 256, 256, 4, 64, torch.bfloat16, DEVICE, requires_grad=False)
    clean = flash_attn_func(q, k, v, causal=True)
    v_bad = v.clone()
    v_bad[:, 100] = float("inf")
    poisoned = flash_attn_func(q, k, v_bad, causal=True)
    if len(hopper_calls) != 2:  # not an AssertionError: a missed path must fail, not xfail
        pytest.fail(f"Hopper path taken {len(hopper_calls)} times, expected 2")
    assert torch.equal(poisoned[:, :100], clean[:, :100]), "rows 0..99 changed by key 100 that they cannot see"


# --------------------------------------------------------------------------------------------
# GPU tier (sm_90): additive bias (the BIAS variant, the default at d128)
# --------------------------------------------------------------------------------------------

# seqlens not multiples of the tiles, seqlen_q = 1, seqlen_k < 128, seqlen_k > seqlen_q
BIAS_SEQLENS = [(300, 300), (1, 200), (200, 1000), (64, 77), (1000, 1000)]
# (batch, heads) of the bias: full, per head (batch 1), per batch (heads 1), one plane expanded
# to (batch, heads) (stride 0), and a per-head bias expanded over the batch.
BIAS_SHAPES = ["full", "heads", "batch", "expanded", "heads-expanded"]


def _make_bias(kind, batch, nheads, seqlen_q, seqlen_k, dtype=torch.bfloat16, requires_grad=False):
    """A random bias (scores' scale) of ``kind`` (BIAS_SHAPES) whose rows are 16-byte aligned
    (the BIAS variant reads it by TMA): a view of rows padded to a multiple of 8 elements."""
    b, h = {"full": (batch, nheads), "heads": (1, nheads), "batch": (batch, 1), "expanded": (1, 1),
            "heads-expanded": (1, nheads)}[kind]
    row = -(-seqlen_k // 8) * 8
    base = (torch.randn(b, h, seqlen_q, row, device=DEVICE) * 2).to(dtype).requires_grad_(requires_grad)
    bias = base[..., :seqlen_k]
    if kind.endswith("expanded"):
        bias = bias.expand(batch, nheads, seqlen_q, seqlen_k)
    assert hopper._bias_ok(bias, torch.empty(batch, seqlen_q, nheads, 8, dtype=dtype), seqlen_k)
    return bias


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("seqlen_q, seqlen_k, causal", SMOKE, ids=[f"sq{q}-sk{k}-{'causal' if c else 'noncausal'}" for q, k, c in SMOKE])
def test_smoke_bias(hopper_calls, seqlen_q, seqlen_k, causal):
    """The smoke shapes with a bias: the bias ring's own ready barriers (a wrong expect-tx count
    hangs here) and 2 stages at d128."""
    for d in (64, 128):
        q, k, v = make_qkv(2, seqlen_q, seqlen_k, 2, d, torch.bfloat16, DEVICE, requires_grad=False)
        hopper_calls.clear()
        _check_forward(hopper_calls, q, k, v, causal=causal, bias=_make_bias("full", 2, 2, seqlen_q, seqlen_k))


@_gpu_grid(("shape", BIAS_SHAPES), BIAS_SEQLENS)
def test_bias_matches_reference(hopper_calls, seqlen_q, seqlen_k, head_dim, causal, alibi, shape):
    """GQA (6 heads, 2 k/v heads), three batch entries, per-batch ALiBi slopes: the bias is added
    before ALiBi and the mask (score = scale * q.k + bias - slope * distance)."""
    q, k, v = make_qkv(3, seqlen_q, seqlen_k, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2, requires_grad=False)
    slopes = _slopes(6, batch=3) if alibi else None
    _check_forward(hopper_calls, q, k, v, causal=causal, alibi_slopes=slopes, bias=_make_bias(shape, 3, 6, seqlen_q, seqlen_k))


@_gpu_grid(("shape", ["full", "heads", "batch", "expanded"]), [(300, 300), (200, 1000)])
def test_bias_backward_with_hopper_lse(hopper_calls, seqlen_q, seqlen_k, head_dim, causal, alibi, shape):
    """A bias that requires grad: the tl backward recomputes P from the Hopper forward's lse;
    dq/dk/dv and dbias (the bias's own shape) against the reference."""
    q, k, v = make_qkv(3, seqlen_q, seqlen_k, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2)
    slopes = _slopes(6) if alibi else None
    bias = _make_bias(shape, 3, 6, seqlen_q, seqlen_k, requires_grad=True)
    _check_forward(hopper_calls, q, k, v, grads=True, causal=causal, alibi_slopes=slopes, bias=bias)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_bias_shared_by_batches_schedule(hopper_calls, causal):
    """A bias shared by every batch puts the batches of one (query block, head) side by side
    (_tile_coords, BATCH_INNER). Causal: sections of (batch, head) pairs numbered batch-fastest
    with no GQA group factor (_heads_per_l2_section of the k/v heads); several sections, the last
    one short (batch 5 and 4 query heads on 2 k/v heads at 4096 keys, d128: 12 pairs a section
    on a 50 MiB L2). Non-causal: batch, then query block, then head."""
    b, s, h, d = 5, 4096, 4, 128
    q, k, v = make_qkv(b, s, s, h, d, torch.bfloat16, DEVICE, nheads_k=2, requires_grad=False)
    per_section = hopper._heads_per_l2_section(k, 2)
    assert causal is False or (b * h > per_section and (b * h) % per_section), per_section
    bias = _make_bias("heads", b, h, s, s)
    assert hopper._bias_shared_by_batches(bias, b)
    _check_forward(hopper_calls, q, k, v, causal=causal, bias=bias, alibi_slopes=_slopes(h, batch=b))


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bias_minus_inf_rows_and_blocks(hopper_calls, head_dim, causal, alibi, dtype):
    """docs/semantics.md, fully masked rows, with masks as additive biases: output 0, lse -inf,
    zero dq, never NaN. Row 5: -inf everywhere; row 6: finfo.min everywhere (bf16: <=
    MASKED_BIAS, masked like -inf; fp16's is finite, the row is not dead). Rows 10..19 (and
    150..169 of entry 1, warpgroup 1 of the second query block): their whole first key block
    -inf (the running max is -inf after block 0; under causal rows 10..19 see no other key and
    are dead); keys 128..255 -inf for every row of entry 0 (a whole block). Row 140: -inf on
    keys 0..140, the keys it sees under causal: dead under causal only."""
    sq = sk = 300
    q, k, v = make_qkv(2, sq, sk, 6, head_dim, dtype, DEVICE, nheads_k=2)
    bias = _make_bias("full", 2, 6, sq, sk, dtype=dtype).detach()
    bias[:, :, 5] = float("-inf")
    bias[:, :, 6] = torch.finfo(dtype).min
    bias[:, :, 10:20, :128] = float("-inf")
    bias[1, :, 150:170, :128] = float("-inf")
    bias[0, :, :, 128:256] = float("-inf")
    bias[:, :, 140, :141] = float("-inf")
    bias.requires_grad_()
    slopes = _slopes(6) if alibi else None
    out, lse = flash_attn_func(q, k, v, bias, causal, alibi_slopes=slopes, return_lse=True)
    assert len(hopper_calls) == 1
    assert not out.isnan().any() and not lse.isnan().any()
    dead = [5] + ([6] if dtype == torch.bfloat16 else []) + (list(range(10, 20)) + [140] if causal else [])
    alive = [r for r in range(sq) if r not in dead]
    assert (out[:, dead] == 0).all() and (lse[:, :, dead] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, alive]).all()
    dout = torch.randn_like(out)
    dq, dk, dv, dbias = torch.autograd.grad(out, (q, k, v, bias), dout, retain_graph=True)
    for g in (dq, dk, dv, dbias):
        assert not g.isnan().any()
    assert (dq[:, dead] == 0).all()
    check_against_reference(out, q, k, v, dout, bias=bias, causal=causal, alibi_slopes=slopes, lse=lse)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bias_softmax_scale_and_bhsd(hopper_calls, head_dim):
    """The kernel adds bias / softmax_scale to q.k (qk_scale applied after): a scale other than
    d^-0.5; q/k/v transposed from (b, h, s, d), a bias whose batch stride is smaller than its
    rows' (a permuted view)."""
    q, k, v = (torch.randn(2, h, s, head_dim, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
               for h, s in ((6, 1000), (2, 1100), (2, 1100)))
    bias = (torch.randn(6, 1000, 2, 1104, device=DEVICE) * 2).to(torch.bfloat16).permute(2, 0, 1, 3)[..., :1100]
    for scale in (0.3, 1.5):
        hopper_calls.clear()
        _check_forward(hopper_calls, q, k, v, causal=True, softmax_scale=scale, bias=bias, alibi_slopes=_slopes(6))


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("mode", [None, "auto", "0"], ids=["default", "auto", "off"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bias_default_dispatch(default_calls, monkeypatch, mode, head_dim):
    """Unset or auto: a bias call at head dim 128 takes the BIAS variant (docs/perf-notes.md,
    change 18), at 64 the tl kernel; TRITONFLASH_HOPPER_FWD=0: the tl kernel for both. With a
    bias that requires grad (the tl backward from the Hopper forward's lse)."""
    _set_mode(monkeypatch, mode)
    q, k, v = make_qkv(2, 1000, 1100, 6, head_dim, torch.bfloat16, DEVICE, nheads_k=2)
    bias = _make_bias("heads", 2, 6, 1000, 1100, requires_grad=True)
    takes = mode != "0" and head_dim in hopper.DEFAULT_HEAD_DIMS
    _check_forward(default_calls, q, k, v, calls=int(takes), grads=True, causal=True, bias=bias)


@pytest.mark.gpu
@sm90
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known deviation of the BIAS variant (hopper.py docstring): in key blocks after "
                          "the first the bias is added after the causal mask, so a NaN bias entry at a key the diagonal "
                          "hides from a row makes that row NaN (the tl kernel and the reference mask it)")
def test_bias_nan_at_causally_hidden_key(hopper_calls):
    """Key 200 (block 1) is hidden by the causal diagonal from rows 0..199; its bias is NaN there."""
    q, k, v = make_qkv(1, 256, 256, 2, 64, torch.bfloat16, DEVICE, requires_grad=False)
    bias = _make_bias("full", 1, 2, 256, 256)
    clean = flash_attn_func(q, k, v, bias, True)
    bias = bias.clone()
    bias[:, :, :200, 200] = float("nan")
    poisoned = flash_attn_func(q, k, v, bias, True)
    if len(hopper_calls) != 2:  # not an AssertionError: a missed path must fail, not xfail
        pytest.fail(f"Hopper path taken {len(hopper_calls)} times, expected 2")
    assert torch.equal(poisoned, clean), "rows 0..199 changed by a bias entry at a key they cannot see"
