"""GPU tier only: what the interpreter cannot show (races, int32 overflow, memory, compilation)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from helpers import check_against_reference, make_qkv
from tritonflash import flash_attn_func, flash_attn_qkvpacked_func

pytestmark = pytest.mark.gpu
REPEATS = int(os.environ.get("TRITONFLASH_DETERMINISM_REPEATS", "100"))

BIAS_KINDS = ["none", "vector", "matrix", "alibi", "kpm", "all"]


def _setup(kind, b=2, sq=1000, sk=1029, h=6, hk=2, d=72, dtype=torch.bfloat16):
    q, k, v = make_qkv(b, sq, sk, h, d, dtype, "cuda", nheads_k=hk)
    kw = {}
    if kind in ("vector", "all"):
        kw["bias"] = torch.randn(1, h, 1, sk, device="cuda", requires_grad=True)
    if kind == "matrix":
        kw["bias"] = torch.randn(1, h, sq, sk, device="cuda", requires_grad=True)
    if kind in ("alibi", "all"):
        kw["alibi_slopes"] = torch.rand(h, device="cuda")
    if kind in ("kpm", "all"):
        kw["key_padding_mask"] = torch.rand(b, sk, device="cuda") > 0.1
    return q, k, v, kw


def _run(q, k, v, kw, causal, dout):
    out, lse = flash_attn_func(q, k, v, kw.get("bias"), causal, alibi_slopes=kw.get("alibi_slopes"),
                               key_padding_mask=kw.get("key_padding_mask"), return_lse=True)
    wanted = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    return [out, lse] + list(torch.autograd.grad(out, wanted, dout))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", BIAS_KINDS)
def test_determinism(kind, causal):
    """fwd+bwd repeated: out, lse, dq, dk, dv, dbias bitwise equal (no atomics anywhere)."""
    q, k, v, kw = _setup(kind)
    dout = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    first = _run(q, k, v, kw, causal, dout)
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    for i in range(REPEATS):
        again = _run(q, k, v, kw, causal, dout)
        for name, a, b in zip(names, first, again):
            assert torch.equal(a, b), f"{name} differs on repeat {i}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["all", "matrix"])
def test_determinism_1000(kind):
    q, k, v, kw = _setup(kind, sq=777, sk=1333)
    dout = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    first = _run(q, k, v, kw, True, dout)
    for _ in range(1000):
        assert all(torch.equal(a, b) for a, b in zip(first, _run(q, k, v, kw, True, dout)))


def test_large_offsets_packed_qkv():
    """Element indices past 2**31 (packed qkv, many batches): the last batch and head are right.
    Guards int64 batch/head offsets in every kernel."""
    b, s, h, d = 344, 1024, 16, 128
    assert b * s * 3 * h * d > 2**31
    qkv = torch.randn(b, s, 3, h, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
    last = slice(b - 1, b)
    q, k, v = [qkv[last, :, i, -2:].detach().requires_grad_() for i in range(3)]
    out_small = flash_attn_func(q, k, v, causal=True)
    dout_small = dout[last, :, -2:]
    check_against_reference(out_small, q, k, v, dout_small, causal=True)
    assert torch.equal(out[last, :, -2:], out_small)
    g = torch.autograd.grad(out_small, (q, k, v), dout_small)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert torch.equal(dqkv[last, :, i, -2:], g[i]), f"{name} of the last batch/heads differs past 2**31"


def test_large_offsets_within_one_slice():
    """Regression (review finding): batch 1 with row * row_stride past 2**31 inside one (batch, head)
    slice — offsets within a slice must be int64 too, not only batch/head offsets."""
    s, h, d = 266000, 64, 128
    q = torch.randn(1, s, h, d, dtype=torch.float16, device="cuda")
    assert q.numel() > 2**31
    k, v = (torch.randn(1, 64, 1, d, dtype=torch.float16, device="cuda") for _ in range(2))
    out = flash_attn_func(q, k, v)
    tail = slice(s - 100, s)
    q_t = q[:, tail, -2:].contiguous().requires_grad_()
    k_t, v_t = (t.expand(1, 64, 2, d).contiguous().requires_grad_() for t in (k, v))
    check_against_reference(out[:, tail, -2:], q_t, k_t, v_t, None, check_grads=False)


def test_memory_is_linear_in_seqlen():
    """fwd+bwd with ALiBi at seqlen 16k adds O(seqlen) bytes beyond q, k, v, out and grads."""
    b, s, h, d = 1, 16384, 16, 128
    q, k, v = make_qkv(b, s, s, h, d, torch.bfloat16, "cuda")
    slopes = torch.rand(h, device="cuda")
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    torch.autograd.grad(out, (q, k, v), dout)
    peak = torch.cuda.max_memory_allocated() - base
    tensor_bytes = q.numel() * q.element_size()
    # out + dq + dk + dv = 4 tensors; lse + delta are fp32 (b, h, s); allow 64 KB of slack.
    budget = 4 * tensor_bytes + 4 * b * h * s * 4 + 65536
    assert peak <= budget, f"peak extra memory {peak} bytes > O(N) budget {budget} (an (N,N) fp32 tile would be {s * s * 4})"


@pytest.mark.parametrize("which", ["fwd", "dkdv", "dq", "dbias"])
def test_every_config_gives_the_same_answer(which):
    """Autotuning must never change results beyond the tolerance rule: run each candidate once,
    on odd seqlens and on seqlens that fill every tile (the backward's EVEN_M/EVEN_N variants)."""
    from tritonflash.kernels import backward, forward
    from tritonflash.kernels.common import Variant

    launcher = {"fwd": forward._launch_fwd, "dkdv": backward._launch_dkdv, "dq": backward._launch_dq,
                "dbias": backward._launch_dbias}[which]
    try:
        for d in (59, 128):
            block_d = 64 if d <= 64 else 128
            for sq, sk in ((333, 517), (256, 512)):
                bias = torch.randn(1, 3, sq, sk, device="cuda", requires_grad=True)
                # The candidates autotuning may pick for this head dim and bias (after the prune).
                var = Variant(CAUSAL=True, HAS_BIAS=True, BIAS_ROW=True, HAS_ALIBI=True, BLOCK_D=block_d, EVEN_D=d == block_d)
                for cfg in launcher.prune(launcher.candidates, {}, VAR=var, score=SimpleNamespace(bias=bias)):
                    launcher.forced = cfg
                    q, k, v = make_qkv(2, sq, sk, 3, d, torch.float16, "cuda")
                    slopes = torch.rand(3, device="cuda")
                    out = flash_attn_func(q, k, v, bias, True, alibi_slopes=slopes)
                    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias, causal=True, alibi_slopes=slopes)
    finally:
        launcher.forced = None


def test_seqlens_stay_out_of_the_compile_key():
    """50 different seqlens compile each kernel at most a handful of times."""
    from tritonflash.kernels import backward, forward

    kernels = [forward._attn_fwd, backward._attn_bwd_dkdv, backward._attn_bwd_dq, backward._attn_bwd_preprocess]

    def n_compiled():
        # device_caches[device][0] is the dict of compiled variants.
        return sum(len(entry[0]) for kern in kernels for entry in kern.device_caches.values())

    q, k, v = make_qkv(1, 100, 100, 2, 64, torch.bfloat16, "cuda")
    flash_attn_func(q, k, v, causal=True).sum().backward()
    before = n_compiled()
    for s in range(101, 151):
        q, k, v = make_qkv(1, s, s + 7, 2, 64, torch.bfloat16, "cuda")
        flash_attn_func(q, k, v, causal=True).sum().backward()
    added = n_compiled() - before
    assert added <= 4 * len(kernels), f"{added} new compilations for 50 seqlens"
