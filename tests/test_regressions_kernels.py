"""Regression tests for failures that outside probes found in the kernels (issue 11).

CPU tier through the interpreter where the shapes allow; the grid-size and cross-process
determinism tests need a GPU (the interpreter runs programs one by one and has no autotuner).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import assert_close_to_ref, make_qkv
from tritonflash import attention_ref, flash_attn_func

HERE = Path(__file__).parent


def _grads(out, tensors, dout):
    return torch.autograd.grad(out, tensors, dout)


_PADDED_CASES = [(p, c) for p in ("nan", "inf") for c in (False, True)] if ON_GPU else [("nan", False), ("inf", True)]


@pytest.mark.parametrize("poison,causal", _PADDED_CASES, ids=lambda v: str(v))
def test_padded_keys_never_contribute(poison, causal):
    """A KV cache allocated with torch.empty holds NaN/inf in its padded rows, masked by
    key_padding_mask. Once every output row (V) or every dq row (K) came out NaN (0 * NaN in
    the matmuls). Output, lse and every gradient must equal those of the same call with
    finite values there, and the padded keys get zero dk/dv."""
    b, sq, sk, h, d = 2, 37, 70, 3, 40
    q, k, v = make_qkv(b, sq, sk, h, d, torch.float16, DEVICE, requires_grad=False)
    kpm = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    kpm[0, 50:] = False  # right padding, crossing a key block
    kpm[1, :9] = False  # left padding
    kpm[1, 30:33] = False
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~kpm] = float(poison)
    v_bad[~kpm] = float(poison)
    dout = torch.randn(b, sq, h, d, dtype=torch.float16, device=DEVICE)
    results = []
    for kk, vv in ((k, v), (k_bad, v_bad)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, kk, vv))
        out, lse = flash_attn_func(qq, kk, vv, causal=causal, key_padding_mask=kpm, return_lse=True)
        results.append((out, lse, *_grads(out, (qq, kk, vv), dout)))
    for name, clean, bad in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.isfinite(bad[torch.isfinite(clean)]).all(), f"{name}: non-finite values leaked from padded keys"
        assert torch.equal(clean, bad), f"{name} differs when padded keys hold {poison}"
    dk, dv = results[1][3], results[1][4]
    assert not dk[~kpm].any() and not dv[~kpm].any(), "padded keys got a non-zero gradient"


@pytest.mark.parametrize("seqlens", [(48, 48), (37, 70)], ids=["square", "kv-longer"])
def test_causally_hidden_key_does_not_poison_earlier_rows(seqlens):
    """NaN in K and inf in V of the last key, which only the last query row sees (causal,
    bottom-right): every other row's output, lse and dq must be what finite values give.
    Once every row of the key block holding it came out NaN."""
    sq, sk = seqlens
    q, k, v = make_qkv(2, sq, sk, 3, 32, torch.bfloat16, DEVICE, requires_grad=False)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, -1] = float("nan")
    v_bad[:, -1] = float("inf")
    dout = torch.randn_like(q)
    dout[:, -1] = 0  # the last row's loss is NaN anyway; keep it out of dq's comparison
    results = []
    for kk, vv in ((k, v), (k_bad, v_bad)):
        qq = q.clone().requires_grad_()
        out, lse = flash_attn_func(qq, kk, vv, causal=True, return_lse=True)
        (dq,) = _grads(out, (qq,), dout)
        results.append((out, lse.transpose(1, 2), dq))
    for name, clean, bad in zip(("out", "lse", "dq"), *results):
        assert torch.equal(clean[:, :-1], bad[:, :-1]), f"{name}: rows that cannot see the last key changed"
    assert not torch.isfinite(results[1][0][:, -1]).all(), "the row that sees the non-finite key should not be finite"


def test_bias_grad_summed_over_batch_within_flash_attn_rule():
    """A bias gradient summed over a broadcast batch ((1, h, sq, sk), fp16, causal, head dim
    88, 512 x 256) once exceeded flash-attn's 2x rule: the sum over batches must stay fp32
    (from fp32 dS) and be rounded to the bias dtype once."""
    b, h, sq, sk, d = 2, 2, 512, 256, 88
    if not ON_GPU:
        sq, sk = 160, 96  # the same shape class (sq > sk: causal rows with no key) at interpreter size
    q, k, v = make_qkv(b, sq, sk, h, d, torch.float16, DEVICE)
    bias = torch.randn(1, h, sq, sk, dtype=torch.float16, device=DEVICE, requires_grad=True)
    out = flash_attn_func(q, k, v, bias, True)
    dout = torch.randn_like(out)
    (dbias,) = torch.autograd.grad(out, (bias,), dout)
    out_ref = attention_ref(q, k, v, bias, True)
    out_pt = attention_ref(q, k, v, bias, True, upcast=False, reorder_ops=True)
    (g_ref,) = torch.autograd.grad(out_ref, (bias,), dout)
    (g_pt,) = torch.autograd.grad(out_pt, (bias,), dout)
    assert_close_to_ref("dbias", dbias, g_ref, g_pt, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias-grad"])
def test_batch_times_heads_above_grid_limit(with_bias):
    """batch * nheads > 65535 (decoding 4096 sequences x 16 heads) once failed at launch with
    a bare CUDA "invalid argument": grid axis 1 (and the dbias grid's axis 2) hold at most
    65535 programs. The grids are one axis now."""
    b, h, sq, sk, d = 4100, 16, 1, 40, 64
    q, k, v = make_qkv(b, sq, sk, h, d, torch.bfloat16, DEVICE)
    bias = torch.randn(b, 1, sq, sk, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) if with_bias else None
    out = flash_attn_func(q, k, v, bias, True)
    dout = torch.randn_like(out)
    tensors = [q, k, v] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(out, tensors, dout)
    # Check the last sequences (the programs past the old limit) against the reference.
    tail = slice(b - 8, b)
    qs, ks, vs = (t.detach()[tail].clone().requires_grad_() for t in (q, k, v))
    bs = bias.detach()[tail].clone().requires_grad_() if with_bias else None
    o_ref = attention_ref(qs, ks, vs, bs, True)
    o_pt = attention_ref(qs, ks, vs, bs, True, upcast=False, reorder_ops=True)
    assert_close_to_ref("out", out[tail], o_ref, o_pt, 2)
    refs = torch.autograd.grad(o_ref, [qs, ks, vs] + ([bs] if with_bias else []), dout[tail])
    pts = torch.autograd.grad(o_pt, [qs, ks, vs] + ([bs] if with_bias else []), dout[tail])
    for name, g, r, p in zip(("dq", "dk", "dv", "dbias"), grads, refs, pts):
        assert_close_to_ref(name, g[tail], r, p, 3)


_DETERMINISM_SCRIPT = r"""
import hashlib, json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
from tritonflash import flash_attn_func
torch.manual_seed(0)
out_digests = {}
for d, causal in ((64, True), (128, False)):
    b, sq, sk, h = 2, 1000, 777, 4
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, sk, h // 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, sk, h // 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(1, h, sq, sk, device="cuda", dtype=torch.float32, requires_grad=True)
    out = flash_attn_func(q, k, v, bias, causal)
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.randn_like(out))
    h_ = hashlib.sha256()
    for t in (out, *grads):
        h_.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    out_digests[f"d{d}-{causal}"] = h_.hexdigest()
