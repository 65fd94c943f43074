"""Backward pass without atomics, so every gradient is deterministic.

1. ``_attn_bwd_preprocess``: delta = rowsum(out * dout) (fp32).
2. ``_attn_bwd_dkdv``: one program per (key block, batch*kv_head); loops over the query
   heads of its group and over query blocks, recomputing P from the saved LSE. Parallel over
   key blocks, so small batch*heads still fills the GPU. Also produces the per-key column
   sums of dS that a bias without a row dimension needs as its gradient.
3. ``_attn_bwd_dq``: one program per (query block, batch*head); loops over key blocks.
4. ``_attn_bwd_dbias``: the gradient of a bias with a row dimension, one program per tile
   of it, summing dS over the batches and heads the bias broadcasts along.

P and dS come from one helper (``_probs_ds``) in both orientations; the score, its mask and
the block ranges from ``common.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    NO_FEATURES,
    _bias_ptrs,
    _cast,
    _dot,
    _dropout_keep,
    _finite_rows,
    _key_keep,
    _key_range,
    _load_bias,
    _load_keys,
    _load_rows,
    _probs_ds,
    _ptr_offset,
    _query_range,
    _row_stats,
    _score_ctx,
    _shift,
    _slice,
    _span,
    _stat_ptr,
    _store_rows,
    _visible,
    launch_meta,
    problem,
)
from .configs import (
    BWD_DBIAS_CONFIGS,
    BWD_DKDV_CONFIGS,
    BWD_DQ_CONFIGS,
    BWD_KEY,
    DBIAS_KEY,
    FWD_KEY,
    INTERPRET,
    Launcher,
    env_mode,
    even_m,
    gluon_module,
    prune_bwd_dbias,
    prune_bwd_dkdv,
    prune_bwd_dq,
    seq_bucket,
    unclamped_bias,
)


@triton.jit(do_not_specialize=["seqlen_q"])
def _attn_bwd_preprocess(
    Out, DOut, Delta, CuSeqQ,
    stride_out, stride_dout, stride_delta,
    batch, nheads, seqlen_q, head_dim,
    BLOCK_M: tl.constexpr, VAR: tl.constexpr,
):
    sp = _span(tl.cdiv(seqlen_q, BLOCK_M), batch, nheads, seqlen_q, seqlen_q, CuSeqQ, CuSeqQ, REVERSE=False, VAR=VAR)
    start_m = sp.block * BLOCK_M
    if VAR.IS_VARLEN:
        if start_m >= sp.seqlen_q:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    BLOCK_D: tl.constexpr = VAR.BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(_slice(Out, stride_out, sp.off_b, sp.start_q, sp.off_h), offs_m, sp.seqlen_q, offs_d, head_dim, MASK_ROWS=True, VAR=VAR)
    do = _load_rows(_slice(DOut, stride_dout, sp.off_b, sp.start_q, sp.off_h), offs_m, sp.seqlen_q, offs_d, head_dim, MASK_ROWS=True, VAR=VAR)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(_stat_ptr(Delta, stride_delta, sp.off_b, sp.off_h, sp.start_q) + offs_m * stride_delta[2], delta, mask=offs_m < sp.seqlen_q)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, dbias_cols, k, v, keep, qdo, stats, ctx, start_n, offs_d, lo, hi, seqlen_q, seqlen_k,
                         head_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DBIAS_COLS: tl.constexpr,
                         EVEN_M: tl.constexpr, UNCLAMPED_BIAS: tl.constexpr, VAR: tl.constexpr):
    """Accumulate dK, dV (and dS column sums) of one key block over query blocks [lo, hi)
    (``qdo``: the Q and dO ``_slice``s; ``stats``: lse and delta pointers and their row stride).
    Works on transposed tiles [BLOCK_N, BLOCK_M] so that no dot result is transposed.
    ``EVEN_M``: seqlen_q is a multiple of BLOCK_M, so no query row needs a bounds check (the
    per-element checks cost ~25% of this pass at head dim 128: docs/perf-notes.md, change 8).
    ``UNCLAMPED_BIAS`` (``configs.unclamped_bias``): seqlen_k is a multiple of BLOCK_N, so the
    bias tile's key index needs no clamp, and there is no causal masking. The clamp hides the
    keys' contiguity from Triton, which then reads the [BLOCK_N, BLOCK_M] tile one 16-bit
    element at a time, unpipelined; without it the tile is read in 16-byte vectors and prefetched, but ptxas serialises wgmma (C7515). Measured on the H200
    (docs/perf-notes.md, change 15): 8% faster without the clamp at 4k non-causal (1k: 1.4%
    slower, within noise), 16-17% slower under causal masking (its (32, 64) tiles), so only
    non-causal calls drop it (left-only windows too: not measured)."""
    q_slc, do_slc = qdo
    lse_ptr, delta_ptr, stride_stat = stats
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    # Keys past seqlen_k read key seqlen_k - 1 (their dK/dV rows are never stored): rows only masked.
    if UNCLAMPED_BIAS:
        bias_ptrs = _bias_ptrs(ctx, offs_m0, offs_n, TRANS=True, VAR=VAR)
    else:
        bias_ptrs = _bias_ptrs(ctx, offs_m0, tl.minimum(offs_n, seqlen_k - 1), TRANS=True, VAR=VAR)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        bias = _load_bias(bias_ptrs, _shift(start_m, ctx.stride_bias_m), offs_m, offs_n, seqlen_q, seqlen_k,
                          TRANS=True, MASK_ROWS=not EVEN_M, MASK_COLS=False, VAR=VAR)
        q = _load_rows(q_slc, offs_m, seqlen_q, offs_d, head_dim, MASK_ROWS=not EVEN_M, VAR=VAR)  # [BLOCK_M, BLOCK_D]
        do = _load_rows(do_slc, offs_m, seqlen_q, offs_d, head_dim, MASK_ROWS=not EVEN_M, VAR=VAR)  # [BLOCK_M, BLOCK_D]
        lse, delta = _row_stats(lse_ptr, delta_ptr, offs_m, stride_stat, seqlen_q, MASK_ROWS=not EVEN_M)
        rows, cols = offs_m[None, :], offs_n[:, None]
        vis = _visible(rows, cols, seqlen_q, seqlen_k, keep, ctx, MASK=MASK, VAR=VAR)
        drop = _dropout_keep(ctx, offs_m, start_n, BLOCK_M, BLOCK_N, TRANS=True, VAR=VAR)
        w_t, ds_t, dsqk_t = _probs_ds(k, q, v, do, bias, lse[None, :], delta[None, :], rows, cols, seqlen_q, seqlen_k, vis, drop,
                                      ctx, MASK=MASK, VAR=VAR)  # [BLOCK_N, BLOCK_M]
        dv = _dot(_cast(w_t, do.dtype, VAR.INTERP_BF16), do, dv, VAR)
        dk = _dot(_cast(dsqk_t, q.dtype, VAR.INTERP_BF16), q, dk, VAR)
        if DBIAS_COLS:
            dbias_cols += tl.sum(ds_t, 1)
    return dk, dv, dbias_cols


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV, DBias, CuSeqQ, CuSeqK,  # tensors (DBias: None unless DBIAS_COLS)
    score,  # ScoreArgs
    stride_q, stride_k, stride_v, stride_dout, stride_dk, stride_dv, stride_stat, stride_dbias,
    batch, nheads_k, kv_group, seqlen_q, seqlen_k, head_dim, tune_bucket, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DBIAS_COLS: tl.constexpr, VAR: tl.constexpr, EVEN_M: tl.constexpr,
    UNCLAMPED_BIAS: tl.constexpr,
):
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    sp = _span(tl.cdiv(seqlen_k, BLOCK_N), batch, nheads_k, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, REVERSE=False, VAR=VAR)
    start_n = sp.block * BLOCK_N
    if VAR.IS_VARLEN:
        if start_n >= sp.seqlen_k:
            return
    seqlen_q, seqlen_k = sp.seqlen_q, sp.seqlen_k
    offs_n = start_n + tl.arange(0, BLOCK_N)
    BLOCK_D: tl.constexpr = VAR.BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    # The key padding mask is per batch: any head's context gives this batch's row.
    ctx_b = _score_ctx(score, sp.off_b, sp.off_h * kv_group, VAR)
    k_slc = _slice(K, stride_k, sp.off_b, sp.start_k, sp.off_h)
    v_slc = _slice(V, stride_v, sp.off_b, sp.start_k, sp.off_h)
    k = _load_keys(k_slc, offs_n, seqlen_k, offs_d, head_dim, ctx_b, MASK=True, VAR=VAR)  # [BLOCK_N, BLOCK_D]
    v = _load_keys(v_slc, offs_n, seqlen_k, offs_d, head_dim, ctx_b, MASK=True, VAR=VAR)  # [BLOCK_N, BLOCK_D]
    keep = _key_keep(ctx_b, offs_n[:, None], seqlen_k, VAR)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _query_range(start_n, seqlen_q, seqlen_k, ctx_b, BLOCK_M, BLOCK_N, VAR=VAR)
    for g in range(0, kv_group):
        off_h = sp.off_h * kv_group + g
        ctx = _score_ctx(score, sp.off_b, off_h, VAR)
        qdo = (_slice(Q, stride_q, sp.off_b, sp.start_q, off_h), _slice(DOut, stride_dout, sp.off_b, sp.start_q, off_h))
        stats = (_stat_ptr(Lse, stride_stat, sp.off_b, off_h, sp.start_q), _stat_ptr(Delta, stride_stat, sp.off_b, off_h, sp.start_q),
                 stride_stat[2])
        dbias_cols = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, dbias_cols = _attn_bwd_dkdv_inner(dk, dv, dbias_cols, k, v, keep, qdo, stats, ctx, start_n, offs_d, lo, full_lo,
                                                  seqlen_q, seqlen_k, head_dim, BLOCK_M, BLOCK_N, MASK=True, DBIAS_COLS=DBIAS_COLS,
                                                  EVEN_M=EVEN_M, UNCLAMPED_BIAS=UNCLAMPED_BIAS, VAR=VAR)
        dk, dv, dbias_cols = _attn_bwd_dkdv_inner(dk, dv, dbias_cols, k, v, keep, qdo, stats, ctx, start_n, offs_d, full_lo, full_hi,
                                                  seqlen_q, seqlen_k, head_dim, BLOCK_M, BLOCK_N, MASK=False, DBIAS_COLS=DBIAS_COLS,
                                                  EVEN_M=EVEN_M, UNCLAMPED_BIAS=UNCLAMPED_BIAS, VAR=VAR)
        if VAR.MASK_BOTH_EDGES:
            dk, dv, dbias_cols = _attn_bwd_dkdv_inner(dk, dv, dbias_cols, k, v, keep, qdo, stats, ctx, start_n, offs_d, full_hi, hi,
                                                      seqlen_q, seqlen_k, head_dim, BLOCK_M, BLOCK_N, MASK=True, DBIAS_COLS=DBIAS_COLS,
                                                      EVEN_M=EVEN_M, UNCLAMPED_BIAS=UNCLAMPED_BIAS, VAR=VAR)
        if DBIAS_COLS:
            dbias_ptr = DBias + sp.off_b * stride_dbias[0] + off_h * stride_dbias[1]
            tl.store(dbias_ptr + offs_n * stride_dbias[3], dbias_cols, mask=offs_n < seqlen_k)

    _store_rows(_slice(DK, stride_dk, sp.off_b, sp.start_k, sp.off_h), dk * sm_scale, offs_n, seqlen_k, offs_d, head_dim, VAR)
    _store_rows(_slice(DV, stride_dv, sp.off_b, sp.start_k, sp.off_h), dv, offs_n, seqlen_k, offs_d, head_dim, VAR)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, ctx, offs_m, offs_d, lo, hi, seqlen_q, seqlen_k, head_dim,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, VAR: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi) (``kv``: K and V ``_slice``s)."""
    k_slc, v_slc = kv
    offs_n0 = tl.arange(0, BLOCK_N)
    # As in the forward: rows clamped, the bias tile pipelined by the compiler.
    bias_ptrs = _bias_ptrs(ctx, tl.minimum(offs_m, seqlen_q - 1), offs_n0, TRANS=False, VAR=VAR)
    # Masked ranges are not software-pipelined: their operand fix-ups (below) in a pipelined
    # loop made ptxas serialise wgmma (C7515); they are one or two blocks per program.
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASK else None):
        offs_n = start_n + offs_n0
        bias = _load_bias(bias_ptrs, _shift(start_n, ctx.stride_bias_n), offs_m, offs_n, seqlen_q, seqlen_k,
                          TRANS=False, MASK_ROWS=False, MASK_COLS=MASK, VAR=VAR)
        k = _load_keys(k_slc, offs_n, seqlen_k, offs_d, head_dim, ctx, MASK=MASK, VAR=VAR)  # [BLOCK_N, BLOCK_D]
        v = _load_keys(v_slc, offs_n, seqlen_k, offs_d, head_dim, ctx, MASK=MASK, VAR=VAR)  # [BLOCK_N, BLOCK_D]
        rows, cols = offs_m[:, None], offs_n[None, :]
        vis = _visible(rows, cols, seqlen_q, seqlen_k, _key_keep(ctx, cols, seqlen_k, VAR), ctx, MASK=MASK, VAR=VAR)
        drop = _dropout_keep(ctx, offs_m, start_n, BLOCK_M, BLOCK_N, TRANS=False, VAR=VAR)
        _, _, ds = _probs_ds(q, k, do, v, bias, lse[:, None], delta[:, None], rows, cols, seqlen_q, seqlen_k, vis, drop, ctx,
                             MASK=MASK, VAR=VAR)  # [BLOCK_M, BLOCK_N]
        if MASK:
            # An invisible key has dS = 0, but 0 * NaN = NaN inside the matmul; a visible
            # non-finite key already made its dS NaN.
            k, _ = _finite_rows(k)
        dq = _dot(_cast(ds, k.dtype, VAR.INTERP_BF16), k, dq, VAR)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, CuSeqQ, CuSeqK,
    score,  # ScoreArgs
    stride_q, stride_k, stride_v, stride_dout, stride_dq, stride_stat,
    batch, nheads, kv_group, seqlen_q, seqlen_k, head_dim, tune_bucket, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VAR: tl.constexpr,
):
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    sp = _span(tl.cdiv(seqlen_q, BLOCK_M), batch, nheads, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, REVERSE=VAR.CAUSAL, VAR=VAR)
    start_m = sp.block * BLOCK_M
    if VAR.IS_VARLEN:
        if start_m >= sp.seqlen_q:
            return
    seqlen_q, seqlen_k = sp.seqlen_q, sp.seqlen_k
    off_hk = sp.off_h // kv_group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    BLOCK_D: tl.constexpr = VAR.BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(_slice(Q, stride_q, sp.off_b, sp.start_q, sp.off_h), offs_m, seqlen_q, offs_d, head_dim, MASK_ROWS=True, VAR=VAR)
    do = _load_rows(_slice(DOut, stride_dout, sp.off_b, sp.start_q, sp.off_h), offs_m, seqlen_q, offs_d, head_dim, MASK_ROWS=True, VAR=VAR)
    lse, delta = _row_stats(_stat_ptr(Lse, stride_stat, sp.off_b, sp.off_h, sp.start_q),
                            _stat_ptr(Delta, stride_stat, sp.off_b, sp.off_h, sp.start_q), offs_m, stride_stat[2], seqlen_q, MASK_ROWS=True)
    ctx = _score_ctx(score, sp.off_b, sp.off_h, VAR)
    kv = (_slice(K, stride_k, sp.off_b, sp.start_k, off_hk), _slice(V, stride_v, sp.off_b, sp.start_k, off_hk))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, ctx, BLOCK_M, BLOCK_N, VAR=VAR)
    if VAR.MASK_BOTH_EDGES:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, ctx, offs_m, offs_d, lo, full_lo, seqlen_q, seqlen_k, head_dim,
                                BLOCK_M, BLOCK_N, MASK=True, VAR=VAR)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, ctx, offs_m, offs_d, full_lo, full_hi, seqlen_q, seqlen_k, head_dim,
                            BLOCK_M, BLOCK_N, MASK=False, VAR=VAR)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, ctx, offs_m, offs_d, full_hi, hi, seqlen_q, seqlen_k, head_dim,
                            BLOCK_M, BLOCK_N, MASK=True, VAR=VAR)
    _store_rows(_slice(DQ, stride_dq, sp.off_b, sp.start_q, sp.off_h), dq * sm_scale, offs_m, seqlen_q, offs_d, head_dim, VAR)


