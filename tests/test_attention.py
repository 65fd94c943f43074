"""Forward and backward of the Triton kernels against the reference, with the tolerance rule.

CPU tier: a covering subset of docs/testing.md's sweep (every head-dim class, odd and swapped
seqlens, both dtypes, causal on/off) through the Triton interpreter. GPU tier: the full sweep.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import check_against_reference, make_qkv
from tritonflash import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from tritonflash.kernels import attn_bwd, attn_fwd

DTYPES = [torch.float16, torch.bfloat16]
SEQLENS_FULL = [(1, 1), (1, 147), (3, 799), (113, 203), (128, 217), (108, 256), (512, 256), (1023, 1024), (1024, 1023)]
SEQLENS_FULL = sorted(set(SEQLENS_FULL + [(k, q) for q, k in SEQLENS_FULL]))
HEADDIMS_FULL = [16, 32, 40, 48, 59, 64, 80, 96, 111, 128, 160, 192, 256]

# Interpreter-sized versions: the same shapes of trouble (1-row, 1-key, odd, non-multiple of
# the 32-wide interpreter tiles, seqlen_q > seqlen_k and the reverse).
SEQLENS_CPU = [(1, 1), (1, 47), (47, 1), (3, 99), (113, 67), (67, 113), (64, 96), (96, 64), (33, 33)]
HEADDIMS_CPU = [16, 40, 59, 64, 111, 128, 192, 256]


def _id(b, sq, sk, h, d, dtype, causal, hk=None):
    hks = f"-hk{hk}" if hk is not None and hk != h else ""
    return f"b{b}-sq{sq}-sk{sk}-h{h}{hks}-d{d}-{str(dtype)[6:]}-{'causal' if causal else 'full'}"


def _cases():
    if ON_GPU:
        for (sq, sk), d, dtype, causal in itertools.product(SEQLENS_FULL, HEADDIMS_FULL, DTYPES, [False, True]):
            yield pytest.param(2, sq, sk, 3, d, dtype, causal, id=_id(2, sq, sk, 3, d, dtype, causal))
        return
    # Covering subset: every seqlen pair meets every head dim once, dtypes and causal alternate.
    for i, d in enumerate(HEADDIMS_CPU):
        for j, (sq, sk) in enumerate(SEQLENS_CPU):
            if (i + j) % 3:
                continue
            dtype = DTYPES[(i + j) % 2]
            causal = bool((i // 2 + j) % 2)
            yield pytest.param(2, sq, sk, 3, d, dtype, causal, id=_id(2, sq, sk, 3, d, dtype, causal))


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,nheads,head_dim,dtype,causal", list(_cases()))
def test_fwd_bwd_matches_reference(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, causal):
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, DEVICE)
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    dout = torch.randn_like(out)
    check_against_reference(out, q, k, v, dout, causal=causal, lse=lse)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nheads,nheads_k", [(6, 1), (6, 2), (6, 3)], ids=["mqa", "gqa3", "gqa2"])
def test_gqa_matches_reference(nheads, nheads_k, causal):
    """k/v with fewer heads are read per group, never expanded; dk/dv sum over the group."""
    q, k, v = make_qkv(2, 45, 77, nheads, 40, torch.bfloat16, DEVICE, nheads_k=nheads_k)
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    check_against_reference(out, q, k, v, torch.randn_like(out), causal=causal, lse=lse)


@pytest.mark.parametrize("causal", [False, True])
def test_full_blocks_with_gqa_alibi_and_key_padding(causal):
    """seqlen_q a multiple of every tile: the dK/dV pass skips its row bounds checks (EVEN_M)
    while looping over a GQA group with ALiBi and a key padding mask."""
    q, k, v = make_qkv(2, 128, 96, 6, 64, torch.bfloat16, DEVICE, nheads_k=2)
    slopes = torch.rand(6, device=DEVICE)
    kpm = torch.ones(2, 96, dtype=torch.bool, device=DEVICE)
    kpm[0, 70:] = False
    out = flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, key_padding_mask=kpm)
    check_against_reference(out, q, k, v, torch.randn_like(out), causal=causal, alibi_slopes=slopes, key_padding_mask=kpm)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_softmax_scale(scale):
    q, k, v = make_qkv(2, 37, 50, 3, 32, torch.float16, DEVICE)
    out = flash_attn_func(q, k, v, None, False, scale)
    check_against_reference(out, q, k, v, torch.randn_like(out), softmax_scale=scale)


def _packed(dtype, seqlen, nheads, head_dim):
    qkv = torch.randn(2, seqlen, 3, nheads, head_dim, dtype=dtype, device=DEVICE)
    return qkv


# CPU: causal and the bias each once (they do not change how packed views are addressed).
_PACKED_CASES = [(c, b) for c in (False, True) for b in (False, True)] if ON_GPU else [(False, False), (True, True)]


@pytest.mark.parametrize("causal,with_bias", _PACKED_CASES, ids=lambda v: str(v))
def test_packed_bitwise_equal_to_separate(causal, with_bias):
    """qkv/kv packed variants are views of the same kernels: bitwise equal outputs and grads."""
    seqlen, nheads, head_dim = 70, 3, 48
    qkv = _packed(torch.bfloat16, seqlen, nheads, head_dim).requires_grad_()
    bias = torch.randn(1, nheads, seqlen, seqlen, device=DEVICE, requires_grad=True) if with_bias else None
    dout = torch.randn(2, seqlen, nheads, head_dim, dtype=torch.bfloat16, device=DEVICE)

    q, k, v = [t.detach().clone().requires_grad_() for t in qkv.unbind(2)]
    out_sep = flash_attn_func(q, k, v, bias, causal)
    g_sep = torch.autograd.grad(out_sep, (q, k, v) + ((bias,) if with_bias else ()), dout)

    out_qkv = flash_attn_qkvpacked_func(qkv, bias, causal)
    g_qkv = torch.autograd.grad(out_qkv, (qkv,) + ((bias,) if with_bias else ()), dout)
    assert torch.equal(out_qkv, out_sep)
    assert torch.equal(g_qkv[0], torch.stack(g_sep[:3], dim=2))

    q2 = qkv[:, :, 0].detach().clone().requires_grad_()
    kv = qkv[:, :, 1:].detach().clone().requires_grad_()
    out_kv = flash_attn_kvpacked_func(q2, kv, bias, causal)
    g_kv = torch.autograd.grad(out_kv, (q2, kv) + ((bias,) if with_bias else ()), dout)
    assert torch.equal(out_kv, out_sep)
    assert torch.equal(g_kv[0], g_sep[0])
    assert torch.equal(g_kv[1], torch.stack(g_sep[1:3], dim=2))
    if with_bias:
        assert torch.equal(g_qkv[1], g_sep[3]) and torch.equal(g_kv[2], g_sep[3])


def test_non_contiguous_inputs_and_dout():
    """Views of a packed buffer, heads transposed in memory, and a strided dout."""
    b, s, h, d = 2, 75, 3, 64
    buf = torch.randn(b, h, s, 3 * d, dtype=torch.float16, device=DEVICE)
    q, k, v = [t.transpose(1, 2).detach().requires_grad_() for t in buf.split(d, dim=-1)]
    assert not q.is_contiguous()
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn(b, h, s, d, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    check_against_reference(out, q, k, v, dout, causal=True)


def test_outputs_fully_written():
    """Outputs and gradients poisoned with NaN before the kernels run must be fully overwritten."""
    b, sq, sk, h, d = 2, 67, 45, 3, 59
    q, k, v = make_qkv(b, sq, sk, h, d, torch.float16, DEVICE, requires_grad=False)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    out, lse = attn_fwd(q, k, v, None, None, None, True, scale, out=out)
    assert not out.isnan().any() and not lse.isnan().any()
    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    dq, dk, dv, _, _ = attn_bwd(dout, q, k, v, out, lse, None, None, None, True, scale, dq=dq, dk=dk, dv=dv)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not g.isnan().any(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(70, 30), (40, 1)])
def test_causal_more_queries_than_keys(seqlen_q, seqlen_k):
    """Bottom-right causal with seqlen_q > seqlen_k: the first rows see no key -> out 0, lse -inf, zero grads."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 3, 32, torch.bfloat16, DEVICE)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    dead = seqlen_q - seqlen_k
    assert torch.equal(out[:, :dead], torch.zeros_like(out[:, :dead]))
    assert torch.isneginf(lse[:, :, :dead]).all()
    dout = torch.randn_like(out)
    check_against_reference(out, q, k, v, dout, causal=True, lse=lse)
    (dq,) = torch.autograd.grad(out, (q,), dout)
    assert torch.equal(dq[:, :dead], torch.zeros_like(dq[:, :dead]))
