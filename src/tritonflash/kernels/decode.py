"""KV-cache decoding (``flash_attn_with_kvcache``): split-KV attention of a few query rows
over a contiguous or paged cache, then an LSE merge of the splits.

One program per (split, query-row block, batch, kv head). Its M dimension is every query
head of the kv head's GQA group times the query rows (row r: query ``r // GROUP``, head
``kv_head * GROUP + r % GROUP``), so MQA/GQA decoding reads each K/V tile once for the whole
group. The key range of the rows (``common._key_range``, aligned to the sequence's valid
length L = ``seqlens_k[b]``) is cut into ``NUM_SPLITS`` equal runs of key blocks; each
program stores its partial (out normalised by its own sum, fp32) and its LSE, and the
``_combine_splits`` kernel merges them (with the sinks) in a fixed order into the output:
deterministic for a given number of splits. The split count is a runtime argument (no
recompile as a cache grows) chosen by ``choose_splits`` for the GPU's program slots.

The score is ``common._score``/``_visible`` with a ``ScoreCtx`` whose ALiBi slope is a
per-row [M, 1] column and whose bias pointer a per-row [M] vector (the rows of one program
belong to different query heads). Sinks enter only the merge (once per row, not per split).

Paged caches: key j of sequence b is slot ``j % PAGE`` of physical block
``block_table[b, j // PAGE]``; BLOCK_N divides PAGE, so a key tile never straddles two blocks.
Keys at or past L are never loaded (masked loads), so a cache's unused slots may hold anything.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (
    LN2,
    LOG2E,
    NO_FEATURES,
    Problem,
    ScoreCtx,
    _cast,
    _dot,
    _finite_rows,
    _key_range,
    _load_rows,
    _score,
    _shift,
    _visible,
    launch_meta,
)
from .configs import INTERPRET, device_properties

# Largest key tile; the tile is the largest power of two <= this that divides the page size.
MAX_BLOCK_N = 16 if INTERPRET else 128
# Rows (query heads of a group x query rows) per program; more rows take more programs.
MAX_BLOCK_M = 32 if INTERPRET else 64
MAX_SPLITS = 128
MIN_SPLIT_TILES = 4  # key tiles per split at least (fewer: the merge's traffic outweighs the split)
DECODE_WARPS = 4
DECODE_STAGES = 3


@triton.jit
def _decode_ctx(args, off_b, off_hk, heads, VAR: tl.constexpr):
    """``ScoreArgs`` resolved for the rows of one decode program: ``heads`` ([M], int64) is
    each row's query head. The ALiBi slope is an [M, 1] column and the bias pointer an [M]
    vector (one per row); sinks are merged after the splits (-inf here)."""
    slope = 0.0
    if VAR.HAS_ALIBI:
        slope = tl.load(args.slopes + off_b * args.stride_slopes_b + heads * args.stride_slopes_h).to(tl.float32) * -LOG2E
        slope = slope[:, None]
    bias_ptr = args.bias
    if VAR.HAS_BIAS:
        bias_ptr = args.bias + off_b * args.stride_bias_b + heads * args.stride_bias_h
    return ScoreCtx(args.qk_scale, slope, bias_ptr, args.stride_bias_m, args.stride_bias_n, args.kpm, args.window_left,
                    args.window_right, args.softcap, float("-inf"), off_b.to(tl.int32), off_hk.to(tl.int32), 0,
                    args.dropout_threshold, args.dropout_scale, args.amask, args.stride_amask_m, args.stride_amask_n)


@triton.jit
def _kv_tiles(K, V, stride_k, stride_v, BlockTable, stride_bt, off_b, cache_row, off_hk, start_n, PAGE: tl.constexpr):
    """The K and V ``_slice``s whose row 0 is logical key ``start_n`` of this sequence."""
    if PAGE > 0:
        phys = tl.load(BlockTable + off_b * stride_bt[0] + (start_n // PAGE) * stride_bt[1]).to(tl.int64)
        slot = start_n % PAGE
        k_base = K + phys * stride_k[0] + _shift(slot, stride_k[1]) + off_hk * stride_k[2]
        v_base = V + phys * stride_v[0] + _shift(slot, stride_v[1]) + off_hk * stride_v[2]
    else:
        k_base = K + cache_row * stride_k[0] + _shift(start_n, stride_k[1]) + off_hk * stride_k[2]
        v_base = V + cache_row * stride_v[0] + _shift(start_n, stride_v[1]) + off_hk * stride_v[2]
    return (k_base, (stride_k[1], stride_k[3])), (v_base, (stride_v[1], stride_v[3]))


@triton.jit
def _decode_inner(acc, l_i, m_i, q, K, V, stride_k, stride_v, BlockTable, stride_bt, off_b, cache_row, off_hk, ctx, qi,
                  offs_d, lo, hi, seqlen_q, seqlen_k, head_dim, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MASK: tl.constexpr,
                  VAR: tl.constexpr):
    """The forward's online-softmax step (``forward._attn_fwd_inner``) over key blocks [lo, hi)
    of one sequence; ``qi`` ([M]) is each row's query index, ``seqlen_k`` the valid length L."""
    offs_t = tl.arange(0, BLOCK_N)
    rows = qi[:, None]
    bias = 0.0
    if VAR.HAS_BIAS:
        # The bias tile is loaded one block ahead (a register double buffer: Triton's pipeliner
        # stages only the dots' operands), so its latency overlaps the previous block's work.
        brow = ctx.bias_ptr[:, None] + rows.to(tl.int64) * ctx.stride_bias_m
        cols0 = lo + offs_t[None, :]
        bias = tl.load(brow + cols0.to(tl.int64) * ctx.stride_bias_n, mask=(cols0 < hi) & (cols0 < seqlen_k), other=0.0)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASK else None):
        k_slc, v_slc = _kv_tiles(K, V, stride_k, stride_v, BlockTable, stride_bt, off_b, cache_row, off_hk, start_n, PAGE)
        offs_n = start_n + offs_t
        cols = offs_n[None, :]
        # Keys at or past L (only in masked blocks) are not loaded: read as 0.
        k = _load_rows(k_slc, offs_t, seqlen_k - start_n, offs_d, head_dim, MASK_ROWS=MASK, VAR=VAR)
        qk = _dot(q, tl.trans(k), None, VAR)
        bias_next = bias
        if VAR.HAS_BIAS:
            nxt = cols + BLOCK_N
            bias_next = tl.load(brow + nxt.to(tl.int64) * ctx.stride_bias_n, mask=(nxt < hi) & (nxt < seqlen_k), other=0.0)
        vis = _visible(rows, cols, seqlen_q, seqlen_k, True, ctx, MASK=MASK, VAR=VAR)
        s = _score(qk, bias, rows, cols, seqlen_q, seqlen_k, vis, ctx, MASK=MASK, VAR=VAR)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        v = _load_rows(v_slc, offs_t, seqlen_k - start_n, offs_d, head_dim, MASK_ROWS=MASK, VAR=VAR)
        if MASK:
            # As in the forward: a non-finite value of an invisible key never reaches a row.
            v, bad = _finite_rows(v)
            p = tl.where(bad[None, :] & vis, float("nan"), p)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(_cast(p, v.dtype, VAR.INTERP_BF16), v, acc, VAR)
        m_i = m_new
        bias = bias_next
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "num_splits"])
def _attn_decode(
    Q, K, V, OutP, LseP, SeqlensK, CacheBatch, BlockTable,
    score,  # ScoreArgs
    stride_q, stride_k, stride_v, stride_op, stride_lp, stride_bt,
    nheads_k, seqlen_q, head_dim, m_blocks, num_splits,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, HAS_CB: tl.constexpr, VAR: tl.constexpr,
):
    """q (batch, sq, nheads, d); K/V the cache, (batch_cache, seqlen_cache, nheads_k, d) or
    paged (num_blocks, PAGE, nheads_k, d) with ``BlockTable`` (batch, max_blocks) (PAGE > 0);
    ``SeqlensK`` (batch,) int32 valid keys; ``CacheBatch`` (batch,) int32 cache rows (HAS_CB);
    OutP (splits, batch, sq, nheads, d) and LseP (splits, batch, sq, nheads) fp32 partials.
    ``BLOCK_Q``: a power of two >= the query rows one program spans (for ``_key_range``).
    ``num_splits`` is a runtime value: a decode loop whose split count changes with the growing
    cache length does not recompile."""
    tl.static_assert(VAR.BLOCK_D >= 16)
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    pid = tl.program_id(0)
    split = pid % num_splits
    mb = (pid // num_splits) % m_blocks
    bh = (pid // num_splits // m_blocks).to(tl.int64)
    off_b = bh // nheads_k
    off_hk = bh % nheads_k
    seqlen_k = tl.load(SeqlensK + off_b)
    if HAS_CB:
        cache_row = tl.load(CacheBatch + off_b).to(tl.int64)
    else:
        cache_row = off_b

    offs_r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < GROUP * seqlen_q
    # Padding rows alias the last query row: computed, never stored.
    qi = tl.where(row_ok, offs_r // GROUP, seqlen_q - 1)
    heads = off_hk * GROUP + (offs_r % GROUP).to(tl.int64)
    ctx = _decode_ctx(score, off_b, off_hk, heads, VAR)
    BLOCK_D: tl.constexpr = VAR.BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + off_b * stride_q[0] + qi[:, None].to(tl.int64) * stride_q[1] + heads[:, None] * stride_q[2] + offs_d[None, :] * stride_q[3]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    # The key blocks any row of this program may see, cut into num_splits runs of blocks.
    start_q = (mb * BLOCK_M) // GROUP
    lo, full_lo, full_hi, hi = _key_range(start_q, seqlen_q, seqlen_k, ctx, BLOCK_Q, BLOCK_N, VAR=VAR)
    per = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits) * BLOCK_N
    s_lo = tl.minimum(lo + split * per, hi)
    s_hi = tl.minimum(s_lo + per, hi)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if VAR.MASK_BOTH_EDGES:
        acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, K, V, stride_k, stride_v, BlockTable, stride_bt, off_b, cache_row, off_hk,
                                      ctx, qi, offs_d, s_lo, tl.minimum(s_hi, full_lo), seqlen_q, seqlen_k, head_dim, BLOCK_N,
                                      PAGE, MASK=True, VAR=VAR)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, K, V, stride_k, stride_v, BlockTable, stride_bt, off_b, cache_row, off_hk,
                                  ctx, qi, offs_d, tl.maximum(s_lo, full_lo), tl.minimum(s_hi, full_hi), seqlen_q, seqlen_k,
                                  head_dim, BLOCK_N, PAGE, MASK=False, VAR=VAR)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, K, V, stride_k, stride_v, BlockTable, stride_bt, off_b, cache_row, off_hk,
                                  ctx, qi, offs_d, tl.maximum(s_lo, full_hi), s_hi, seqlen_q, seqlen_k, head_dim, BLOCK_N,
                                  PAGE, MASK=True, VAR=VAR)

    # A split with no visible key: out 0, lse -inf (weight 0 in the merge).
    dead = l_i == 0.0
    acc = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(tl.where(dead, 1.0, l_i))) * LN2)
    row_off = split.to(tl.int64) * stride_op[0] + off_b * stride_op[1] + qi.to(tl.int64) * stride_op[2] + heads * stride_op[3]
    tl.store(OutP + row_off[:, None] + offs_d[None, :] * stride_op[4], acc, mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
    lse_off = split.to(tl.int64) * stride_lp[0] + off_b * stride_lp[1] + qi.to(tl.int64) * stride_lp[2] + heads * stride_lp[3]
    tl.store(LseP + lse_off, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits", "seqlen_q"])
def _combine_splits(OutP, LseP, Sinks, Out, Lse, stride_op, stride_lp, stride_o, stride_lse, num_splits, seqlen_q, nheads,
                    head_dim, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
                    INTERP_BF16: tl.constexpr):
    """One program per (batch, query row, head): lse = logsumexp over the splits' LSEs (and the
    head's sink logit), out = sum over splits, in split order, of exp(lse_s - lse) * out_s,
    stored in Out's dtype. Fixed order, no atomics: the same bits for the same ``num_splits``.
    A row whose every split is empty gets out 0 and lse -inf (with a sink: lse = the sink)."""
    pid = tl.program_id(0)
    h = pid % nheads
    i = (pid // nheads) % seqlen_q
    b = (pid // nheads // seqlen_q).to(tl.int64)
    row_lp = b * stride_lp[1] + i * stride_lp[2] + h * stride_lp[3]
    row_op = b * stride_op[1] + i * stride_op[2] + h * stride_op[3]
    offs_s = tl.arange(0, SPLITS_P2)
    lse_s = tl.load(LseP + row_lp + offs_s * stride_lp[0], mask=offs_s < num_splits, other=float("-inf"))
    top = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + h).to(tl.float32)
        top = tl.maximum(top, sink)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(lse_s - top_safe), 0)
    if HAS_SINKS:
        total += tl.exp(sink - top_safe)
    lse = tl.where(total > 0.0, tl.log(tl.where(total > 0.0, total, 1.0)) + top_safe, float("-inf"))
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.exp(tl.load(LseP + row_lp + s * stride_lp[0]) - lse_safe)  # 0 for an empty split
        acc += w * tl.load(OutP + row_op + s * stride_op[0] + offs_d * stride_op[4], mask=offs_d < head_dim, other=0.0)
    tl.store(Out + b * stride_o[0] + i * stride_o[1] + h * stride_o[2] + offs_d * stride_o[3], _cast(acc, Out.dtype.element_ty, INTERP_BF16),
             mask=offs_d < head_dim)
    tl.store(Lse + b * stride_lse[0] + h * stride_lse[1] + i * stride_lse[2], lse)


def _tile_smem(block_n: int, block_d: int, elem_size: int, block_m: int = MAX_BLOCK_M) -> int:
    """Shared memory of one decode program, an estimate: the pipelined K and V tiles
    ((DECODE_STAGES - 1) of each), fp32 layout-conversion scratch for the score and output
    tiles, and q (compiled for sm_90, d 128, 128-key tiles: 136 KB with 16 rows, 208 KB with
    64, 216 KB with 64 rows and a bias; this gives 148 KB and 208 KB). sm_90, sm_80 and sm_86
    compiles of d 64/128/256 x 16/64 rows x bias or not all fit the limits it chose for."""
    return ((DECODE_STAGES - 1) * 2 * block_n * block_d + block_m * block_d) * elem_size + block_m * (block_n + block_d) * 4


def _device_facts(index: int) -> tuple[int, int, int]:
    """(SM count, shared memory a block may opt into, shared memory per SM) of a CUDA device."""
    props = device_properties(index)
    per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 100 * 1024)
    per_block = int(getattr(props, "shared_memory_per_block_optin", 0) or per_sm - 1024)
    return props.multi_processor_count, per_block, per_sm


def _shared_limit(device: torch.device) -> int:
    """Shared memory a program may use: the CUDA device's opt-in limit; elsewhere (compile-only
    checks for sm_90, the interpreter) H100's."""
    return _device_facts(device.index or 0)[1] if device.type == "cuda" else 232448


def key_tile(page_size: int | None, block_d: int = 128, elem_size: int = 2, shared_limit: int = 232448,
             block_m: int = MAX_BLOCK_M) -> int:
    """The key tile: the largest power of two <= MAX_BLOCK_N whose program fits
    ``shared_limit`` bytes of shared memory (d 128 on H100/H200: 128; d 256: 64) and, for a
    paged cache, that divides the page size (a multiple of 16)."""
    tile = MAX_BLOCK_N
    while tile > 16 and _tile_smem(tile, block_d, elem_size, block_m) > shared_limit:
        tile //= 2
    while page_size and page_size % tile:
        tile //= 2
    return tile


def choose_splits(batch: int, nheads_k: int, m_blocks: int, max_keys: int, block_n: int, device: torch.device,
                  block_d: int = 128, elem_size: int = 2, paged: bool = False, block_m: int = 16) -> int:
    """num_splits=0, from the GPU's program slots (SMs x programs resident per SM, from shared
    memory). Fewer programs than slots: about one full wave (two for a paged cache, whose
    table lookups hide less latency), each split at least MIN_SPLIT_TILES key tiles of the
    longest possible sequence ``max_keys`` (a host-side bound: the cache's capacity unless the
    lengths are host ints). More: the smallest split count within 5% of the best wave
    efficiency (waves / ceil(waves)), at most 4. Tuned on an H200 (docs/perf-notes.md,
    issue 14). Under the interpreter, at most 2. A function of its arguments only, so the same
    call always splits alike."""
    tiles = max(1, triton.cdiv(max_keys, block_n))
    programs = batch * nheads_k * m_blocks
    if device.type != "cuda":
        return max(1, min(2, tiles // 2))
    sms, _, per_sm = _device_facts(device.index or 0)
    slots = sms * max(1, min(16, per_sm // _tile_smem(block_n, block_d, elem_size, block_m)))
    most = max(1, min(MAX_SPLITS, tiles // MIN_SPLIT_TILES))
    if programs < slots:
        return max(1, min(most, (2 if paged else 1) * slots // programs))
    effs = [(programs * s / slots) / math.ceil(programs * s / slots) for s in range(1, min(most, 4) + 1)]
    return next(s for s, e in enumerate(effs, 1) if e >= 0.95 * max(effs))


def attn_decode(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, bias, alibi_slopes, causal, softmax_scale,
                features=NO_FEATURES, num_splits=0, max_keys=None):
    """Decode attention on validated, normalised inputs: q (b, sq, h, d) (unit stride on d),
    k/v caches (unit stride on d) already holding the appended tokens, ``seqlens_k`` (b,)
    int32 valid lengths, ``cache_batch_idx`` (b,) int32 or None, ``block_table`` (b, max_blocks)
    int32 or None, bias a rank-4 view or None, alibi_slopes (1 or b, h) fp32 or None,
    ``features`` window/softcap/sinks ((h,) contiguous, merged by the combine kernel). Two
    launches: the split kernel's fp32 partials, then their merge. Returns out (b, sq, h, d) in
    q's dtype and lse (b, h, sq) fp32."""
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    page = 0 if block_table is None else k_cache.shape[1]
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * page
    pb = Problem(batch, seqlen_q, capacity, nheads, nheads_k, head_dim)
    # No key padding mask; the sinks are merged by the combine kernel, not passed to the split kernel.
    meta = launch_meta(pb, q, causal, bias, alibi_slopes, None, softmax_scale, (q,), features._replace(sinks=None))
    rows = group * seqlen_q
    block_m = max(16, min(triton.next_power_of_2(rows), MAX_BLOCK_M))
    block_n = key_tile(page or None, meta.variant.BLOCK_D, q.element_size(), _shared_limit(q.device), block_m)
    m_blocks = triton.cdiv(rows, block_m)
    block_q = min(block_m, triton.next_power_of_2(seqlen_q))
    if num_splits == 0:
        num_splits = choose_splits(batch, nheads_k, m_blocks, capacity if max_keys is None else max_keys, block_n, q.device,
                                   meta.variant.BLOCK_D, q.element_size(), paged=page > 0, block_m=block_m)
    # The merge indexes the fp32 partials (splits, b, sq, h, d) with int32 split offsets: cap the
    # split count so they stay under 2^31 elements (only an explicit large num_splits with a
    # long chunk of query rows gets there; the result is then that of the capped count).
    num_splits = max(1, min(num_splits, MAX_SPLITS, (2**31 - 1) // (batch * seqlen_q * nheads * head_dim)))
    out_p = torch.empty((num_splits, batch, seqlen_q, nheads, head_dim), device=q.device, dtype=torch.float32)
    lse_p = torch.empty((num_splits, batch, seqlen_q, nheads), device=q.device, dtype=torch.float32)
    bt = q if block_table is None else block_table
    grid = (num_splits * m_blocks * batch * nheads_k,)
    _attn_decode[grid](
        q, k_cache, v_cache, out_p, lse_p, seqlens_k, q if cache_batch_idx is None else cache_batch_idx, bt,
        meta.score,
        q.stride(), k_cache.stride(), v_cache.stride(), out_p.stride(), lse_p.stride(),
        (0, 0) if block_table is None else block_table.stride(),
        nheads_k, seqlen_q, head_dim, m_blocks, num_splits,
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, PAGE=page,
        HAS_CB=cache_batch_idx is not None, VAR=meta.variant,
        num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
    )
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, nheads, seqlen_q), device=q.device, dtype=torch.float32)
    sinks = features.sinks
    _combine_splits[(batch * seqlen_q * nheads,)](
        out_p, lse_p, q if sinks is None else sinks, out, lse,
        out_p.stride(), lse_p.stride(), out.stride(), lse.stride(), num_splits, seqlen_q, nheads, head_dim,
        SPLITS_P2=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=meta.variant.BLOCK_D, HAS_SINKS=sinks is not None,
        INTERP_BF16=meta.variant.INTERP_BF16, num_warps=1,
    )
    return out, lse
