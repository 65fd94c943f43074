"""Additive bias (and its gradient), in-kernel ALiBi and key padding, against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import check_against_reference, make_qkv
from tritonflash import flash_attn_func
from tritonflash.bias import MASKED_BIAS

B, H = 2, 3
# (seqlen_q, seqlen_k): odd, swapped, non-multiples of the tiles.
# CPU: (64, 96) fills every interpreter tile (32), so the backward kernels skip their bounds
# checks (EVEN_M and EVEN_N); (64, 71) and (96, 64) give the mixed variants, seqlen_q > seqlen_k too.
SEQLENS = [(113, 203), (128, 217), (1023, 1024)] if ON_GPU else [(37, 71), (70, 33), (64, 96), (64, 71), (96, 64)]
BIAS_SHAPES = {
    "1h1k": lambda sq, sk: (1, H, 1, sk),
    "b11k": lambda sq, sk: (B, 1, 1, sk),
    "bh1k": lambda sq, sk: (B, H, 1, sk),
    "1hqk": lambda sq, sk: (1, H, sq, sk),
    "bhqk": lambda sq, sk: (B, H, sq, sk),
    "qk": lambda sq, sk: (sq, sk),
    "bhq1": lambda sq, sk: (B, H, sq, 1),
    "b1qk": lambda sq, sk: (B, 1, sq, sk),
    "1hq1": lambda sq, sk: (1, H, sq, 1),
}
BIAS_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _bias_cases():
    def param(name, bdt, causal, sq, sk):
        return pytest.param(name, bdt, causal, sq, sk, id=f"{name}-bias{bdt}-sq{sq}-sk{sk}-{'causal' if causal else 'full'}")

    if ON_GPU:
        for name in BIAS_SHAPES:
            for bdt in BIAS_DTYPES:
                for causal in (False, True):
                    for sq, sk in SEQLENS:
                        yield param(name, bdt, causal, sq, sk)
        return
    # CPU: a covering design instead of the product (the interpreter's time is the tier's
    # budget): every (shape, bias dtype) pair once; causal alternates so that every shape and
    # every dtype runs both ways; the seqlen pairs (full and partial tiles) rotate.
    for i, name in enumerate(BIAS_SHAPES):
        for j, bdt in enumerate(BIAS_DTYPES):
            sq, sk = SEQLENS[(i + 2 * j) % len(SEQLENS)]
            yield param(name, bdt, bool((i + j) % 2), sq, sk)


@pytest.mark.parametrize("shape_name,bias_dtype,causal,seqlen_q,seqlen_k", list(_bias_cases()))
def test_bias_and_dbias(shape_name, bias_dtype, causal, seqlen_q, seqlen_k):
    """dbias has the bias's own shape and dtype, summed over its broadcast dims."""
    dtype = torch.bfloat16 if bias_dtype == "bf16" else torch.float16
    q, k, v = make_qkv(B, seqlen_q, seqlen_k, H, 40, dtype, DEVICE)
    shape = BIAS_SHAPES[shape_name](seqlen_q, seqlen_k)
    bias = torch.randn(shape, device=DEVICE).mul(2).to(BIAS_DTYPES[bias_dtype]).requires_grad_()
    out, lse = flash_attn_func(q, k, v, bias, causal, return_lse=True)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias, causal=causal, lse=lse)


def test_bias_without_grad_matches():
    q, k, v = make_qkv(B, 45, 60, H, 64, torch.float16, DEVICE)
    bias = torch.randn(1, H, 45, 60, device=DEVICE)
    out = flash_attn_func(q, k, v, bias)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias)


def test_expanded_bias_gradient_has_expanded_shape():
    """A bias given as an expanded view (stride 0, never materialised) still gets a gradient of its shape."""
    q, k, v = make_qkv(B, 33, 47, H, 32, torch.bfloat16, DEVICE)
    base = torch.randn(1, H, 1, 47, device=DEVICE, requires_grad=True)
    bias = base.expand(B, H, 33, 47)
    out = flash_attn_func(q, k, v, bias)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias)


