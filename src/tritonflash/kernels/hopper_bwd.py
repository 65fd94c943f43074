"""Hopper (sm_90) dK/dV pass in Gluon, warp-specialised (issue 15, item 2). ``attn_bwd`` runs it
(``backward._hopper_bwd_module``) by default for the calls with a bias that ``AUTO_BIAS`` lists
(causal at d64, every one at d128: its BIAS variant measured 2-12% faster on the whole backward
than the ``tl`` pass on an H200, docs/perf-notes.md change 21), and for every call it covers with
``TRITONFLASH_HOPPER_BWD=1``; without a bias it measured at parity with the ``tl`` pass (change
16), so those calls keep the ``tl`` pass by default. Verified on an H200 with and without a bias:
tests/test_hopper_bwd.py.

It computes what ``backward._attn_bwd_dkdv`` computes for the calls ``hopper_bwd_supports``
accepts (no ALiBi, key padding, varlen or score feature; no bias, or a 16-bit one with rows in
the BIAS variant), deterministically (each CTA owns its dK/dV rows, no atomics, one query
order); dQ stays with the ``tl`` pass.

Structure (one CTA per 128 keys of one (batch, kv head)):
- a producer partition (1 warp) loads the two 64-key halves of K and V once, then for every
  query head of the GQA group and every query block the CTA's keys can see, the 64-row Q and dO
  tiles by TMA into a STAGES-deep ring (a ready mbarrier per stage, expect-tx; an empty mbarrier
  with one arrival per consumer);
- two consumer warpgroups, each owning 64 keys, work on transposed tiles ([keys, queries]) so
  that no wgmma result is transposed: S^T = K Q^T and dP^T = V dO^T (both operands in shared
  memory, issued back to back, async), P^T = exp2(S^T * scale * log2 e - lse * log2 e) (zero
  where causal masking hides the query), dS^T = P^T (dP^T - delta), then dV += P^T dO and
  dK += dS^T Q with P^T and dS^T from registers;
- epilogue: dK * scale and dV through the warpgroup's own K/V buffers and TMA stores (clipped
  at seqlen_k).

Rows past the ends. Q/dO rows past seqlen_q are zero-filled by TMA and their lse is read as +inf
(delta as 0), so P^T and dS^T are exactly 0 there. Keys past seqlen_k are zero-filled too; their
P^T, dS^T only reach their own dK/dV rows, which the TMA store drops. A second key half wholly
past seqlen_k is not loaded: that warpgroup computes on whatever its buffers hold, in step with
the other, and stores nothing.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .hopper import GL_DTYPES, LOG2E, WARP_SPECIALISED, _bias_descriptor, _bias_ok, _descriptor, _tma_box, _tma_ok, on_sm90, plain_scores

BLOCK_N = 128  # keys per CTA (two warpgroups x 64)
HALF_N = 64  # keys per consumer warpgroup
BLOCK_M = 64  # query rows per step
STAGES = gl.constexpr(2)
HEAD_DIMS = (64, 128)
# Where attn_bwd takes this pass by default (TRITONFLASH_HOPPER_BWD unset or auto): calls with a
# bias (the BIAS variant) whose (head dim, causal) is in this set, where it measured faster than
# the tl pass on an H200 (docs/perf-notes.md, change 21: 2-12% on the whole backward). Without a
# bias it is at parity (change 16), and non-causal d64 with a bias 1-2% slower: those calls take
# it with TRITONFLASH_HOPPER_BWD=1.
AUTO_BIAS = frozenset({(64, True), (128, True), (128, False)})


@gluon.jit
def _query_blocks(n0, seqlen_q, seqlen_k, BM: gl.constexpr, CAUSAL: gl.constexpr):
    """(first, end) query blocks of BM rows that see any of the keys from n0 on."""
    first = 0
    if CAUSAL:
        # Query i sees key j iff j <= i + seqlen_k - seqlen_q; n0 - (seqlen_k - seqlen_q) < seqlen_q.
        first = gl.maximum(n0 - (seqlen_k - seqlen_q), 0) // BM
    return first, (seqlen_q + BM - 1) // BM


@gluon.jit
def _bwd_producer_impl(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar,
                       b, n0, hk, kv_group, first, end, seqlen_k, bias, BIAS: gl.constexpr):
    """The producer; BIAS: ``bias`` = (bias_desc, b_smem), and every step also loads the bias
    tile of its 64 query rows for each key half ((1, 1, 64, 64) boxes) into b_smem[2 * s + half]."""
    NS: gl.constexpr = q_smem.shape[0]
    BM: gl.constexpr = q_smem.shape[1]
    HN: gl.constexpr = k_smem.shape[1]
    KV_BYTES: gl.constexpr = k_desc.block_type.nbytes
    # The second key half only if it has a real key (a wholly out-of-bounds box is not relied on).
    second = n0 + HN < seqlen_k
    mbarrier.expect(kv_bar, 4 * KV_BYTES, pred=second)
    mbarrier.expect(kv_bar, 2 * KV_BYTES, pred=n0 + HN >= seqlen_k)
    tma.async_copy_global_to_shared(k_desc, [b, n0, hk, 0], kv_bar, _tma_box(k_smem.index(0)))
    tma.async_copy_global_to_shared(v_desc, [b, n0, hk, 0], kv_bar, _tma_box(v_smem.index(0)))
    tma.async_copy_global_to_shared(k_desc, [b, n0 + HN, hk, 0], kv_bar, _tma_box(k_smem.index(1)), pred=second)
    tma.async_copy_global_to_shared(v_desc, [b, n0 + HN, hk, 0], kv_bar, _tma_box(v_smem.index(1)), pred=second)
    per_head = end - first
    for t in range(kv_group * per_head):
        h = hk * kv_group + t // per_head
        m0 = (first + t % per_head) * BM
        s = t % NS
        # Fresh barrier: waiting for parity 1 passes at once (the producer starts one phase ahead).
        mbarrier.wait(empty_bar.index(s), ((t // NS) & 1) ^ 1)
        if BIAS:
            bias_desc, b_smem = bias
            QDO_BYTES: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes
            B_BYTES: gl.constexpr = bias_desc.block_type.nbytes
            mbarrier.expect(ready_bar.index(s), QDO_BYTES + 2 * B_BYTES, pred=second)
            mbarrier.expect(ready_bar.index(s), QDO_BYTES + B_BYTES, pred=n0 + HN >= seqlen_k)
            # A broadcast batch or head dim of the bias has one element in the descriptor.
            bb = gl.minimum(b, bias_desc.shape[0] - 1)
            bh = gl.minimum(h, bias_desc.shape[1] - 1)
            tma.async_copy_global_to_shared(bias_desc, [bb, bh, m0, n0], ready_bar.index(s),
                                            b_smem.index(2 * s).reshape([1, 1, BM, HN]))
            tma.async_copy_global_to_shared(bias_desc, [bb, bh, m0, n0 + HN], ready_bar.index(s),
                                            b_smem.index(2 * s + 1).reshape([1, 1, BM, HN]), pred=second)
        else:
            mbarrier.expect(ready_bar.index(s), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, m0, h, 0], ready_bar.index(s), _tma_box(q_smem.index(s)))
        tma.async_copy_global_to_shared(do_desc, [b, m0, h, 0], ready_bar.index(s), _tma_box(do_smem.index(s)))


@gluon.jit
def _bwd_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar,
                  b, n0, hk, kv_group, first, end, seqlen_k):
    _bwd_producer_impl(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar,
                       b, n0, hk, kv_group, first, end, seqlen_k, None, False)


@gluon.jit
def _bwd_producer_bias(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar,
                       b, n0, hk, kv_group, first, end, seqlen_k, bias_desc, b_smem):
    _bwd_producer_impl(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar,
                       b, n0, hk, kv_group, first, end, seqlen_k, (bias_desc, b_smem), True)


@gluon.jit
def _bwd_consumer(WG: gl.constexpr, dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar,
                  lse_ptr, delta_ptr, b, n0, hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale,
                  CAUSAL: gl.constexpr, b_smem, BIAS: gl.constexpr):
    """One consumer warpgroup (WG: its 64 keys); BIAS: b_smem holds each step's bias tiles
    (_bwd_producer_impl), read transposed ([keys, queries]) in the score layout and added to
    S^T; a row whose lse is -inf (every visible key -inf biased) then gets P = 0."""
    NS: gl.constexpr = q_smem.shape[0]
    BM: gl.constexpr = q_smem.shape[1]
    D: gl.constexpr = q_smem.shape[2]
    HN: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    LOG2E_C: gl.constexpr = 1.4426950408889634

    k = k_smem.index(WG)
    v = v_smem.index(WG)
    key0 = n0 + WG * HN  # this warpgroup's first key
    dk = gl.zeros([HN, D], gl.float32, acc_layout)
    dv = gl.zeros([HN, D], gl.float32, acc_layout)
    cols = gl.arange(0, BM, layout=col_layout)
    keys = gl.arange(0, HN, layout=gl.SliceLayout(1, s_layout))
    mbarrier.wait(kv_bar, 0)
    per_head = end - first
    for t in range(kv_group * per_head):
        h = hk * kv_group + t // per_head
        m0 = (first + t % per_head) * BM
        s = t % NS
        # lse and delta of the block's query rows, read before the wait (their latency overlaps
        # the TMA); rows past seqlen_q: lse +inf and delta 0, so P and dS are 0 there.
        stat = (b * nheads + h).to(gl.int64) * seqlen_q + m0
        in_q = (m0 + cols) < seqlen_q
        lse2 = gl.load(lse_ptr + stat + cols, mask=in_q, other=float("inf")) * LOG2E_C
        if BIAS:
            lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)
        delta = gl.load(delta_ptr + stat + cols, mask=in_q, other=0.0)
        mbarrier.wait(ready_bar.index(s), (t // NS) & 1)
        q = q_smem.index(s)
        do = do_smem.index(s)
        # Zero accumulators made here, not kept across the loop (32 registers each at d128).
        st_tok = warpgroup_mma(k, q.permute((1, 0)), gl.zeros([HN, BM], gl.float32, s_layout), use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v, do.permute((1, 0)), gl.zeros([HN, BM], gl.float32, s_layout), use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok,))
        if BIAS:
            # bias^T of this warpgroup's keys: the (64 queries, 64 keys) tile read as (keys, queries).
            bt = b_smem.index(2 * s + WG).permute((1, 0)).load(s_layout).to(gl.float32)
            pt = gl.exp2(st * qk_scale + bt * LOG2E_C - gl.expand_dims(lse2, 0))
        else:
            pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
        if CAUSAL:
            # Key j (row) is visible to query i (column) iff i + seqlen_k - seqlen_q - j >= 0.
            # (a broadcast compare of a key vector and a query vector: no [keys, queries] index tile)
            pt = gl.where(gl.expand_dims(keys, 1) <= gl.expand_dims(cols + (m0 + seqlen_k - seqlen_q - key0), 0), pt, 0.0)
        # dV's wgmma runs while dS is computed (wgmma groups complete in order: waiting for
        # dP^T with one group outstanding leaves dV's running).
        dv_tok = warpgroup_mma(gl.convert_layout(pt.to(q.dtype), a_layout), do, dv, is_async=True)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt_tok,))
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        dk_tok = warpgroup_mma(gl.convert_layout(dst.to(q.dtype), a_layout), q, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok))
        gl.thread_barrier()  # every warp of the group is past its wait before the stage is released
        mbarrier.arrive(empty_bar.index(s), count=1)

    # K and V of this warpgroup are no longer read: their buffers stage dK and dV for the TMA
    # stores, which drop the rows past seqlen_k.
    k.store((dk * sm_scale).to(k.dtype))
    v.store(dv.to(v.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [b, key0, hk, 0], _tma_box(k))
    tma.async_copy_shared_to_global(dv_desc, [b, key0, hk, 0], _tma_box(v))
    tma.store_wait(pendings=0)


@gluon.jit
def _bwd_consumer0(dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b, n0,
                   hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _bwd_consumer(0, dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b, n0,
                  hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL, None, False)


@gluon.jit
def _bwd_consumer1(dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b, n0,
                   hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _bwd_consumer(1, dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b, n0,
                  hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL, None, False)


# The BIAS variant's consumers (BIAS literal: a flag passed through warp_specialize is not a real
# constexpr in Gluon 3.6, see hopper.py).
@gluon.jit
def _bwd_consumer0_bias(dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b,
                        n0, hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL: gl.constexpr, b_smem):
    _bwd_consumer(0, dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b, n0,
                  hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL, b_smem, True)


@gluon.jit
def _bwd_consumer1_bias(dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b,
                        n0, hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL: gl.constexpr, b_smem):
    _bwd_consumer(1, dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b, n0,
                  hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL, b_smem, True)


@gluon.jit
def _stream_barriers(NS: gl.constexpr):
    """The mbarriers of a pass that loads some tiles once and streams the rest through an NS-deep
    ring, initialised and fenced: ``once`` (one expect-tx arrival), per stage ``ready`` (the
    producer's expect-tx) and ``empty`` (2 arrivals: one per consumer warpgroup). Also used by
    hopper_dbias.py."""
    once = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(once, count=1)
    for i in gl.static_range(NS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    return once, ready, empty


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _hopper_attn_bwd_dkdv(
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc,  # 4-D (batch, seqlen, heads, head dim) TMA descriptors
    lse_ptr, delta_ptr,  # (batch, nheads, seqlen_q) fp32, contiguous
    seqlen_q, seqlen_k, nheads, nheads_k, kv_group, qk_scale, sm_scale,
    CAUSAL: gl.constexpr, P_WARPS: gl.constexpr, P_REGS: gl.constexpr, C_REGS: gl.constexpr,
    bias_desc=None,  # BIAS: 4-D (batch or 1, heads or 1, seqlen_q, seqlen_k), box (1, 1, 64, 64)
    BIAS: gl.constexpr = False,
):
    BM: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    HN: gl.constexpr = k_desc.block_type.shape[1]
    BN: gl.constexpr = 2 * HN
    # Key blocks of one (batch, kv head) adjacent: they stream the same Q/dO (L2); block 0 first,
    # which under causal masking sees the most query blocks.
    n_n = (seqlen_k + BN - 1) // BN
    pid = gl.program_id(0)
    n0 = (pid % n_n) * BN
    bhk = pid // n_n
    b = bhk // nheads_k
    hk = bhk % nheads_k
    first, end = _query_blocks(n0, seqlen_q, seqlen_k, BM, CAUSAL)

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HN, D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, D], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, HN, D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, HN, D], kv_layout)
    kv_bar, ready_bar, empty_bar = _stream_barriers(STAGES)

    consumer_args = (dk_desc, dv_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, b, n0,
                     hk, nheads, kv_group, first, end, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL)
    producer_args = (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready_bar, empty_bar,
                     b, n0, hk, kv_group, first, end, seqlen_k)
    if BIAS:
        # Per ring stage, the (64 queries, 64 keys) bias tile of each key half: 2 * 2 * 8 KB.
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, HN], dtype)
        b_smem = gl.allocate_shared_memory(dtype, [2 * STAGES, BM, HN], b_layout)
        gl.warp_specialize([
            (_bwd_consumer0_bias, consumer_args + (b_smem,)),
            (_bwd_consumer1_bias, consumer_args + (b_smem,)),
            (_bwd_producer_bias, producer_args + (bias_desc, b_smem)),
        ], [4, P_WARPS], [C_REGS, P_REGS])
    else:
        gl.warp_specialize([
            (_bwd_consumer0, consumer_args),
            (_bwd_consumer1, consumer_args),
            (_bwd_producer, producer_args),
        ], [4, P_WARPS], [C_REGS, P_REGS])


def backward_operands_ok(q, k, v, dout, lse, causal, *outputs) -> bool:
    """The operands a Gluon backward pass reads (and ``outputs`` it writes, like k): fp16/bf16
    (batch, seqlen, heads, head dim) tensors of one dtype, head dim 64/128, no empty dimension
    (TMA descriptors cannot have one; the tl passes launch nothing there), GQA heads, causal only
    with seqlen_k >= seqlen_q, all addressable by TMA, and a contiguous lse. Shared by
    ``hopper_bwd_supports`` and ``hopper_dbias.hopper_dbias_supports``."""
    if q.dim() != 4 or q.dtype not in GL_DTYPES or not all(t.dtype == q.dtype and t.dim() == 4 for t in (k, v, dout, *outputs)):
        return False
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if head_dim not in HEAD_DIMS or k.shape[3] != head_dim or v.shape != k.shape or k.shape[0] != batch or dout.shape != q.shape:
        return False
    if min(batch, seqlen_q, seqlen_k, nheads, nheads_k) < 1 or nheads % nheads_k:
        return False
    if (causal and seqlen_k < seqlen_q) or not lse.is_contiguous():
        return False
    return all(_tma_ok(t) for t in (q, k, v, dout, *outputs))


def hopper_bwd_supports(q, k, v, dout, dk, dv, lse, bias, alibi_slopes, key_padding_mask, causal, softmax_scale, varlen,
                        features, capability=None) -> bool:
    """Whether ``hopper_bwd_dkdv`` computes this ``attn_bwd`` call's dK/dV (its arguments,
    validated): sm_90 (``capability`` (major, minor), else q's device), no ALiBi, key padding,
    varlen or score feature, a positive softmax_scale, operands ``backward_operands_ok`` accepts,
    and no bias or one ``hopper._bias_ok`` accepts (q's dtype, a real (seqlen_q, seqlen_k) plane
    TMA can read: the BIAS variant; other biases, fp32 or row-less, take the tl pass). A bias
    gradient without a row dimension comes from the tl pass (attn_bwd checks that)."""
    if not on_sm90(q, capability) or alibi_slopes is not None or not softmax_scale > 0:
        return False
    if not plain_scores(key_padding_mask, varlen, features, causal):
        return False
    if not backward_operands_ok(q, k, v, dout, lse, causal, dk, dv):
        return False
    return bias is None or _bias_ok(bias, q, k.shape[1])


def hopper_bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, causal, softmax_scale, bias=None):
    """Fill dk, dv (like k) for a call ``hopper_bwd_supports`` accepted. lse, delta: (batch,
    nheads, seqlen_q) fp32 contiguous (natural-log lse from the forward, delta = rowsum(o * do));
    bias: the call's rank-4 bias view or None."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    grid = (triton.cdiv(seqlen_k, BLOCK_N) * batch * nheads_k,)
    _hopper_attn_bwd_dkdv[grid](
        q_desc=_descriptor(q, BLOCK_M),
        do_desc=_descriptor(dout, BLOCK_M),
        k_desc=_descriptor(k, HALF_N),
        v_desc=_descriptor(v, HALF_N),
        dk_desc=_descriptor(dk, HALF_N),
        dv_desc=_descriptor(dv, HALF_N),
        lse_ptr=lse,
        delta_ptr=delta,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        nheads=nheads,
        nheads_k=nheads_k,
        kv_group=nheads // nheads_k,
        qk_scale=float(softmax_scale) * LOG2E,
        sm_scale=float(softmax_scale),
        CAUSAL=bool(causal),
        bias_desc=None if bias is None else _bias_descriptor(bias, q.dtype, BLOCK_M, HALF_N),
        BIAS=bias is not None,
        **WARP_SPECIALISED,
    )
    return dk, dv