print(json.dumps(out_digests))
"""


@pytest.mark.gpu
def test_fwd_bwd_bitwise_equal_across_processes():
    """With default settings, two processes (two ranks) get the same bits for out, dq, dk, dv
    and dbias: tiles come from a fixed table, not from timing (autotuning is opt-in). Runs
    without the test session's TRITONFLASH_AUTOTUNE pin, as a user would."""
    env = {key: val for key, val in os.environ.items() if key != "TRITONFLASH_AUTOTUNE"}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, str(HERE.parent / "src")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1], f"processes disagree: {runs}"


@pytest.mark.parametrize("hidden_by", ["padding", "causal"])
def test_reference_hidden_keys_never_contribute(hidden_by):
    """The oracle (and CPU path) follows the same rule as the kernels: a NaN/inf in a key that
    a row cannot see changes nothing for that row, gradients included; otherwise the answer
    would depend on the device."""
    b, sq, sk, h, d = 2, 9, 13, 2, 8
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for s in (sq, sk, sk))
    kpm = torch.ones(b, sk, dtype=torch.bool)
    if hidden_by == "padding":
        kpm[:, -4:] = False
        hidden = ~kpm
    else:
        hidden = torch.zeros(b, sk, dtype=torch.bool)
        hidden[:, -1] = True  # seen by the last query row only
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[hidden] = float("nan")
    v_bad[hidden] = float("inf")
    causal = hidden_by == "causal"
    rows = slice(0, sq - 1) if causal else slice(None)
    dout = torch.randn(b, sq, h, d, dtype=torch.float64)
    dout[:, sq - 1] = 0
    results = []
    for kk, vv in ((k, v), (k_bad, v_bad)):
        qq = q.clone().requires_grad_()
        out = attention_ref(qq, kk, vv, causal=causal, key_padding_mask=kpm)
        (dq,) = torch.autograd.grad(out, (qq,), dout)
        results.append((out[:, rows], dq[:, rows]))
    for name, clean, bad in zip(("out", "dq"), *results):
        assert torch.equal(clean, bad), f"{name} changed by values in keys the rows cannot see"
    if causal:
        out_bad = attention_ref(q, k_bad, v_bad, causal=True)
        assert torch.isnan(out_bad[:, -1]).all(), "the row that sees the non-finite key should be NaN"


