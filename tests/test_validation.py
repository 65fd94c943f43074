"""Bad input raises a typed error naming the argument, what was expected and what was received
(docs/semantics.md, "Bad input"), at every public entry point, before any kernel launch.

Each error test runs with every compute path (the kernel launchers and the reference the CPU
path falls back to) replaced by one that fails the test, on both dispatch paths of the public
functions (Triton kernels / CPU reference, chosen by TRITON_INTERPRET) and on the autograd
classes called positionally as the original module did. Validation needs no kernel, so the
error tests use small CPU tensors (and the 'meta' device for device mismatches) on every tier.
The positive tests at the end run the real kernels (the interpreter on CPU).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import check_against_reference
from tritonflash import (
    FlashAttnFunc,
    FlashAttnKVPackedFunc,
    FlashAttnQKVPackedFunc,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)
from tritonflash.checks import prepare

F16, BF16 = torch.float16, torch.bfloat16
api_mod = importlib.import_module("tritonflash.api")
autograd_mod = importlib.import_module("tritonflash.autograd")
forward_mod = importlib.import_module("tritonflash.kernels.forward")


# ---- entry points and inputs -----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One way in. ``kind``: 'sep' (q, k, v), 'kv' (q, kv packed) or 'qkv' (qkv packed).
    ``dispatch``: the path TRITON_INTERPRET selects for a public function on CPU tensors;
    the autograd classes always launch kernels."""

    id: str
    kind: str
    apply: bool
    dispatch: str = "kernels"


ENTRIES = [
    Entry("flash_attn_func-kernels", "sep", False, "kernels"),
    Entry("flash_attn_func-reference", "sep", False, "reference"),
    Entry("FlashAttnFunc.apply", "sep", True),
    Entry("flash_attn_kvpacked_func-kernels", "kv", False, "kernels"),
    Entry("flash_attn_kvpacked_func-reference", "kv", False, "reference"),
    Entry("FlashAttnKVPackedFunc.apply", "kv", True),
    Entry("flash_attn_qkvpacked_func-kernels", "qkv", False, "kernels"),
    Entry("flash_attn_qkvpacked_func-reference", "qkv", False, "reference"),
    Entry("FlashAttnQKVPackedFunc.apply", "qkv", True),
]
ALL = ("sep", "kv", "qkv")
SEP_KV = ("sep", "kv")


def call(entry, q=None, k=None, v=None, bias=None, causal=False, softmax_scale=None, *,
         alibi_slopes=None, key_padding_mask=None, kv=None, qkv=None):
    """Call ``entry``; packed entries stack q/k/v unless ``kv``/``qkv`` is given. The autograd
    classes get the original module's six positional arguments, plus the extras only when set."""
    if entry.kind == "kv" and kv is None:
        kv = torch.stack([k, v], dim=2)
    if entry.kind == "qkv" and qkv is None:
        qkv = torch.stack([q, k, v], dim=2)
    tensors = {"sep": (q, k, v), "kv": (q, kv), "qkv": (qkv,)}[entry.kind]
    if entry.apply:
        cls = {"sep": FlashAttnFunc, "kv": FlashAttnKVPackedFunc, "qkv": FlashAttnQKVPackedFunc}[entry.kind]
        extras = (alibi_slopes, key_padding_mask) if (alibi_slopes is not None or key_padding_mask is not None) else ()
        return cls.apply(*tensors, bias, causal, softmax_scale, *extras)
    fn = {"sep": flash_attn_func, "kv": flash_attn_kvpacked_func, "qkv": flash_attn_qkvpacked_func}[entry.kind]
    return fn(*tensors, bias, causal, softmax_scale, alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask)


@dataclass(frozen=True)
class Dims:
    b: int
    sq: int
    sk: int
    h: int
    hk: int
    d: int


def base(kind, dtype=F16, device="cpu", d=8, sq=None, sk=None):
    """Valid q, k, v for ``kind``: GQA (4 heads over 2) with seqlen_q != seqlen_k where the
    layout allows it; packed qkv needs one shape for all three."""
    if kind == "qkv":
        sq = sk = sq if sq is not None else 5
        h = hk = 4
    else:
        sq = 3 if sq is None else sq
        sk = 5 if sk is None else sk
        h, hk = 4, 2
    q = torch.randn(2, sq, h, d, device=device).to(dtype)
    k = torch.randn(2, sk, hk, d, device=device).to(dtype)
    v = torch.randn(2, sk, hk, d, device=device).to(dtype)
    return q, k, v, Dims(2, sq, sk, h, hk, d)


@dataclass(frozen=True)
class Case:
    """``build(kind)`` returns (keyword arguments for ``call``, regex of the message)."""

    id: str
    kinds: tuple
    build: object


def cross(cases):
    """Each case at every entry whose layout can express it."""
    params = []
    for case in cases:
        for entry in ENTRIES:
            if entry.kind not in case.kinds:
                continue
            params.append(pytest.param(entry, case, id=f"{case.id}-{entry.id}"))
    return params