@triton.jit
def _attn_bwd_dbias_inner(acc, tensors, strides, bias_ptrs, bias_col_stride, score, first, sums, kv_group, offs_m, offs_d,
                          lo, hi, seqlen_q, seqlen_k, head_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                          EVEN_M: tl.constexpr, VAR: tl.constexpr):
    """Sum dS of the query block ``offs_m`` over key blocks [lo, hi) and over the
    ``sums = (batches, heads)`` slices from ``first = (batch, head)`` that one dbias tile
    gathers, in a fixed order (deterministic, no atomics)."""
    Q, K, V, DOut, Lse, Delta = tensors
    stride_q, stride_k, stride_v, stride_dout, stride_stat = strides
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        bias = _load_bias(bias_ptrs, _shift(start_n, bias_col_stride), offs_m, offs_n, seqlen_q, seqlen_k,
                          TRANS=False, MASK_ROWS=False, MASK_COLS=MASK, VAR=VAR)
        for r in range(0, sums[0] * sums[1]):
            off_b = first[0] + r // sums[1]
            off_h = first[1] + r % sums[1]
            off_hk = off_h // kv_group
            ctx = _score_ctx(score, off_b, off_h, VAR)
            q = _load_rows(_slice(Q, stride_q, off_b, 0, off_h), offs_m, seqlen_q, offs_d, head_dim, MASK_ROWS=not EVEN_M, VAR=VAR)
            do = _load_rows(_slice(DOut, stride_dout, off_b, 0, off_h), offs_m, seqlen_q, offs_d, head_dim, MASK_ROWS=not EVEN_M, VAR=VAR)
            k = _load_keys(_slice(K, stride_k, off_b, 0, off_hk), offs_n, seqlen_k, offs_d, head_dim, ctx, MASK=MASK, VAR=VAR)
            v = _load_keys(_slice(V, stride_v, off_b, 0, off_hk), offs_n, seqlen_k, offs_d, head_dim, ctx, MASK=MASK, VAR=VAR)
            lse, delta = _row_stats(_stat_ptr(Lse, stride_stat, off_b, off_h, 0), _stat_ptr(Delta, stride_stat, off_b, off_h, 0),
                                    offs_m, stride_stat[2], seqlen_q, MASK_ROWS=not EVEN_M)
            rows, cols = offs_m[:, None], offs_n[None, :]
            vis = _visible(rows, cols, seqlen_q, seqlen_k, _key_keep(ctx, cols, seqlen_k, VAR), ctx, MASK=MASK, VAR=VAR)
            drop = _dropout_keep(ctx, offs_m, start_n, BLOCK_M, BLOCK_N, TRANS=False, VAR=VAR)
            _, ds, _ = _probs_ds(q, k, do, v, bias, lse[:, None], delta[:, None], rows, cols, seqlen_q, seqlen_k, vis, drop, ctx,
                                 MASK=MASK, VAR=VAR)
            acc += ds
    return acc


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_bwd_dbias(
    Q, K, V, DOut, Lse, Delta, DBias,
    score,  # ScoreArgs
    stride_q, stride_k, stride_v, stride_dout, stride_stat, stride_dbias,
    kv_group, sum_batch, sum_heads, dbias_heads, seqlen_q, seqlen_k, head_dim, tune_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUM_KEYS: tl.constexpr, INTERP_DBIAS_BF16: tl.constexpr,
    VAR: tl.constexpr, EVEN_M: tl.constexpr,
):
    """Gradient of a bias with a row dimension: one program per [BLOCK_M, BLOCK_N] tile of
    dbias (per query block when the bias has no key dimension, ``SUM_KEYS``), summing dS over
    the batches (``sum_batch``) and heads (``sum_heads``) the bias broadcasts along, in fp32
    registers and in a fixed order: no (batch, heads, seqlen_q, seqlen_k) buffer, no atomics.
    Recomputes dS (2 matmuls per tile and summed slice); writes dbias in its own dtype, once.
    ``EVEN_M``: every query block is full, no bounds checks on rows."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    # One grid axis (see _span): query blocks fastest, then key blocks, then dbias slices.
    pid = tl.program_id(0)
    n_m = tl.cdiv(seqlen_q, BLOCK_M)
    n_n = 1 if SUM_KEYS else tl.cdiv(seqlen_k, BLOCK_N)
    pid_m = pid % n_m
    pid_n = (pid // n_m) % n_n
    pid_bh = (pid // n_m // n_n).to(tl.int64)
    first = (pid_bh // dbias_heads, pid_bh % dbias_heads)  # (0, h) when summing over batch, (b, 0) over heads
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    BLOCK_D: tl.constexpr = VAR.BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    ctx = _score_ctx(score, first[0], first[1], VAR)
    bias_ptrs = _bias_ptrs(ctx, tl.minimum(offs_m, seqlen_q - 1), tl.arange(0, BLOCK_N), TRANS=False, VAR=VAR)

    lo, full_lo, full_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, ctx, BLOCK_M, BLOCK_N, VAR=VAR)
    if not SUM_KEYS:
        # This program's key block only (the range bounds are multiples of BLOCK_N but hi).
        own = pid_n * BLOCK_N
        lo = tl.maximum(lo, own)
        full_lo = tl.minimum(tl.maximum(full_lo, own), own + BLOCK_N)
        full_hi = tl.minimum(tl.maximum(full_hi, own), own + BLOCK_N)
        hi = tl.minimum(hi, own + BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    tensors = (Q, K, V, DOut, Lse, Delta)
    strides = (stride_q, stride_k, stride_v, stride_dout, stride_stat)
    sums = (sum_batch, sum_heads)
    if VAR.MASK_BOTH_EDGES:
        acc = _attn_bwd_dbias_inner(acc, tensors, strides, bias_ptrs, ctx.stride_bias_n, score, first, sums, kv_group, offs_m, offs_d,
                                    lo, full_lo, seqlen_q, seqlen_k, head_dim, BLOCK_M, BLOCK_N, MASK=True, EVEN_M=EVEN_M, VAR=VAR)
    acc = _attn_bwd_dbias_inner(acc, tensors, strides, bias_ptrs, ctx.stride_bias_n, score, first, sums, kv_group, offs_m, offs_d,
                                full_lo, full_hi, seqlen_q, seqlen_k, head_dim, BLOCK_M, BLOCK_N, MASK=False, EVEN_M=EVEN_M, VAR=VAR)
    acc = _attn_bwd_dbias_inner(acc, tensors, strides, bias_ptrs, ctx.stride_bias_n, score, first, sums, kv_group, offs_m, offs_d,
                                full_hi, hi, seqlen_q, seqlen_k, head_dim, BLOCK_M, BLOCK_N, MASK=True, EVEN_M=EVEN_M, VAR=VAR)

    dbias_ptr = DBias + first[0] * stride_dbias[0] + first[1] * stride_dbias[1]
    if SUM_KEYS:
        tl.store(dbias_ptr + offs_m * stride_dbias[2], _cast(tl.sum(acc, 1), DBias.dtype.element_ty, INTERP_DBIAS_BF16),
                 mask=offs_m < seqlen_q)
    else:
        rows, cols = offs_m[:, None], pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(dbias_ptr + _ptr_offset(rows, cols, (stride_dbias[2], stride_dbias[3]), VAR.WIDE),
                 _cast(acc, DBias.dtype.element_ty, INTERP_DBIAS_BF16), mask=(rows < seqlen_q) & (cols < seqlen_k))


# EVEN_M/UNCLAMPED_BIAS follow from the tile the autotuner picks, so they are set per launch, not tuning keys.
_launch_dkdv = Launcher(_attn_bwd_dkdv, BWD_DKDV_CONFIGS, BWD_KEY, prune_bwd_dkdv,
                        heuristics={"EVEN_M": even_m, "UNCLAMPED_BIAS": unclamped_bias})
_launch_dq = Launcher(_attn_bwd_dq, BWD_DQ_CONFIGS, FWD_KEY, prune_bwd_dq)
_launch_dbias = Launcher(_attn_bwd_dbias, BWD_DBIAS_CONFIGS, DBIAS_KEY, prune_bwd_dbias, heuristics={"EVEN_M": even_m})
PRE_BLOCK_M = 64


def attn_bwd(
    dout, q, k, v, out, lse, bias, alibi_slopes, key_padding_mask, causal, softmax_scale,
    dq=None, dk=None, dv=None, bias_grad=False, varlen=None, features=NO_FEATURES, sinks_grad=False,
):
    """Launch the backward kernels. Inputs as for ``attn_fwd`` (``features`` as there, with the
    forward's dropout seed); ``dq``/``dk``/``dv`` may be given (e.g. views into a packed
    gradient). With ``bias_grad`` the bias gradient is returned in the shape and dtype of the
    rank-4 ``bias`` view (its size-1 dims summed over), else None; with ``sinks_grad`` the
    sinks' gradient (fp32, (nheads,)), else None. Returns (dq, dk, dv, dbias, dsinks)."""
    pb = problem(q, k, varlen)
    batch, seqlen_q, seqlen_k, nheads, nheads_k = pb.batch, pb.seqlen_q, pb.seqlen_k, pb.nheads, pb.nheads_k
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    meta = launch_meta(pb, q, causal, bias, alibi_slopes, key_padding_mask, softmax_scale, (q, k, v, out, dout, dq, dk, dv), features)
    cu = pb.varlen_args()

    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(seqlen_q, PRE_BLOCK_M) * batch * nheads,)](
        **pb.operands(Out=out, DOut=dout, Delta=delta),
        CuSeqQ=cu["CuSeqQ"],
        batch=batch,
        nheads=nheads,
        seqlen_q=seqlen_q,
        head_dim=pb.head_dim,
        BLOCK_M=PRE_BLOCK_M,
        VAR=meta.variant,
    )

    bias_grad = bias is not None and bias_grad
    # By shape, not stride: an expanded view (stride 0, size seqlen_q) needs a gradient per row.
    row_grad = bias_grad and bias.shape[2] > 1
    # A bias without a row dimension gets per-(batch, head) key sums (fp32) from the dK/dV pass.
    dbias_cols = None
    if bias_grad and not row_grad:
        dbias_cols = torch.empty((batch, nheads, 1, seqlen_k), device=q.device, dtype=torch.float32)
    common = dict(
        **pb.operands(Q=q, K=k, V=v, DOut=dout),
        Lse=lse,
        Delta=delta,
        score=meta.score,
        stride_stat=pb.strides(lse),
        kv_group=nheads // nheads_k,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=pb.head_dim,
        tune_bucket=seq_bucket(seqlen_q, seqlen_k),
        VAR=meta.variant,
    )

    def grid_dkdv(m):
        return (triton.cdiv(seqlen_k, m["BLOCK_N"]) * batch * nheads_k,)

    def grid_dq(m):
        return (triton.cdiv(seqlen_q, m["BLOCK_M"]) * batch * nheads,)

    hopper_bwd = _hopper_bwd_module(causal, bias is not None, q.shape[-1])
    # The Gluon dK/dV pass writes no key sums: a gradient of a bias without rows stays with tl.
    if hopper_bwd is not None and dbias_cols is None and hopper_bwd.hopper_bwd_supports(
            q, k, v, dout, dk, dv, lse, bias, alibi_slopes, key_padding_mask, causal, softmax_scale, varlen, features):
        hopper_bwd.hopper_bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, causal, softmax_scale, bias=bias)
    else:
        _launch_dkdv(
            grid_dkdv, **pb.operands(DK=dk, DV=dv), DBias=dbias_cols, stride_dbias=dbias_cols.stride() if dbias_cols is not None else (0, 0, 0, 0), batch=batch,
            nheads_k=nheads_k, sm_scale=softmax_scale, DBIAS_COLS=dbias_cols is not None, **common, **cu,
        )
    _launch_dq(grid_dq, **pb.operands(DQ=dq), batch=batch, nheads=nheads, sm_scale=softmax_scale, **common, **cu)

    dbias = None
    hopper_dbias = _hopper_dbias_module() if row_grad else None
    if dbias_cols is not None:
        # Summed over broadcast batches/heads in fp32, rounded to the bias dtype once.
        dbias = dbias_cols.sum_to_size(bias.shape).to(bias.dtype)
    elif row_grad and hopper_dbias is not None and hopper_dbias.hopper_dbias_supports(
            q, k, v, dout, lse, bias, alibi_slopes, key_padding_mask, causal, softmax_scale, varlen, features):
        dbias = hopper_dbias.hopper_dbias(q, k, v, dout, lse, delta, bias, causal, softmax_scale)
    elif row_grad:
        dbias = torch.empty(bias.shape, device=q.device, dtype=bias.dtype)
        sum_batch = batch if bias.shape[0] == 1 else 1
        sum_heads = nheads if bias.shape[1] == 1 else 1
        sum_keys = bias.shape[3] == 1

        def grid_dbias(m):
            n_blocks = 1 if sum_keys else triton.cdiv(seqlen_k, m["BLOCK_N"])
            return (triton.cdiv(seqlen_q, m["BLOCK_M"]) * n_blocks * bias.shape[0] * bias.shape[1],)

        _launch_dbias(
            grid_dbias, DBias=dbias, stride_dbias=dbias.stride(), sum_batch=sum_batch, sum_heads=sum_heads,
            dbias_heads=bias.shape[1], SUM_KEYS=sum_keys,
            INTERP_DBIAS_BF16=INTERPRET and bias.dtype == torch.bfloat16, **common,
        )
    dsinks = None
    if sinks_grad and features.sinks is not None:
        dsinks = sinks_gradient(features.sinks, lse, delta, varlen is not None)
    return dq, dk, dv, dbias, dsinks


