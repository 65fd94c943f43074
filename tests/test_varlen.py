"""Variable-length (packed) batches against per-sequence references, and the pad/unpad helpers."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from helpers import FWD_FACTOR, GRAD_FACTOR, assert_close_to_ref
from tritonflash import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    pad_input,
    unpad_input,
)
from tritonflash.reference import varlen_attention_ref

LENGTHS = {
    "mixed": ([5, 0, 1, 67, 33], [9, 3, 1, 67, 70]),
    "self": ([17, 1, 40], [17, 1, 40]),
    "emptyk": ([7, 12], [0, 12]),
}
if ON_GPU:
    LENGTHS["long"] = ([1023, 1, 517, 2049], [1024, 3, 517, 2000])


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)


def _ref(q, k, v, cu_q, cu_k, causal, slopes, upcast, reorder):
    return varlen_attention_ref(q, k, v, cu_q, cu_k, causal, alibi_slopes=slopes, return_lse=True, upcast=upcast, reorder_ops=reorder)


def _varlen_cases():
    heads = {"mha": (4, 4), "gqa": (4, 2)}
    if ON_GPU:
        combos = [(h, n, c, a) for h in heads for n in LENGTHS for c in (False, True) for a in (False, True)]
    else:
        # CPU: a strength-2 covering array (every pair of factor values meets at least once) in
        # 6 runs instead of the 24 of the product; the GPU tier runs the product.
        rows = [(0, 0, 0), (1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 0, 1), (1, 1, 0)]
        names = list(LENGTHS)
        combos = [(list(heads)[h], names[i // 2], bool(c), bool(a)) for i, (h, c, a) in enumerate(rows)]
    for h, n, c, a in combos:
        yield pytest.param(n, c, a, *heads[h], id=f"{h}-{n}-{c}-{'alibi' if a else 'noalibi'}")


@pytest.mark.parametrize("lengths,causal,alibi,nheads,nheads_k", list(_varlen_cases()))
def test_varlen_matches_per_sequence_reference(lengths, causal, alibi, nheads, nheads_k):
    """Causal is bottom-right per sequence; zero-length sequences (q or k) are allowed."""
    lq, lk = LENGTHS[lengths]
    cu_q, cu_k = _cu(lq), _cu(lk)
    d, dtype = 40, torch.bfloat16
    q = torch.randn(sum(lq), nheads, d, dtype=dtype, device=DEVICE, requires_grad=True)
    k = torch.randn(sum(lk), nheads_k, d, dtype=dtype, device=DEVICE, requires_grad=True)
    v = torch.randn(sum(lk), nheads_k, d, dtype=dtype, device=DEVICE, requires_grad=True)
    slopes = torch.rand(len(lq), nheads, device=DEVICE) if alibi else None
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.0, None, causal, alibi_slopes=slopes, return_lse=True)
    assert out.shape == q.shape and lse.shape == (nheads, sum(lq))
    out_ref, lse_ref = _ref(q, k, v, cu_q, cu_k, causal, slopes, True, False)
    out_pt, lse_pt = _ref(q, k, v, cu_q, cu_k, causal, slopes, False, True)
    assert_close_to_ref("out", out, out_ref, out_pt, FWD_FACTOR)
    assert_close_to_ref("lse", lse, lse_ref, lse_pt, FWD_FACTOR)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    g_ref = torch.autograd.grad(out_ref, (q, k, v), dout, allow_unused=True)
    g_pt = torch.autograd.grad(out_pt, (q, k, v), dout, allow_unused=True)
    for name, a, r, p, t in zip(("dq", "dk", "dv"), g, g_ref, g_pt, (q, k, v)):
        r = torch.zeros_like(t) if r is None else r
        p = torch.zeros_like(t) if p is None else p
        assert_close_to_ref(name, a, r, p, GRAD_FACTOR)


def test_varlen_equals_padded_batch_with_key_padding():
    """The same batch as padded + key_padding_mask (non-causal) and as varlen: same rows."""
    b, s, h, d = 3, 50, 3, 32
    lens = torch.tensor([50, 17, 33])
    mask = torch.arange(s)[None, :] < lens[:, None]
    mask = mask.to(DEVICE)
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float16, device=DEVICE) for _ in range(3))
    out_pad = flash_attn_func(q, k, v, key_padding_mask=mask)
    (qu, idx, cu, mx), ku, vu = unpad_input(q, mask), unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    out_var = flash_attn_varlen_func(qu, ku, vu, cu, cu, mx, mx)
    out_back = pad_input(out_var, idx, b, s)
    torch.testing.assert_close(out_back[mask], out_pad[mask], rtol=0, atol=2e-3)
    assert (out_back[~mask] == 0).all()


def test_pad_unpad_round_trip():
    x = torch.randn(4, 9, 5, device=DEVICE)
    mask = torch.rand(4, 9, device=DEVICE) > 0.4
    mask[2] = False
    xu, idx, cu, mx = unpad_input(x, mask)
    assert xu.shape[0] == int(mask.sum()) and cu.dtype == torch.int32 and cu[-1] == xu.shape[0]
    assert mx == int(mask.sum(1).max())
    back = pad_input(xu, idx, 4, 9)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()


def test_varlen_packed_views_match():
    lens = [13, 30, 1]
    cu = _cu(lens)
    qkv = torch.randn(sum(lens), 3, 2, 48, dtype=torch.float16, device=DEVICE)
    out_qkv = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    q, k, v = qkv.unbind(1)
    out_sep = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    out_kv = flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], cu, cu, max(lens), max(lens), causal=True)
    assert torch.equal(out_qkv, out_sep) and torch.equal(out_kv, out_sep)


def _qkv(total_q=10, total_k=10):
    q = torch.randn(total_q, 2, 16, dtype=torch.float16, device=DEVICE)
    k = torch.randn(total_k, 2, 16, dtype=torch.float16, device=DEVICE)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "cu_q,max_q,exc,match",
    [
        pytest.param([0, 4, 10], 6, None, None, id="valid"),
        pytest.param(torch.tensor([0, 4, 10], dtype=torch.int64), 6, TypeError, r"cu_seqlens_q must be int32, got torch.int64", id="dtype"),
        pytest.param([[0, 4, 10]], 6, ValueError, r"cu_seqlens_q must have shape \(batch \+ 1,\)", id="rank"),
        pytest.param([1, 4, 10], 6, ValueError, r"cu_seqlens_q must start at 0, got 1", id="start"),
        pytest.param([0, 6, 4, 10], 6, ValueError, r"cu_seqlens_q must be non-decreasing, got 6 then 4", id="monotonic"),
        pytest.param([0, 4, 9], 6, ValueError, r"cu_seqlens_q\[-1\] must equal the number of packed rows 10, got 9", id="last"),
        pytest.param([0, 4, 10], 5, ValueError, r"max_seqlen_q \(5\) is smaller than the longest sequence \(6\)", id="max"),
        pytest.param([0, 4, 10], 6.0, TypeError, r"max_seqlen_q must be an int", id="max-type"),
    ],
)
def test_varlen_validation(cu_q, max_q, exc, match):
    q, k, v = _qkv()
    cu_k = torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE)
    cu_q = cu_q if isinstance(cu_q, torch.Tensor) else torch.tensor(cu_q, dtype=torch.int32)
    cu_q = cu_q.to(DEVICE)
    if exc is None:
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 5)
        return
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 5)


def test_varlen_batch_mismatch_and_rank():
    q, k, v = _qkv()
    cu_q = torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"same batch, got 1 and 2 sequences"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 10, 5)
    with pytest.raises(ValueError, match=r"q must have rank 3 \(total_tokens, nheads, headdim\)"):
        flash_attn_varlen_func(q[None], k, v, cu_q, cu_q, 10, 10)


@pytest.mark.skipif(ON_GPU, reason="the reference fallback serves CPU tensors")
def test_cpu_reference_fallback_matches_kernels(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the reference path: same semantics as the kernels."""
    lq, lk = LENGTHS["mixed"]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), 4, 32, dtype=torch.float16)
    k = torch.randn(sum(lk), 2, 32, dtype=torch.float16)
    v = torch.randn(sum(lk), 2, 32, dtype=torch.float16)
    out_k, lse_k = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.0, None, True, return_lse=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out_r, lse_r = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.0, None, True, return_lse=True)
    torch.testing.assert_close(out_r, out_k, rtol=0, atol=2e-3)
    torch.testing.assert_close(lse_r, lse_k, rtol=0, atol=1e-4)


