"""Sliding window, softcap, sinks, dropout and boolean masks (docs/semantics.md, "Score
features"): every feature forward and backward against the reference under the tolerance rule,
alone and combined with bias (+ gradient), ALiBi, key padding, GQA, causal and varlen."""

from __future__ import annotations

import math
import time

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import assert_close_to_ref, check_against_reference, make_qkv
from tritonflash import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_qkvpacked_func,
)
from tritonflash.checks import draw_dropout_seed
from tritonflash.reference import attention_ref, dropout_keep_mask, varlen_attention_ref

F16, BF16 = torch.float16, torch.bfloat16


def _case(id, sq, sk, h=4, hk=None, d=32, dtype=F16, causal=False, window=(-1, -1), softcap=0.0, sinks=False, p=0.0,
          amask=None, bias=None, alibi=False, kpm=None, batch=2):
    return pytest.param(dict(sq=sq, sk=sk, h=h, hk=hk or h, d=d, dtype=dtype, causal=causal, window=window, softcap=softcap,
                             sinks=sinks, p=p, amask=amask, bias=bias, alibi=alibi, kpm=kpm, batch=batch), id=id)


# A covering design: every feature with each of the existing axes at least once, and every pair
# of new features at least once. ``amask``/``bias``: the broadcast shape; ``kpm``: "pad" (random
# right padding) or "dead" (batch 0 sees no key).
CASES = [
    _case("window-20-5-gqa", 70, 90, h=4, hk=2, window=(20, 5)),
    _case("window-0-0-bf16", 64, 64, dtype=BF16, window=(0, 0)),
    _case("window-left-causal-alibi-sq>sk", 90, 70, causal=True, window=(33, -1), alibi=True),
    _case("window-right-only", 50, 80, window=(-1, 3), bias=(1, 4, 50, 80)),
    _case("window-wider-than-sk-bias", 40, 60, window=(200, 200), bias=(1, 4, 40, 60)),
    _case("window-kpm-sinks", 64, 96, window=(16, 8), kpm="pad", sinks=True),
    _case("softcap-bias-causal", 70, 90, causal=True, softcap=5.0, bias=(1, 4, 70, 90)),
    _case("softcap-alibi-window-bf16", 64, 71, dtype=BF16, softcap=2.0, alibi=True, window=(24, -1)),
    _case("sinks-dead-rows-gqa-causal", 48, 80, h=4, hk=1, causal=True, sinks=True, kpm="dead"),
    _case("sinks-vecbias-softcap", 37, 71, sinks=True, bias=(2, 1, 1, 71), softcap=4.0),
    _case("dropout-causal-bias", 64, 96, causal=True, p=0.3, bias=(1, 4, 64, 96)),
    _case("dropout-window-sinks-gqa", 70, 90, h=4, hk=2, causal=True, window=(20, -1), sinks=True, p=0.15),
    _case("amask-bias-causal", 70, 90, amask=(2, 1, 70, 90), bias=(1, 4, 70, 90), causal=True),
    _case("amask-2d-alibi-kpm-dropout", 64, 71, amask=(64, 71), alibi=True, kpm="pad", p=0.2),
    _case("amask-vector-dead-row", 33, 64, amask=(2, 4, 33, 1)),
    _case("everything-bf16", 64, 96, h=4, hk=2, dtype=BF16, window=(16, 8), softcap=3.0, sinks=True, p=0.2,
          amask=(2, 1, 64, 96), bias=(1, 4, 64, 96), alibi=True, kpm="pad"),
]
if ON_GPU:
    CASES += [
        _case("gpu-window-d128", 1023, 2048, h=8, hk=2, d=128, window=(256, 0), bias=(1, 8, 1023, 2048)),
        _case("gpu-softcap-d256", 513, 700, d=256, softcap=30.0, causal=True),
        _case("gpu-sinks-window-d64", 1024, 1024, h=8, hk=1, d=64, sinks=True, window=(128, 0), dtype=BF16),
        _case("gpu-dropout-d128", 777, 1024, d=128, p=0.1, bias=(1, 4, 777, 1024), alibi=True),
        _case("gpu-amask-d64", 512, 1000, d=64, amask=(2, 1, 512, 1000), kpm="pad", sinks=True),
    ]