class Launched(AssertionError):
    pass


def _launched(*args, **kwargs):
    raise Launched("a kernel (or the reference) ran before validation rejected the input")


@pytest.fixture
def no_launch(monkeypatch):
    """Every compute path fails if reached; returns a function that selects an entry's dispatch."""
    monkeypatch.setattr(autograd_mod, "attn_fwd", _launched)
    # On a GPU machine the kernels are not built for the interpreter: CPU tensors on the
    # kernel path would be refused just before the launch, which the guard stands in for.
    monkeypatch.setattr(autograd_mod, "check_kernel_device", lambda q: None)
    monkeypatch.setattr(forward_mod, "_launch_fwd", _launched)
    monkeypatch.setattr(api_mod, "attention_ref", _launched)

    def select(entry):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if entry.dispatch == "kernels" else "0")

    return select


def check_raises(no_launch, entry, case, exc):
    no_launch(entry)
    kwargs, pattern = case.build(entry.kind)
    # A launch raises Launched (an AssertionError), which is not ``exc``: the test fails.
    with pytest.raises(exc, match=pattern):
        call(entry, **kwargs)


def esc(x):
    return re.escape(str(x))


# ---- the launch guard itself -------------------------------------------------------------------


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.id) for e in ENTRIES])
def test_launch_guard_is_live(no_launch, entry):
    """A valid call does reach the patched compute path: the error tests' 'no launch' is real."""
    no_launch(entry)
    q, k, v, _ = base(entry.kind)
    with pytest.raises(Launched):
        call(entry, q, k, v)


# ---- one test per rule ---------------------------------------------------------------------------


def _non_tensor(kind, name, value, got):
    q, k, v, _ = base(kind)
    kwargs = {**dict(q=q, k=k, v=v), name: value}
    return kwargs, rf"^{name} must be a torch\.Tensor, got {re.escape(got)}$"


@pytest.mark.parametrize("entry, case", cross([
    Case("q-list", SEP_KV, lambda kind: _non_tensor(kind, "q", [[0.0]], "list")),
    Case("k-None", ("sep",), lambda kind: _non_tensor(kind, "k", None, "NoneType")),
    Case("v-ndarray", ("sep",), lambda kind: _non_tensor(kind, "v", np.zeros((2, 5, 2, 8), np.float16), "numpy.ndarray")),
    Case("kv-list", ("kv",), lambda kind: _non_tensor(kind, "kv", [0.0], "list")),
    Case("qkv-ndarray", ("qkv",), lambda kind: _non_tensor(kind, "qkv", np.zeros((2, 5, 3, 4, 8), np.float16), "numpy.ndarray")),
    Case("bias-float", ALL, lambda kind: _non_tensor(kind, "bias", 0.5, "float")),
    Case("alibi_slopes-list", ALL, lambda kind: _non_tensor(kind, "alibi_slopes", [0.5] * 4, "list")),
    Case("key_padding_mask-list", ALL, lambda kind: _non_tensor(kind, "key_padding_mask", [[True] * 5] * 2, "list")),
]))
def test_non_tensor_input_raises_type_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, TypeError)


def _rank(kind, name, shape):
    q, k, v, _ = base(kind)
    kwargs = dict(q=q, k=k, v=v)
    kwargs[name] = torch.randn(shape).half()
    if name in ("q", "k", "v"):
        return kwargs, rf"^{name} must have rank 4 \(batch, seqlen, nheads, headdim\), got shape {esc(shape)}"
    layout = {"kv": r"\(batch, seqlen_k, 2, nheads_k, headdim\)", "qkv": r"\(batch, seqlen, 3, nheads, headdim\)"}[name]
    return kwargs, rf"^{name} must have shape {layout}, got {esc(shape)}"


@pytest.mark.parametrize("entry, case", cross([
    Case("q-rank3", SEP_KV, lambda kind: _rank(kind, "q", (2, 3, 32))),
    Case("q-rank5", SEP_KV, lambda kind: _rank(kind, "q", (2, 3, 1, 4, 8))),
    Case("k-rank5", ("sep",), lambda kind: _rank(kind, "k", (2, 5, 1, 2, 8))),
    Case("v-rank3", ("sep",), lambda kind: _rank(kind, "v", (2, 5, 16))),
    Case("kv-rank4", ("kv",), lambda kind: _rank(kind, "kv", (2, 5, 4, 8))),
    Case("kv-rank6", ("kv",), lambda kind: _rank(kind, "kv", (2, 5, 2, 2, 1, 8))),
    Case("kv-packed-dim3", ("kv",), lambda kind: _rank(kind, "kv", (2, 5, 3, 2, 8))),
    Case("kv-packed-dim1", ("kv",), lambda kind: _rank(kind, "kv", (2, 5, 1, 2, 8))),
    Case("qkv-rank4", ("qkv",), lambda kind: _rank(kind, "qkv", (2, 5, 12, 8))),
    Case("qkv-rank6", ("qkv",), lambda kind: _rank(kind, "qkv", (2, 5, 3, 4, 1, 8))),
    Case("qkv-packed-dim2", ("qkv",), lambda kind: _rank(kind, "qkv", (2, 5, 2, 4, 8))),
    Case("qkv-packed-dim4", ("qkv",), lambda kind: _rank(kind, "qkv", (2, 5, 4, 4, 8))),
]))
def test_wrong_rank_or_packed_dim_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _dtype(kind, names, dtype):
    q, k, v, _ = base(kind)
    kwargs = dict(q=q, k=k, v=v)
    for name in names:
        if name == "kv":
            kwargs["kv"] = torch.stack([k, v], 2).to(dtype)
        elif name == "qkv":
            kwargs["qkv"] = torch.stack([q, k, v], 2).to(dtype)
        else:
            kwargs[name] = kwargs[name].to(dtype)
    first = names[0]
    return kwargs, rf"^{first} must be float16 or bfloat16, got {esc(dtype)}; cast with {first}\.to\("


