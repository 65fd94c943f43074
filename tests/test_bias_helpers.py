"""ALiBi slopes and bias shape helpers (tritonflash.bias), checked against independent
computations of MPT's rules, and the equivalence of MPT's materialised causal ALiBi bias with
the library's in-kernel ``alibi_slopes`` (through the reference)."""

from __future__ import annotations

import pytest
import torch

from tritonflash import attention_ref
from tritonflash.bias import alibi_slopes_to_bias, bias_broadcast_shape, build_alibi_bias, gen_slopes


def mpt_slopes(n_heads, alibi_bias_max=8):
    """MPT's rule in plain Python floats: slopes 2^(-max * m / n) for m = 1..n, n the next power
    of two >= n_heads; if n != n_heads, the odd-indexed slopes (m = 2, 4, ...) come first, then
    the even-indexed ones (m = 1, 3, ...), truncated to n_heads."""
    n = 1
    while n < n_heads:
        n *= 2
    full = [2.0 ** (-alibi_bias_max * m / n) for m in range(1, n + 1)]
    if n != n_heads:
        full = full[1::2] + full[0::2]
    return full[:n_heads]


@pytest.mark.parametrize("n_heads", [pytest.param(n, id=f"h{n}") for n in [*range(1, 17), 12, 24, 40]])
def test_gen_slopes_matches_mpt_rule(n_heads):
    slopes = gen_slopes(n_heads)
    assert slopes.shape == (n_heads,) and slopes.dtype == torch.float32
    want = torch.tensor(mpt_slopes(n_heads), dtype=torch.float64)
    torch.testing.assert_close(slopes.double(), want, rtol=2e-7, atol=0)
    assert len(set(slopes.tolist())) == n_heads, "slopes must be distinct"


def test_gen_slopes_known_values():
    """Spelled-out values: 8 heads are 2^-1 .. 2^-8; 12 heads use the 16-head slopes
    2^-(m/2), odd-indexed first (2^-1 .. 2^-8) then the first four even-indexed (2^-0.5 ..)."""
    assert gen_slopes(8).tolist() == [2.0 ** -m for m in range(1, 9)]
    want12 = [2.0 ** -m for m in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    torch.testing.assert_close(gen_slopes(12), torch.tensor(want12), rtol=1e-7, atol=0)
    assert gen_slopes(1).tolist() == [2.0 ** -8]


@pytest.mark.parametrize("n_heads, alibi_bias_max", [
    pytest.param(4, 16, id="h4-max16"),
    pytest.param(6, 4, id="h6-max4"),
    pytest.param(16, 1, id="h16-max1"),
    pytest.param(3, 12, id="h3-max12"),
])
def test_gen_slopes_alibi_bias_max(n_heads, alibi_bias_max):
    slopes = gen_slopes(n_heads, alibi_bias_max=alibi_bias_max)
    want = torch.tensor(mpt_slopes(n_heads, alibi_bias_max), dtype=torch.float64)
    torch.testing.assert_close(slopes.double(), want, rtol=2e-7, atol=0)


def test_gen_slopes_device_and_bad_count():
    assert gen_slopes(5, device="meta").device.type == "meta"
    with pytest.raises(ValueError, match=r"n_heads must be >= 1, got 0"):
        gen_slopes(0)


@pytest.mark.parametrize("n_heads, seq_len", [
    pytest.param(1, 1, id="h1-s1"),
    pytest.param(3, 7, id="h3-s7"),
    pytest.param(8, 5, id="h8-s5"),
])
def test_build_alibi_bias_vector(n_heads, seq_len):
    """full=False: (1, h, 1, s) with -slope * (s - 1 - j), MPT's per-key form."""
    bias = build_alibi_bias(n_heads, seq_len)
    assert bias.shape == (1, n_heads, 1, seq_len) and bias.dtype == torch.float32
    slopes = mpt_slopes(n_heads)
    for h in range(n_heads):
        for j in range(seq_len):
            assert bias[0, h, 0, j].item() == pytest.approx(-slopes[h] * (seq_len - 1 - j), rel=1e-6, abs=0)
    assert (bias[..., -1] == 0).all()


@pytest.mark.parametrize("n_heads, seq_len", [pytest.param(3, 6, id="h3-s6"), pytest.param(5, 4, id="h5-s4")])
def test_build_alibi_bias_full(n_heads, seq_len):
    """full=True: (1, h, s, s) with -slope * |i - j|, symmetric with a zero diagonal."""
    bias = build_alibi_bias(n_heads, seq_len, full=True)
    assert bias.shape == (1, n_heads, seq_len, seq_len) and bias.dtype == torch.float32
    slopes = mpt_slopes(n_heads)
    for h in range(n_heads):
        for i in range(seq_len):
            for j in range(seq_len):
                assert bias[0, h, i, j].item() == pytest.approx(-slopes[h] * abs(i - j), rel=1e-6, abs=0)
    assert torch.equal(bias, bias.transpose(-1, -2))
    assert torch.equal(bias, alibi_slopes_to_bias(gen_slopes(n_heads), seq_len, seq_len))


def test_build_alibi_bias_alibi_bias_max():
    torch.testing.assert_close(
        build_alibi_bias(4, 5, alibi_bias_max=16),
        gen_slopes(4, alibi_bias_max=16).view(1, 4, 1, 1) * torch.arange(-4, 1.0).view(1, 1, 1, 5),
    )


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
])
@pytest.mark.parametrize("full", [pytest.param(False, id="vector"), pytest.param(True, id="full")])
def test_build_alibi_bias_dtype(dtype, full):
    """The dtype argument is the fp32 bias rounded once to that dtype."""
    bias = build_alibi_bias(6, 9, full=full, dtype=dtype)
    assert bias.dtype == dtype
    assert torch.equal(bias, build_alibi_bias(6, 9, full=full).to(dtype))


