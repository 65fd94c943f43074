"""flash_attn_with_kvcache (issue 14): the decode kernel against kvcache_attention_ref under the
tolerance rule (docs/testing.md), the in-place append, split determinism and validation.

CPU tier: tiny shapes in the interpreter (key tile 16, at most 32 rows a program), so that
sequences cross several key tiles and pages, end mid-tile, and GQA groups times query rows
take more than one program. GPU tier (``gpu`` marker): realistic sizes."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from helpers import FWD_FACTOR, assert_close_to_ref
from tritonflash import attention_ref, flash_attn_with_kvcache, gen_slopes
from tritonflash.reference import kvcache_attention_ref


def make_cache(batch, seqlen_q, nheads, nheads_k, d, capacity, lengths, dtype=torch.float16, s_new=0, page=None, batch_cache=None,
               device=DEVICE):
    """q, caches (NaN in every slot at or past each sequence's length + s_new), new k/v, and
    block_table (paged: blocks shuffled, unused entries out of range) or None."""
    q = torch.randn(batch, seqlen_q, nheads, d, dtype=dtype, device=device)
    k_new = v_new = None
    if s_new:
        k_new = torch.randn(batch, s_new, nheads_k, d, dtype=dtype, device=device)
        v_new = torch.randn_like(k_new)
    if page is None:
        rows = batch if batch_cache is None else batch_cache
        kc = torch.randn(rows, capacity, nheads_k, d, dtype=dtype, device=device)
        vc = torch.randn_like(kc)
        return q, kc, vc, k_new, v_new, None
    max_blocks = capacity // page
    num_blocks = batch * max_blocks + 3
    kc = torch.full((num_blocks, page, nheads_k, d), float("nan"), dtype=dtype, device=device)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(num_blocks, device=device)[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    table = perm.clone()
    for b, n in enumerate(lengths):
        used = -(-(n + s_new) // page)
        table[b, used:] = num_blocks + 7  # never read
        for j in range(n):
            blk, slot = perm[b, j // page], j % page
            kc[blk, slot] = torch.randn(nheads_k, d, dtype=dtype, device=device)
            vc[blk, slot] = torch.randn(nheads_k, d, dtype=dtype, device=device)
    return q, kc, vc, k_new, v_new, table


def poison(kc, vc, lengths, cache_batch_idx=None):
    """NaN in every contiguous-cache slot past each sequence's valid length."""
    for b, n in enumerate(lengths):
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        kc[row, n:] = float("nan")
        vc[row, n:] = float("nan")


def check(q, kc, vc, k_new, v_new, *, lengths, check_cache=True, **kw):
    """Run flash_attn_with_kvcache on copies of the caches; compare out and lse with the
    reference (fp32 oracle and same-precision baseline) and the caches with the append."""
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
    kw.setdefault("cache_seqlens", seqlens)
    ref_kw = {k: v for k, v in kw.items() if k != "num_splits"}
    out_ref, lse_ref = kvcache_attention_ref(q, kc, vc, k_new, v_new, return_lse=True, **ref_kw)
    out_pt, lse_pt = kvcache_attention_ref(q, kc, vc, k_new, v_new, return_lse=True, upcast=False, reorder_ops=True, **ref_kw)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(q, kc2, vc2, k_new, v_new, return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_ref("out", out, out_ref, out_pt, FWD_FACTOR)
    assert_close_to_ref("lse", lse, lse_ref, lse_pt, FWD_FACTOR)
    if check_cache and k_new is not None:
        cbi, table = kw.get("cache_batch_idx"), kw.get("block_table")
        s_new = k_new.shape[1]
        for b, n in enumerate(lengths):
            for t in range(s_new):
                j = n + t
                if table is None:
                    row = b if cbi is None else int(cbi[b])
                    got_k, got_v = kc2[row, j], vc2[row, j]
                else:
                    blk = int(table[b, j // kc.shape[1]])
                    got_k, got_v = kc2[blk, j % kc.shape[1]], vc2[blk, j % kc.shape[1]]
                assert torch.equal(got_k, k_new[b, t]) and torch.equal(got_v, v_new[b, t]), f"append of sequence {b} token {t}"
        written = (kc2 != kc) & ~(kc2.isnan() & kc.isnan())
        assert written.sum() <= k_new.numel(), "the append wrote outside its slots"
    return out, lse


# Covering set: every factor value at least once (layout x append x GQA x dtype x score terms).
CASES = [
    # id, (batch, sq, h, hk, d, capacity, lengths), dtype, s_new, page, extra
    ("contig-mha-causal", (2, 1, 2, 2, 32, 70, [37, 5]), torch.float16, 0, None, dict(causal=True)),
    ("contig-gqa-append-d40", (2, 1, 4, 2, 40, 64, [40, 17]), torch.bfloat16, 1, None, dict(causal=True)),
    ("paged16-mqa-append-sq2", (2, 2, 4, 1, 32, 64, [30, 3]), torch.float16, 2, 16, dict(causal=True)),
    ("paged32-alibi-bias-sq3", (2, 3, 4, 2, 16, 96, [50, 70]), torch.bfloat16, 0, 32,
     dict(causal=True, alibi=True, bias=(2, 4, 3, 96))),
    ("contig-window-softcap-sinks", (1, 2, 4, 2, 32, 80, [75]), torch.float16, 3, None,
     dict(causal=True, window_size=(20, 0), softcap=5.0, sinks=True)),
    ("contig-noncausal-biasvec", (2, 1, 2, 1, 32, 48, [48, 20]), torch.bfloat16, 0, None, dict(bias=(1, 2, 1, 48))),
    ("contig-gqa-sq5-two-mblocks", (1, 5, 8, 1, 16, 40, [33]), torch.float16, 2, None, dict(causal=True, alibi=True)),
    ("paged48-window-both", (1, 3, 2, 2, 32, 96, [60]), torch.float16, 1, 48, dict(window_size=(10, 4))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_reference(case):
    _, (b, sq, h, hk, d, cap, lengths), dtype, s_new, page, extra = case
    q, kc, vc, k_new, v_new, table = make_cache(b, sq, h, hk, d, cap, lengths, dtype, s_new, page)
    if table is None:
        poison(kc, vc, [n + s_new for n in lengths])
    kw = dict(causal=extra.get("causal", False), window_size=extra.get("window_size", (-1, -1)), softcap=extra.get("softcap", 0.0),
              block_table=table, num_splits=3)
    if extra.get("alibi"):
        kw["alibi_slopes"] = gen_slopes(h, device=q.device)
    if "bias" in extra:
        kw["bias"] = torch.randn(*extra["bias"], device=q.device)
    if extra.get("sinks"):
        kw["sinks"] = torch.randn(h, device=q.device)
    check(q, kc, vc, k_new, v_new, lengths=lengths, **kw)


def test_cache_batch_idx_with_append():
    q, kc, vc, k_new, v_new, _ = make_cache(2, 1, 4, 2, 32, 50, [20, 33], s_new=2, batch_cache=3)
    cbi = torch.tensor([2, 0], dtype=torch.int32, device=q.device)
    poison(kc, vc, [22, 35], cbi)
    kc[1] = float("nan")  # a row no sequence uses
    vc[1] = float("nan")
    check(q, kc, vc, k_new, v_new, lengths=[20, 33], cache_batch_idx=cbi, causal=True)


@pytest.mark.parametrize("sinks", [False, True])
def test_empty_cache(sinks):
    """cache_seqlens 0: with no append every row is dead (out 0, lse -inf or the sink); with an
    append the new tokens alone."""
    q, kc, vc, k_new, v_new, _ = make_cache(2, 2, 2, 1, 16, 32, [0, 0], s_new=2)
    poison(kc, vc, [0, 0])
    s = torch.randn(2, device=q.device) if sinks else None
    out, lse = check(q, kc, vc, None, None, lengths=[0, 0], causal=True, sinks=s)
    assert torch.equal(out, torch.zeros_like(out))
    want = s.view(1, 2, 1).expand_as(lse) if sinks else torch.full_like(lse, float("-inf"))
    assert torch.equal(lse, want)
    check(q, kc, vc, k_new, v_new, lengths=[0, 0], causal=True, sinks=s)


def test_strided_cache_seqlens_and_cache_batch_idx():
    """Index tensors with a non-unit stride (a column of a (batch, n) table) are read by their
    strides, not as packed arrays: same result as packed copies."""
    q, kc, vc, _, _, _ = make_cache(3, 1, 2, 1, 16, 40, [7, 30, 12], batch_cache=4)
    table = torch.tensor([[7, 3], [30, 0], [12, 2]], dtype=torch.int32, device=q.device)  # (length, cache row)
    lengths, rows = table[:, 0], table[:, 1]
    assert lengths.stride() == (2,) and rows.stride() == (2,)
    poison(kc, vc, [7, 30, 12], rows)
    check(q, kc, vc, None, None, lengths=[7, 30, 12], cache_seqlens=lengths, cache_batch_idx=rows, causal=True)


def test_full_cache():
    """cache_seqlens = capacity (and None: the whole cache); an append that ends exactly at it."""
    q, kc, vc, k_new, v_new, table = make_cache(1, 1, 2, 2, 32, 64, [64], page=16)
    check(q, kc, vc, None, None, lengths=[64], block_table=table, causal=True)
    out_none = flash_attn_with_kvcache(q, kc, vc, block_table=table, causal=True)
    assert torch.equal(out_none, flash_attn_with_kvcache(q, kc, vc, cache_seqlens=64, block_table=table, causal=True))
    q, kc, vc, k_new, v_new, _ = make_cache(1, 1, 2, 2, 32, 40, [37], s_new=3)
    check(q, kc, vc, k_new, v_new, lengths=[37], cache_seqlens=37, causal=True)  # an int


def test_splits_within_tolerance_and_deterministic():
    q, kc, vc, k_new, v_new, table = make_cache(2, 1, 4, 2, 32, 96, [90, 41], s_new=1, page=32)
    kw = dict(block_table=table, causal=True, alibi_slopes=gen_slopes(4, device=q.device))
    seqlens = torch.tensor([90, 41], dtype=torch.int32, device=q.device)
    outs = {}
    for ns in (1, 2, 7, 0):
        out, _ = check(q, kc, vc, k_new, v_new, lengths=[90, 41], num_splits=ns, **kw)
        kc2, vc2 = kc.clone(), vc.clone()
        again = flash_attn_with_kvcache(q, kc2, vc2, k_new, v_new, cache_seqlens=seqlens, num_splits=ns, **kw)
        assert torch.equal(out, again), f"num_splits={ns} not deterministic"
        outs[ns] = out
    assert not all(torch.equal(outs[1], outs[n]) for n in (2, 7))  # the splits really merge


def test_step_by_step_decoding_equals_full_attention():
    """Appending one token per call and attending causally gives attention_ref over the whole
    sequence, row by row."""
    b, s, h, hk, d = 1, 6, 4, 2, 32
    q = torch.randn(b, s, h, d, dtype=torch.float16, device=DEVICE)
    k = torch.randn(b, s, hk, d, dtype=torch.float16, device=DEVICE)
    v = torch.randn_like(k)
    full = attention_ref(q, k, v, causal=True)
    kc = torch.full((b, 32, hk, d), float("nan"), dtype=torch.float16, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    flash_attn_with_kvcache(q[:, :2], kc, vc, k[:, :2], v[:, :2], cache_seqlens=0, causal=True)  # a 2-token prefill
    for t in range(2, s):
        out = flash_attn_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1], cache_seqlens=t, causal=True)
        assert (out.float() - full[:, t:t + 1].float()).abs().max().item() < 2e-3
    assert torch.equal(kc[:, :s], k) and torch.equal(vc[:, :s], v) and kc[:, s:].isnan().all()


def test_reference_matches_attention_ref_on_a_full_cache():
    q, kc, vc, _, _, _ = make_cache(2, 3, 4, 2, 16, 12, [12, 12])
    bias = torch.randn(2, 4, 3, 12, device=q.device)
    want = attention_ref(q, kc, vc, bias, True, alibi_slopes=gen_slopes(4, device=q.device))
    got = kvcache_attention_ref(q, kc, vc, causal=True, bias=bias, alibi_slopes=gen_slopes(4, device=q.device))
    # The same fp32 math, batched there and per sequence here: CPU BLAS may round one product
    # differently by shape (an AVX2 machine gave one fp16 output 1 ulp apart), so 1 ulp is allowed.
    torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-6)


def test_inference_only():
    q, kc, vc, _, _, _ = make_cache(1, 1, 2, 2, 16, 16, [16])
    with pytest.raises(NotImplementedError, match="q requires grad"):
        flash_attn_with_kvcache(q.requires_grad_(), kc, vc)
    with torch.no_grad():
        flash_attn_with_kvcache(q, kc, vc)


ERRORS = [
    ("q-rank", lambda a: a.update(q=a["q"][0]), ValueError, "q must have rank 4"),
    ("q-dtype", lambda a: a.update(q=a["q"].float()), TypeError, "q must be float16 or bfloat16"),
    ("cache-dtype", lambda a: a.update(k_cache=a["k_cache"].bfloat16()), TypeError, "k_cache must have q's dtype"),
    ("cache-shape", lambda a: a.update(v_cache=a["v_cache"][:, :8]), ValueError, "same shape"),
    ("heads", lambda a: a.update(q=torch.randn(2, 1, 3, 16, dtype=torch.float16, device=DEVICE)), ValueError, "multiple of the cache's"),
    ("head-dim", lambda a: a.update(q=a["q"][..., :8]), ValueError, "head dim"),
    ("cache-batch", lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, "k_cache's batch"),
    ("k-without-v", lambda a: a.update(k=a["k_new"]), ValueError, "given together"),
    ("k-shape", lambda a: a.update(k=a["k_new"][:, :, :1], v=a["v_new"][:, :, :1]), ValueError, "k must have shape"),
    ("seqlens-dtype", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens must be int32"),
    ("seqlens-shape", lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens must have shape"),
    ("seqlens-type", lambda a: a.update(cache_seqlens=3.0), TypeError, "cache_seqlens must be an int"),
    ("seqlens-overflow", lambda a: a.update(k=a["k_new"], v=a["v_new"], cache_seqlens=15), ValueError, r"\+ 2 must be between 0 and"),
    ("seqlens-negative", lambda a: a.update(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32, device=DEVICE)), ValueError,
     r"cache_seqlens\[0\]"),
    ("append-full", lambda a: a.update(k=a["k_new"], v=a["v_new"], cache_seqlens=None), ValueError, "no room"),
    ("cbi-range", lambda a: a.update(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)), ValueError,
     "cache_batch_idx entries"),
    ("cbi-repeat", lambda a: a.update(k=a["k_new"], v=a["v_new"], cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32,
                                                                                                  device=DEVICE)),
     ValueError, "must not repeat"),
    ("table-dtype", lambda a: a.update(block_table=torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)), TypeError,
     "block_table must be int32"),
    ("table-page", lambda a: a.update(block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE),
                                      k_cache=a["k_cache"][:, :8], v_cache=a["v_cache"][:, :8]), ValueError, "multiple of 16"),
    ("table-range", lambda a: a.update(block_table=torch.tensor([[0], [5]], dtype=torch.int32, device=DEVICE)), ValueError,
     r"block_table\[1, 0\] = 5 is out of range"),
    ("table-with-cbi", lambda a: a.update(block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE),
                                          cache_batch_idx=torch.zeros(2, dtype=torch.int32, device=DEVICE)), ValueError,
     "cannot be combined"),
    ("bias-shape", lambda a: a.update(bias=torch.zeros(1, 2, 1, 15, device=DEVICE)), ValueError, "seqlen_cache"),
    ("bias-dtype", lambda a: a.update(bias=torch.zeros(1, 2, 1, 16, dtype=torch.float64, device=DEVICE)), TypeError, "bias must be"),
    ("slopes", lambda a: a.update(alibi_slopes=torch.ones(3, device=DEVICE)), ValueError, "alibi_slopes must have shape"),
    ("sinks", lambda a: a.update(sinks=torch.ones(3, device=DEVICE)), ValueError, "sinks must have shape"),
    ("window", lambda a: a.update(window_size=(4, 2), causal=True), ValueError, "causal=True means"),
    ("softcap", lambda a: a.update(softcap=-1.0), ValueError, "softcap"),
    ("causal", lambda a: a.update(causal=1), TypeError, "causal must be a bool"),
    ("num-splits", lambda a: a.update(num_splits=-1), ValueError, "num_splits must be >= 0"),
    ("num-splits-type", lambda a: a.update(num_splits=2.0), TypeError, "num_splits must be an int"),
]