@pytest.mark.parametrize("entry, case", cross([
    Case("q-fp32", SEP_KV, lambda kind: _dtype(kind, ["q"], torch.float32)),
    Case("qkv-all-fp32", ("sep",), lambda kind: _dtype(kind, ["q", "k", "v"], torch.float32)),
    Case("k-fp64", ("sep",), lambda kind: _dtype(kind, ["k"], torch.float64)),
    Case("v-int32", ("sep",), lambda kind: _dtype(kind, ["v"], torch.int32)),
    Case("kv-fp32", ("kv",), lambda kind: _dtype(kind, ["kv"], torch.float32)),
    Case("kv-fp8", ("kv",), lambda kind: _dtype(kind, ["kv"], torch.float8_e4m3fn)),
    Case("qkv-fp32", ("qkv",), lambda kind: _dtype(kind, ["qkv"], torch.float32)),
    Case("qkv-fp64", ("qkv",), lambda kind: _dtype(kind, ["qkv"], torch.float64)),
]))
def test_dtype_not_fp16_or_bf16_raises_type_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, TypeError)


def _mixed(kind, qd, kd, vd):
    q, k, v, _ = base(kind)
    kwargs = dict(q=q.to(qd), k=k.to(kd), v=v.to(vd))
    return kwargs, rf"^q, k and v must share one dtype, got q {esc(qd)}, k {esc(kd)}, v {esc(vd)}"


@pytest.mark.parametrize("entry, case", cross([
    Case("k-bf16", ("sep",), lambda kind: _mixed(kind, F16, BF16, F16)),
    Case("v-bf16", ("sep",), lambda kind: _mixed(kind, F16, F16, BF16)),
    Case("q-bf16-kv-fp16", SEP_KV, lambda kind: _mixed(kind, BF16, F16, F16)),
]))
def test_qkv_dtypes_differ_raises_type_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, TypeError)


def _kv_like(kind, **changes):
    """k and v built like the base ones but with some of (b, sk, hk, d) changed."""
    q, _, _, dm = base(kind)
    shape = {**dict(b=dm.b, sk=dm.sk, hk=dm.hk, d=dm.d), **changes}
    k = torch.randn(shape["b"], shape["sk"], shape["hk"], shape["d"]).half()
    v = torch.randn_like(k)
    return q, k, v, dm


@pytest.mark.parametrize("entry, case", cross([
    Case("k-batch3", SEP_KV, lambda kind: (dict(zip("qkv", _kv_like(kind, b=3)[:3])), r"^k and v must have q's batch size 2, got 3")),
    Case("k-batch1", SEP_KV, lambda kind: (dict(zip("qkv", _kv_like(kind, b=1)[:3])), r"^k and v must have q's batch size 2, got 1")),
]))
def test_batch_mismatch_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


@pytest.mark.parametrize("entry, case", cross([
    Case("k-d16", SEP_KV, lambda kind: (dict(zip("qkv", _kv_like(kind, d=16)[:3])), r"^k and v must have q's head dim 8, got 16")),
    Case("k-d7", SEP_KV, lambda kind: (dict(zip("qkv", _kv_like(kind, d=7)[:3])), r"^k and v must have q's head dim 8, got 7")),
]))
def test_head_dim_mismatch_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _v_shape(kind, shape):
    q, k, _, _ = base(kind)
    v = torch.randn(shape).half()
    return dict(q=q, k=k, v=v), rf"^k and v must have the same shape, got k {esc(tuple(k.shape))} and v {esc(shape)}"


@pytest.mark.parametrize("entry, case", cross([
    Case("v-seqlen6", ("sep",), lambda kind: _v_shape(kind, (2, 6, 2, 8))),
    Case("v-nheads1", ("sep",), lambda kind: _v_shape(kind, (2, 5, 1, 8))),
    Case("v-d16", ("sep",), lambda kind: _v_shape(kind, (2, 5, 2, 16))),
    Case("v-batch1", ("sep",), lambda kind: _v_shape(kind, (1, 5, 2, 8))),
]))
def test_k_v_shape_mismatch_raises_value_error(no_launch, entry, case):
    """Only expressible with separate k and v (a packed kv has one shape for both)."""
    check_raises(no_launch, entry, case, ValueError)