@pytest.mark.parametrize("impl", ["torch", "flash", "triton"])
def test_layers_padded_cache_never_contributes(impl):
    """Every layer backend: NaN in the padded rows of a KV cache (key_padding_mask False there)
    leaves the output as finite values give."""
    from tritonflash.layers import ATTN_FNS

    if impl == "triton" and not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend needs CUDA or the interpreter")
    b, s_new, s_past, h, d = 2, 3, 29, 2, 16
    dtype = torch.bfloat16
    query = torch.randn(b, s_new, h * d, dtype=dtype, device=DEVICE)
    key = torch.randn(b, s_new, h * d, dtype=dtype, device=DEVICE)
    value = torch.randn(b, s_new, h * d, dtype=dtype, device=DEVICE)
    cache = [torch.randn(b, s_past, h, d, dtype=dtype, device=DEVICE) for _ in range(2)]
    kpm = torch.ones(b, s_past + s_new, dtype=torch.bool, device=DEVICE)
    kpm[0, 20:s_past] = False
    bad_cache = [c.clone() for c in cache]
    for c in bad_cache:
        c[0, 20:] = float("nan")
    outs = [ATTN_FNS[impl](query, key, value, h, h, past_key_value=tuple(pkv), key_padding_mask=kpm, is_causal=True)[0]
            for pkv in (cache, bad_cache)]
    assert torch.isfinite(outs[1]).all(), f"{impl}: NaN from padded cache rows reached the output"
    assert torch.equal(outs[0], outs[1])


def test_alibi_slopes_checked_once_per_tensor_version():
    """The finite-slopes check reads the slopes on the host; once per call it stalled the GPU
    launch queue (ALiBi 1k forward 0.22 -> 0.40 ms on an H200). It runs once per tensor and
    version, and again after an in-place change."""
    from tritonflash.checks import _slopes_unchecked, check_alibi_slopes

    slopes = torch.full((3,), 0.5)
    check_alibi_slopes(slopes, 2, 3, slopes.device)
    assert not _slopes_unchecked(slopes)
    slopes[1] = float("nan")
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        check_alibi_slopes(slopes, 2, 3, slopes.device)


def test_alibi_slopes_under_inference_mode():
    """Slopes made under torch.inference_mode (a generate loop) have no version counter; the
    once-per-version check must not crash on them (it checks them every call instead)."""
    from tritonflash.checks import check_alibi_slopes

    with torch.inference_mode():
        slopes = torch.full((3,), 0.5)
        check_alibi_slopes(slopes, 2, 3, slopes.device)
        bad = torch.tensor([0.5, float("inf"), 0.25])
        with pytest.raises(ValueError, match="alibi_slopes must be finite"):
            check_alibi_slopes(bad, 2, 3, bad.device)


def test_flash_layer_backend_keeps_large_finite_bias_rows():
    """The 'flash' (SDPA) layer backend casts its additive mask to q's dtype: a finite fp32 bias
    row of -1e5 became -inf in fp16 and the row came out 0, where 'torch' and 'triton' give the
    softmax of the scores (a constant row shift changes nothing)."""
    from tritonflash.layers import ATTN_FNS

    b, s, h, d = 1, 6, 2, 8
    query, key, value = (torch.randn(b, s, h * d, dtype=torch.float16) for _ in range(3))
    bias = torch.randn(1, h, s, s)
    bias[:, :, 0] = -1e5 + torch.randn(s)
    outs = {impl: ATTN_FNS[impl](query, key, value, h, h, attn_bias=bias, is_causal=False)[0].float()
            for impl in ("torch", "flash")}
    assert torch.isfinite(outs["flash"]).all()
    torch.testing.assert_close(outs["flash"], outs["torch"], atol=2e-2, rtol=0)


def test_varlen_shape_errors_print_the_shapes_given():
    """Varlen validation reuses the padded-batch check on views with a leading 1; its messages
    printed those made-up 4-D shapes instead of the user's 3-D ones."""
    from tritonflash import flash_attn_varlen_func

    q = torch.randn(5, 4, 16, dtype=torch.float16)
    k = torch.randn(5, 3, 16, dtype=torch.float16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"got k \(5, 3, 16\) and v \(5, 2, 16\)"):
        flash_attn_varlen_func(q, k, k[:, :2], cu, cu, 5, 5)
    with pytest.raises(ValueError, match=r"got k/v with shape \(5, 3, 16\)"):
        flash_attn_varlen_func(q, k, k, cu, cu, 5, 5)