def test_bias_minus_inf_rows():
    """Rows whose bias is -inf everywhere: output 0, lse -inf, zero gradients, no NaN."""
    q, k, v = make_qkv(B, 40, 50, H, 32, torch.float16, DEVICE)
    bias = torch.randn(B, H, 40, 50, device=DEVICE)
    bias[:, :, 5] = float("-inf")
    bias[1, 2, 17:23] = float("-inf")
    bias.requires_grad_()
    out, lse = flash_attn_func(q, k, v, bias, return_lse=True)
    assert (out[:, 5] == 0).all() and (out[1, 17:23, 2] == 0).all()
    assert torch.isneginf(lse[:, :, 5]).all()
    dout = torch.randn_like(out)
    check_against_reference(out, q, k, v, dout, bias=bias, lse=lse)
    dq, dbias = torch.autograd.grad(out, (q, bias), dout)
    assert (dq[:, 5] == 0).all() and (dbias[:, :, 5] == 0).all()
    assert not dbias.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finfo_min_added_twice(dtype):
    """A padding mask of finfo.min added to a causal mask of finfo.min (as HF/MPT code does) overflows to -inf."""
    sq = sk = 48
    q, k, v = make_qkv(B, sq, sk, H, 32, dtype, DEVICE)
    m = torch.finfo(dtype).min
    pad = torch.zeros(B, 1, 1, sk, dtype=dtype, device=DEVICE)
    pad[:, :, :, 30:] = m
    causal = torch.triu(torch.full((sq, sk), m, dtype=dtype, device=DEVICE), 1)
    bias = pad + causal  # finfo.min + finfo.min = -inf where both apply
    bias[0, 0, 3] = m  # a row masked by finfo.min only: dead for fp32/bf16 (MASKED_BIAS), finite for fp16
    out = flash_attn_func(q, k, v, bias)
    assert torch.isfinite(out).all()
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_masked_bias_threshold(bias_dtype):
    """The kernels add bias * log2(e) with no masking test: entries at or below MASKED_BIAS
    must overflow to -inf there (a row of them is dead: output 0, lse -inf), and the first
    values above it must stay finite (the row is alive), exactly as the reference decides."""
    sq, sk = 8, 40
    q, k, v = make_qkv(1, sq, sk, 2, 16, torch.bfloat16, DEVICE)
    at = torch.tensor(MASKED_BIAS, dtype=bias_dtype)
    assert at.item() <= MASKED_BIAS or bias_dtype != torch.float32
    below = at if at.item() <= MASKED_BIAS else torch.nextafter(at, torch.tensor(-math.inf, dtype=bias_dtype))
    above = torch.nextafter(below, torch.tensor(0.0, dtype=bias_dtype))
    assert below.item() <= MASKED_BIAS < above.item()
    bias = torch.zeros(1, 2, sq, sk, dtype=bias_dtype, device=DEVICE)
    bias[0, 0, 2] = below.item()
    bias[0, 1, 5] = above.item()
    bias.requires_grad_()
    out, lse = flash_attn_func(q, k, v, bias, return_lse=True)
    assert (out[0, 2, 0] == 0).all() and torch.isneginf(lse[0, 0, 2])
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, 1]).all()
    # The alive row's scores are ~-3.4e38 in log2 units, where fp32 cannot hold lse = m + log2(l)
    # (ulp ~2e31): its P cannot be recomputed from the LSE in the backward (true of any row
    # whose visible scores all pass ~1e8; README, known limits). Its dout is zeroed, so the
    # gradient check covers the dead row and every other row.
    dout = torch.randn_like(out)
    dout[0, 5, 1] = 0
    check_against_reference(out, q, k, v, dout, bias=bias, lse=lse)


@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_h", "slopes_bh"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(57, 91), (91, 57)])
def test_alibi_matches_fp32_bias(per_batch, causal, seqlen_q, seqlen_k):
    """In-kernel ALiBi equals the same ALiBi materialised in fp32 (the reference adds it as a bias)."""
    q, k, v = make_qkv(B, seqlen_q, seqlen_k, H, 64, torch.bfloat16, DEVICE)
    slopes = torch.rand(B, H, device=DEVICE) if per_batch else torch.rand(H, device=DEVICE)
    out, lse = flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, return_lse=True)
    check_against_reference(out, q, k, v, torch.randn_like(out), causal=causal, alibi_slopes=slopes, lse=lse)


