"""Backward pass without atomics, so every gradient is deterministic.

1. ``_attn_bwd_preprocess``: delta = rowsum(out * dout) (fp32).
2. ``_attn_bwd_dkdv``: one program per (key block, batch*kv_head); loops over the query
   heads of its group and over query blocks, recomputing P from the saved LSE. Parallel over
   key blocks, so small batch*heads still fills the GPU. Also produces the per-key column
   sums of dS that a bias without a row dimension needs as its gradient.
3. ``_attn_bwd_dq``: one program per (query block, batch*head); loops over key blocks. Also
   writes dS tiles when a bias with a row dimension needs its gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    _alibi_slope,
    _batch_head,
    _bias_ptrs,
    _cast,
    _causal_split,
    _dot,
    _load_bias,
    _load_tile,
    _ptr_offset,
    _score,
    _seq_span,
    _shift,
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
    even_m,
    even_n,
    prune_bwd_dbias,
    prune_bwd_dkdv,
    prune_bwd_dq,
    seq_bucket,
)


@triton.jit(do_not_specialize=["seqlen_q"])
def _attn_bwd_preprocess(
    Out,
    DOut,
    Delta,
    CuSeqQ,
    stride_o,
    stride_do,
    stride_delta,
    nheads,
    seqlen_q,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    WIDE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // nheads
    off_h = pid_bh % nheads
    start_q, seqlen_q = _seq_span(CuSeqQ, off_b, seqlen_q, IS_VARLEN)
    if IS_VARLEN:
        if pid_m * BLOCK_M >= seqlen_q:
            return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows, cols = offs_m[:, None], offs_d[None, :]
    o = _load_tile(
        Out + off_b * stride_o[0] + start_q * stride_o[1] + off_h * stride_o[2] + _ptr_offset(rows, cols, (stride_o[1], stride_o[3]), WIDE),
        rows, seqlen_q, cols, head_dim, True, True,
    )
    do = _load_tile(
        DOut + off_b * stride_do[0] + start_q * stride_do[1] + off_h * stride_do[2] + _ptr_offset(rows, cols, (stride_do[1], stride_do[3]), WIDE),
        rows, seqlen_q, cols, head_dim, True, True,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(Delta + off_b * stride_delta[0] + off_h * stride_delta[1] + (start_q + offs_m) * stride_delta[2], delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, offs_m, stride_m, seqlen_q, MASK_ROWS: tl.constexpr = True):
    """LSE (in log2 units) and delta of a block of query rows. A row with no visible key
    (lse = -inf) and a row past seqlen_q both get +inf, so that P = exp2(s - lse) = 0.
    Rows are bounds-checked unless ``MASK_ROWS`` is False (every row is < seqlen_q)."""
    if MASK_ROWS:
        lse = tl.load(lse_ptr + offs_m * stride_m, mask=offs_m < seqlen_q, other=float("-inf"))
        delta = tl.load(delta_ptr + offs_m * stride_m, mask=offs_m < seqlen_q, other=0.0)
    else:
        lse = tl.load(lse_ptr + offs_m * stride_m)
        delta = tl.load(delta_ptr + offs_m * stride_m)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse, delta


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    dbias_cols,
    k,
    v,
    q_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    bias_ptr,
    kpm_ptr,
    stride_q,
    stride_do,
    stride_stat,
    stride_bias,
    slope,
    offs_n,
    offs_d,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    head_dim,
    qk_scale,
    BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DBIAS_COLS: tl.constexpr,
    EVEN_M: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Accumulate dK, dV (and dS column sums) of one key block over query blocks [lo, hi).
    Works on transposed tiles [BLOCK_N, BLOCK_M] so that no dot result is transposed.
    ``EVEN_M``: seqlen_q is a multiple of BLOCK_M, so no query row needs a bounds check (the
    per-element checks cost ~25% of this pass at head dim 128: docs/perf-notes.md, change 8)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    # Keys past seqlen_k read key seqlen_k - 1 (their dK/dV rows are never stored): rows only masked.
    bias_ptrs = _bias_ptrs(bias_ptr, offs_m0, tl.minimum(offs_n, seqlen_k - 1), stride_bias, HAS_BIAS, BIAS_ROW, True)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        bias = _load_bias(bias_ptrs, _shift(start_m, stride_bias[0]), offs_m, offs_n, seqlen_q, seqlen_k,
                          HAS_BIAS, BIAS_ROW, True, not EVEN_M, False)
        q = _load_tile(
            q_ptr + _ptr_offset(offs_m[:, None], offs_d[None, :], stride_q, WIDE),
            offs_m[:, None], seqlen_q, offs_d[None, :], head_dim, not EVEN_M, not EVEN_D,
        )  # [BLOCK_M, BLOCK_D]
        do = _load_tile(
            do_ptr + _ptr_offset(offs_m[:, None], offs_d[None, :], stride_do, WIDE),
            offs_m[:, None], seqlen_q, offs_d[None, :], head_dim, not EVEN_M, not EVEN_D,
        )  # [BLOCK_M, BLOCK_D]
        lse, delta = _load_row_stats(lse_ptr, delta_ptr, offs_m, stride_stat, seqlen_q, not EVEN_M)
        qk_t = _dot(k, tl.trans(q), None, INTERP_BF16)  # [BLOCK_N, BLOCK_M]
        s_t = _score(
            qk_t, bias, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, qk_scale, slope, kpm_ptr,
            HAS_BIAS, HAS_ALIBI, HAS_KPM, MASK and CAUSAL, False,
        )
        p_t = tl.math.exp2(s_t - lse[None, :])  # [BLOCK_N, BLOCK_M]
        dv = _dot(_cast(p_t, do.dtype, INTERP_BF16), do, dv, INTERP_BF16)
        dp_t = _dot(v, tl.trans(do), None, INTERP_BF16)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(_cast(ds_t, q.dtype, INTERP_BF16), q, dk, INTERP_BF16)
        if DBIAS_COLS:
            dbias_cols += tl.sum(ds_t, 1)
    return dk, dv, dbias_cols


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    Bias,
    DBias,
    Slopes,
    KPM,
    CuSeqQ,
    CuSeqK,
    stride_q,
    stride_k,
    stride_v,
    stride_do,
    stride_dk,
    stride_dv,
    stride_stat,
    stride_bias,
    stride_dbias,
    stride_slopes,
    stride_kpm,
    batch,
    nheads_k,
    kv_group,
    seqlen_q,
    seqlen_k,
    head_dim,
    tune_bucket,
    qk_scale,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr,
    DBIAS_COLS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    WIDE: tl.constexpr,
    EVEN_M: tl.constexpr,
):
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    pid_n = tl.program_id(0)
    off_b, off_hk = _batch_head(tl.program_id(1), batch, nheads_k, BIAS_ROW)
    start_q, seqlen_q = _seq_span(CuSeqQ, off_b, seqlen_q, IS_VARLEN)
    start_k, seqlen_k = _seq_span(CuSeqK, off_b, seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if pid_n * BLOCK_N >= seqlen_k:
            return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(
        K + off_b * stride_k[0] + start_k * stride_k[1] + off_hk * stride_k[2]
        + _ptr_offset(offs_n[:, None], offs_d[None, :], (stride_k[1], stride_k[3]), WIDE),
        offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, True, not EVEN_D,
    )  # [BLOCK_N, BLOCK_D]
    v = _load_tile(
        V + off_b * stride_v[0] + start_k * stride_v[1] + off_hk * stride_v[2]
        + _ptr_offset(offs_n[:, None], offs_d[None, :], (stride_v[1], stride_v[3]), WIDE),
        offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, True, not EVEN_D,
    )  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [lo, split) straddle the causal diagonal for this key block; blocks from
    # split on see every key of it. Rows past seqlen_q are neutralised by their LSE.
    end_m = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        first_row = tl.maximum(pid_n * BLOCK_N - (seqlen_k - seqlen_q), 0)
        lo = tl.minimum((first_row // BLOCK_M) * BLOCK_M, end_m)
        full_row = tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - (seqlen_k - seqlen_q), 0)
        split = tl.minimum(tl.cdiv(full_row, BLOCK_M) * BLOCK_M, end_m)
    else:
        lo = 0
        split = 0

    kpm_ptr = KPM
    if HAS_KPM:
        kpm_ptr = KPM + off_b * stride_kpm[0]
    for g in range(0, kv_group):
        off_h = off_hk * kv_group + g
        q_ptr = Q + off_b * stride_q[0] + start_q * stride_q[1] + off_h * stride_q[2]
        do_ptr = DOut + off_b * stride_do[0] + start_q * stride_do[1] + off_h * stride_do[2]
        lse_ptr = Lse + off_b * stride_stat[0] + off_h * stride_stat[1] + start_q * stride_stat[2]
        delta_ptr = Delta + off_b * stride_stat[0] + off_h * stride_stat[1] + start_q * stride_stat[2]
        bias_ptr = Bias
        bias_rc = (0, 0)
        if HAS_BIAS:
            bias_ptr = Bias + off_b * stride_bias[0] + off_h * stride_bias[1]
            bias_rc = (stride_bias[2], stride_bias[3])
        slope = _alibi_slope(Slopes, off_b, off_h, stride_slopes, HAS_ALIBI)
        dbias_cols = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, dbias_cols = _attn_bwd_dkdv_inner(
            dk, dv, dbias_cols, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, kpm_ptr,
            (stride_q[1], stride_q[3]), (stride_do[1], stride_do[3]), stride_stat[2], bias_rc, slope,
            offs_n, offs_d, lo, split, seqlen_q, seqlen_k, head_dim, qk_scale,
            BLOCK_M, EVEN_D, HAS_BIAS, BIAS_ROW, HAS_ALIBI, HAS_KPM, True, CAUSAL, DBIAS_COLS, EVEN_M, INTERP_BF16, WIDE,
        )
        dk, dv, dbias_cols = _attn_bwd_dkdv_inner(
            dk, dv, dbias_cols, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, kpm_ptr,
            (stride_q[1], stride_q[3]), (stride_do[1], stride_do[3]), stride_stat[2], bias_rc, slope,
            offs_n, offs_d, split, end_m, seqlen_q, seqlen_k, head_dim, qk_scale,
            BLOCK_M, EVEN_D, HAS_BIAS, BIAS_ROW, HAS_ALIBI, HAS_KPM, False, CAUSAL, DBIAS_COLS, EVEN_M, INTERP_BF16, WIDE,
        )
        if DBIAS_COLS:
            dbias_ptr = DBias + off_b * stride_dbias[0] + off_h * stride_dbias[1]
            tl.store(dbias_ptr + offs_n * stride_dbias[3], dbias_cols, mask=offs_n < seqlen_k)

    rows, cols = offs_n[:, None], offs_d[None, :]
    mask_kv = (rows < seqlen_k) & (cols < head_dim)
    dk_ptrs = DK + off_b * stride_dk[0] + start_k * stride_dk[1] + off_hk * stride_dk[2] + _ptr_offset(rows, cols, (stride_dk[1], stride_dk[3]), WIDE)
    tl.store(dk_ptrs, _cast(dk * sm_scale, DK.dtype.element_ty, INTERP_BF16), mask=mask_kv)
    dv_ptrs = DV + off_b * stride_dv[0] + start_k * stride_dv[1] + off_hk * stride_dv[2] + _ptr_offset(rows, cols, (stride_dv[1], stride_dv[3]), WIDE)
    tl.store(dv_ptrs, _cast(dv, DV.dtype.element_ty, INTERP_BF16), mask=mask_kv)


@triton.jit
def _dscore(q, k, v, do, bias, lse, delta, offs_m, offs_n, seqlen_q, seqlen_k, qk_scale, slope, kpm_ptr,
            HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
            MASK_CAUSAL: tl.constexpr, MASK_N: tl.constexpr, INTERP_BF16: tl.constexpr):
    """dS = P * (dP - delta) of a [BLOCK_M, BLOCK_N] tile, P recomputed from the LSE (log2 units)."""
    qk = _dot(q, tl.trans(k), None, INTERP_BF16)  # [BLOCK_M, BLOCK_N]
    s = _score(
        qk, bias, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, qk_scale, slope, kpm_ptr,
        HAS_BIAS, HAS_ALIBI, HAS_KPM, MASK_CAUSAL, MASK_N,
    )
    p = tl.math.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), None, INTERP_BF16)  # [BLOCK_M, BLOCK_N]
    return p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_ptr,
    v_ptr,
    bias_ptr,
    kpm_ptr,
    stride_k,
    stride_v,
    stride_bias,
    slope,
    offs_m,
    offs_d,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    head_dim,
    qk_scale,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    # As in the forward: rows clamped, the bias tile pipelined by the compiler.
    bias_ptrs = _bias_ptrs(bias_ptr, tl.minimum(offs_m, seqlen_q - 1), offs_n0, stride_bias, HAS_BIAS, BIAS_ROW, False)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        bias = _load_bias(bias_ptrs, _shift(start_n, stride_bias[1]), offs_m, offs_n, seqlen_q, seqlen_k,
                          HAS_BIAS, BIAS_ROW, False, False, MASK)
        k = _load_tile(
            k_ptr + _ptr_offset(offs_n[:, None], offs_d[None, :], stride_k, WIDE),
            offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, MASK, not EVEN_D,
        )  # [BLOCK_N, BLOCK_D]
        v = _load_tile(
            v_ptr + _ptr_offset(offs_n[:, None], offs_d[None, :], stride_v, WIDE),
            offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, MASK, not EVEN_D,
        )  # [BLOCK_N, BLOCK_D]
        ds = _dscore(
            q, k, v, do, bias, lse, delta, offs_m, offs_n, seqlen_q, seqlen_k, qk_scale, slope, kpm_ptr,
            HAS_BIAS, HAS_ALIBI, HAS_KPM, MASK and CAUSAL, MASK, INTERP_BF16,
        )
        dq = _dot(_cast(ds, k.dtype, INTERP_BF16), k, dq, INTERP_BF16)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_bwd_dq(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DQ,
    Bias,
    Slopes,
    KPM,
    CuSeqQ,
    CuSeqK,
    stride_q,
    stride_k,
    stride_v,
    stride_do,
    stride_dq,
    stride_stat,
    stride_bias,
    stride_slopes,
    stride_kpm,
    batch,
    nheads,
    kv_group,
    seqlen_q,
    seqlen_k,
    head_dim,
    tune_bucket,
    qk_scale,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    WIDE: tl.constexpr,
):
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_b, off_h = _batch_head(tl.program_id(1), batch, nheads, BIAS_ROW)
    off_hk = off_h // kv_group
    start_q, seqlen_q = _seq_span(CuSeqQ, off_b, seqlen_q, IS_VARLEN)
    start_k, seqlen_k = _seq_span(CuSeqK, off_b, seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if pid_m * BLOCK_M >= seqlen_q:
            return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows, cols = offs_m[:, None], offs_d[None, :]
    q = _load_tile(
        Q + off_b * stride_q[0] + start_q * stride_q[1] + off_h * stride_q[2] + _ptr_offset(rows, cols, (stride_q[1], stride_q[3]), WIDE),
        rows, seqlen_q, cols, head_dim, True, not EVEN_D,
    )  # [BLOCK_M, BLOCK_D]
    do = _load_tile(
        DOut + off_b * stride_do[0] + start_q * stride_do[1] + off_h * stride_do[2] + _ptr_offset(rows, cols, (stride_do[1], stride_do[3]), WIDE),
        rows, seqlen_q, cols, head_dim, True, not EVEN_D,
    )  # [BLOCK_M, BLOCK_D]
    lse, delta = _load_row_stats(
        Lse + off_b * stride_stat[0] + off_h * stride_stat[1] + start_q * stride_stat[2],
        Delta + off_b * stride_stat[0] + off_h * stride_stat[1] + start_q * stride_stat[2],
        offs_m, stride_stat[2], seqlen_q,
    )

    k_ptr = K + off_b * stride_k[0] + start_k * stride_k[1] + off_hk * stride_k[2]
    v_ptr = V + off_b * stride_v[0] + start_k * stride_v[1] + off_hk * stride_v[2]
    bias_ptr = Bias
    bias_rc = (0, 0)
    if HAS_BIAS:
        bias_ptr = Bias + off_b * stride_bias[0] + off_h * stride_bias[1]
        bias_rc = (stride_bias[2], stride_bias[3])
    slope = _alibi_slope(Slopes, off_b, off_h, stride_slopes, HAS_ALIBI)
    kpm_ptr = KPM
    if HAS_KPM:
        kpm_ptr = KPM + off_b * stride_kpm[0]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    split, hi = _causal_split(pid_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptr, v_ptr, bias_ptr, kpm_ptr,
        (stride_k[1], stride_k[3]), (stride_v[1], stride_v[3]), bias_rc, slope,
        offs_m, offs_d, 0, split, seqlen_q, seqlen_k, head_dim, qk_scale,
        BLOCK_N, EVEN_D, HAS_BIAS, BIAS_ROW, HAS_ALIBI, HAS_KPM, False, CAUSAL, INTERP_BF16, WIDE,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptr, v_ptr, bias_ptr, kpm_ptr,
        (stride_k[1], stride_k[3]), (stride_v[1], stride_v[3]), bias_rc, slope,
        offs_m, offs_d, split, hi, seqlen_q, seqlen_k, head_dim, qk_scale,
        BLOCK_N, EVEN_D, HAS_BIAS, BIAS_ROW, HAS_ALIBI, HAS_KPM, True, CAUSAL, INTERP_BF16, WIDE,
    )
    dq_ptrs = DQ + off_b * stride_dq[0] + start_q * stride_dq[1] + off_h * stride_dq[2] + _ptr_offset(rows, cols, (stride_dq[1], stride_dq[3]), WIDE)
    tl.store(dq_ptrs, _cast(dq * sm_scale, DQ.dtype.element_ty, INTERP_BF16), mask=(rows < seqlen_q) & (cols < head_dim))


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_bwd_dbias(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    Bias,
    DBias,
    Slopes,
    KPM,
    stride_q,
    stride_k,
    stride_v,
    stride_do,
    stride_stat,
    stride_bias,
    stride_dbias,
    stride_slopes,
    stride_kpm,
    kv_group,
    sum_batch,
    sum_heads,
    dbias_heads,
    seqlen_q,
    seqlen_k,
    head_dim,
    tune_bucket,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr,
    SUM_KEYS: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    WIDE: tl.constexpr,
    INTERP_DBIAS_BF16: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """Gradient of a bias with a row dimension: one program per [BLOCK_M, BLOCK_N] tile of
    dbias (per query block when the bias has no key dimension, ``SUM_KEYS``), summing dS over
    the batches (``sum_batch``) and heads (``sum_heads``) the bias broadcasts along, in
    registers and in a fixed order: no (batch, heads, seqlen_q, seqlen_k) buffer, no atomics.
    Recomputes dS (2 matmuls per tile and summed slice); writes dbias in its own dtype.
    ``EVEN_M`` / ``EVEN_N``: every query / key block is full, no bounds checks on them."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(2).to(tl.int64)
    first_b = pid_bh // dbias_heads  # 0 when summing over batch
    first_h = pid_bh % dbias_heads  # 0 when summing over heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs = _ptr_offset(offs_m[:, None], offs_d[None, :], (stride_q[1], stride_q[3]), WIDE)
    do_offs = _ptr_offset(offs_m[:, None], offs_d[None, :], (stride_do[1], stride_do[3]), WIDE)
    k_offs = _ptr_offset(offs_n0[:, None], offs_d[None, :], (stride_k[1], stride_k[3]), WIDE)
    v_offs = _ptr_offset(offs_n0[:, None], offs_d[None, :], (stride_v[1], stride_v[3]), WIDE)
    bias_ptrs = _bias_ptrs(Bias + first_b * stride_bias[0] + first_h * stride_bias[1], tl.minimum(offs_m, seqlen_q - 1), offs_n0,
                           (stride_bias[2], stride_bias[3]), HAS_BIAS, BIAS_ROW, False)

    _, hi = _causal_split(pid_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    if SUM_KEYS:
        lo = 0
    else:
        lo = tl.program_id(1) * BLOCK_N
        hi = tl.minimum(hi, lo + BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        bias = _load_bias(bias_ptrs, _shift(start_n, stride_bias[3]), offs_m, offs_n, seqlen_q, seqlen_k,
                          HAS_BIAS, BIAS_ROW, False, False, not EVEN_N)
        for r in range(0, sum_batch * sum_heads):
            off_b = first_b + r // sum_heads
            off_h = first_h + r % sum_heads
            off_hk = off_h // kv_group
            q = _load_tile(Q + off_b * stride_q[0] + off_h * stride_q[2] + q_offs,
                           offs_m[:, None], seqlen_q, offs_d[None, :], head_dim, not EVEN_M, not EVEN_D)
            do = _load_tile(DOut + off_b * stride_do[0] + off_h * stride_do[2] + do_offs,
                            offs_m[:, None], seqlen_q, offs_d[None, :], head_dim, not EVEN_M, not EVEN_D)
            k = _load_tile(K + off_b * stride_k[0] + off_hk * stride_k[2] + _shift(start_n, stride_k[1]) + k_offs,
                           offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, not EVEN_N, not EVEN_D)
            v = _load_tile(V + off_b * stride_v[0] + off_hk * stride_v[2] + _shift(start_n, stride_v[1]) + v_offs,
                           offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, not EVEN_N, not EVEN_D)
            lse, delta = _load_row_stats(Lse + off_b * stride_stat[0] + off_h * stride_stat[1],
                                         Delta + off_b * stride_stat[0] + off_h * stride_stat[1],
                                         offs_m, stride_stat[2], seqlen_q, not EVEN_M)
            slope = _alibi_slope(Slopes, off_b, off_h, stride_slopes, HAS_ALIBI)
            kpm_ptr = KPM
            if HAS_KPM:
                kpm_ptr = KPM + off_b * stride_kpm[0]
            acc += _dscore(
                q, k, v, do, bias, lse, delta, offs_m, offs_n, seqlen_q, seqlen_k, qk_scale, slope, kpm_ptr,
                HAS_BIAS, HAS_ALIBI, HAS_KPM, CAUSAL, not EVEN_N, INTERP_BF16,
            )

    dbias_ptr = DBias + first_b * stride_dbias[0] + first_h * stride_dbias[1]
    if SUM_KEYS:
        tl.store(dbias_ptr + offs_m * stride_dbias[2], _cast(tl.sum(acc, 1), DBias.dtype.element_ty, INTERP_DBIAS_BF16), mask=offs_m < seqlen_q)
    else:
        offs_n = tl.program_id(1) * BLOCK_N + offs_n0
        rows, cols = offs_m[:, None], offs_n[None, :]
        tl.store(dbias_ptr + _ptr_offset(rows, cols, (stride_dbias[2], stride_dbias[3]), WIDE),
                 _cast(acc, DBias.dtype.element_ty, INTERP_DBIAS_BF16), mask=(rows < seqlen_q) & (cols < seqlen_k))


# EVEN_M follows from the tile the autotuner picks, so it is set per launch, not a tuning key.
_launch_dkdv = Launcher(_attn_bwd_dkdv, BWD_DKDV_CONFIGS, BWD_KEY, prune_bwd_dkdv, heuristics={"EVEN_M": even_m})
_launch_dq = Launcher(_attn_bwd_dq, BWD_DQ_CONFIGS, FWD_KEY, prune_bwd_dq)
_launch_dbias = Launcher(_attn_bwd_dbias, BWD_DBIAS_CONFIGS, DBIAS_KEY, prune_bwd_dbias,
                         heuristics={"EVEN_M": even_m, "EVEN_N": even_n})


def attn_bwd(
    dout, q, k, v, out, lse, bias, alibi_slopes, key_padding_mask, causal, softmax_scale,
    dq=None, dk=None, dv=None, bias_grad=False, varlen=None,
):
    """Launch the backward kernels. Inputs as for ``attn_fwd``; ``dq``/``dk``/``dv`` may be
    given (e.g. views into a packed gradient). With ``bias_grad`` the bias gradient is
    returned in the shape and dtype of the rank-4 ``bias`` view (its size-1 dims summed over),
    else None. Returns (dq, dk, dv, dbias)."""
    pb = problem(q, k, varlen)
    batch, seqlen_q, seqlen_k, nheads, nheads_k = pb.batch, pb.seqlen_q, pb.seqlen_k, pb.nheads, pb.nheads_k
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    meta = launch_meta(pb, q, causal, bias, alibi_slopes, key_padding_mask, (q, k, v, out, dout, dq, dk, dv))
    varlen_args = pb.varlen_args()

    delta = torch.empty_like(lse)
    pre_block_m = 64
    _attn_bwd_preprocess[(triton.cdiv(seqlen_q, pre_block_m), batch * nheads)](
        Out=out,
        DOut=dout,
        Delta=delta,
        CuSeqQ=varlen_args["CuSeqQ"],
        stride_o=pb.strides(out),
        stride_do=pb.strides(dout),
        stride_delta=pb.strides(delta),
        nheads=nheads,
        seqlen_q=seqlen_q,
        head_dim=pb.head_dim,
        BLOCK_M=pre_block_m,
        BLOCK_D=meta.constexprs["BLOCK_D"],
        IS_VARLEN=varlen_args["IS_VARLEN"],
        WIDE=meta.constexprs["WIDE"],
    )

    bias_grad = bias is not None and bias_grad
    # By shape, not stride: an expanded view (stride 0, size seqlen_q) needs a gradient per row.
    row_grad = bias_grad and bias.shape[2] > 1
    # A bias without a row dimension gets per-(batch, head) key sums from the dK/dV pass.
    dbias_cols = None
    if bias_grad and not row_grad:
        dbias_cols = torch.empty((batch, nheads, 1, seqlen_k), device=q.device, dtype=torch.float32)
    common = dict(
        Q=q,
        K=k,
        V=v,
        DOut=dout,
        Lse=lse,
        Delta=delta,
        Bias=meta.bias,
        Slopes=meta.slopes,
        KPM=meta.kpm,
        stride_q=pb.strides(q),
        stride_k=pb.strides(k),
        stride_v=pb.strides(v),
        stride_do=pb.strides(dout),
        stride_stat=pb.strides(lse),
        stride_bias=meta.stride_bias,
        stride_slopes=meta.stride_slopes,
        stride_kpm=meta.stride_kpm,
        kv_group=nheads // nheads_k,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=pb.head_dim,
        tune_bucket=seq_bucket(seqlen_q, seqlen_k),
        qk_scale=softmax_scale * 1.4426950408889634,
        **meta.constexprs,
    )

    def grid_dkdv(m):
        return (triton.cdiv(seqlen_k, m["BLOCK_N"]), batch * nheads_k)

    def grid_dq(m):
        return (triton.cdiv(seqlen_q, m["BLOCK_M"]), batch * nheads)

    _launch_dkdv(
        grid_dkdv, DK=dk, DV=dv, DBias=dbias_cols, stride_dk=pb.strides(dk), stride_dv=pb.strides(dv),
        stride_dbias=dbias_cols.stride() if dbias_cols is not None else (0, 0, 0, 0), batch=batch, nheads_k=nheads_k,
        sm_scale=softmax_scale, DBIAS_COLS=dbias_cols is not None, **common, **varlen_args,
    )
    _launch_dq(grid_dq, DQ=dq, stride_dq=pb.strides(dq), batch=batch, nheads=nheads, sm_scale=softmax_scale, **common, **varlen_args)

    dbias = None
    if dbias_cols is not None:
        dbias = dbias_cols.sum_to_size(bias.shape).to(bias.dtype)
    elif row_grad:
        dbias = torch.empty(bias.shape, device=q.device, dtype=bias.dtype)
        sum_batch = batch if bias.shape[0] == 1 else 1
        sum_heads = nheads if bias.shape[1] == 1 else 1
        sum_keys = bias.shape[3] == 1

        def grid_dbias(m):
            n_blocks = 1 if sum_keys else triton.cdiv(seqlen_k, m["BLOCK_N"])
            return (triton.cdiv(seqlen_q, m["BLOCK_M"]), n_blocks, bias.shape[0] * bias.shape[1])

        _launch_dbias(
            grid_dbias, DBias=dbias, stride_dbias=dbias.stride(), sum_batch=sum_batch, sum_heads=sum_heads,
            dbias_heads=bias.shape[1], SUM_KEYS=sum_keys,
            INTERP_DBIAS_BF16=INTERPRET and bias.dtype == torch.bfloat16, **common,
        )
    return dq, dk, dv, dbias
