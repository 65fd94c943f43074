"""tritonflash.layers: every backend against every other with shared weights, against
torch.nn.MultiheadAttention, KV-cache decoding, bias builders, configuration errors.

Tolerance (docs/testing.md's rule, applied to a whole layer): the oracle is the 'torch' backend in
float64. A backend's error on every output and gradient (input and parameters) must be within
``factor x`` the error of the *baseline* plus a floor of two rounding steps of the precision
the backend computes in (for fp32, at least 1e-5 of the tensor's largest value: PyTorch's fp32
tolerance). The baseline is the 'torch' backend on the same layer with q, k, v rounded to that
precision (for 'triton' in an fp32 layer: bf16, the kernels' dtype).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import tritonflash.bias
from conftest import DEVICE
from tritonflash import attention_ref
from tritonflash.layers import (
    ATTN_CLASS_REGISTRY,
    ATTN_FNS,
    ATTN_IMPLS,
    GroupedQueryAttention,
    MultiheadAttention,
    MultiQueryAttention,
    apply_prefix_lm_mask,
    apply_sequence_id_mask,
    attn_bias_shape,
    build_alibi_bias,
    build_attn_bias,
    gen_slopes,
    scaled_multihead_dot_product_attention,
    slice_attn_bias,
    triton_compute_dtype,
)

FWD_FACTOR = 2
GRAD_FACTOR = 3
D_MODEL, N_HEADS = 64, 4
KV_HEADS = {"mha": N_HEADS, "gqa": 2, "mqa": 1}


# ----------------------------------------------------------------------------- helpers


def compute_dtype(impl: str, dtype: torch.dtype) -> torch.dtype:
    return triton_compute_dtype(torch.empty(0, dtype=dtype)) if impl == "triton" else dtype


def torch_backend_at(dtype: torch.dtype):
    """The 'torch' backend fed q, k, v rounded to ``dtype``: the baseline for a backend that
    computes in ``dtype``."""

    def attn_fn(query, key, value, *args, **kwargs):
        def rnd(t):
            return t.to(dtype).to(t.dtype)

        return scaled_multihead_dot_product_attention(rnd(query), rnd(key), rnd(value), *args, **kwargs)

    return attn_fn


def assert_within(name, x, x_ref, x_base, factor, floor_dtype):
    """max|x - x_ref| <= factor * max|x_base - x_ref| + 2 rounding steps of ``floor_dtype``.
    Prints both errors and the budget when it fails."""
    assert x.shape == x_ref.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(x_ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    xr = x_ref.double()
    err = (x.double() - xr).abs().max().item()
    err_base = (x_base.double() - xr).abs().max().item()
    floor = 2 * ((xr.to(floor_dtype) + 0.3 - 0.3).double() - xr).abs().max().item()
    if torch.finfo(floor_dtype).bits >= 32:
        # fp32 kernels (SDPA's on GPU) reduce in other orders than the eager baseline: allow
        # PyTorch's fp32 tolerance (assert_close's atol 1e-5) at the tensor's scale.
        floor = max(floor, 1e-5 * xr.abs().max().item())
    budget = factor * err_base + floor
    assert err <= budget, (
        f"{name}: max error {err:.3e} > budget {budget:.3e} ({factor} x baseline error {err_base:.3e} + floor {floor:.3e})"
    )


def make_layer(kind: str, impl: str, dtype=torch.float32, **cfg) -> GroupedQueryAttention:
    """A layer whose weights depend only on (kind, cfg): the same for every backend and dtype."""
    torch.manual_seed(1234)
    cls = ATTN_CLASS_REGISTRY[kind]
    kv = {} if kind != "grouped_query_attention" else {"kv_n_heads": cfg.pop("kv_n_heads")}
    layer = cls(D_MODEL, N_HEADS, attn_impl="torch", device=DEVICE, dtype=torch.float64, **kv, **cfg)
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial LayerNorm affine and biases
            p.add_(0.1 * torch.randn_like(p))
    other = cls(D_MODEL, N_HEADS, attn_impl=impl, device=DEVICE, dtype=dtype, **kv, **cfg)
    other.load_state_dict(layer.state_dict())
    return other


REGISTRY_NAME = {"mha": "multihead_attention", "mqa": "multiquery_attention", "gqa": "grouped_query_attention"}


def layer_cfg(kind, qk_ln=False, clip_qkv=None, **extra):
    cfg = dict(qk_ln=qk_ln, clip_qkv=clip_qkv, **extra)
    if kind == "gqa":
        cfg["kv_n_heads"] = KV_HEADS["gqa"]
    return REGISTRY_NAME[kind], cfg


def run_layer(layer, x, dout, **fwd):
    """Forward + backward; returns {name: tensor} of the output, dx and every parameter grad."""
    x = x.detach().clone().requires_grad_(True)
    out, _, _ = layer(x, **fwd)
    out.backward(dout)
    res = {"out": out.detach(), "dx": x.grad}
    res.update({f"d{n}": p.grad for n, p in layer.named_parameters()})
    return res


def to_dtype(fwd: dict, dtype) -> dict:
    """Forward kwargs for a layer of ``dtype``: floating biases follow the layer (as a model's
    bias buffer would); masks and ALiBi slopes (fp32 by contract) stay."""
    out = {}
    for k, v in fwd.items():
        if k == "attn_bias" and v is not None:
            v = v.to(dtype)
        out[k] = v
    return out


def check_backends(kind, cfg, fwd, batch, seqlen, impls=ATTN_IMPLS, dtype=torch.float32, eval_mode=False):
    """Run ``impls`` on one layer (shared weights) in ``dtype``; compare every output and
    gradient with the float64 oracle under the tolerance rule."""
    torch.manual_seed(0)
    x = torch.randn(batch, seqlen, D_MODEL, device=DEVICE, dtype=torch.float64)
    dout = torch.randn_like(x)

    def layer(impl, dt, attn_fn=None):
        m = make_layer(kind, impl, dt, **copy.deepcopy(cfg))
        if attn_fn is not None:
            m.attn_fn = attn_fn
        return m.eval() if eval_mode else m

    ref = run_layer(layer("torch", torch.float64), x, dout, **to_dtype(fwd, torch.float64))
    # A gradient that is 0 in exact arithmetic (e.g. k_ln.bias: one vector added to every key
    # shifts each score row by a constant, which softmax ignores) is pure rounding noise on
    # every backend; the rule has no scale to measure it against, so it is only checked finite.
    largest = max(t.abs().max().item() for t in ref.values())
    exact_zero = {name for name, t in ref.items() if t.abs().max().item() <= 1e-12 * largest}
    baselines = {}
    for impl in impls:
        cdt = compute_dtype(impl, dtype)
        if cdt not in baselines:
            baselines[cdt] = run_layer(layer("torch", dtype, torch_backend_at(cdt)), x.to(dtype), dout.to(dtype), **to_dtype(fwd, dtype))
        got = run_layer(layer(impl, dtype), x.to(dtype), dout.to(dtype), **to_dtype(fwd, dtype))
        for name, t in got.items():
            if name in exact_zero:
                assert torch.isfinite(t).all(), f"{impl}/{name}: non-finite values"
                continue
            factor = FWD_FACTOR if name == "out" else GRAD_FACTOR
            assert_within(f"{impl}/{dtype}/{name}", t, ref[name], baselines[cdt][name], factor, cdt)


# ----------------------------------------------------------------------------- inputs


def padding_mask(kind, batch, seqlen):
    """(batch, seqlen) bool, True = keep. 'right': the second sequence ends early; 'left': it
    starts late, so under a causal mask its first queries see no key (dead rows)."""
    if kind is None:
        return None
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEVICE)
    if kind == "right":
        mask[1, seqlen - seqlen // 3:] = False
    else:
        mask[1, : seqlen // 3] = False
    return mask


def model_bias(kind, batch, seqlen, alibi_bias):
    """A model-wide bias built with the public builders, and whether the layer is causal."""
    if kind is None and not alibi_bias:
        return None, True
    prefix_lm = kind == "prefix_lm"
    seq_id = kind == "sequence_id"
    causal = not prefix_lm
    shape = attn_bias_shape("torch", N_HEADS, seqlen, alibi_bias, prefix_lm, causal, seq_id)
    bias = torch.zeros(shape, device=DEVICE)
    bias = build_attn_bias("torch", bias, N_HEADS, seqlen, causal=causal, alibi=alibi_bias)
    if prefix_lm:
        prefix = torch.zeros(batch, seqlen, dtype=torch.bool, device=DEVICE)
        prefix[0, : seqlen // 3] = True  # within the prefill of the KV-cache test
        prefix[1, :3] = True
        bias = apply_prefix_lm_mask(bias, prefix)
    if seq_id:
        ids = torch.zeros(batch, seqlen, dtype=torch.long, device=DEVICE)
        ids[0, seqlen // 3:] = 1
        ids[0, seqlen // 2:] = 2
        ids[1, 5:] = 1
        bias = apply_sequence_id_mask(bias, ids, max_seq_len=seqlen)
    return bias, causal


def forward_kwargs(batch, seqlen, alibi=False, pad=None, bias=None, alibi_bias=False, causal=True):
    attn_bias, bias_causal = model_bias(bias, batch, seqlen, alibi_bias)
    return dict(
        attn_bias=attn_bias,
        attention_mask=padding_mask(pad, batch, seqlen),
        is_causal=causal and bias_causal,
        alibi_slopes=gen_slopes(N_HEADS, device=DEVICE) if alibi else None,
    )


# (kind, layer options, forward options): each feature crossed with several others.
CASES = [
    pytest.param("mha", {}, {}, id="mha"),
    pytest.param("mqa", {}, {}, id="mqa"),
    pytest.param("gqa", {}, {}, id="gqa"),
    pytest.param("mha", {}, dict(alibi=True, pad="right"), id="mha-alibi-padright"),
    pytest.param("mqa", dict(qk_ln=True), dict(alibi=True), id="mqa-alibi-qkln"),
    pytest.param("gqa", dict(clip_qkv=0.5), dict(alibi=True, pad="left"), id="gqa-alibi-clip-padleft"),
    pytest.param("mha", {}, dict(bias="prefix_lm", alibi_bias=True), id="mha-prefixlm-alibibias"),
    pytest.param("gqa", dict(qk_ln=True, clip_qkv=0.5), dict(bias="sequence_id", alibi=True), id="gqa-seqid-alibi-qkln-clip"),
    pytest.param("mqa", {}, dict(bias="sequence_id", pad="right"), id="mqa-seqid-padright"),
    pytest.param("gqa", {}, dict(alibi=True, pad="right", causal=False), id="gqa-noncausal-alibi-padright"),
    pytest.param("mha", dict(qk_ln=True, fused_qkv=False, softmax_scale=0.3), dict(alibi_bias=True), id="mha-unfused-scale-alibibias"),
    pytest.param("gqa", dict(qk_ln=True), dict(bias="prefix_lm", pad="left"), id="gqa-prefixlm-padleft-qkln"),
    pytest.param("mqa", dict(clip_qkv=0.5, attn_pdrop=0.3), dict(alibi=True, pad="left"), id="mqa-alibi-clip-padleft-dropout-eval"),
]


# ----------------------------------------------------------------------------- cross-backend


@pytest.mark.parametrize("kind, layer_opts, fwd_opts", CASES)
def test_backends_agree_fp32(kind, layer_opts, fwd_opts):
    """fp32 layers: 'torch', 'flash' and 'triton' (kernels in bf16) against the float64 oracle;
    outputs, input grads and parameter grads."""
    batch, seqlen = 2, 24
    name, cfg = layer_cfg(kind, **layer_opts)
    check_backends(name, cfg, forward_kwargs(batch, seqlen, **fwd_opts), batch, seqlen,
                   eval_mode="attn_pdrop" in layer_opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.gpu)], ids=str)
@pytest.mark.parametrize(
    "kind, layer_opts, fwd_opts",
    [
        pytest.param("gqa", dict(qk_ln=True), dict(alibi=True, pad="left"), id="gqa-alibi-qkln-padleft"),
        pytest.param("mha", dict(clip_qkv=0.5), dict(bias="sequence_id", alibi_bias=True), id="mha-seqid-alibibias-clip"),
    ],
)
def test_backends_agree_16bit(kind, layer_opts, fwd_opts, dtype):
    """16-bit layers: every backend within the rule, the baseline being the 'torch' backend on
    the same 16-bit layer."""
    batch, seqlen = 2, 37
    name, cfg = layer_cfg(kind, **layer_opts)
    check_backends(name, cfg, forward_kwargs(batch, seqlen, **fwd_opts), batch, seqlen, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind, layer_opts, fwd_opts", CASES)
def test_backends_agree_gpu_large(kind, layer_opts, fwd_opts, dtype):
    """GPU tier: the same matrix at a longer, odd sequence length and every dtype."""
    batch, seqlen = 3, 203
    name, cfg = layer_cfg(kind, **layer_opts)
    check_backends(name, cfg, forward_kwargs(batch, seqlen, **fwd_opts), batch, seqlen, dtype=dtype,
                   eval_mode="attn_pdrop" in layer_opts)


# ----------------------------------------------------------------------------- KV cache


def decode(layer, x, chunks, fwd):
    """Run ``x`` through ``layer`` in chunks with a KV cache; the model-wide bias is cut to the
    keys seen so far and the layer takes its last rows, as a model would."""
    outs, cache, start = [], None, 0
    for n in chunks:
        end = start + n
        bias = fwd["attn_bias"]
        mask = fwd["attention_mask"]
        out, _, cache = layer(
            x[:, start:end],
            past_key_value=cache,
            attn_bias=None if bias is None else bias[..., :end, :end],
            attention_mask=None if mask is None else mask[:, :end],
            is_causal=fwd["is_causal"],
            alibi_slopes=fwd["alibi_slopes"],
        )
        assert cache[0].shape == (x.shape[0], end, layer.kv_n_heads, layer.head_dim)
        outs.append(out)
        start = end
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize(
    "kind, layer_opts, fwd_opts",
    [
        pytest.param("gqa", dict(qk_ln=True), dict(alibi=True, pad="left"), id="gqa-alibi-qkln-padleft"),
        pytest.param("mqa", dict(clip_qkv=0.5), dict(bias="sequence_id", alibi_bias=True), id="mqa-seqid-alibibias-clip"),
        pytest.param("mha", {}, dict(bias="prefix_lm", pad="right"), id="mha-prefixlm-padright"),
    ],
)
def test_kv_cache_decoding_matches_full_forward(kind, layer_opts, fwd_opts, impl):
    """Prefill, then one token at a time and a few tokens at once: the outputs equal the
    full-sequence forward (bottom-right causal alignment, bias slicing, cache layout)."""
    batch, seqlen, chunks = 2, 16, [6, 1, 1, 3, 1, 4]
    name, cfg = layer_cfg(kind, **layer_opts)
    fwd = forward_kwargs(batch, seqlen, **fwd_opts)
    torch.manual_seed(0)
    x = torch.randn(batch, seqlen, D_MODEL, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ref, _, (k_ref, v_ref) = make_layer(name, "torch", torch.float64, **copy.deepcopy(cfg))(x, **fwd)
        cdt = compute_dtype(impl, torch.float32)
        base_layer = make_layer(name, "torch", torch.float32, **copy.deepcopy(cfg))
        base_layer.attn_fn = torch_backend_at(cdt)
        base, _, _ = base_layer(x.float(), **fwd)
        layer = make_layer(name, impl, torch.float32, **copy.deepcopy(cfg))
        out, (k, v) = decode(layer, x.float(), chunks, fwd)
    assert_within(f"{impl}/decode", out, ref, base, FWD_FACTOR, cdt)
    torch.testing.assert_close(k, k_ref.float())
    torch.testing.assert_close(v, v_ref.float())


def test_kv_cache_moves_between_backends():
    """The cache layout is the same on every backend: prefill on one, decode on another."""
    name, cfg = layer_cfg("gqa")
    x = torch.randn(2, 9, D_MODEL, device=DEVICE)
    layers = {impl: make_layer(name, impl, **copy.deepcopy(cfg)) for impl in ("torch", "flash")}
    with torch.no_grad():
        full, _, _ = layers["torch"](x)
        _, _, cache = layers["flash"](x[:, :6])
        out, _, _ = layers["torch"](x[:, 6:], past_key_value=cache)
    torch.testing.assert_close(out, full[:, 6:])


# ----------------------------------------------------------------------------- torch.nn.MultiheadAttention


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("pad", [None, "right"], ids=["nopad", "padright"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_matches_torch_nn_multihead_attention(impl, pad, causal):
    """The MHA preset with nn.MultiheadAttention's weights gives nn.MultiheadAttention's output
    (and, on 'torch', its per-head weights)."""
    batch, seqlen = 2, 21
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(D_MODEL, N_HEADS, batch_first=True, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()

    def ours(impl, dtype, attn_fn=None):
        layer = MultiheadAttention(D_MODEL, N_HEADS, attn_impl=impl, device=DEVICE, dtype=dtype)
        layer.load_state_dict(
            {"Wqkv.weight": ref.in_proj_weight, "Wqkv.bias": ref.in_proj_bias,
             "out_proj.weight": ref.out_proj.weight, "out_proj.bias": ref.out_proj.bias}
        )
        if attn_fn is not None:
            layer.attn_fn = attn_fn
        return layer

    x = torch.randn(batch, seqlen, D_MODEL, device=DEVICE, dtype=torch.float64)
    keep = padding_mask(pad, batch, seqlen)
    causal_mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=DEVICE).triu(1) if causal else None
    with torch.no_grad():
        out_ref, w_ref = ref(x, x, x, attn_mask=causal_mask, key_padding_mask=None if keep is None else ~keep,
                             need_weights=True, average_attn_weights=False)
        cdt = compute_dtype(impl, torch.float32)
        base, _, _ = ours("torch", torch.float32, torch_backend_at(cdt))(x.float(), attention_mask=keep, is_causal=causal)
        needs_weights = impl == "torch"
        out, w, _ = ours(impl, torch.float32)(x.float(), attention_mask=keep, is_causal=causal, needs_weights=needs_weights)
    assert_within(f"{impl}/out", out, out_ref, base, FWD_FACTOR, cdt)
    if needs_weights:
        torch.testing.assert_close(w, w_ref.float())


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("mask_value", [float("-inf"), torch.finfo(torch.float32).min], ids=["-inf", "finfo.min"])
def test_fully_masked_rows_give_zero(impl, mask_value):
    """A query with no visible key (causal with seqlen_q > seqlen_k, an all-padded sequence, a
    bias row of -inf or of fp32 finfo.min as MPT masks) gives context 0 and finite,
    zero-for-that-row gradients on every backend."""
    b, h, hk, d, sq, sk = 2, 4, 2, 16, 7, 5
    q = torch.randn(b, sq, h * d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, sk, hk * d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, sk, hk * d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    keep[1] = False
    bias = torch.zeros(1, 1, sq, sk, device=DEVICE)
    bias[..., -1, :] = mask_value
    out, _, _ = ATTN_FNS[impl](q, k, v, h, hk, attn_bias=bias, key_padding_mask=keep, is_causal=True,
                               alibi_slopes=gen_slopes(h, device=DEVICE))
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    dead = torch.zeros(b, sq, dtype=torch.bool, device=DEVICE)
    dead[:, : sq - sk] = True  # causal, bottom-right: the first sq - sk queries see nothing
    dead[1] = True  # all keys padded
    dead[:, -1] = True  # -inf bias row
    assert (out[dead] == 0).all()
    assert (out[~dead] != 0).any(dim=-1).all()
    assert (q.grad[dead] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("bias_shape", [(1, N_HEADS, 9, 9), (2, 1, 1, 9)], ids=["1h-s-s", "b11s"])
def test_learned_bias_gradient(bias_shape):
    """A bias that requires grad (e.g. a learned relative-position bias) gets the same gradient,
    of its own shape, on every backend; the cache-free call slices nothing."""
    b, hk, d, s = 2, 2, 16, 9
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h * d, device=DEVICE, dtype=torch.float64) for h in (N_HEADS, hk, hk))
    bias = torch.randn(bias_shape, device=DEVICE, dtype=torch.float64)
    dout = torch.randn_like(q)

    def run(impl, dtype, rnd=None):
        args = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, bias)]
        fn = torch_backend_at(rnd) if rnd is not None else ATTN_FNS[impl]
        out, _, _ = fn(*args[:3], N_HEADS, hk, attn_bias=args[3], is_causal=True)
        out.backward(dout.to(dtype))
        return [out] + [t.grad for t in args]

    ref = run("torch", torch.float64)
    for impl in ATTN_IMPLS:
        cdt = compute_dtype(impl, torch.float32)
        base = run("torch", torch.float32, cdt)
        for name, x, r, p in zip(("out", "dq", "dk", "dv", "dbias"), run(impl, torch.float32), ref, base):
            assert_within(f"{impl}/{name}", x, r, p, FWD_FACTOR if name == "out" else GRAD_FACTOR, cdt)


def test_needs_weights_torch_backend():
    """'torch' returns (batch, n_heads, seqlen_q, seqlen_k) weights: rows sum to 1, causal zeros."""
    layer = make_layer("multiquery_attention", "torch")
    _, w, _ = layer(torch.randn(2, 6, D_MODEL, device=DEVICE), needs_weights=True)
    assert w.shape == (2, N_HEADS, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, N_HEADS, 6, device=DEVICE))
    assert (w.triu(1) == 0).all()


@pytest.mark.parametrize("impl", ATTN_IMPLS)
def test_dropout_in_training_only(impl):
    """attn_pdrop drops attention weights in training mode only, reproducibly under a seed."""
    layer = make_layer("multihead_attention", impl, attn_pdrop=0.5)
    x = torch.randn(2, 12, D_MODEL, device=DEVICE)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(layer.train()(x)[0])
    evals = [layer.eval()(x)[0] for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(evals[0], evals[1])
    assert (outs[0] - evals[0]).abs().max() > 1e-3
    ref, _, _ = make_layer("multihead_attention", "torch", attn_pdrop=0.5).eval()(x)
    # 'triton' runs fp32 layers in bf16 (triton_compute_dtype).
    tol = dict(atol=3e-2, rtol=0) if impl == "triton" else {}
    torch.testing.assert_close(evals[0], ref, **tol)


def test_triton_compute_dtype():
    """fp32 layers run the kernels in bf16 (or the autocast dtype); 16-bit as they are."""
    assert triton_compute_dtype(torch.empty(1, dtype=torch.float16)) == torch.float16
    assert triton_compute_dtype(torch.empty(1)) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert triton_compute_dtype(torch.empty(1)) == torch.float16


def test_triton_layer_keeps_fp32_interface():
    """An fp32 layer on 'triton' returns fp32 outputs, fp32 cache and fp32 gradients."""
    layer = make_layer("grouped_query_attention", "triton", kv_n_heads=2)
    x = torch.randn(2, 5, D_MODEL, device=DEVICE, requires_grad=True)
    out, _, (k, v) = layer(x, alibi_slopes=gen_slopes(N_HEADS, device=DEVICE))
    out.sum().backward()
    assert out.dtype == k.dtype == v.dtype == x.grad.dtype == layer.Wqkv.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- bias builders


def test_builders_reexport_core():
    assert gen_slopes is tritonflash.bias.gen_slopes
    assert build_alibi_bias is tritonflash.bias.build_alibi_bias


@pytest.mark.parametrize("impl", ATTN_IMPLS)
def test_attn_bias_shape(impl):
    h, s = 4, 10
    assert attn_bias_shape(impl, h, s, alibi=False, prefix_lm=False, causal=True, use_sequence_id=False) is None
    assert attn_bias_shape(impl, h, s, alibi=True, prefix_lm=False, causal=True, use_sequence_id=False) == (1, h, 1, s)
    assert attn_bias_shape(impl, h, s, alibi=True, prefix_lm=False, causal=False, use_sequence_id=False) == (1, h, s, s)
    assert attn_bias_shape(impl, h, s, alibi=True, prefix_lm=True, causal=False, use_sequence_id=False) == (1, h, s, s)
    assert attn_bias_shape(impl, h, s, alibi=True, prefix_lm=False, causal=True, use_sequence_id=True) == (1, h, s, s)
    assert attn_bias_shape(impl, h, s, alibi=False, prefix_lm=True, causal=False, use_sequence_id=False) == (1, 1, s, s)
    assert attn_bias_shape(impl, h, s, alibi=False, prefix_lm=False, causal=True, use_sequence_id=True) == (1, 1, s, s)


def test_build_attn_bias_alibi():
    """Causal: the per-key vector form; non-causal: -slope * |i - j|."""
    h, s = 3, 6
    slopes = gen_slopes(h).view(h, 1, 1)
    vec = build_attn_bias("triton", torch.zeros(1, h, 1, s), h, s, causal=True, alibi=True)
    torch.testing.assert_close(vec[0], -slopes * (s - 1 - torch.arange(s)).float().view(1, 1, s))
    full = build_attn_bias("torch", torch.zeros(1, h, s, s), h, s, causal=False, alibi=True)
    i = torch.arange(s).view(-1, 1)
    torch.testing.assert_close(full[0], -slopes * (i - i.T).abs().float())
    plain = torch.randn(1, 1, s, s)
    assert build_attn_bias("flash", plain, h, s, alibi=False) is plain


def test_prefix_lm_mask_semantics():
    """i sees j iff j <= i or j is in the prefix; other entries -inf, the rest untouched."""
    s = 7
    prefix = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    base = torch.randn(1, 2, s + 2, s + 2)
    out = apply_prefix_lm_mask(base, prefix)
    assert out.shape == (2, 2, s, s)
    for b in range(2):
        for i in range(s):
            for j in range(s):
                want = base[0, :, i, j] if (j <= i or prefix[b, j]) else torch.full((2,), float("-inf"))
                torch.testing.assert_close(out[b, :, i, j], want)


def test_sequence_id_mask_semantics():
    s = 6
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    out = apply_sequence_id_mask(None, ids, max_seq_len=8)
    assert out.shape == (2, 1, s, s)
    want = torch.where(ids[:, :, None] == ids[:, None, :], 0.0, float("-inf")).unsqueeze(1)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="longer than max_seq_len 4"):
        apply_sequence_id_mask(None, ids, max_seq_len=4)


def test_slice_attn_bias_takes_last_rows_and_columns():
    bias = torch.arange(36.0).view(1, 1, 6, 6)
    torch.testing.assert_close(slice_attn_bias(bias, 1, 1, 2, 4), bias[..., 4:, 2:])
    assert slice_attn_bias(torch.zeros(6, 6), 2, 4, 6, 6).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"does not broadcast to \(batch, n_heads, seqlen_q, seqlen_k\)"):
        slice_attn_bias(torch.zeros(1, 3, 6, 6), 2, 4, 6, 6)


def test_unknown_attn_impl_in_builders():
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        attn_bias_shape("xformers", 4, 8, True, False, True, False)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        build_attn_bias("xformers", None, 4, 8)


# ----------------------------------------------------------------------------- registry and errors


def test_registry_and_presets():
    assert set(ATTN_CLASS_REGISTRY) == {"multihead_attention", "multiquery_attention", "grouped_query_attention"}
    mha = ATTN_CLASS_REGISTRY["multihead_attention"](D_MODEL, N_HEADS, "torch")
    mqa = ATTN_CLASS_REGISTRY["multiquery_attention"](D_MODEL, N_HEADS, attn_impl="flash", qk_ln=True)
    gqa = ATTN_CLASS_REGISTRY["grouped_query_attention"](D_MODEL, N_HEADS, 2)
    assert isinstance(mha, GroupedQueryAttention) and isinstance(mqa, GroupedQueryAttention)
    assert (mha.kv_n_heads, mqa.kv_n_heads, gqa.kv_n_heads) == (N_HEADS, 1, 2)
    assert (mha.attn_impl, mqa.attn_impl, gqa.attn_impl) == ("torch", "flash", "triton")
    head_dim = D_MODEL // N_HEADS
    assert mha.Wqkv.weight.shape == (3 * D_MODEL, D_MODEL)
    assert mqa.Wqkv.weight.shape == (D_MODEL + 2 * head_dim, D_MODEL)
    assert mqa.k_ln.normalized_shape == (head_dim,) and mqa.q_ln.normalized_shape == (D_MODEL,)
    assert gqa.Wqkv.weight.shape == (D_MODEL + 4 * head_dim, D_MODEL)
    with pytest.raises(TypeError, match="MultiQueryAttention fixes kv_n_heads"):
        MultiQueryAttention(D_MODEL, N_HEADS, kv_n_heads=2)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        pytest.param((64, 4, 3), {}, r"kv_n_heads \(3\) must divide n_heads \(4\)", id="kv-not-dividing"),
        pytest.param((64, 4, 8), {}, r"kv_n_heads \(8\) must not exceed n_heads \(4\)", id="kv-exceeds"),
        pytest.param((64, 5, 5), {}, r"d_model \(64\) must be divisible by n_heads \(5\)", id="dmodel-not-divisible"),
        pytest.param((64, 0, 1), {}, "n_heads must be a positive int", id="zero-heads"),
        pytest.param((64, 4, 4), {"attn_impl": "xformers"}, r"attn_impl must be one of .*'xformers'", id="unknown-impl"),
        pytest.param((64, 4, 4), {"attn_pdrop": 1.0}, r"attn_pdrop must be in \[0, 1\), got 1.0", id="pdrop-one"),
        pytest.param((64, 4, 4), {"attn_pdrop": -0.1}, r"attn_pdrop must be in \[0, 1\)", id="pdrop-negative"),
        pytest.param((64, 4, 4), {"clip_qkv": 0}, "clip_qkv must be None or > 0", id="clip-zero"),
        pytest.param((64, 4, 4), {"softmax_scale": -1.0}, "softmax_scale must be None or > 0", id="scale-negative"),
    ],
)
def test_config_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupedQueryAttention(*args, **kwargs)


@pytest.mark.parametrize(
    "impl, kwargs, train, match",
    [
        pytest.param("triton", {"needs_weights": True}, False, r"attn_impl='triton' .*needs_weights=True", id="triton-weights"),
        pytest.param("flash", {"needs_weights": True}, False, r"attn_impl='flash' .*needs_weights=True", id="flash-weights"),
    ],
)
def test_unsupported_options_raise(impl, kwargs, train, match):
    """An unsupported option raises NotImplementedError naming the backend; never a fallback."""
    layer = make_layer("multihead_attention", impl, attn_pdrop=0.1).train(train)
    with pytest.raises(NotImplementedError, match=match):
        layer(torch.randn(1, 3, D_MODEL, device=DEVICE), **kwargs)


def test_triton_dropout_allowed_in_eval():
    layer = make_layer("multihead_attention", "triton", attn_pdrop=0.1).eval()
    layer(torch.randn(1, 3, D_MODEL, device=DEVICE))


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize(
    "fwd, match",
    [
        pytest.param({"x": (2, 5, 32)}, r"x must have shape \(batch, seqlen, d_model=64\), got \(2, 5, 32\)", id="x-width"),
        pytest.param({"attention_mask": (2, 4)}, r"attention_mask\) must have shape .* = \(2, 5\), got \(2, 4\)", id="mask-shape"),
        pytest.param({"past_key_value": (2, 2, 16, 3)}, r"past_key_value's past key must have shape .*flash-attn layout",
                     id="cache-mpt-torch-layout"),
        pytest.param({"attn_bias": (1, 3, 5, 5)}, r"attn_bias of shape \(1, 3, 5, 5\).*does not broadcast", id="bias-heads"),
        pytest.param({"alibi_slopes": (3,)}, r"alibi_slopes must have shape \(4,\) or \(2, 4\), got \(3,\)", id="slopes-shape"),
    ],
)
def test_forward_errors(impl, fwd, match):
    """Bad forward inputs raise ValueError with the expected and received shapes, on every backend."""
    layer = make_layer("grouped_query_attention", impl, kv_n_heads=2)
    x = torch.randn(*fwd.get("x", (2, 5, D_MODEL)), device=DEVICE)
    kwargs = {}
    if "attention_mask" in fwd:
        kwargs["attention_mask"] = torch.ones(fwd["attention_mask"], dtype=torch.bool, device=DEVICE)
    if "past_key_value" in fwd:
        kwargs["past_key_value"] = (torch.zeros(fwd["past_key_value"], device=DEVICE),) * 2
    if "attn_bias" in fwd:
        kwargs["attn_bias"] = torch.zeros(fwd["attn_bias"], device=DEVICE)
    if "alibi_slopes" in fwd:
        kwargs["alibi_slopes"] = torch.ones(fwd["alibi_slopes"], device=DEVICE)
    with pytest.raises(ValueError, match=match):
        layer(x, **kwargs)



# ----------------------------------------------------------------------------- backends agree or refuse alike


def _qkv_flat(b=2, sq=6, sk=6, h=N_HEADS, hk=2, d=16, dtype=torch.float32):
    q = torch.randn(b, sq, h * d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, sk, hk * d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, sk, hk * d, device=DEVICE, dtype=dtype)
    return q, k, v, hk


@pytest.mark.parametrize("impl", ATTN_IMPLS)
def test_bool_attn_bias_is_an_sdpa_mask_on_every_backend(impl):
    """Regression: a bool attn_bias (PyTorch SDPA's convention, True = attend) was added as +1.0
    by 'torch' and 'flash' and refused by 'triton'. Every backend now reads it as SDPA does: the
    same result as the additive 0 / -inf bias, SDPA's result on rows that see a key, and 0 (not
    NaN) on a row that sees none."""
    torch.manual_seed(0)
    q, k, v, hk = _qkv_flat()
    b, sq, sk, h, d = 2, 6, 6, N_HEADS, 16
    mask = torch.rand(b, 1, sq, sk, device=DEVICE) > 0.4
    mask |= torch.eye(sq, sk, dtype=torch.bool, device=DEVICE)
    mask[1, 0, 2] = False  # a row with no visible key
    additive = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))
    out_bool, _, _ = ATTN_FNS[impl](q, k, v, h, hk, attn_bias=mask)
    out_add, _, _ = ATTN_FNS[impl](q, k, v, h, hk, attn_bias=additive)
    assert torch.equal(out_bool, out_add)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.unflatten(-1, (h, d)).transpose(1, 2),
        k.unflatten(-1, (hk, d)).transpose(1, 2).repeat_interleave(h // hk, 1),
        v.unflatten(-1, (hk, d)).transpose(1, 2).repeat_interleave(h // hk, 1),
        attn_mask=mask,
    ).transpose(1, 2).flatten(2)
    live = mask.any(-1)[:, 0]  # (b, sq)
    tol = 2e-2 if impl == "triton" else 1e-5  # 'triton' computes in bf16 for fp32 layers
    torch.testing.assert_close(out_bool[live], sdpa[live], rtol=tol, atol=tol)
    assert (out_bool[~live] == 0).all()


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.complex64], ids=str)
def test_non_float_attn_bias_refused_alike(impl, dtype):
    """Regression: an integer attn_bias was accepted by 'torch' and 'flash' and refused by
    'triton'. Every backend now raises the same TypeError naming attn_bias."""
    q, k, v, hk = _qkv_flat()
    bias = torch.zeros(1, 1, 6, 6, device=DEVICE).to(dtype)
    with pytest.raises(TypeError, match=rf"^attn_bias must be a floating-point additive bias .* or a bool mask "
                                        rf"\(True = attend, PyTorch SDPA's convention\), got {re.escape(str(dtype))}$"):
        ATTN_FNS[impl](q, k, v, N_HEADS, hk, attn_bias=bias)


def _slopes_case(case):
    slopes = gen_slopes(N_HEADS, device=DEVICE)
    if case == "fp16":
        return slopes.half(), TypeError, r"^alibi_slopes must be float32, got torch\.float16$"
    if case == "fp64":
        return slopes.double(), TypeError, r"^alibi_slopes must be float32, got torch\.float64$"
    if case == "requires-grad":
        return slopes.requires_grad_(True), ValueError, r"^alibi_slopes must not require grad"
    slopes[1] = {"nan": float("nan"), "inf": float("inf")}[case]
    return slopes, ValueError, rf"^alibi_slopes must be finite, got {slopes[1].item()} at index \(1,\)$"


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("case", ["fp16", "fp64", "requires-grad", "nan", "inf"])
def test_alibi_slopes_refused_alike(impl, case):
    """Regression: fp16 or grad-requiring alibi_slopes ran on 'torch' and 'flash' (a learned
    slope even got a gradient there) and were refused by 'triton'; non-finite slopes gave NaN.
    The layers now apply the kernels' rules (checks.check_alibi_slopes) on every backend."""
    q, k, v, hk = _qkv_flat()
    slopes, exc, match = _slopes_case(case)
    with pytest.raises(exc, match=match):
        ATTN_FNS[impl](q, k, v, N_HEADS, hk, is_causal=True, alibi_slopes=slopes)