@pytest.mark.parametrize("mutate, exc, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_validation(mutate, exc, match):
    q, kc, vc, k_new, v_new, _ = make_cache(2, 1, 2, 2, 16, 16, [4, 9], s_new=2)
    args = dict(q=q, k_cache=kc, v_cache=vc, k_new=k_new, v_new=v_new,
                cache_seqlens=torch.tensor([4, 9], dtype=torch.int32, device=DEVICE))
    mutate(args)
    k_new, v_new = args.pop("k_new"), args.pop("v_new")
    snapshot = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**args)
    # Nothing was written before the error.
    assert torch.equal(args["k_cache"], snapshot[0]) and torch.equal(args["v_cache"], snapshot[1])
    del k_new, v_new


def test_layer_decodes_through_kvcache(monkeypatch):
    """The 'triton' layer backend decodes with flash_attn_with_kvcache when given a cache (no
    padding mask, no gradient), and step-by-step decoding equals the full forward; with grad
    enabled on parameters that require it, it keeps flash_attn_func."""
    from tritonflash.layers import GroupedQueryAttention, backends

    calls = []
    real = backends.flash_attn_with_kvcache
    monkeypatch.setattr(backends, "flash_attn_with_kvcache", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layer = GroupedQueryAttention(64, 4, 2, attn_impl="triton", device=DEVICE)
    x = torch.randn(2, 7, 64, device=DEVICE)
    slopes = gen_slopes(4, device=DEVICE)
    with torch.no_grad():
        full, _, _ = layer(x, alibi_slopes=slopes)
        out, _, cache = layer(x[:, :4], alibi_slopes=slopes)
        steps = [out]
        for t in range(4, 7):
            out, _, cache = layer(x[:, t:t + 1], past_key_value=cache, alibi_slopes=slopes)
            steps.append(out)
    assert len(calls) == 3
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-2, rtol=0)
    layer(x[:, :1], past_key_value=cache, alibi_slopes=slopes)[0].sum().backward()  # grad: the prefill kernel
    assert len(calls) == 3