@pytest.mark.parametrize("full", [pytest.param(False, id="vector"), pytest.param(True, id="full")])
def test_build_alibi_bias_device(full):
    bias = build_alibi_bias(3, 4, full=full, device="meta", dtype=torch.bfloat16)
    assert bias.device.type == "meta" and bias.dtype == torch.bfloat16
    assert bias.shape == ((1, 3, 4, 4) if full else (1, 3, 1, 4))


B, H, SQ, SK = 2, 3, 5, 7


@pytest.mark.parametrize("shape, want", [
    pytest.param((), (1, 1, 1, 1), id="scalar"),
    pytest.param((SK,), (1, 1, 1, SK), id="sk"),
    pytest.param((1,), (1, 1, 1, 1), id="one"),
    pytest.param((SQ, SK), (1, 1, SQ, SK), id="sq-sk"),
    pytest.param((SQ, 1), (1, 1, SQ, 1), id="sq-1"),
    pytest.param((H, SQ, SK), (1, H, SQ, SK), id="h-sq-sk"),
    pytest.param((1, H, 1, SK), (1, H, 1, SK), id="1-h-1-sk-alibi"),
    pytest.param((B, 1, 1, SK), (B, 1, 1, SK), id="b-1-1-sk-padding"),
    pytest.param((1, H, SQ, SK), (1, H, SQ, SK), id="1-h-sq-sk"),
    pytest.param((B, H, SQ, SK), (B, H, SQ, SK), id="b-h-sq-sk"),
    pytest.param((B, H, 1, 1), (B, H, 1, 1), id="b-h-1-1"),
    pytest.param((1, 1, 1, 1), (1, 1, 1, 1), id="ones"),
    pytest.param((SK, SQ), None, id="transposed"),
    pytest.param((SQ,), None, id="sq-as-keys"),
    pytest.param((B + 1, 1, 1, SK), None, id="batch+1"),
    pytest.param((1, H + 1, 1, SK), None, id="heads+1"),
    pytest.param((1, H, SQ + 1, SK), None, id="rows+1"),
    pytest.param((1, H, 1, SK - 1), None, id="keys-1"),
    pytest.param((B * H, SQ, SK), None, id="b*h-sq-sk"),
    pytest.param((1, 1, 1, 1, 1), None, id="rank5-ones"),
    pytest.param((1, B, H, SQ, SK), None, id="rank5"),
    pytest.param((0, H, SQ, SK), None, id="zero-batch"),
])
def test_bias_broadcast_shape(shape, want):
    assert bias_broadcast_shape(shape, B, H, SQ, SK) == want
    assert bias_broadcast_shape(torch.Size(shape), B, H, SQ, SK) == want
    if want is not None:
        # Agrees with torch's own broadcasting to the score shape.
        assert torch.zeros(shape).expand(B, H, SQ, SK).shape == (B, H, SQ, SK)


def slopes_to_bias_loop(slopes, seqlen_q, seqlen_k):
    slopes = slopes if slopes.dim() == 2 else slopes.unsqueeze(0)
    out = torch.empty(slopes.shape[0], slopes.shape[1], seqlen_q, seqlen_k)
    for b in range(slopes.shape[0]):
        for h in range(slopes.shape[1]):
            for i in range(seqlen_q):
                for j in range(seqlen_k):
                    out[b, h, i, j] = -slopes[b, h].item() * abs(i + seqlen_k - seqlen_q - j)
    return out