def _inputs(c, seed_value=1234):
    q, k, v = make_qkv(c["batch"], c["sq"], c["sk"], c["h"], c["d"], c["dtype"], DEVICE, nheads_k=c["hk"])
    extra = {}
    ref = {}
    if c["bias"] is not None:
        extra["bias"] = torch.randn(c["bias"], device=DEVICE).requires_grad_()
    if c["alibi"]:
        extra["alibi_slopes"] = torch.rand(c["h"], device=DEVICE) * 0.3
    if c["kpm"] is not None:
        kpm = torch.rand(c["batch"], c["sk"], device=DEVICE) > 0.3
        if c["kpm"] == "dead":
            kpm[0] = False
        extra["key_padding_mask"] = kpm
    feats = dict(window_size=c["window"], softcap=c["softcap"])
    if c["sinks"]:
        feats["sinks"] = torch.randn(c["h"], device=DEVICE).requires_grad_()
    if c["amask"] is not None:
        amask = torch.rand(c["amask"], device=DEVICE) > 0.25
        if c["amask"][-1] == 1:
            amask[0, 0, 3] = False  # one row of one head sees nothing
        feats["attn_mask"] = amask
    if c["p"] > 0:
        feats["dropout_p"] = c["p"]
        torch.manual_seed(seed_value)
        seed = draw_dropout_seed(c["p"], q.device)
        ref["dropout_mask"] = dropout_keep_mask(seed, (c["batch"], c["h"], c["sq"], c["sk"]), c["p"], device=q.device)
    return q, k, v, extra, feats, ref


@pytest.mark.parametrize("c", CASES)
def test_feature_against_reference(c):
    """out, lse and dq, dk, dv, dbias, dsinks against the reference (the kernel's own dropout mask)."""
    q, k, v, extra, feats, ref = _inputs(c)
    torch.manual_seed(1234)  # the dropout seed is the next draw: the one _inputs recorded
    out, lse = flash_attn_func(q, k, v, causal=c["causal"], return_lse=True, **extra, **feats)
    dout = torch.randn_like(out)
    check_against_reference(out, q, k, v, dout, causal=c["causal"], lse=lse, **extra, **feats, **ref)


def test_window_blocks_are_skipped_in_the_ranges():
    """A key far outside every query's window holds NaN: a skipped (or masked) block never
    reads it into a result, forward or backward."""
    q, k, v = make_qkv(1, 96, 96, 2, 32, F16, DEVICE)
    with torch.no_grad():
        k[0, 90:] = float("nan")
        v[0, 90:] = float("nan")
    out = flash_attn_func(q, k, v, window_size=(16, 0))
    assert not out[:, :80].isnan().any()
    out[:, :80].sum().backward()
    assert not q.grad[:, :80].isnan().any()


def test_softcap_bias_gradient_is_post_cap():
    """dbias is the gradient w.r.t. the capped score: the reference's, not the raw score's."""
    c = dict(batch=1, sq=40, sk=50, h=2, hk=2, d=32, dtype=F16, bias=(1, 2, 40, 50), alibi=False, kpm=None, window=(-1, -1),
             softcap=1.0, sinks=False, amask=None, p=0.0, causal=False)
    q, k, v, extra, feats, _ = _inputs(c)
    with torch.no_grad():
        q.mul_(4)  # scores well into the tanh's saturation
    out = flash_attn_func(q, k, v, **extra, **feats)
    check_against_reference(out, q, k, v, torch.randn_like(out), **extra, **feats)