def test_validate_false_reads_nothing_on_the_host(monkeypatch):
    q, kc, vc, k_new, v_new, table = make_cache(2, 1, 2, 1, 16, 32, [20, 5], s_new=1, page=16)
    seqlens = torch.tensor([20, 5], dtype=torch.int32, device=q.device)
    kw = dict(cache_seqlens=seqlens, block_table=table, causal=True, num_splits=2)
    want = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k_new, v_new, **kw)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host read"))
    assert torch.equal(flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k_new, v_new, validate=False, **kw), want)


def test_opcheck_fwd_kvcache():
    """The op's schema, fake implementation and AOT dispatch (dynamic shapes): paged with every
    optional tensor, and contiguous with cache_batch_idx and none of them."""
    q, kc, vc, _, _, table = make_cache(2, 2, 4, 2, 16, 32, [20, 5], page=16)
    seqlens = torch.tensor([20, 5], dtype=torch.int32, device=q.device)
    opts = (torch.randn(2, 4, 2, 32, device=q.device), gen_slopes(4, device=q.device), torch.randn(4, device=q.device))
    torch.library.opcheck(torch.ops.tritonflash.fwd_kvcache, (q, kc, vc, seqlens, None, table, *opts, True, 0.25, 8, 0, 3.0, 2, -1))
    q, kc, vc, _, _, _ = make_cache(2, 1, 2, 1, 16, 24, [24, 9], batch_cache=3)
    cbi = torch.tensor([2, 0], dtype=torch.int32, device=q.device)
    torch.library.opcheck(torch.ops.tritonflash.fwd_kvcache, (q, kc, vc, seqlens, cbi, None, None, None, None, False, 0.3, -1, -1,
                                                              0.0, 0, 24), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("over", ["q", "k_cache", "bias", "sinks", "alibi_slopes"])
def test_vmap_is_refused_not_run_on_batched_tensors(over):
    """Eager calls skip the op's dispatch; a functorch transform over any tensor argument is a
    typed NotImplementedError, never a launch with batched tensors nor validation's host read."""
    q, kc, vc, _, _, _ = make_cache(2, 1, 2, 1, 16, 24, [24, 9])
    args = dict(q=q, k_cache=kc, bias=torch.randn(2, 2, 1, 24, device=q.device), sinks=torch.randn(2, device=q.device),
                alibi_slopes=gen_slopes(2, device=q.device))

    def call(x):
        kw = dict(args, **{over: x})
        return flash_attn_with_kvcache(kw["q"], kw["k_cache"], vc, cache_seqlens=9, bias=kw["bias"], sinks=kw["sinks"],
                                       alibi_slopes=kw["alibi_slopes"])

    batched = args[over].unsqueeze(0).expand(3, *args[over].shape)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="vmap"):
        torch.vmap(call)(batched)


