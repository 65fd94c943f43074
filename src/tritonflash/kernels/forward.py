"""Forward pass: one program per (query block, batch*head), one sweep over key blocks with
an online softmax; stores the output and the log-sum-exp (natural log) per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LN2,
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
from .configs import FWD_CONFIGS, FWD_KEY, Launcher, prune_fwd, seq_bucket


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
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
    """Online-softmax step over key blocks [lo, hi). ``MASK`` selects the diagonal / tail
    variant that applies the causal and key-bound masks; the off-band blocks skip them."""
    offs_n0 = tl.arange(0, BLOCK_N)
    # Rows past seqlen_q read row seqlen_q - 1 (never stored): no row mask on bias loads.
    bias_ptrs = _bias_ptrs(bias_ptr, tl.minimum(offs_m, seqlen_q - 1), offs_n0, stride_bias, HAS_BIAS, BIAS_ROW, False)
    # Triton's pipeliner streams the bias tile through shared memory (cp.async, num_stages
    # deep) and reads it back in the MMA layout: no hand prefetch (which kept it in registers
    # and made ptxas serialise wgmma; docs/perf-notes.md, change 6).
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        bias = _load_bias(bias_ptrs, _shift(start_n, stride_bias[1]), offs_m, offs_n, seqlen_q, seqlen_k,
                          HAS_BIAS, BIAS_ROW, False, False, MASK)
        k = _load_tile(
            k_ptr + _ptr_offset(offs_n[:, None], offs_d[None, :], stride_k, WIDE),
            offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, MASK, not EVEN_D,
        )  # [BLOCK_N, BLOCK_D]
        qk = _dot(q, tl.trans(k), None, INTERP_BF16)  # [BLOCK_M, BLOCK_N]
        s = _score(
            qk, bias, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, qk_scale, slope, kpm_ptr,
            HAS_BIAS, HAS_ALIBI, HAS_KPM, MASK and CAUSAL, MASK,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - m) at 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(
            v_ptr + _ptr_offset(offs_n[:, None], offs_d[None, :], stride_v, WIDE),
            offs_n[:, None], seqlen_k, offs_d[None, :], head_dim, MASK, not EVEN_D,
        )  # [BLOCK_N, BLOCK_D]
        acc = _dot(_cast(p, v.dtype, INTERP_BF16), v, acc, INTERP_BF16)  # [BLOCK_M, BLOCK_D]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    Bias,
    Slopes,
    KPM,
    CuSeqQ,
    CuSeqK,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_lse,
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
    """Strides are tuples: q/k/v/o (batch, seq, head, dim), lse (batch, head, row),
    bias (batch, head, row, col) with 0 on broadcast dims, slopes (batch, head), kpm (batch, col).
    Variable-length batches (``IS_VARLEN``) stack their sequences along the row dim with batch
    stride 0; ``seqlen_q``/``seqlen_k`` are then the maxima and ``CuSeqQ``/``CuSeqK`` the
    cumulative lengths."""
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Later query blocks see more keys: start them first so the tail of the grid is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_b, off_h = _batch_head(tl.program_id(1), batch, nheads, BIAS_ROW)
    off_hk = off_h // kv_group
    start_q, seqlen_q = _seq_span(CuSeqQ, off_b, seqlen_q, IS_VARLEN)
    start_k, seqlen_k = _seq_span(CuSeqK, off_b, seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if pid_m * BLOCK_M >= seqlen_q:
            return

    q_ptr = Q + off_b * stride_q[0] + start_q * stride_q[1] + off_h * stride_q[2]
    k_ptr = K + off_b * stride_k[0] + start_k * stride_k[1] + off_hk * stride_k[2]
    v_ptr = V + off_b * stride_v[0] + start_k * stride_v[1] + off_hk * stride_v[2]
    q_rows = (stride_q[1], stride_q[3])
    k_rows = (stride_k[1], stride_k[3])
    v_rows = (stride_v[1], stride_v[3])
    bias_ptr = Bias
    bias_rc = (0, 0)
    if HAS_BIAS:
        bias_ptr = Bias + off_b * stride_bias[0] + off_h * stride_bias[1]
        bias_rc = (stride_bias[2], stride_bias[3])
    slope = _alibi_slope(Slopes, off_b, off_h, stride_slopes, HAS_ALIBI)
    kpm_ptr = KPM
    if HAS_KPM:
        kpm_ptr = KPM + off_b * stride_kpm[0]

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(
        q_ptr + _ptr_offset(offs_m[:, None], offs_d[None, :], q_rows, WIDE),
        offs_m[:, None], seqlen_q, offs_d[None, :], head_dim, True, not EVEN_D,
    )  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    split, hi = _causal_split(pid_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptr, v_ptr, bias_ptr, kpm_ptr, k_rows, v_rows, bias_rc, slope,
        offs_m, offs_d, 0, split, seqlen_q, seqlen_k, head_dim, qk_scale,
        BLOCK_N, EVEN_D, HAS_BIAS, BIAS_ROW, HAS_ALIBI, HAS_KPM, False, CAUSAL, INTERP_BF16, WIDE,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptr, v_ptr, bias_ptr, kpm_ptr, k_rows, v_rows, bias_rc, slope,
        offs_m, offs_d, split, hi, seqlen_q, seqlen_k, head_dim, qk_scale,
        BLOCK_N, EVEN_D, HAS_BIAS, BIAS_ROW, HAS_ALIBI, HAS_KPM, True, CAUSAL, INTERP_BF16, WIDE,
    )

    # Rows that saw no key (l == 0) get output 0 and lse -inf (DESIGN.md), never NaN.
    dead = l_i == 0.0
    acc = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(tl.where(dead, 1.0, l_i))) * LN2)
    rows, cols = offs_m[:, None], offs_d[None, :]
    o_ptrs = Out + off_b * stride_o[0] + start_q * stride_o[1] + off_h * stride_o[2] + _ptr_offset(rows, cols, (stride_o[1], stride_o[3]), WIDE)
    tl.store(o_ptrs, _cast(acc, Out.dtype.element_ty, INTERP_BF16), mask=(rows < seqlen_q) & (cols < head_dim))
    lse_ptr = Lse + off_b * stride_lse[0] + off_h * stride_lse[1] + start_q * stride_lse[2]
    tl.store(lse_ptr + offs_m * stride_lse[2], lse, mask=offs_m < seqlen_q)


_launch_fwd = Launcher(_attn_fwd, FWD_CONFIGS, FWD_KEY, prune_fwd)


def attn_fwd(q, k, v, bias, alibi_slopes, key_padding_mask, causal, softmax_scale, out=None, varlen=None):
    """Launch the forward kernel. Inputs are already validated and normalised by the caller:
    q (b, sq, h, d), k/v (b, sk, h_k, d) — or, with ``varlen`` (a ``Varlen``), q (total_q, h, d)
    and k/v (total_k, h_k, d) — bias a rank-4 view broadcastable to (b, h, sq, sk) (or None),
    alibi_slopes (b or 1, h) fp32 (or None), key_padding_mask (b, sk) uint8 (or None).
    Returns (out, lse); lse is (b, h, sq), or (h, total_q) for varlen."""
    pb = problem(q, k, varlen)
    if out is None:
        out = torch.empty_like(q)
    lse, stride_lse = pb.lse_empty(q.device)
    meta = launch_meta(pb, q, causal, bias, alibi_slopes, key_padding_mask, (q, k, v, out))

    def grid(m):
        return (triton.cdiv(pb.seqlen_q, m["BLOCK_M"]), pb.batch * pb.nheads)

    _launch_fwd(
        grid,
        Q=q,
        K=k,
        V=v,
        Out=out,
        Lse=lse,
        Bias=meta.bias,
        Slopes=meta.slopes,
        KPM=meta.kpm,
        stride_q=pb.strides(q),
        stride_k=pb.strides(k),
        stride_v=pb.strides(v),
        stride_o=pb.strides(out),
        stride_lse=stride_lse,
        stride_bias=meta.stride_bias,
        stride_slopes=meta.stride_slopes,
        stride_kpm=meta.stride_kpm,
        batch=pb.batch,
        nheads=pb.nheads,
        kv_group=pb.nheads // pb.nheads_k,
        seqlen_q=pb.seqlen_q,
        seqlen_k=pb.seqlen_k,
        head_dim=pb.head_dim,
        tune_bucket=seq_bucket(pb.seqlen_q, pb.seqlen_k),
        qk_scale=softmax_scale * 1.4426950408889634,
        **pb.varlen_args(),
        **meta.constexprs,
    )
    return out, lse