def test_torch_backend_is_the_reference():
    """reference.py is the single semantics oracle: the 'torch' backend computes with its
    functions, so in float64 it equals attention_ref bit for bit (bias with a finfo.min row,
    ALiBi, key padding, bottom-right causal, GQA), and its weights are attention_weights'."""
    from tritonflash.reference import attention_scores, attention_weights

    torch.manual_seed(0)
    b, sq, sk, h, hk, d = 2, 5, 7, N_HEADS, 2, 8
    q, k, v, _ = _qkv_flat(b, sq, sk, h, hk, d, dtype=torch.float64)
    bias = torch.randn(b, 1, sq, sk, device=DEVICE, dtype=torch.float64)
    bias[0, 0, 1] = torch.finfo(torch.float64).min
    kpm = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    kpm[1, :3] = False
    slopes = gen_slopes(h, device=DEVICE)
    out, w, _ = scaled_multihead_dot_product_attention(q, k, v, h, hk, softmax_scale=0.3, attn_bias=bias,
                                                       key_padding_mask=kpm, is_causal=True, needs_weights=True,
                                                       alibi_slopes=slopes)
    q4, k4, v4 = q.unflatten(-1, (h, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))
    kwargs = dict(alibi_slopes=slopes, key_padding_mask=kpm)
    ref = attention_ref(q4, k4, v4, bias, True, 0.3, upcast=False, **kwargs)
    assert torch.equal(out, ref.flatten(2))
    assert torch.equal(w, attention_weights(attention_scores(q4, k4, bias, True, 0.3, **kwargs)))