HOPPER_BWD_ENV = "TRITONFLASH_HOPPER_BWD"


HOPPER_DBIAS_ENV = "TRITONFLASH_HOPPER_DBIAS"


def _hopper_bwd_module(causal: bool, has_bias: bool, head_dim: int):
    """kernels/hopper_bwd.py (the Gluon dK/dV pass) when ``TRITONFLASH_HOPPER_BWD`` lets it take a
    call like this one (read per call; case and surrounding spaces ignored, anything else is a
    ValueError): unset, empty or ``auto``, the default: calls with a bias whose (head dim,
    causal) is in ``hopper_bwd.AUTO_BIAS`` (its BIAS variant, measured faster than the tl pass
    there, docs/perf-notes.md change 21); ``1``: every call it covers (without a bias it is at
    parity with the tl pass, non-causal d64 with a bias slower); ``0``: never.
    ``hopper_bwd.hopper_bwd_supports`` still decides whether it covers the call."""
    mode = env_mode(HOPPER_BWD_ENV, ("0", "1", "auto"), "auto")
    module = gluon_module("hopper_bwd", mode != "0" and not INTERPRET)
    if module is not None and mode == "auto" and not (has_bias and (head_dim, bool(causal)) in module.AUTO_BIAS):
        return None
    return module


def _hopper_dbias_module():
    """kernels/hopper_dbias.py (the Gluon bias-gradient pass): on by default (on sm_90, for the
    calls hopper_dbias_supports takes; 1.1-1.9x the tl pass on the H200, docs/perf-notes.md
    change 20); ``TRITONFLASH_HOPPER_DBIAS=0`` turns it off (``1`` or unset: on; anything else is
    a ValueError)."""
    return gluon_module("hopper_dbias", env_mode(HOPPER_DBIAS_ENV, ("0", "1"), "1") == "1" and not INTERPRET)


def sinks_gradient(sinks, lse, delta, is_varlen):
    """d loss / d sinks[h] = -sum over rows of P_sink * delta, P_sink = exp(sinks[h] - lse) the
    probability the sink took (the sink has no value, so the output moves only through the
    normaliser). A plain reduction over (batch, rows) in fp32: deterministic, no atomics.
    lse/delta are (batch, nheads, seqlen_q), or (nheads, total_q) for varlen."""
    sinks = sinks[:, None] if is_varlen else sinks[None, :, None]
    # A -inf sink in a row without keys (lse -inf) took no probability.
    p_sink = torch.where(lse == float("-inf"), 0.0, torch.exp(sinks - lse))
    return -(p_sink * delta).sum(tuple(d for d in range(lse.dim()) if d != lse.dim() - 2))