def test_sinks_fully_masked_rows():
    """A row that sees no key gives output 0 and lse = its head's sink; dsinks is still exact."""
    q, k, v = make_qkv(2, 8, 40, 3, 16, F16, DEVICE)
    sinks = torch.tensor([0.5, -1.0, 2.0], device=DEVICE, requires_grad=True)
    kpm = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    kpm[1] = False
    out, lse = flash_attn_func(q, k, v, key_padding_mask=kpm, sinks=sinks, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(lse[1], sinks.detach()[:, None].expand(3, 8), atol=0, rtol=0)
    check_against_reference(out, q, k, v, torch.randn_like(out), key_padding_mask=kpm, sinks=sinks, lse=lse)


# ---- dropout ------------------------------------------------------------------------------------


def _reveal_mask(p, batch=2, nheads=2, seqlen_q=40, seed=5, **kw):
    """The kernel's keep-mask: q = 0 gives uniform weights 1/sk, v = identity (sk = d) puts key
    j's weight in output column j: out[b, i, h, j] = M / (sk * (1 - p))."""
    sk = d = 64
    q = torch.zeros(batch, seqlen_q, nheads, d, dtype=F16, device=DEVICE)
    k = torch.randn(batch, sk, nheads, d, dtype=F16, device=DEVICE)
    v = torch.eye(sk, dtype=F16, device=DEVICE)[None, :, None, :].expand(batch, sk, nheads, d).contiguous()
    torch.manual_seed(seed)
    out = flash_attn_func(q, k, v, dropout_p=p, **kw)
    return (out > 0).permute(0, 2, 1, 3), out


def test_dropout_mask_is_the_documented_one():
    """The keep-mask the kernels apply is reference.dropout_keep_mask of the seed drawn from the
    device's generator, entry for entry; kept values are scaled by 1 / (1 - p)."""
    p = 0.3
    kept, out = _reveal_mask(p)
    torch.manual_seed(5)
    seed = draw_dropout_seed(p, DEVICE)
    want = dropout_keep_mask(seed, kept.shape, p, device=DEVICE)
    assert torch.equal(kept, want)
    scale = 1 / (64 * (1 - p))
    torch.testing.assert_close(out[out > 0].float(), torch.full_like(out[out > 0].float(), scale), atol=1e-4, rtol=1e-3)


def test_dropout_kept_fraction():
    """Kept fraction within 5 sigma of 1 - p, from the kernel's mask and from the documented one
    over 2M draws (16-bit draws: p is honoured to 2**-16)."""
    for p in (0.1, 0.5):
        kept, _ = _reveal_mask(p, batch=2, nheads=4, seqlen_q=64)
        n = kept.numel()
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        big = dropout_keep_mask(12345, (4, 8, 256, 256), p)
        n = big.numel()
        assert abs(big.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # Independent across heads, batches, rows and key groups: no two mask rows alike.
    rows = dropout_keep_mask(7, (2, 2, 32, 64), 0.5).reshape(-1, 64)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_dropout_same_seed_same_bits_and_p0():
    """Same generator state: bitwise the same output and gradients (fwd + bwd regenerate the
    same mask); p = 0 is exactly no dropout; another seed gives another mask."""
    q, k, v = make_qkv(2, 50, 70, 4, 32, F16, DEVICE, nheads_k=2)
    bias = torch.randn(1, 4, 50, 70, device=DEVICE, requires_grad=True)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        out = flash_attn_func(q, k, v, bias, causal=True, dropout_p=0.25)
        grads = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
        runs.append((out, *grads))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])
    assert torch.equal(flash_attn_func(q, k, v, dropout_p=0.0), flash_attn_func(q, k, v))


# ---- varlen and packed --------------------------------------------------------------------------


@pytest.mark.parametrize("feats", [
    pytest.param(dict(window_size=(7, 0), causal=True), id="window-causal"),
    pytest.param(dict(window_size=(5, 9), softcap=3.0), id="window-softcap"),
    pytest.param(dict(sinks=True, dropout_p=0.2, causal=True), id="sinks-dropout"),
], )
def test_varlen_features(feats):
    lens = [0, 13, 40, 1, 27]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    total, h, d = sum(lens), 4, 32
    q = torch.randn(total, h, d, dtype=F16, device=DEVICE, requires_grad=True)
    k = torch.randn(total, 2, d, dtype=F16, device=DEVICE, requires_grad=True)
    v = torch.randn(total, 2, d, dtype=F16, device=DEVICE, requires_grad=True)
    feats = dict(feats)
    causal = feats.pop("causal", False)
    if feats.pop("sinks", False):
        feats["sinks"] = torch.randn(h, device=DEVICE, requires_grad=True)
    seed = None
    if feats.get("dropout_p", 0) > 0:
        torch.manual_seed(9)
        seed = int(draw_dropout_seed(feats["dropout_p"], DEVICE).item())
    torch.manual_seed(9)
    out, lse = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal, return_lse=True, **feats)
    ref_kw = dict(feats, dropout_seed=seed)
    out_ref, lse_ref = varlen_attention_ref(q, k, v, cu, cu, causal, return_lse=True, **ref_kw)
    out_pt, lse_pt = varlen_attention_ref(q, k, v, cu, cu, causal, return_lse=True, upcast=False, reorder_ops=True, **ref_kw)
    assert_close_to_ref("out", out, out_ref, out_pt, 2)
    assert_close_to_ref("lse", lse, lse_ref, lse_pt, 2)
    dout = torch.randn_like(out)
    wrt = [q, k, v] + ([feats["sinks"]] if "sinks" in feats else [])
    for name, a, r, pt in zip(("dq", "dk", "dv", "dsinks"), torch.autograd.grad(out, wrt, dout),
                              torch.autograd.grad(out_ref, wrt, dout), torch.autograd.grad(out_pt, wrt, dout)):
        assert_close_to_ref(name, a, r, pt, 3)