def test_merge_rounds_bf16_like_the_gpu():
    """The split merge stores bf16 rounded to nearest even, as the GPU and torch do (Triton 3.6's
    interpreter would truncate): one split with lse 0 gives the fp32 partial itself, rounded."""
    from tritonflash.kernels.decode import _combine_splits

    g = torch.Generator().manual_seed(0)
    b, sq, h, d = 2, 1, 3, 32
    out_p = (1 + torch.rand(1, b, sq, h, d, generator=g)).to(DEVICE)  # values with bits below bf16's
    lse_p = torch.zeros(1, b, sq, h, device=DEVICE)
    out = torch.empty(b, sq, h, d, dtype=torch.bfloat16, device=DEVICE)
    lse = torch.empty(b, h, sq, device=DEVICE)
    _combine_splits[(b * sq * h,)](out_p, lse_p, out_p, out, lse, out_p.stride(), lse_p.stride(), out.stride(), lse.stride(), 1,
                                   sq, h, d, SPLITS_P2=2, BLOCK_D=d, HAS_SINKS=False,
                                   INTERP_BF16=not out_p.is_cuda, num_warps=1)
    assert torch.equal(out, out_p[0].to(torch.bfloat16))
    assert torch.equal(lse, torch.zeros_like(lse))


def test_compile_decode_step_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) of a decode step (append + attention, paged, ALiBi, sinks)
    gives eager's out, lse and cache contents bitwise, reads nothing on the host while it runs,
    and a second step with new lengths reuses the graph."""
    q, kc, vc, k_new, v_new, table = make_cache(2, 1, 4, 2, 16, 48, [20, 33], s_new=1, page=16)
    slopes, sinks = gen_slopes(4, device=q.device), torch.randn(4, device=q.device)

    def step(q, kc, vc, k_new, v_new, seqlens):
        out, lse = flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table, causal=True,
                                           alibi_slopes=slopes, sinks=sinks, num_splits=2, return_lse=True)
        return out * 2, lse

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)

    def host_read(self, *args, **kwargs):
        raise AssertionError("a device value was read on the host")

    kc_e, vc_e, kc_c, vc_c = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    for lengths in ([20, 33], [21, 34]):  # two decode steps, the caches carried over
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
        want = step(q, kc_e, vc_e, k_new, v_new, seqlens)
        with torch.no_grad(), monkeypatch.context() as m:
            for name in ("tolist", "item", "__bool__"):
                m.setattr(torch.Tensor, name, host_read)
            got = compiled(q, kc_c, vc_c, k_new, v_new, seqlens)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        assert torch.equal(kc_c.nan_to_num(7.0), kc_e.nan_to_num(7.0)) and torch.equal(vc_c.nan_to_num(7.0), vc_e.nan_to_num(7.0))
    assert counter.frame_count == 1


def test_compile_layer_decode_step_matches_eager():
    """A 'triton' layer's decode step (concatenated past_key_value, the kvcache op) under
    torch.compile(fullgraph=True) equals eager bitwise."""
    from tritonflash.layers import GroupedQueryAttention

    layer = GroupedQueryAttention(64, 4, 2, attn_impl="triton", device=DEVICE)
    x = torch.randn(1, 6, 64, device=DEVICE)
    slopes = gen_slopes(4, device=DEVICE)

    def step(x_new, past):
        return layer(x_new, past_key_value=past, alibi_slopes=slopes)[0]

    with torch.no_grad():
        _, _, past = layer(x[:, :5], alibi_slopes=slopes)
        want = step(x[:, 5:], past)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x[:, 5:], past)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 16, 64, 256])
@pytest.mark.parametrize("nheads_k", [8, 1])
def test_gpu_realistic(page, nheads_k):
    b, h, d, cap = 4, 32, 128, 4096
    lengths = [4095, 1000, 1, 2500]
    q, kc, vc, k_new, v_new, table = make_cache(b, 1, h, nheads_k, d, cap, lengths, torch.bfloat16, s_new=1, page=page)
    if table is None:
        poison(kc, vc, [n + 1 for n in lengths])
    kw = dict(block_table=table, causal=True, alibi_slopes=gen_slopes(h, device=q.device))
    outs = [check(q, kc, vc, k_new, v_new, lengths=lengths, num_splits=ns, check_cache=ns == 0, **kw)[0] for ns in (0, 1, 16)]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
    for ns, out in zip((0, 1, 16), outs):
        kc2, vc2 = kc.clone(), vc.clone()
        assert torch.equal(out, flash_attn_with_kvcache(q, kc2, vc2, k_new, v_new, cache_seqlens=seqlens, num_splits=ns, **kw))


@pytest.mark.gpu
def test_gpu_every_feature_sq4():
    b, sq, h, hk, d, cap = 3, 4, 16, 4, 64, 2048
    lengths = [2000, 700, 0]
    q, kc, vc, k_new, v_new, table = make_cache(b, sq, h, hk, d, cap, lengths, torch.float16, s_new=4, page=128)
    check(q, kc, vc, k_new, v_new, lengths=lengths, block_table=table, causal=True, window_size=(512, 0), softcap=30.0,
          sinks=torch.randn(h, device=q.device), bias=torch.randn(b, h, sq, cap, device=q.device),
          alibi_slopes=gen_slopes(h, device=q.device))