def test_mpt_builders_refuse_bool_bias():
    """The MPT builders add to and -inf-fill a float bias; a bool one would turn -inf into True."""
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"^attn_bias must be a floating-point bias for the MPT builders, got torch\.bool"):
        apply_prefix_lm_mask(mask, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^attn_bias must be a floating-point bias for the MPT builders, got torch\.bool"):
        build_attn_bias("torch", mask, 1, 4, alibi=True)


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"query": [[0.0]]}, r"^query must be a torch\.Tensor, got list$", id="query-list"),
    pytest.param({"n_heads": 4.0}, r"^n_heads must be an int, got float$", id="n_heads-float"),
    pytest.param({"is_causal": "yes"}, r"^is_causal must be a bool, got str$", id="is_causal-str"),
    pytest.param({"softmax_scale": "0.3"}, r"^softmax_scale must be a float or None, got str$", id="scale-str"),
    pytest.param({"dropout_p": None}, r"^dropout_p must be a float, got NoneType$", id="dropout-None"),
    pytest.param({"past_key_value": torch.zeros(2)}, r"^past_key_value must be None, \(\) or a \(key, value\) pair of tensors, "
                 r"got torch\.Tensor$", id="cache-tensor"),
    pytest.param({"past_key_value": (torch.zeros(2),)}, r"^past_key_value must be None, \(\) or a \(key, value\) pair of tensors, "
                 r"got tuple of length 1$", id="cache-1-tuple"),
    pytest.param({"past_key_value": ([0.0], [0.0])}, r"^past_key_value's past key must be a torch\.Tensor, got list$",
                 id="cache-lists"),
])
def test_backend_type_errors_name_the_argument(impl, kwargs, match):
    """Wrong types reach every backend's shared validation and raise the same TypeError naming
    the argument (they used to surface as AttributeError or torch's own messages)."""
    q, k, v, hk = _qkv_flat()
    args = {"query": q, "key": k, "value": v, "n_heads": N_HEADS, "kv_n_heads": hk, **kwargs}
    with pytest.raises(TypeError, match=match):
        ATTN_FNS[impl](**args)


