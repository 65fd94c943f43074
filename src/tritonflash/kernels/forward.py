"""Forward pass: one program per (query block, batch*head), one sweep over key blocks with
an online softmax; stores the output and the log-sum-exp (natural log) per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LN2,
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
    _score,
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
from .configs import FWD_CONFIGS, FWD_KEY, INTERPRET, Launcher, env_mode, gluon_module, prune_fwd, seq_bucket


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, kv, ctx, offs_m, offs_d, lo, hi, seqlen_q, seqlen_k, head_dim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, VAR: tl.constexpr):
    """Online-softmax step over key blocks [lo, hi) (``kv``: the K and V ``_slice``s).
    ``MASK`` selects the variant for the masked ranges of ``_key_range``."""
    k_slc, v_slc = kv
    offs_n0 = tl.arange(0, BLOCK_N)
    # Rows past seqlen_q read row seqlen_q - 1 (never stored): no row mask on bias loads.
    # Triton's pipeliner streams the bias tile through shared memory (cp.async, num_stages
    # deep) and reads it back in the MMA layout: no hand prefetch (which kept it in registers
    # and made ptxas serialise wgmma; docs/perf-notes.md, change 6).
    bias_ptrs = _bias_ptrs(ctx, tl.minimum(offs_m, seqlen_q - 1), offs_n0, TRANS=False, VAR=VAR)
    # Masked ranges are not software-pipelined: their operand fix-ups (below) in a pipelined
    # loop made ptxas serialise wgmma (C7515); they are one or two blocks per program.
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASK else None):
        offs_n = start_n + offs_n0
        bias = _load_bias(bias_ptrs, _shift(start_n, ctx.stride_bias_n), offs_m, offs_n, seqlen_q, seqlen_k,
                          TRANS=False, MASK_ROWS=False, MASK_COLS=MASK, VAR=VAR)
        k = _load_rows(k_slc, offs_n, seqlen_k, offs_d, head_dim, MASK_ROWS=MASK, VAR=VAR)  # [BLOCK_N, BLOCK_D]
        qk = _dot(q, tl.trans(k), None, VAR)  # [BLOCK_M, BLOCK_N]
        rows, cols = offs_m[:, None], offs_n[None, :]
        vis = _visible(rows, cols, seqlen_q, seqlen_k, _key_keep(ctx, cols, seqlen_k, VAR), ctx, MASK=MASK, VAR=VAR)
        s = _score(qk, bias, rows, cols, seqlen_q, seqlen_k, vis, ctx, MASK=MASK, VAR=VAR)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - m) at 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_safe)
        v = _load_keys(v_slc, offs_n, seqlen_k, offs_d, head_dim, ctx, MASK=MASK, VAR=VAR)
        if MASK:
            # An invisible key has P = 0, but 0 * inf = NaN inside the matmul: zero the
            # non-finite values and poison only the rows that see them.
            v, bad = _finite_rows(v)
            p = tl.where(bad[None, :] & vis, float("nan"), p)
        # The normaliser sums P before dropout; the values get the kept entries (the
        # 1 / (1 - dropout_p) scale is applied once, at the end).
        l_i = l_i * alpha + tl.sum(p, 1)
        w = p
        if VAR.DROPOUT:
            w = tl.where(_dropout_keep(ctx, offs_m, start_n, BLOCK_M, BLOCK_N, TRANS=False, VAR=VAR), p, 0.0)
        acc = acc * alpha[:, None]
        acc = _dot(_cast(w, v.dtype, VAR.INTERP_BF16), v, acc, VAR)  # [BLOCK_M, BLOCK_D]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "tune_bucket"])
def _attn_fwd(
    Q, K, V, Out, Lse, CuSeqQ, CuSeqK,  # tensors (cu_seqlens: None unless VAR.IS_VARLEN)
    score,  # ScoreArgs
    stride_q, stride_k, stride_v, stride_out, stride_lse,
    batch, nheads, kv_group, seqlen_q, seqlen_k, head_dim, tune_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VAR: tl.constexpr,
):
    """Strides are tuples: q/k/v/o (batch, seq, head, dim), lse (batch, head, row); ``score``
    is a ``ScoreArgs``, ``VAR`` a ``Variant``. Variable-length batches (``VAR.IS_VARLEN``)
    stack their sequences along the row dim with batch stride 0; ``seqlen_q``/``seqlen_k``
    are then the maxima and ``CuSeqQ``/``CuSeqK`` the cumulative lengths."""
    tl.static_assert(VAR.BLOCK_D >= 16)
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    sp = _span(tl.cdiv(seqlen_q, BLOCK_M), batch, nheads, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, REVERSE=VAR.CAUSAL, VAR=VAR)
    start_m = sp.block * BLOCK_M
    if VAR.IS_VARLEN:
        if start_m >= sp.seqlen_q:
            return
    off_hk = sp.off_h // kv_group
    ctx = _score_ctx(score, sp.off_b, sp.off_h, VAR)
    kv = (_slice(K, stride_k, sp.off_b, sp.start_k, off_hk), _slice(V, stride_v, sp.off_b, sp.start_k, off_hk))
    offs_m = start_m + tl.arange(0, BLOCK_M)
    BLOCK_D: tl.constexpr = VAR.BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(_slice(Q, stride_q, sp.off_b, sp.start_q, sp.off_h), offs_m, sp.seqlen_q, offs_d, head_dim, MASK_ROWS=True, VAR=VAR)

    # A sink is one more logit of every row, without a value: the running max and sum start
    # from it (ctx.sink = -inf without sinks, or for a -inf sink: no term).
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + ctx.sink
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.where(ctx.sink == float("-inf"), 0.0, 1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, sp.seqlen_q, sp.seqlen_k, ctx, BLOCK_M, BLOCK_N, VAR=VAR)
    if VAR.MASK_BOTH_EDGES:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, kv, ctx, offs_m, offs_d, lo, full_lo, sp.seqlen_q, sp.seqlen_k,
                                        head_dim, BLOCK_M, BLOCK_N, MASK=True, VAR=VAR)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, kv, ctx, offs_m, offs_d, full_lo, full_hi, sp.seqlen_q, sp.seqlen_k,
                                    head_dim, BLOCK_M, BLOCK_N, MASK=False, VAR=VAR)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, kv, ctx, offs_m, offs_d, full_hi, hi, sp.seqlen_q, sp.seqlen_k,
                                    head_dim, BLOCK_M, BLOCK_N, MASK=True, VAR=VAR)

    # Rows that saw no key (l == 0) get output 0 and lse -inf (docs/semantics.md), never NaN;
    # with a sink they get output 0 and lse = the sink.
    dead = l_i == 0.0
    norm = tl.where(dead, 1.0, l_i)
    if VAR.DROPOUT:
        norm = norm / ctx.dropout_scale
    acc = acc / norm[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(tl.where(dead, 1.0, l_i))) * LN2)
    _store_rows(_slice(Out, stride_out, sp.off_b, sp.start_q, sp.off_h), acc, offs_m, sp.seqlen_q, offs_d, head_dim, VAR)
    tl.store(_stat_ptr(Lse, stride_lse, sp.off_b, sp.off_h, sp.start_q) + offs_m * stride_lse[2], lse, mask=offs_m < sp.seqlen_q)


_launch_fwd = Launcher(_attn_fwd, FWD_CONFIGS, FWD_KEY, prune_fwd)


HOPPER_ENV = "TRITONFLASH_HOPPER_FWD"


def _hopper_module(head_dim: int):
    """kernels/hopper.py if it may take a call of this head dim, else None. ``TRITONFLASH_HOPPER_FWD``
    (read per call, so it is fixed inside a captured CUDA graph or a compiled graph): unset,
    empty or ``auto``, the default: head dims in ``hopper.DEFAULT_HEAD_DIMS`` (where it measured
    faster than the tl kernel, docs/perf-notes.md); ``1``: every head dim it covers; ``0``:
    never (case and surrounding spaces ignored; anything else is a ValueError). Never under the
    interpreter, None where Gluon cannot be imported. Imported on first use, so that
    ``import tritonflash`` does not need Gluon."""
    mode = env_mode(HOPPER_ENV, ("0", "1", "auto"), "auto")
    hopper = gluon_module("hopper", mode != "0" and not INTERPRET)
    if hopper is not None and mode == "auto" and head_dim not in hopper.DEFAULT_HEAD_DIMS:
        return None
    return hopper


def attn_fwd(q, k, v, bias, alibi_slopes, key_padding_mask, causal, softmax_scale, out=None, varlen=None, features=NO_FEATURES):
    """Launch the forward kernel. Inputs are already validated and normalised by the caller:
    q (b, sq, h, d), k/v (b, sk, h_k, d) — or, with ``varlen`` (a ``Varlen``), q (total_q, h, d)
    and k/v (total_k, h_k, d) — bias a rank-4 view broadcastable to (b, h, sq, sk) (or None),
    alibi_slopes (b or 1, h) fp32 (or None), key_padding_mask (b, sk) uint8 (or None),
    ``features`` a ``common.Features`` (window, softcap, sinks, dropout, boolean mask).
    Returns (out, lse); lse is (b, h, sq), or (h, total_q) for varlen.

    On sm_90 the calls that ``hopper.hopper_supports`` accepts, of a head dim ``_hopper_module``
    lets through, run the Gluon kernel of kernels/hopper.py instead (same contract)."""
    hopper = _hopper_module(q.shape[-1])
    if hopper is not None and hopper.hopper_supports(q, k, v, out, bias, alibi_slopes, key_padding_mask, causal, softmax_scale,
                                                     varlen, features):
        return hopper.hopper_fwd(q, k, v, alibi_slopes, causal, softmax_scale, out=out, key_padding_mask=key_padding_mask,
                                 bias=bias)
    pb = problem(q, k, varlen)
    if out is None:
        out = torch.empty_like(q)
    lse, stride_lse = pb.lse_empty(q.device)
    meta = launch_meta(pb, q, causal, bias, alibi_slopes, key_padding_mask, softmax_scale, (q, k, v, out), features)

    def grid(m):
        return (triton.cdiv(pb.seqlen_q, m["BLOCK_M"]) * pb.batch * pb.nheads,)

    _launch_fwd(
        grid,
        **pb.operands(Q=q, K=k, V=v, Out=out),
        Lse=lse,
        **pb.varlen_args(),
        score=meta.score,
        stride_lse=stride_lse,
        nheads=pb.nheads,
        **pb.sizes(),
        tune_bucket=seq_bucket(pb.seqlen_q, pb.seqlen_k),
        VAR=meta.variant,
    )
    return out, lse