def test_alibi_long_context_beats_bf16_bias():
    """The reason in-kernel ALiBi exists: a bf16 (1,h,1,s) ALiBi vector loses precision at long context."""
    from tritonflash import attention_ref, build_alibi_bias, gen_slopes

    s = 333
    q, k, v = make_qkv(1, s, s, 4, 32, torch.bfloat16, DEVICE, requires_grad=False)
    slopes = gen_slopes(4, device=DEVICE)
    out_slopes = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    out_bf16 = flash_attn_func(q, k, v, build_alibi_bias(4, s, device=DEVICE, dtype=torch.bfloat16), True)
    ref = attention_ref(q, k, v, causal=True, alibi_slopes=slopes)
    err_slopes = (out_slopes.float() - ref.float()).abs().max()
    err_bf16 = (out_bf16.float() - ref.float()).abs().max()
    assert err_slopes < err_bf16


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_equals_minus_inf_bias(causal):
    """key_padding_mask is the -inf bias it stands for; padded keys get zero dk/dv; a row left with no key is dead."""
    sq, sk = 50, 70
    q, k, v = make_qkv(B, sq, sk, H, 48, torch.float16, DEVICE)
    kpm = torch.rand(B, sk, device=DEVICE) > 0.3
    kpm[1] = False
    kpm[1, :3] = True  # batch 1 keeps only the first 3 keys: with causal some rows see none
    out, lse = flash_attn_func(q, k, v, causal=causal, key_padding_mask=kpm, return_lse=True)
    dout = torch.randn_like(out)
    check_against_reference(out, q, k, v, dout, causal=causal, key_padding_mask=kpm, lse=lse)
    bias = torch.zeros(B, 1, 1, sk, device=DEVICE).masked_fill(~kpm[:, None, None, :], float("-inf"))
    out_bias = flash_attn_func(q, k, v, bias, causal)
    torch.testing.assert_close(out, out_bias, rtol=0, atol=0)
    dk, dv = torch.autograd.grad(out, (k, v), dout)
    assert (dk[~kpm] == 0).all() and (dv[~kpm] == 0).all()


def test_everything_combined():
    """Bias with grad + ALiBi + key padding + causal + GQA in one call."""
    sq, sk = 45, 77
    q, k, v = make_qkv(B, sq, sk, 6, 59, torch.bfloat16, DEVICE, nheads_k=2)
    bias = torch.randn(1, 6, sq, sk, device=DEVICE, requires_grad=True)
    slopes = torch.rand(6, device=DEVICE)
    kpm = torch.rand(B, sk, device=DEVICE) > 0.2
    out, lse = flash_attn_func(q, k, v, bias, True, alibi_slopes=slopes, key_padding_mask=kpm, return_lse=True)
    check_against_reference(out, q, k, v, torch.randn_like(out), bias=bias, causal=True,
                            alibi_slopes=slopes, key_padding_mask=kpm, lse=lse)


def test_key_padding_mask_with_strided_columns():
    """Regression: a mask whose last dim is not unit-stride (a transpose, an expand) was read as
    if contiguous (review finding); it must give the same result as its contiguous copy."""
    sq, sk = 9, 40
    q, k, v = make_qkv(B, sq, sk, H, 16, torch.float16, DEVICE)
    for kpm in ((torch.rand(sk, B, device=DEVICE) > 0.5).T, (torch.rand(B, 1, device=DEVICE) > -1).expand(B, sk)):
        assert kpm.stride(-1) != 1
        out = flash_attn_func(q, k, v, key_padding_mask=kpm)
        check_against_reference(out, q, k, v, torch.randn_like(out), key_padding_mask=kpm.contiguous(), check_grads=False)


def test_alibi_slopes_requiring_grad_is_refused():
    """Regression: the gradient of slopes that require grad was silently dropped (review finding)."""
    q, k, v = make_qkv(B, 8, 8, H, 16, torch.float16, DEVICE)
    slopes = torch.rand(H, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match=r"alibi_slopes must not require grad"):
        flash_attn_func(q, k, v, alibi_slopes=slopes)