def _heads(kind, h, hk):
    _, _, _, dm = base(kind)
    q = torch.randn(dm.b, dm.sq, h, dm.d).half()
    k = torch.randn(dm.b, dm.sk, hk, dm.d).half()
    return dict(q=q, k=k, v=torch.randn_like(k)), rf"^q's nheads \({h}\) must be a multiple of k/v's nheads \({hk}\)"


@pytest.mark.parametrize("entry, case", cross([
    Case("h4-hk3", SEP_KV, lambda kind: _heads(kind, 4, 3)),
    Case("h6-hk4", SEP_KV, lambda kind: _heads(kind, 6, 4)),
    Case("h2-hk4", SEP_KV, lambda kind: _heads(kind, 2, 4)),
    Case("h3-hk0", SEP_KV, lambda kind: _heads(kind, 3, 0)),
]))
def test_nheads_not_multiple_of_nheads_k_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _head_dim(kind, d):
    q, k, v, _ = base(kind, d=d)
    return dict(q=q, k=k, v=v), rf"^head dim \(last dim of q, k and v\) must be between 1 and 256, got {d}$"


@pytest.mark.parametrize("entry, case", cross([
    Case("d0", ALL, lambda kind: _head_dim(kind, 0)),
    Case("d257", ALL, lambda kind: _head_dim(kind, 257)),
    Case("d512", ALL, lambda kind: _head_dim(kind, 512)),
]))
def test_head_dim_out_of_range_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _seqlen(kind, sq, sk):
    q, k, v, dm = base(kind, sq=sq, sk=sk)
    return dict(q=q, k=k, v=v), rf"^seqlen_q and seqlen_k must be >= 1, got {dm.sq} and {dm.sk}"


@pytest.mark.parametrize("entry, case", cross([
    Case("sq0", SEP_KV, lambda kind: _seqlen(kind, 0, 5)),
    Case("sk0", SEP_KV, lambda kind: _seqlen(kind, 3, 0)),
    Case("s0", ("qkv",), lambda kind: _seqlen(kind, 0, 0)),
]))
def test_seqlen_zero_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _bias(kind, make_shape):
    q, k, v, dm = base(kind)
    shape = make_shape(dm)
    bias = torch.randn(shape)
    want = (dm.b, dm.h, dm.sq, dm.sk)
    return dict(q=q, k=k, v=v, bias=bias), (
        rf"^bias of shape {esc(shape)} does not broadcast to \(batch, nheads, seqlen_q, seqlen_k\) = {esc(want)}; "
        rf"use e\.g\. \(1, {dm.h}, 1, {dm.sk}\)"
    )


@pytest.mark.parametrize("entry, case", cross([
    Case("batch+1", ALL, lambda kind: _bias(kind, lambda d: (d.b + 1, d.h, d.sq, d.sk))),
    Case("heads+1", ALL, lambda kind: _bias(kind, lambda d: (1, d.h + 1, 1, d.sk))),
    Case("gqa-nheads_k", SEP_KV, lambda kind: _bias(kind, lambda d: (1, d.hk, 1, d.sk))),
    Case("rows+1", ALL, lambda kind: _bias(kind, lambda d: (1, d.h, d.sq + 1, d.sk))),
    Case("keys+1", ALL, lambda kind: _bias(kind, lambda d: (1, d.h, 1, d.sk + 1))),
    Case("transposed-sk-sq", SEP_KV, lambda kind: _bias(kind, lambda d: (d.sk, d.sq))),
    Case("rank1-sq", SEP_KV, lambda kind: _bias(kind, lambda d: (d.sq,))),
    Case("rank3-b*h", ALL, lambda kind: _bias(kind, lambda d: (d.b * d.h, d.sq, d.sk))),
    Case("rank5", ALL, lambda kind: _bias(kind, lambda d: (1, 1, d.h, d.sq, d.sk))),
    Case("rank5-ones", ALL, lambda kind: _bias(kind, lambda d: (1, 1, 1, 1, 1))),
]))
def test_bias_not_broadcastable_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _bias_dtype(kind, dtype):
    q, k, v, dm = base(kind)
    bias = torch.zeros(1, dm.h, 1, dm.sk, dtype=dtype)
    return dict(q=q, k=k, v=v, bias=bias), rf"^bias must be float32, float16 or bfloat16, got {esc(dtype)}"


@pytest.mark.parametrize("entry, case", cross([
    Case("int32", ALL, lambda kind: _bias_dtype(kind, torch.int32)),
    Case("int64", ALL, lambda kind: _bias_dtype(kind, torch.int64)),
    Case("float64", ALL, lambda kind: _bias_dtype(kind, torch.float64)),
    Case("bool", ALL, lambda kind: _bias_dtype(kind, torch.bool)),
]))
def test_bias_dtype_raises_type_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, TypeError)