@pytest.mark.parametrize("slopes_shape", [pytest.param((3,), id="h"), pytest.param((2, 3), id="b-h")])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [
    pytest.param(4, 4, id="sq4-sk4"),
    pytest.param(3, 7, id="sq3-sk7-kv-cache"),
    pytest.param(6, 2, id="sq6-sk2"),
    pytest.param(1, 5, id="sq1-sk5-decode"),
])
def test_alibi_slopes_to_bias_matches_loop(slopes_shape, seqlen_q, seqlen_k):
    """-slope * |i + seqlen_k - seqlen_q - j|: distances aligned bottom-right like causal."""
    slopes = torch.rand(slopes_shape) + 0.1
    bias = alibi_slopes_to_bias(slopes, seqlen_q, seqlen_k)
    want = slopes_to_bias_loop(slopes, seqlen_q, seqlen_k)
    assert bias.shape == want.shape and bias.dtype == torch.float32
    torch.testing.assert_close(bias, want, rtol=1e-6, atol=0)


def test_alibi_slopes_to_bias_upcasts():
    """Slopes are applied in fp32 whatever their dtype (the reference's contract with the kernel)."""
    slopes = gen_slopes(4)
    assert torch.equal(alibi_slopes_to_bias(slopes.double(), 3, 5), alibi_slopes_to_bias(slopes, 3, 5))


def _qkv(b, sq, sk, h, d=16):
    return (torch.randn(b, s, h, d, dtype=torch.float32) for s in (sq, sk, sk))


@pytest.mark.parametrize("seqlen_q, seqlen_k", [
    pytest.param(6, 6, id="sq6-sk6"),
    pytest.param(3, 8, id="sq3-sk8-kv-cache"),
    pytest.param(1, 5, id="sq1-sk5-decode"),
    pytest.param(7, 4, id="sq7-sk4-dead-rows"),
])
@pytest.mark.parametrize("n_heads", [pytest.param(4, id="h4"), pytest.param(6, id="h6")])
def test_causal_mpt_alibi_vector_equals_alibi_slopes(seqlen_q, seqlen_k, n_heads):
    """Under a causal mask MPT's per-key bias -slope*(sk-1-j) and the distance form
    -slope*|i + sk - sq - j| differ by a per-row constant, which softmax ignores: the same
    attention (and the same gradients)."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, seqlen_q, seqlen_k, n_heads))
    out_mpt, lse_mpt = attention_ref(q, k, v, build_alibi_bias(n_heads, seqlen_k), True, return_lse=True)
    out_slopes, lse_slopes = attention_ref(q, k, v, None, True, alibi_slopes=gen_slopes(n_heads), return_lse=True)
    torch.testing.assert_close(out_mpt, out_slopes, rtol=1e-5, atol=1e-6)
    dout = torch.randn_like(out_mpt)
    for a, b in zip(torch.autograd.grad(out_mpt, (q, k, v), dout), torch.autograd.grad(out_slopes, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The lse differs by exactly that per-row constant: -slope * (seqlen_q - 1 - i).
    i = torch.arange(seqlen_q, dtype=torch.float32)
    shift = gen_slopes(n_heads).view(1, -1, 1) * (seqlen_q - 1 - i).view(1, 1, -1)
    live = torch.isfinite(lse_slopes)
    torch.testing.assert_close(lse_mpt[live], (lse_slopes - shift)[live], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(lse_mpt), ~live)


def test_non_causal_needs_full_alibi_bias():
    """Without the causal mask the per-key vector is NOT the distance form (keys after the query
    get the wrong sign); MPT's full (1, h, s, s) bias is."""
    h, s = 4, 6
    q, k, v = _qkv(2, s, s, h)
    out_slopes = attention_ref(q, k, v, alibi_slopes=gen_slopes(h))
    torch.testing.assert_close(attention_ref(q, k, v, build_alibi_bias(h, s, full=True)), out_slopes, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(attention_ref(q, k, v, build_alibi_bias(h, s)), out_slopes, rtol=1e-3, atol=1e-3)


def test_gen_slopes_non_power_of_two_covers_the_range():
    """For 7 heads (next power 8: 2^-1 .. 2^-8) the odd-then-even order keeps both ends of the
    range, 2^-2 .. 2^-8 then 2^-1 .. 2^-5, rather than the first 7 of the 8 slopes."""
    assert gen_slopes(7).tolist() == [2.0 ** -m for m in (2, 4, 6, 8, 1, 3, 5)]