def test_layer_x_must_be_a_tensor():
    layer = make_layer("multihead_attention", "torch")
    with pytest.raises(TypeError, match=r"^x must be a torch\.Tensor, got list$"):
        layer([[0.0] * D_MODEL])


@pytest.mark.parametrize("impl", ATTN_IMPLS)
def test_sliding_window_and_softcap_agree_across_backends(impl):
    """sliding_window_size (llm-foundry's name) and attn_logit_softcapping: every backend gives
    the fp64 'torch' layer's answer within the layers' tolerance, with a KV cache step too;
    'flash' (SDPA) refuses a softcap instead of dropping it (test below)."""
    cfg = dict(kv_n_heads=2, sliding_window_size=5, attn_logit_softcapping=None if impl == "flash" else 2.0)
    x = torch.randn(2, 12, D_MODEL, device=DEVICE)
    step = torch.randn(2, 1, D_MODEL, device=DEVICE)
    ref_layer = make_layer("grouped_query_attention", "torch", torch.float64, **dict(cfg))
    layer = make_layer("grouped_query_attention", impl, **dict(cfg))
    ref, _, cache_ref = ref_layer(x.double())
    out, _, cache = layer(x)
    tol = dict(atol=3e-2, rtol=0) if impl == "triton" else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref.float(), **tol)
    ref_step, _, _ = ref_layer(step.double(), past_key_value=cache_ref)
    out_step, _, _ = layer(step, past_key_value=cache)
    torch.testing.assert_close(out_step, ref_step.float(), **tol)
    # The window matters: without it the decode step (13 keys, window 5) differs.
    plain = make_layer("grouped_query_attention", "torch", torch.float64,
                       **dict(cfg, sliding_window_size=-1))
    assert (plain(step.double(), past_key_value=cache_ref)[0] - ref_step).abs().max() > 1e-3


def test_flash_layer_refuses_softcap():
    with pytest.raises(NotImplementedError, match=r"attn_impl='flash' .*cannot cap logits"):
        make_layer("grouped_query_attention", "flash", kv_n_heads=2, attn_logit_softcapping=2.0)
    with pytest.raises(ValueError, match="sliding_window_size must be -1"):
        make_layer("grouped_query_attention", "torch", kv_n_heads=2, sliding_window_size=-3)