def _slopes(kind, make, dtype=torch.float32):
    q, k, v, dm = base(kind)
    slopes = torch.rand(make(dm)).to(dtype)
    return dict(q=q, k=k, v=v, alibi_slopes=slopes), dm


def _slopes_dtype(kind, make, dtype):
    return _slopes(kind, make, dtype)[0], rf"^alibi_slopes must be float32, got {esc(dtype)}$"


@pytest.mark.parametrize("entry, case", cross([
    Case("fp16", ALL, lambda kind: _slopes_dtype(kind, lambda d: (d.h,), F16)),
    Case("fp64", ALL, lambda kind: _slopes_dtype(kind, lambda d: (d.h,), torch.float64)),
    Case("bf16-b-h", ALL, lambda kind: _slopes_dtype(kind, lambda d: (d.b, d.h), BF16)),
]))
def test_alibi_slopes_dtype_raises_type_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, TypeError)


def _slopes_shape(kind, make):
    kwargs, dm = _slopes(kind, make)
    shape = make(dm)
    return kwargs, rf"^alibi_slopes must have shape \({dm.h},\) or \({dm.b}, {dm.h}\), got {esc(shape)}"


@pytest.mark.parametrize("entry, case", cross([
    Case("h+1", ALL, lambda kind: _slopes_shape(kind, lambda d: (d.h + 1,))),
    Case("gqa-nheads_k", SEP_KV, lambda kind: _slopes_shape(kind, lambda d: (d.hk,))),
    Case("1-h", ALL, lambda kind: _slopes_shape(kind, lambda d: (1, d.h))),
    Case("h-b", ALL, lambda kind: _slopes_shape(kind, lambda d: (d.h, d.b))),
    Case("b-h-1", ALL, lambda kind: _slopes_shape(kind, lambda d: (d.b, d.h, 1))),
    Case("scalar", ALL, lambda kind: _slopes_shape(kind, lambda d: ())),
]))
def test_alibi_slopes_shape_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _kpm(kind, make, dtype=torch.bool):
    q, k, v, dm = base(kind)
    shape = make(dm)
    kpm = torch.ones(shape, dtype=dtype)
    return dict(q=q, k=k, v=v, key_padding_mask=kpm), dm, shape


@pytest.mark.parametrize("entry, case", cross([
    Case("uint8", ALL, lambda kind: (_kpm(kind, lambda d: (d.b, d.sk), torch.uint8)[0],
                                      r"^key_padding_mask must be bool \(True = keep\), got torch\.uint8")),
    Case("float32", ALL, lambda kind: (_kpm(kind, lambda d: (d.b, d.sk), torch.float32)[0],
                                        r"^key_padding_mask must be bool \(True = keep\), got torch\.float32")),
    Case("int64", ALL, lambda kind: (_kpm(kind, lambda d: (d.b, d.sk), torch.int64)[0],
                                      r"^key_padding_mask must be bool \(True = keep\), got torch\.int64")),
]))
def test_key_padding_mask_dtype_raises_type_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, TypeError)


def _kpm_shape(kind, make):
    kwargs, dm, shape = _kpm(kind, make)
    return kwargs, rf"^key_padding_mask must have shape \(batch, seqlen_k\) = \({dm.b}, {dm.sk}\), got {esc(shape)}"


@pytest.mark.parametrize("entry, case", cross([
    Case("b-sq", SEP_KV, lambda kind: _kpm_shape(kind, lambda d: (d.b, d.sq))),
    Case("1-sk", ALL, lambda kind: _kpm_shape(kind, lambda d: (1, d.sk))),
    Case("sk", ALL, lambda kind: _kpm_shape(kind, lambda d: (d.sk,))),
    Case("b-1-sk", ALL, lambda kind: _kpm_shape(kind, lambda d: (d.b, 1, d.sk))),
    Case("sk-b", ALL, lambda kind: _kpm_shape(kind, lambda d: (d.sk, d.b))),
]))
def test_key_padding_mask_shape_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


def _scale(kind, scale, pattern):
    q, k, v, _ = base(kind)
    return dict(q=q, k=k, v=v, softmax_scale=scale), pattern


@pytest.mark.parametrize("entry, case", cross([
    Case("nan", ALL, lambda kind: _scale(kind, float("nan"), r"^softmax_scale must be a finite number or None, got nan")),
    Case("inf", ALL, lambda kind: _scale(kind, float("inf"), r"^softmax_scale must be a finite number or None, got inf")),
    Case("-inf", ALL, lambda kind: _scale(kind, float("-inf"), r"^softmax_scale must be a finite number or None, got -inf")),
    Case("np-float32-nan", ALL, lambda kind: _scale(kind, np.float32("nan"), r"^softmax_scale must be a finite number or None, got .*nan")),
]))
def test_softmax_scale_not_finite_raises_value_error(no_launch, entry, case):
    check_raises(no_launch, entry, case, ValueError)