def test_packed_variants_take_the_features():
    """qkvpacked / kvpacked / varlen-qkvpacked give the unpacked function's result."""
    qkv = torch.randn(2, 48, 3, 2, 32, dtype=F16, device=DEVICE)
    q, k, v = qkv.unbind(2)
    sinks = torch.randn(2, device=DEVICE)
    kw = dict(window_size=(9, 2), softcap=4.0, sinks=sinks)
    want = flash_attn_func(q, k, v, **kw)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, **kw), want)
    assert torch.equal(flash_attn_kvpacked_func(q, qkv[:, :, 1:], **kw), want)
    cu = torch.tensor([0, 48, 96], dtype=torch.int32, device=DEVICE)
    got = flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, 48, **kw)
    assert torch.equal(got, want.flatten(0, 1))


def test_double_backward_with_features():
    """create_graph=True goes through the reference with every feature (the dropout mask too)."""
    q, k, v = make_qkv(1, 16, 24, 2, 16, F16, DEVICE)
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)
    torch.manual_seed(2)
    out = flash_attn_func(q, k, v, window_size=(4, 4), softcap=2.0, sinks=sinks, dropout_p=0.2)
    (gq,) = torch.autograd.grad(out.float().square().sum(), q, create_graph=True)
    torch.manual_seed(2)
    seed = draw_dropout_seed(0.2, DEVICE)
    mask = dropout_keep_mask(seed, (1, 2, 16, 24), 0.2, device=DEVICE)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_ref(qr, kr, vr, window_size=(4, 4), softcap=2.0, sinks=sinks, dropout_p=0.2, dropout_mask=mask)
    (gq_ref,) = torch.autograd.grad(ref.square().sum(), qr, create_graph=True)
    torch.testing.assert_close(gq.float(), gq_ref, atol=5e-2, rtol=5e-2)
    gq.sum().backward()
    assert sinks.grad is not None and torch.isfinite(sinks.grad).all()


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    pytest.param(dict(window_size=5), TypeError, r"^window_size must be a pair \(left, right\)", id="window-int"),
    pytest.param(dict(window_size=(1.5, 2)), TypeError, r"^window_size left must be an int", id="window-float"),
    pytest.param(dict(window_size=(-2, 0)), ValueError, r"^window_size left must be >= -1", id="window-neg"),
    pytest.param(dict(window_size=(4, 2), causal=True), ValueError, r"^causal=True means window_size right = 0", id="window-causal"),
    pytest.param(dict(softcap=-1.0), ValueError, r"^softcap must be a finite number >= 0", id="softcap-neg"),
    pytest.param(dict(softcap="1"), TypeError, r"^softcap must be a float", id="softcap-str"),
    pytest.param(dict(sinks=torch.zeros(3, dtype=torch.float16)), TypeError, r"^sinks must be float32", id="sinks-dtype"),
    pytest.param(dict(sinks=torch.zeros(2)), ValueError, r"^sinks must have shape \(nheads,\) = \(3,\), got \(2,\)", id="sinks-shape"),
    pytest.param(dict(sinks=[0.0] * 3), TypeError, r"^sinks must be a torch.Tensor", id="sinks-list"),
    pytest.param(dict(attn_mask=torch.zeros(5, 7)), TypeError, r"^attn_mask must be bool", id="amask-float"),
    pytest.param(dict(attn_mask=torch.ones(4, 7, dtype=torch.bool)), ValueError, r"^attn_mask of shape \(4, 7\) does not broadcast",
                 id="amask-shape"),
    pytest.param(dict(dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)", id="dropout-one"),
    pytest.param(dict(dropout_p=True), TypeError, r"^dropout_p must be a float, got bool", id="dropout-bool"),
])
def test_feature_validation(kwargs, exc, match):
    q, k, v = make_qkv(2, 5, 7, 3, 16, F16, DEVICE, requires_grad=False)
    kwargs = dict(kwargs)
    for name in ("sinks", "attn_mask"):
        if isinstance(kwargs.get(name), torch.Tensor):
            kwargs[name] = kwargs[name].to(DEVICE)
    causal = kwargs.pop("causal", False)
    with pytest.raises(exc, match=match):
        flash_attn_func(q, k, v, causal=causal, **kwargs)