def test_non_contiguous_cu_seqlens():
    """Regression: a strided cu_seqlens passed validation (its values are fine) and the kernels then
    read it with unit stride, past its end (illegal memory access on GPU; review finding)."""
    lens = [3, 7, 5]
    storage = torch.full((8,), 99, dtype=torch.int32, device=DEVICE)
    storage[::2] = _cu(lens)
    cu = storage[::2]
    assert cu.stride(0) == 2
    q = torch.randn(sum(lens), 2, 16, dtype=torch.float16, device=DEVICE)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 7, 7, causal=True)
    ref = flash_attn_varlen_func(q, q, q, cu.contiguous(), cu.contiguous(), 7, 7, causal=True)
    assert torch.equal(out, ref)


def test_kernel_backward_refuses_bias_with_varlen():
    """The kernels have no per-sequence bias offsets: attn_bwd says so instead of computing."""
    from tritonflash.kernels import Varlen, attn_bwd

    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    q = torch.randn(12, 2, 16, device=DEVICE)
    lse = torch.zeros(2, 12, device=DEVICE)
    bias = torch.zeros(1, 2, 7, 7, device=DEVICE)
    with pytest.raises(ValueError, match="bias is not supported with variable-length"):
        attn_bwd(q, q, q, q, q, lse, bias, None, None, False, 0.25, bias_grad=True, varlen=Varlen(cu, cu, 7, 7))