@pytest.mark.parametrize("entry, case", cross([
    Case("bool-False", ALL, lambda kind: _scale(kind, False, r"^softmax_scale must be a float or None, got bool")),
    Case("bool-True", ALL, lambda kind: _scale(kind, True, r"^softmax_scale must be a float or None, got bool")),
    Case("str", ALL, lambda kind: _scale(kind, "0.125", r"^softmax_scale must be a float or None, got str")),
    Case("tensor", ALL, lambda kind: _scale(kind, torch.tensor(0.125), r"^softmax_scale must be a float or None, got torch\.Tensor")),
]))
def test_softmax_scale_not_a_number_raises_type_error(no_launch, entry, case):
    """Regression: softmax_scale=False (e.g. a causal flag passed one position too far) was
    accepted as scale 0, silently giving uniform attention."""
    check_raises(no_launch, entry, case, TypeError)


def _causal(kind, value, name):
    q, k, v, _ = base(kind)
    return dict(q=q, k=k, v=v, causal=value), rf"^causal must be a bool, got {re.escape(name)}$"


@pytest.mark.parametrize("entry, case", cross([
    Case("int1", ALL, lambda kind: _causal(kind, 1, "int")),
    Case("None", ALL, lambda kind: _causal(kind, None, "NoneType")),
    Case("str", ALL, lambda kind: _causal(kind, "True", "str")),
    Case("tensor", ALL, lambda kind: _causal(kind, torch.tensor(True), "torch.Tensor")),
    Case("numpy-bool", ALL, lambda kind: _causal(kind, np.bool_(True), f"numpy.{type(np.bool_(True)).__qualname__}")),
]))
def test_causal_not_bool_raises_type_error(no_launch, entry, case):
    """The numpy-bool case guards the message: it used to read 'got bool' for a numpy.bool."""
    check_raises(no_launch, entry, case, TypeError)


def _device(kind, what):
    q, k, v, dm = base(kind)
    kwargs = dict(q=q, k=k, v=v)
    meta = dict(device="meta")
    if what == "kv-meta":
        kwargs.update(k=k.to(**meta), v=v.to(**meta))
        return kwargs, r"^q, k and v must be on one device, got q cpu, k meta, v meta"
    if what == "v-meta":
        kwargs.update(v=v.to(**meta))
        return kwargs, r"^q, k and v must be on one device, got q cpu, k cpu, v meta"
    if what == "q-meta":
        kwargs.update(q=q.to(**meta))
        return kwargs, r"^q, k and v must be on one device, got q meta, k cpu, v cpu"
    if what == "bias":
        kwargs.update(bias=torch.zeros(1, dm.h, 1, dm.sk, **meta))
    elif what == "alibi_slopes":
        kwargs.update(alibi_slopes=torch.zeros(dm.h, **meta))
    elif what == "key_padding_mask":
        kwargs.update(key_padding_mask=torch.ones(dm.b, dm.sk, dtype=torch.bool, **meta))
    return kwargs, rf"^{what} must be on q's device cpu, got meta"


@pytest.mark.parametrize("entry, case", cross([
    Case("k-v-meta", SEP_KV, lambda kind: _device(kind, "kv-meta")),
    Case("v-meta", ("sep",), lambda kind: _device(kind, "v-meta")),
    Case("q-meta", SEP_KV, lambda kind: _device(kind, "q-meta")),
    Case("bias-meta", ALL, lambda kind: _device(kind, "bias")),
    Case("alibi_slopes-meta", ALL, lambda kind: _device(kind, "alibi_slopes")),
    Case("key_padding_mask-meta", ALL, lambda kind: _device(kind, "key_padding_mask")),
]))
def test_device_mismatch_raises_value_error(no_launch, entry, case):
    """q on the CPU and another input on the 'meta' device (no GPU needed): the mismatch is
    caught before the kernel or the reference touches either tensor."""
    check_raises(no_launch, entry, case, ValueError)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", [pytest.param(e, id=e.id) for e in ENTRIES if e.kind != "qkv" and e.dispatch == "kernels"])
def test_device_mismatch_cuda_cpu_raises_value_error(entry):
    """On a GPU: q on CUDA, k/v on the CPU must not reach a kernel (it would read host memory)."""
    assert ON_GPU
    q, k, v, _ = base(entry.kind, device="cuda")
    with pytest.raises(ValueError, match=r"^q, k and v must be on one device, got q cuda:0, k cpu, v cpu"):
        call(entry, q, k.cpu(), v.cpu())


# ---- valid inputs are accepted (real kernels) -----------------------------------------------