def test_varlen_refuses_bias_like_features_by_name():
    """The varlen functions have no attn_mask: passing one is a TypeError naming it (never dropped)."""
    q = torch.randn(5, 2, 16, dtype=F16, device=DEVICE)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="attn_mask"):
        flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, attn_mask=torch.ones(5, 5, dtype=torch.bool))


# ---- GPU: determinism and the window's cost -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("feats", [
    pytest.param(dict(window_size=(128, 0)), id="window"),
    pytest.param(dict(softcap=20.0), id="softcap"),
    pytest.param(dict(sinks="grad"), id="sinks"),
    pytest.param(dict(dropout_p=0.1), id="dropout"),
    pytest.param(dict(attn_mask="rand"), id="attn_mask"),
])
def test_features_deterministic_gpu(feats):
    """Every feature: fwd + bwd bitwise equal over repeated runs (same generator state)."""
    q, k, v = make_qkv(2, 1000, 1500, 8, 64, BF16, DEVICE, nheads_k=2)
    bias = torch.randn(1, 8, 1000, 1500, device=DEVICE, requires_grad=True)
    feats = dict(feats)
    if feats.get("sinks") == "grad":
        feats["sinks"] = torch.randn(8, device=DEVICE, requires_grad=True)
    if feats.get("attn_mask") == "rand":
        feats["attn_mask"] = torch.rand(2, 1, 1000, 1500, device=DEVICE) > 0.2
    wrt = [q, k, v, bias] + ([feats["sinks"]] if "sinks" in feats else [])
    first = None
    for _ in range(5):
        torch.manual_seed(0)
        out = flash_attn_func(q, k, v, bias, causal=True, **feats)
        got = (out, *torch.autograd.grad(out, wrt, torch.ones_like(out)))
        if first is None:
            first = got
        for a, b in zip(first, got):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_window_cost_is_proportional_gpu(monkeypatch):
    """16k keys with a 1k window cost about 1k/16k of full causal attention (skipped blocks),
    forward and backward; asserted loosely (launch overheads; without the skipping the ratio
    would be about 1), measured in the benchmark. Both through the tl kernels
    (TRITONFLASH_HOPPER_FWD=0: the Hopper forward takes the full causal call but not the window,
    and would make this a comparison of two kernels). The GPU tier runs many test workers on one
    GPU, so each case takes its fastest of several synchronised runs (the least disturbed one)
    rather than the total of a few."""
    monkeypatch.setenv("TRITONFLASH_HOPPER_FWD", "0")
    q, k, v = make_qkv(1, 16384, 16384, 16, 128, BF16, DEVICE)

    def timed(**kw):
        def run():
            out = flash_attn_func(q, k, v, causal=True, **kw)
            out.backward(torch.ones_like(out))
        run()
        best = float("inf")
        for _ in range(7):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    full, windowed = timed(), timed(window_size=(1024, 0))
    # Causal full attention does ~8k keys per row on average; the window ~1k: ~1/8 of the work
    # (measured 0.30 with the Hopper forward on the full call, 16 test workers on the GPU).
    assert windowed < full / 3, f"window {windowed:.3f}s vs full causal {full:.3f}s"