def test_softmax_scale_accepts_real_numbers():
    """int, float and numpy scalars are scales; they are normalised to a Python float."""
    q, k, v, _ = base("sep")
    for scale in (1, 0.25, np.float32(0.25), np.float64(0.25)):
        inp = prepare(q, k, v, softmax_scale=scale)
        assert type(inp.softmax_scale) is float and inp.softmax_scale == float(scale)
    assert prepare(q, k, v).softmax_scale == pytest.approx(8 ** -0.5)


class LaunchSpy:
    """Wraps the forward launcher and records the data pointers and strides it was given."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = forward_mod._launch_fwd

        def spy(grid, **kwargs):
            self.calls.append({n: (kwargs[n].data_ptr(), kwargs[n].stride()) for n in ("Q", "K", "V")})
            return inner(grid, **kwargs)

        monkeypatch.setattr(forward_mod, "_launch_fwd", spy)


def _leaf(x):
    return x.detach().requires_grad_(True)


@pytest.mark.parametrize("which", [
    pytest.param("q", id="q-last-dim-stride-h"),
    pytest.param("qkv", id="q-k-v-last-dim-stride-h"),
])
def test_last_dim_strided_is_copied_and_correct(monkeypatch, which):
    """A q whose head dim is not unit-stride (built as a transpose: stride(-1) == nheads) is
    accepted: the kernels read the head dim as contiguous vectors, so the library copies such a
    tensor once (checks._last_dim_unit) and then gives the reference result (forward and
    gradients, which come back in the caller's shape). Guards against a strided last dim being
    read as if contiguous, which would be silently wrong."""
    spy = LaunchSpy(monkeypatch)
    b, sq, sk, h, d = 2, 7, 9, 3, 16

    def strided(s):
        return _leaf(torch.randn(b, s, d, h, device=DEVICE, dtype=F16).transpose(-1, -2))

    q = strided(sq)
    k = strided(sk) if which == "qkv" else _leaf(torch.randn(b, sk, h, d, device=DEVICE, dtype=F16))
    v = strided(sk) if which == "qkv" else _leaf(torch.randn(b, sk, h, d, device=DEVICE, dtype=F16))
    assert q.stride(-1) == h
    out = flash_attn_func(q, k, v, causal=True)
    seen = spy.calls[-1]
    assert seen["Q"][1][-1] == 1 and seen["Q"][0] != q.data_ptr(), "a strided q must be copied before the kernel"
    check_against_reference(out, q, k, v, torch.randn_like(out), causal=True)


def _views(layout, b, s, h, d):
    if layout == "packed-qkv-views":
        qkv = torch.randn(b, s, 3, h, d, device=DEVICE, dtype=F16)
        return qkv.unbind(2)
    if layout == "transposed-heads":
        return [torch.randn(b, h, s, d, device=DEVICE, dtype=F16).transpose(1, 2) for _ in range(3)]
    if layout == "seqlen-stride-2":
        return [torch.randn(b, 2 * s, h, d, device=DEVICE, dtype=F16)[:, ::2] for _ in range(3)]
    if layout == "head-dim-slice":
        return [torch.randn(b, s, h, d + 5, device=DEVICE, dtype=F16)[..., 2:2 + d] for _ in range(3)]
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["packed-qkv-views", "transposed-heads", "seqlen-stride-2", "head-dim-slice"])
def test_non_contiguous_views_are_used_uncopied(monkeypatch, layout):
    """Views with a unit-stride head dim reach the kernel as they are (same pointer, same
    strides; DESIGN: packed inputs are used as views, never copied) and give the reference
    result, forward and backward."""
    spy = LaunchSpy(monkeypatch)
    b, s, h, d = 2, 11, 3, 24
    q, k, v = (_leaf(t) for t in _views(layout, b, s, h, d))
    assert not q.is_contiguous()
    out = flash_attn_func(q, k, v)
    seen = spy.calls[-1]
    for name, t in (("Q", q), ("K", k), ("V", v)):
        assert seen[name] == (t.data_ptr(), t.stride()), f"{name} was copied or restrided"
    check_against_reference(out, q, k, v, torch.randn_like(out))


def test_packed_views_reach_the_kernel_uncopied(monkeypatch):
    """qkv / kv packed buffers are unbound into views, not copied, and give bitwise the result of
    the same views passed separately."""
    spy = LaunchSpy(monkeypatch)
    b, s, h, d = 2, 6, 3, 16
    qkv = torch.randn(b, s, 3, h, d, device=DEVICE, dtype=BF16)
    out_packed = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    assert spy.calls[-1] == {n: (t.data_ptr(), t.stride()) for n, t in (("Q", q), ("K", k), ("V", v))}
    assert torch.equal(out_packed, flash_attn_func(q, k, v, causal=True))
    kv = qkv[:, :, 1:]
    out_kv = flash_attn_kvpacked_func(q, kv, causal=True)
    assert spy.calls[-1] == {n: (t.data_ptr(), t.stride()) for n, t in (("Q", q), ("K", k), ("V", v))}
    assert torch.equal(out_kv, out_packed)


@pytest.mark.parametrize("nheads, nheads_k", [
    pytest.param(4, 2, id="gqa-h4-hk2"),
    pytest.param(3, 1, id="mqa-h3-hk1"),
    pytest.param(6, 3, id="gqa-h6-hk3"),
])
@pytest.mark.parametrize("packed", [pytest.param(False, id="separate"), pytest.param(True, id="kvpacked")])
def test_gqa_with_divisible_heads_is_accepted(nheads, nheads_k, packed):
    """nheads divisible by nheads_k is grouped-query attention, not an error."""
    b, sq, sk, d = 2, 5, 7, 16
    q = _leaf(torch.randn(b, sq, nheads, d, device=DEVICE, dtype=F16))
    if packed:
        kv = _leaf(torch.randn(b, sk, 2, nheads_k, d, device=DEVICE, dtype=F16))
        out = flash_attn_kvpacked_func(q, kv)
        k, v = kv.unbind(2)
        dout = torch.randn_like(out)
        out_sep = flash_attn_func(q, k, v)
        assert torch.equal(out, out_sep)
        check_against_reference(out, q, k, v, dout, check_grads=False)
        g_packed = torch.autograd.grad(out, (q, kv), dout)
        g_sep = torch.autograd.grad(out_sep, (q, kv), dout)
        for a, r in zip(g_packed, g_sep):
            assert torch.equal(a, r)
    else:
        k = _leaf(torch.randn(b, sk, nheads_k, d, device=DEVICE, dtype=F16))
        v = _leaf(torch.randn(b, sk, nheads_k, d, device=DEVICE, dtype=F16))
        out = flash_attn_func(q, k, v)
        check_against_reference(out, q, k, v, torch.randn_like(out))


@pytest.mark.parametrize("head_dim", [pytest.param(1, id="d1"), pytest.param(256, id="d256")])
@pytest.mark.parametrize("dtype", [pytest.param(F16, id="fp16"), pytest.param(BF16, id="bf16")])
def test_head_dim_bounds_are_accepted(head_dim, dtype):
    """1 and 256 are the inclusive bounds of the head dim."""
    b, sq, sk, h = 2, 3, 5, 3
    q = _leaf(torch.randn(b, sq, h, head_dim, device=DEVICE, dtype=dtype))
    k = _leaf(torch.randn(b, sk, h, head_dim, device=DEVICE, dtype=dtype))
    v = _leaf(torch.randn(b, sk, h, head_dim, device=DEVICE, dtype=dtype))
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    check_against_reference(out, q, k, v, torch.randn_like(out), lse=lse)


@pytest.mark.parametrize("shape", [
    pytest.param((), id="scalar"),
    pytest.param(("sk",), id="sk"),
    pytest.param(("h", "sq", "sk"), id="h-sq-sk"),
    pytest.param((1, "h", "sq", 1), id="1-h-sq-1-per-row"),
    pytest.param(("b", 1, "sq", 1), id="b-1-sq-1-per-row"),
    pytest.param(("b", "h", 1, 1), id="b-h-1-1"),
])
def test_unusual_broadcastable_bias_shapes_are_accepted(shape):
    """Every shape that broadcasts to (batch, nheads, seqlen_q, seqlen_k) is accepted, including
    lower ranks and a bias constant along seqlen_k; its gradient has the bias's own shape.

    A bias constant along seqlen_k shifts whole softmax rows, so its exact gradient is 0 and
    the tolerance rule (relative to the reference's rounding) does not apply: what the kernel
    returns is the rounding of O in delta = rowsum(dO * O), bounded per element by the sum over its rows of |dO * O| * 2^-10."""
    b, sq, sk, h, d = 2, 5, 7, 3, 16
    sizes = dict(b=b, h=h, sq=sq, sk=sk)
    bshape = tuple(sizes.get(s, s) for s in shape)
    q, k, v = (_leaf(torch.randn(b, s, h, d, device=DEVICE, dtype=F16)) for s in (sq, sk, sk))
    bias = _leaf(torch.randn(bshape, device=DEVICE))
    out = flash_attn_func(q, k, v, bias, True)
    dout = torch.randn_like(out)
    if "sk" in shape:
        check_against_reference(out, q, k, v, dout, bias=bias, causal=True)
        return
    check_against_reference(out, q, k, v, dout, bias=bias.detach(), causal=True)
    (dbias,) = torch.autograd.grad(out, bias, dout)
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype and torch.isfinite(dbias).all()
    # Per bias element: the rows (b, h, i) it is added to, each contributing sum_d |dO * O| * 2^-10.
    row_terms = (dout.float() * out.float()).abs().sum(-1).transpose(1, 2).unsqueeze(-1)  # [b, h, sq, 1]
    bound = row_terms.sum_to_size((1,) * (4 - bias.dim()) + tuple(bias.shape)).reshape(bias.shape) * 2**-10
    excess = (dbias.abs() - bound).max().item()
    assert excess <= 0, f"dbias of a key-constant bias exceeds its rounding bound by {excess:.3e}: {dbias} vs {bound}"
